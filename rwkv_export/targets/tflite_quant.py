"""The TFLite target's quantized variants (fp16, int8, int4), derived from the fp32 file, file in -> file out, weight
by weight: the files ai-edge-quantizer writes for the target's recipes (tflite._recipe spells them out for it), made
here without it.

Why not ai-edge-quantizer itself: at 169M shapes it took 15 s (94 s on a loaded machine) for the three variants and
raised the export's peak RSS to 1.68 GB (issue 19: <= 60 s and 1.5 GB for the whole export): it unpacks the whole
model into Python objects, quantizes every tensor in memory, serializes the result with its weights at offsets, and
tflite_write.inline_file then rewrote that file once more to put them inside the flatbuffer. Here the fp32 file's
graph is read (memory-mapped; the weights are read one piece at a time with ordinary reads, so their pages never
count against this process), each weight's quantization parameters are computed in a first pass over it, and
tflite_write.write_tflite streams every weight, quantized as it is written, into its place in the output's
flatbuffer: in memory at a time, the graph and one piece of one weight.

What each variant is, as ai-edge-quantizer 0.10 makes it for our graphs (tests/test_tflite_quant.py holds our files
against its, tensor by tensor and byte for byte). The weights quantized are the constant float32 input 1 of every
FULLY_CONNECTED ([out, in]) and EMBEDDING_LOOKUP ([rows, dim]), and for int8 also every constant float32 operand of
a BATCH_MATMUL; every other tensor, op and buffer is kept as it is.
- fp16: the weight cast to float16 (numpy's round to nearest even), and a DEQUANTIZE op (its output `<name>_dequant`,
  float32, rank unset) inserted just before the op, which reads that output instead.
- int8: symmetric, one scale per tensor: scale = max|w| / 127 (float32, at least 1e-9 / 127), q = rint(w / scale)
  (half to even) clipped to [-127, 127] (narrow range); zero point 0, quantized_dimension 0.

One departure from ai-edge-quantizer, on purpose: its int8 also quantizes a constant LEFT operand of a BATCH_MATMUL
(the RWKV-5.2 / 6 prompt graphs' 0/1 scatter and block-sum matrices, wkv_consts.*), and LiteRT's BATCH_MATMUL kernel
takes float32 x int8 (hybrid: the int8 operand on the right) or two operands of one type, nothing else: such a file
fails at its first invoke ("BATCH_MATMUL failed to prepare"). Here a constant left operand stays float32 (a
constant right operand, RWKV-6's [5, 32, C] token-shift LoRA, is quantized as the oracle does); every other tensor
and byte is the oracle's (tests/test_tflite_quant.py holds both).
- int4: symmetric, blocks of 32 along the input dim (dim 1): scale = max|w| of the block / 7, rounded to bfloat16 then
  to float16 (the format of the scales); q = rint(w / scale) clipped to [-8, 7], packed two a byte (the even element
  in the low nibble); the scales a float16 constant `<name>_scales` [out, in / 32] (buffers of equal bytes shared),
  BlockwiseQuantization(scales, zero points -1, block 32), quantized_dimension 0. A weight whose input dim is no
  multiple of 32 (a narrow LoRA factor: tflite.unblockable_scopes) is int8 with one scale per output channel instead.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import RwkvExportError

VARIANTS = ("fp16", "int8", "int4")
INT4_BLOCK = 32
_WEIGHT_OPS = {"FULLY_CONNECTED", "EMBEDDING_LOOKUP"}  # weight = input 1; blocks along dim 1 of it
# int8 (dynamic range, ALL_SUPPORTED) also quantizes a constant float operand of a BATCH_MATMUL: the right one only
# (input _HYBRID_RHS; RWKV-6's [5, 32, C] token-shift LoRA), the one LiteRT's hybrid kernel takes in int8; a constant
# left one (the prompt graphs' scatter and block-sum matrices) stays float32, where ai-edge-quantizer quantizes it
# into a file LiteRT refuses (the module docstring). fp16's float casting and int4's blockwise recipe leave both
# float32.
_INT8_RHS_OPS = {"BATCH_MATMUL"}
_HYBRID_RHS = 1
# ops whose constant float inputs ai-edge-quantizer would also quantize, which our writer never gives a constant:
# met with one, we stop rather than differ from it
_UNHANDLED_WEIGHT_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "CONV_3D"}
_MIN_SCALE_BOUND = np.float32(1e-9)  # ai-edge-quantizer's floor on max|w| (no zero scale)
_SMALL = 1 << 16  # unchanged buffers up to this size are copied into memory; larger ones stream from the file


class TFLiteQuantizeError(RwkvExportError):
    """A file cannot be quantized as asked (not a TFLite file, unknown variant, a weight layout not handled)."""


# -- reading the fp32 file ----------------------------------------------------------------------------------------
class _Source:
    """Where a weight's float32 bytes lie in the source file; read in row blocks with ordinary reads."""

    def __init__(self, path: Path, offset: int, shape, name: str):
        self.path, self.offset, self.shape, self.name = path, offset, tuple(int(d) for d in shape), name

    def row_blocks(self, f, max_bytes: int):
        """(first row, rows [r, *shape[1:]] float32) in blocks of about max_bytes."""
        rows, row_elems = self.shape[0], int(np.prod(self.shape[1:], dtype=np.int64))
        step = max(1, max_bytes // max(1, row_elems * 4))
        for r in range(0, rows, step):
            n = min(step, rows - r)
            f.seek(self.offset + r * row_elems * 4)
            a = np.fromfile(f, dtype=np.float32, count=n * row_elems)
            if a.size != n * row_elems:
                raise TFLiteQuantizeError(f"{self.path.name} ends inside weight {self.name}")
            yield r, a.reshape((n, *self.shape[1:]))


def op_names(schema) -> dict[int, str]:
    """Builtin operator code -> its name (FULLY_CONNECTED, ...), from ai-edge-litert's schema module."""
    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def buffer_span(root, i: int) -> tuple[int, int]:
    """(file offset, bytes) of buffer i's data in a model's flatbuffer (`root`, schema.Model read in place), inside
    the flatbuffer or (the > 2 GB layout) after it; read without a view of the bytes."""
    b = root.Buffers(i)
    if b.Offset() > 1:
        return int(b.Offset()), int(b.Size())
    o = b._tab.Offset(4)  # the `data` vector's field
    if not o:
        return 0, 0
    return int(b._tab.Vector(o)), int(b._tab.VectorLen(o))


def _read_model(data, path: Path):
    """(ModelT, [(offset, size)] per buffer) of the TFLite flatbuffer `data` (a mapped file)."""
    from ai_edge_litert import schema_py_generated as schema

    if len(data) < 8 or bytes(data[4:8]) != b"TFL3":
        raise TFLiteQuantizeError(f"{path.name} is not a TFLite file (no TFL3 identifier)")
    try:
        root = schema.Model.GetRootAs(data, 0)
        spans = [buffer_span(root, i) for i in range(root.BuffersLength())]
        model = schema.ModelT.InitFromObj(root)
    except Exception as e:  # a damaged flatbuffer fails anywhere inside the generated readers
        raise TFLiteQuantizeError(f"{path.name} is not a readable TFLite file ({type(e).__name__}: {e})") from None
    if any(off + n > len(data) for off, n in spans):
        raise TFLiteQuantizeError(f"{path.name} is truncated (a weight lies past its end)")
    return model, spans


# -- the quantized bytes ------------------------------------------------------------------------------------------
def _bf16_then_fp16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest even) -> float16, as ai-edge-quantizer rounds blockwise scales
    (ml_dtypes' casts; the values are positive and finite)."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    bits = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(np.float16)


def _bound(block: np.ndarray, axis) -> np.ndarray:
    """max(|min|, |max|) over `axis` (kept), floored: the symmetric range ai-edge-quantizer's scales come from."""
    b = np.maximum(np.abs(np.min(block, axis=axis, keepdims=True)), np.abs(np.max(block, axis=axis, keepdims=True)))
    return np.maximum(b, _MIN_SCALE_BOUND)


class _Quantized:
    """One weight's quantized bytes, made as the output is written (tflite_write._Weight streams them): `kind` is
    fp16, int8 (scale per tensor), int8c (per output channel) or int4 (blocks of INT4_BLOCK along dim 1)."""

    def __init__(self, src: _Source, kind: str, scale: np.ndarray | None = None):
        self.src, self.kind, self.scale, self.name = src, kind, scale, src.name
        n = int(np.prod(src.shape, dtype=np.int64))
        self.nbytes = {"fp16": 2 * n, "int8": n, "int8c": n, "int4": (n + 1) // 2}[kind]

    def write_to(self, f) -> None:
        from .tflite_write import STREAM_BYTES

        written = 0
        with open(self.src.path, "rb") as src:
            for r, w in self.src.row_blocks(src, STREAM_BYTES):
                out = self._encode(r, w)
                f.write(out.data)
                written += out.nbytes
        if written != self.nbytes:
            raise TFLiteQuantizeError(f"weight {self.name}: {written} quantized bytes, {self.nbytes} expected")

    def _encode(self, r: int, w: np.ndarray) -> np.ndarray:
        if self.kind == "fp16":
            return w.astype(np.float16).reshape(-1).view(np.uint8)
        if self.kind == "int8":
            q = np.divide(w, self.scale.reshape((1,) * w.ndim), out=w)
        elif self.kind == "int8c":
            q = np.divide(w, self.scale[r:r + len(w)].reshape((-1,) + (1,) * (w.ndim - 1)), out=w)
        else:  # int4: [rows, in] as [rows, in / block, block], each block by its scale
            blocks = w.reshape(len(w), -1, INT4_BLOCK)
            q = np.divide(blocks, self.scale[r:r + len(w), :, None], out=blocks)
        np.rint(q, out=q)
        if self.kind == "int4":
            np.clip(q, -8, 7, out=q)
            q = q.astype(np.int8).reshape(-1).view(np.uint8)
            lo, hi = q[0::2] & np.uint8(0x0F), q[1::2]
            if hi.size < lo.size:
                hi = np.append(hi, np.uint8(0))
            return (hi << np.uint8(4)) | lo
        np.clip(q, -127, 127, out=q)
        return q.astype(np.int8).reshape(-1).view(np.uint8)


def _scales(src: _Source, kind: str) -> np.ndarray:
    """The first pass over a weight: its float32 scale(s) (int8: [1]; int8c: [rows]; int4: [rows, in / block], the
    rounding to float16's grid done)."""
    from .tflite_write import STREAM_BYTES

    parts = []
    with open(src.path, "rb") as f:
        for _, w in src.row_blocks(f, STREAM_BYTES):
            if kind == "int8":
                parts.append(_bound(w, None).reshape(1))
            elif kind == "int8c":
                parts.append(_bound(w, tuple(range(1, w.ndim))).reshape(-1))
            else:
                # max|w| (= max(|min|, |max|)) per block: a reduction over 32 values at a time is twice as slow
                # as the same over |w|
                b = np.abs(w, out=w).reshape(len(w), -1, INT4_BLOCK).max(axis=2)
                parts.append(np.maximum(b, _MIN_SCALE_BOUND))
    b = np.concatenate(parts)
    if kind == "int8":
        return (np.max(b, keepdims=True) / np.float32(127)).astype(np.float32)
    if kind == "int8c":
        return (b / np.float32(127)).astype(np.float32)
    return _bf16_then_fp16((b / np.float32(7)).astype(np.float32)).astype(np.float32)


# -- the graph ----------------------------------------------------------------------------------------------------
def _plan(model, schema, variant: str) -> list[tuple[int, int, str]]:
    """(op index, weight tensor index, op name) of every weight to quantize, once each, in op order (the first op
    that reads it); errors for what our writer never makes and ai-edge-quantizer might treat otherwise."""
    names = op_names(schema)
    if len(model.subgraphs) != 1:
        raise TFLiteQuantizeError(f"the TFLite quantizer reads files of one subgraph (this one has "
                                  f"{len(model.subgraphs)})")
    sg = model.subgraphs[0]

    def constant_float(i):
        if i < 0:
            return False
        t = sg.tensors[i]
        b = model.buffers[t.buffer]
        has = (b.data is not None and len(b.data)) or b.offset > 1
        return bool(has) and t.type == schema.TensorType.FLOAT32

    readers: dict[int, list[tuple[int, str, int]]] = {}
    for j, op in enumerate(sg.operators):
        name = names.get(model.operatorCodes[op.opcodeIndex].builtinCode)
        for k, i in enumerate(op.inputs if op.inputs is not None else []):
            if i >= 0:
                readers.setdefault(int(i), []).append((j, name, k))
        if name in _UNHANDLED_WEIGHT_OPS and any(constant_float(int(i)) for i in op.inputs):
            raise TFLiteQuantizeError(f"{name} (op {j}) has a constant float input: not quantized here")

    def is_weight(name, k):  # what each recipe quantizes (ai-edge-quantizer's default_policy, our graphs' ops)
        return (name in _WEIGHT_OPS and k == 1) or (variant == "int8" and name in _INT8_RHS_OPS and k == _HYBRID_RHS)

    plan = []
    for i, uses in readers.items():
        if not constant_float(i) or not any(is_weight(n, k) for _, n, k in uses):
            continue
        if any(n in _INT8_RHS_OPS and k != _HYBRID_RHS for _, n, k in uses):
            continue  # also a left operand of a BATCH_MATMUL: float32 for every reader (no int8 left operand runs)
        t = sg.tensors[i]
        kinds = {(n, k) for _, n, k in uses}
        if len(uses) > 1 and (variant == "fp16" or len(kinds) > 1 or not all(is_weight(n, k) for n, k in kinds)):
            raise TFLiteQuantizeError(f"weight {t.name.decode()} is read by {len(uses)} ops "
                                      f"({', '.join(sorted(f'{n}[{k}]' for n, k in kinds))}): not quantized here")
        j, name, _ = uses[0]
        if name in _WEIGHT_OPS and len(t.shape) != 2:
            raise TFLiteQuantizeError(f"weight {t.name.decode()} of {name} has rank {len(t.shape)}; 2-D only")
        plan.append((j, i, name))
    return sorted(plan)


class Reuse:
    """Weights quantized once for the fp32 files of one model: the step and prompt files hold the same weights (the
    prompt file's FULLY_CONNECTED weights and embedding are the step file's arrays), so quantize_file(..., reuse=)
    of the second file takes a weight's scales from the first file's output of the same variant and copies its
    quantized bytes from there (tflite_write.FileRange), instead of reading, reducing and encoding it again.

    A weight is matched by what proves it the same, never by position: a weight of an earlier output with the same
    name and shape whose float32 bytes in its fp32 file are those of this one, compared byte for byte (once per pair
    of weights, whichever variants ask: one read of both, ~0.35 s for the 0.68 GB of a 169M file pair, against the
    scales pass and encoding of every variant). What does not match is quantized as without reuse; either way the
    output is the same bytes (the same float32 bytes, recipe and shape give the same scales and quantized bytes)."""

    def __init__(self):
        self._made: dict[str, dict[tuple, list[dict]]] = {}  # variant -> (name, shape) -> weights written
        self._same: dict[tuple, bool] = {}  # ((file, offset), (file, offset), bytes) -> equal

    def find(self, variant: str, src: "_Source") -> dict | None:
        """A weight of an earlier output of `variant` that `src` (a weight of another fp32 file) is the same as."""
        n = int(np.prod(src.shape, dtype=np.int64)) * 4
        for made in self._made.get(variant, {}).get((src.name, src.shape), []):
            if made["src"] == (src.path, src.offset) or os.path.getsize(made["out"]) != made["out_size"]:
                continue
            key = (made["src"], (src.path, src.offset), n)
            if key not in self._same:
                self._same[key] = _same_bytes(*made["src"], src.path, src.offset, n)
            if self._same[key]:
                return made
        return None

    def add(self, variant: str, src: "_Source", kind: str, scale, out: Path, offset: int, nbytes: int) -> None:
        self._made.setdefault(variant, {}).setdefault((src.name, src.shape), []).append(
            {"src": (src.path, src.offset), "kind": kind, "scale": scale, "out": out, "offset": offset,
             "nbytes": nbytes, "out_size": os.path.getsize(out)})


def _same_bytes(a: Path, a_offset: int, b: Path, b_offset: int, n: int) -> bool:
    """Whether n bytes of file a at a_offset equal those of file b at b_offset (read in pieces, compared)."""
    from .tflite_write import STREAM_BYTES

    size = max(1, min(n, STREAM_BYTES))
    bufs = bytearray(size), bytearray(size)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(a_offset)
        fb.seek(b_offset)
        left = n
        while left:
            k = min(left, size)
            views = [memoryview(buf)[:k] for buf in bufs]
            if fa.readinto(views[0]) != k or fb.readinto(views[1]) != k:
                return False
            # bytearrays compare by memcmp (memoryviews item by item, 10x slower); a last short piece as bytes
            if not (bufs[0] == bufs[1] if k == size else views[0].tobytes() == views[1].tobytes()):
                return False
            left -= k
    return True


def quantize_file(fp32_path: Path, variant: str, out: Path, *, inline_limit: int | None = None,
                  reuse: Reuse | None = None) -> int:
    """Write `variant` (fp16, int8, int4) of the fp32 TFLite file `fp32_path` to `out` (see the module docstring for
    what each is); its weights inside the flatbuffer unless they reach inline_limit (tflite_write.INLINE_LIMIT: the
    2 GB a flatbuffer addresses). `reuse`: shared by the calls for one model's files, each weight quantized once per
    variant (Reuse says how; the bytes written are the same). Returns out's size."""
    from .tflite_write import INLINE_LIMIT

    if variant not in VARIANTS:
        raise TFLiteQuantizeError(f"unknown TFLite quantization variant '{variant}'; choose from {', '.join(VARIANTS)}")
    src, out = Path(fp32_path), Path(out)
    if not src.is_file():
        raise TFLiteQuantizeError(f"{src} is not a file")
    with open(src, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise TFLiteQuantizeError(f"{src.name} is not a TFLite file (empty)")
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _quantize(m, src, variant, out, INLINE_LIMIT if inline_limit is None else inline_limit, reuse)
    finally:
        try:
            m.close()
        except BufferError:  # views of it still held by a traceback's frames: closed when they go
            pass


def _quantize(m, src: Path, variant: str, out: Path, inline_limit: int, reuse: Reuse | None) -> int:
    """quantize_file on the mapped file `m` (every view into it dies with this call's frame)."""
    from ai_edge_litert import schema_py_generated as schema

    from .tflite_write import FileRange, _Const, _Weight, write_tflite

    model, spans = _read_model(m, src)
    plan = _plan(model, schema, variant)
    sg = model.subgraphs[0]
    weight_buffers = {int(sg.tensors[w].buffer) for _, w, _ in plan}
    users: dict[int, int] = {}
    for t in sg.tensors:
        users[int(t.buffer)] = users.get(int(t.buffer), 0) + 1
    shared = [sg.tensors[w].name.decode() for _, w, _ in plan if users[int(sg.tensors[w].buffer)] > 1]
    if shared:
        raise TFLiteQuantizeError(f"weight {shared[0]} shares its buffer with another tensor: not quantized here")
    # every other buffer's bytes from the source file: small ones copied, the rest streamed as the output is written
    known: dict[bytes, int] = {}  # bytes -> buffer, for the int4 scales (ai-edge-quantizer shares equal buffers)
    for i, b in enumerate(model.buffers):
        off, n = spans[i]
        if not n:
            if b.data is not None and not len(b.data):
                b.data = None
            continue
        if i in weight_buffers:
            continue
        if n <= _SMALL:
            data = np.array(np.frombuffer(m, np.uint8, n, off))
            known.setdefault(data.tobytes(), i)
            model.buffers[i] = _Weight(_Const(data, name=f"buffer {i}"))
        else:
            model.buffers[i] = _Weight(_Const(file=src, offset=off, shape=(n,), dtype="uint8", name=f"buffer {i}"))
    ops = list(sg.operators)
    inserted = {}  # op index -> the DEQUANTIZE op to put before it
    made = []  # (source, kind, scale, buffer) of the weights quantized here (for reuse)
    for j, w, _ in plan:
        t = sg.tensors[w]
        source = _Source(src, spans[t.buffer][0], t.shape, t.name.decode())
        same = reuse.find(variant, source) if reuse is not None else None
        if variant == "fp16":
            kind, scale = "fp16", None
        elif same is not None:
            kind, scale = same["kind"], same["scale"]
        else:
            kind = "int8" if variant == "int8" else ("int4" if int(t.shape[1]) % INT4_BLOCK == 0 else "int8c")
            scale = _scales(source, kind)
        if same is not None:
            model.buffers[t.buffer] = _Weight(FileRange(same["out"], same["offset"], same["nbytes"], source.name))
        else:
            model.buffers[t.buffer] = _Weight(_Quantized(source, kind, scale))
            made.append((source, kind, scale, t.buffer))
        if variant == "fp16":
            t.type = schema.TensorType.FLOAT16
            inserted[j] = w
            continue
        q = schema.QuantizationParametersT()
        q.quantizedDimension = 0
        if kind == "int4":
            t.type = schema.TensorType.INT4
            det = schema.BlockwiseQuantizationT()
            det.scales = _scales_tensor(model, sg, schema, t, scale, known)
            det.zeroPoints, det.blockSize = -1, INT4_BLOCK
            q.detailsType, q.details = schema.QuantizationDetails.BlockwiseQuantization, det
        else:
            t.type = schema.TensorType.INT8
            q.scale = scale.reshape(-1)
            q.zeroPoint = np.zeros(q.scale.size, np.int64)
        t.quantization = q
    if inserted:
        inserted = _dequantize(model, sg, schema, inserted)
        sg.operators = [o for j, op in enumerate(ops) for o in ((inserted[j], op) if j in inserted else (op,))]
    part = out.with_name(f".{out.name}.part")  # a failed write leaves no file that looks finished
    try:
        size = write_tflite(model, part, inline_limit=inline_limit)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    if reuse is not None:
        for source, kind, scale, b in made:
            w = model.buffers[b]
            reuse.add(variant, source, kind, scale, out, w.file_offset, w.nbytes)
    return size


def _dequantize(model, sg, schema, weights: dict[int, int]) -> dict[int, object]:
    """op index -> a DEQUANTIZE of its weight tensor w (`weights`: op index -> w) into a new float32 tensor
    `<name>_dequant`, which every op reading w reads instead (new tensors in the order of `weights`)."""
    code = next((i for i, c in enumerate(model.operatorCodes) if c.builtinCode == schema.BuiltinOperator.DEQUANTIZE),
                None)
    if code is None:
        c = schema.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = schema.BuiltinOperator.DEQUANTIZE, 0, 1
        model.operatorCodes.append(c)
        code = len(model.operatorCodes) - 1
    ops, renamed = {}, {}
    for j, w in weights.items():
        t = sg.tensors[w]
        d = schema.TensorT()
        d.shape, d.type, d.buffer, d.name = np.array(t.shape, np.int32), schema.TensorType.FLOAT32, 0, \
            t.name + b"_dequant"
        sg.tensors.append(d)
        renamed[w] = len(sg.tensors) - 1
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, np.array([w], np.int32), np.array([renamed[w]], np.int32)
        ops[j] = o
    for op in sg.operators:  # the graph's own ops (the DEQUANTIZEs are not among them yet)
        if op.inputs is not None:
            op.inputs = np.array([renamed.get(int(i), int(i)) for i in op.inputs], np.int32)
    return ops


def _scales_tensor(model, sg, schema, t, scale: np.ndarray, known: dict) -> int:
    """The float16 constant `<name>_scales` of an int4 weight; a buffer of the same bytes is shared."""
    from .tflite_write import _Const, _Weight

    data = scale.astype(np.float16)
    key = data.tobytes()
    if key not in known:
        model.buffers.append(_Weight(_Const(data, name=f"{t.name.decode()}_scales")))
        known[key] = len(model.buffers) - 1
    s = schema.TensorT()
    s.shape, s.type, s.buffer, s.name = np.array(data.shape, np.int32), schema.TensorType.FLOAT16, known[key], \
        t.name + b"_scales"
    sg.tensors.append(s)
    return len(sg.tensors) - 1
