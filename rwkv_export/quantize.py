"""Quantized variants of an exported step graph: ONNX file in, ONNX file out, options as arguments.

Only weights are quantized; the graph's inputs, outputs and state stay fp32, so a quantized file is a drop-in
replacement for model.onnx (same manifest I/O entry). Every MatMul with a constant weight is quantized, the head
(the [n_embd, vocab] MatMul, ~30% of the bytes a 169M step reads) included; the embedding table is one row per step,
so quantizing it only shrinks the file, and is optional.

Measured with benchmarks/bench_quant.py (169M shapes, 2-core AVX2 box without VNNI, all rows timed interleaved;
quality = perplexity increase on tiny-pydoc; "web" = onnxruntime-web's wasm backend against native onnxruntime on the
same file over 512 tokens, state fed back; the README has the tables).

int8 (`quantize_int8`), four formulations:
- "dynamic-int7" (default): onnxruntime's quantize_dynamic with QInt8 weights and reduce_range, i.e. symmetric
  weights in [-64, 64] with a scale per output column; MatMul becomes DynamicQuantizeLinear + MatMulInteger
  (activations quantized to uint8 at run time), fused by onnxruntime into DynamicQuantizeMatMul. Why 7 bits: on
  AVX2 without VNNI the uint8 x int8 kernel multiplies byte pairs with vpmaddubsw, whose int16 pair sums saturate
  for full-range int8 weights (2 * 255 * 127 > 32767), so every matmul differed between native and wasm (~9e-2 of
  std on a test chain: the QInt8 difference notes/toolchain.md found); with |w| <= 64 no sum can saturate and both
  runtimes compute the exact int32 dot products (test chain: max|Δ| = 0). uint8 x int8 is also the fastest kernel we
  measured in both runtimes: 113M weights in 48 matmuls took 6.1 ms natively vs 8.3 for uint8 weights, and 21 ms vs
  41 in onnxruntime-web (2 threads). Quality +0.06%.
- "dynamic-uint8": the same with QUInt8 weights (scale and zero point per column): slower in both runtimes; -0.03%.
  Neither dynamic formulation is bit-identical across runtimes over a long generation: exp, sigmoid and LayerNorm
  differ in the last bit between native and wasm, and sooner or later an activation sits on a rounding boundary of
  its dynamic quantization and rounds to the neighbouring step; the recurrent state then carries that difference
  (measured: first such token ~80-100 of 512 on tiny-pydoc for both; afterwards ~3e-2 of std, top-1 99.6-99.8% the
  same). Only fp32-compute formulations (MatMulNBits accuracy_level 0) stay at rounding level (3e-6), at a fraction
  of the speed.
- "matmul-nbits": com.microsoft MatMulNBits, bits=8, block-wise along K. Needs accuracy_level 4 (int8
  activations): level 0 dequantizes to fp32 on every call (~0.8 tok/s). Its wasm kernel is slow.
- "qdq": standard ONNX only, DequantizeLinear(int8 weight, per-column scale) -> MatMul, which any ONNX runtime or
  converter reads. onnxruntime does not constant-fold the DQ back to fp32 at session init: it fuses DQ+MatMul into
  MatMulNBits (8-bit, accuracy 4), except where MatMul+Add was fused into Gemm first (att.output + residual), which
  keeps a DequantizeLinear per step: barely faster than fp32.
The embedding (include_embedding=True, the default for int8) becomes Gather(int8 rows) + Gather(row scales) ->
DequantizeLinear: standard ops, one row dequantized per step.

int4 (`quantize_int4`): MatMulNBits bits=4 (onnxruntime's MatMulNBitsQuantizer, round-to-nearest, asymmetric),
block-wise along K (default 128: +1.6%, the fastest; block 32: +0.85%, ~25% slower). The embedding is stored as
int8's is (int8 rows, a scale per row), or with include_embedding=True as com.microsoft GatherBlockQuantized (4-bit
blocks along n_embd). Why int8 rows by default: an fp32 table made int4 larger than int8 wherever the vocab is large
(RWKV-7 0.1B: 283 vs 194 MB, the 65536 x 768 table alone 201 MB). int8 rows cost no measurable quality, 4-bit
blocks do (int4 perplexity change over 2000 eval tokens, KL to fp32; fp32 / int8-row / 4-bit table): tiny-pydoc
+2.45 / +2.41 / +3.67% (KL 1.32 / 1.31 / 1.87e-2), v7-tiny-pydoc +1.83 / +1.90 / +2.05% (KL 1.26 / 1.28 / 1.92e-2).
accuracy_level 4 (default) quantizes activations to
int8 inside the kernel; accuracy_level 0 computes in fp32: the same quality and the same numbers in the browser but
~3x slower natively. onnxruntime-web's wasm MatMulNBits has no fast path (~2 tok/s at 169M), so int4 is for native
runtimes. Symmetric blocks measured worse (+1.3% at block 32).

Each function returns an info dict for the manifest (method, options, sizes, what was quantized).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputPathError, RwkvExportError

DYNAMIC_METHODS = ("dynamic-int7", "dynamic-uint8")  # onnxruntime's quantize_dynamic; per_channel applies
INT8_METHODS = (*DYNAMIC_METHODS, "matmul-nbits", "qdq")
DEFAULT_INT8_METHOD = "dynamic-int7"
DEFAULT_INT8_BLOCK_SIZE = 128  # matmul-nbits only: 32 was slower (77 vs 87 tok/s) and 9% bigger for no real gain
DEFAULT_INT8_ACCURACY_LEVEL = 4  # matmul-nbits only: level 0 (fp32 compute) measured ~40x slower on AVX2
# 128 weights share a scale and zero point: at 169M shapes decode 139 / 150 tok/s (1 / 2 threads) vs 117 / 142 for block
# 32 (bench_quant), for +1.63% perplexity vs +0.85% on tiny-pydoc (gate 5%); `block_size=32` for the last 0.8%
DEFAULT_INT4_BLOCK_SIZE = 128
DEFAULT_INT4_ACCURACY_LEVEL = 4  # int8 activations: 3.7x level 0's native speed at the same perplexity
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (= fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute
MIN_BLOCK_SIZE = 16  # MatMulNBits and GatherBlockQuantized: a power of two >= 16
# protobuf cannot hold a message of 2 GiB or more: above this, weights go to an external data file
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2

LOGITS_OUTPUT = "logits"


class QuantizeError(RwkvExportError):
    """A model cannot be quantized as asked (unreadable file, nothing to quantize, bad option)."""


# Which onnxruntime-web backends a variant suits (the manifest's graph entry "backends"; the web demo picks a variant
# per backend from it). Measured in headless Chromium (benchmarks/bench_web.py; README): on WebGPU (onnxruntime-web
# 1.30's WebGPU EP) fp32 and MatMulNBits (int4, int8 "matmul-nbits") run every node of the step graph on the GPU, while
# the dynamic int8 formulations' DynamicQuantizeMatMul has no WebGPU kernel and runs on the CPU (~3 tok/s at 169M);
# fp16 computes in fp16 and needs the adapter's shader-f16 ("webgpu-f16"). On wasm, MatMulNBits has no fast kernel
# (2-4 tok/s at 169M) and the dynamic int8 is the fastest.
def web_backends(variant: str, info: dict | None = None) -> list[str]:
    method = (info or {}).get("method")
    if variant == "fp32":
        return ["wasm", "webgpu"]
    if variant == "fp16":
        return ["wasm", "webgpu-f16"]
    if method == "matmul-nbits":
        return ["webgpu"]
    if method in DYNAMIC_METHODS:
        return ["wasm"]
    return []  # not measured (qdq)


# -- public API -------------------------------------------------------------------------------------------------------


def quantize_int8(
    src: str | Path,
    dst: str | Path,
    *,
    method: str = DEFAULT_INT8_METHOD,
    include_embedding: bool = True,
    per_channel: bool = True,
    block_size: int = DEFAULT_INT8_BLOCK_SIZE,
    accuracy_level: int = DEFAULT_INT8_ACCURACY_LEVEL,
) -> dict:
    """Weight-only-stored int8 quantization of every constant-weight MatMul (head included); see the module doc.

    method: "dynamic-int7" or "dynamic-uint8" (per_channel applies), "matmul-nbits" (block_size, accuracy_level
    apply) or "qdq".
    include_embedding: also store the embedding table as int8 rows with a scale each.
    """
    if method not in INT8_METHODS:
        raise QuantizeError(f"unknown int8 method '{method}': choose from {', '.join(INT8_METHODS)}")
    if method == "matmul-nbits":
        _check_nbits_options(block_size, accuracy_level)
    src, dst = Path(src), Path(dst)
    model = _load(src)
    n_matmul = _check_has_weights(model, src)
    head = _head_weight_name(model)
    kept: list[str] = []
    with _quiet():
        if method in DYNAMIC_METHODS:
            model = _dynamic(model, per_channel, int7=method == "dynamic-int7")
        elif method == "matmul-nbits":
            model, kept = _nbits(model, bits=8, block_size=block_size, accuracy_level=accuracy_level,
                                 embedding=False)
        else:
            model = _qdq_int8(model)
        if include_embedding:
            _embedding_int8_rows(model)
    options = {"include_embedding": include_embedding}
    if method in DYNAMIC_METHODS:
        options["per_channel"] = per_channel
    if method == "matmul-nbits":
        options.update(block_size=block_size, accuracy_level=accuracy_level)
    return _finish(model, src, dst, bits=8, method=method, options=options, n_matmul=n_matmul, head=head,
                   kept_fp32=kept)


def quantize_int4(
    src: str | Path,
    dst: str | Path,
    *,
    block_size: int = DEFAULT_INT4_BLOCK_SIZE,
    include_embedding: bool = False,
    accuracy_level: int = DEFAULT_INT4_ACCURACY_LEVEL,
    symmetric: bool = False,
) -> dict:
    """MatMulNBits 4-bit (block-wise along K, round to nearest) for every constant-weight MatMul, head included.

    The embedding table is stored as int8 rows with a scale each (as int8's; INT4_EMBEDDING says why), or with
    include_embedding=True as 4-bit blocks (com.microsoft GatherBlockQuantized, the smallest).
    accuracy_level: 0 computes in fp32 after dequantizing, 4 quantizes activations to int8 (see ACCURACY_LEVELS).
    """
    _check_nbits_options(block_size, accuracy_level)
    src, dst = Path(src), Path(dst)
    model = _load(src)
    n_matmul = _check_has_weights(model, src)
    head = _head_weight_name(model)
    with _quiet():
        model, kept = _nbits(model, bits=4, block_size=block_size, accuracy_level=accuracy_level,
                             embedding=include_embedding, symmetric=symmetric)
        if not include_embedding:
            _embedding_int8_rows(model)
    options = {"block_size": block_size, "accuracy_level": accuracy_level, "include_embedding": include_embedding,
               "embedding_bits": 4 if include_embedding else 8, "symmetric": symmetric}
    return _finish(model, src, dst, bits=4, method="matmul-nbits", options=options, n_matmul=n_matmul, head=head,
                   kept_fp32=kept)


def weight_summary(path: str | Path) -> dict:
    """What a (quantized) step graph holds: op counts, how each big weight is stored, whether the head is quantized.

    Reads the graph only (no external data), so it is cheap on any size.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    ops: dict[str, int] = {}
    for n in g.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    head_node = _head_node(model)
    head_kind = _weight_kind(head_node, inits, producer) if head_node is not None else None
    fp32_matmuls = sum(1 for n in g.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
                       and n.input[1] in inits and inits[n.input[1]].data_type == onnx.TensorProto.FLOAT)
    emb = _embedding_gather(g, inits, producer)
    return {
        "ops": ops,
        "head": head_kind,
        "head_quantized": head_kind is not None and head_kind != "fp32",
        "fp32_matmul_weights": fp32_matmuls,
        "embedding": _weight_kind(emb, inits, producer) if emb is not None else None,
    }


# -- loading and saving -----------------------------------------------------------------------------------------------


def _load(src: Path):
    import onnx

    if not src.exists():
        raise QuantizeError(f"model not found: {src}")
    if not src.is_file():
        raise QuantizeError(f"not a file: {src}")
    try:
        model = onnx.load(str(src))
    except Exception as e:  # protobuf's DecodeError, missing external data, ...
        raise QuantizeError(f"cannot read {src.name} as an ONNX model: {_first_line(e)}") from None
    if len(model.graph.node) == 0:
        raise QuantizeError(f"{src.name} is not an ONNX model with a graph (no nodes)")
    return model


def _check_has_weights(model, src: Path) -> int:
    import onnx

    inits = {i.name: i for i in model.graph.initializer}
    n = sum(1 for nd in model.graph.node if nd.op_type == "MatMul" and nd.input[1] in inits
            and inits[nd.input[1]].data_type == onnx.TensorProto.FLOAT and len(inits[nd.input[1]].dims) == 2)
    if n == 0:
        raise QuantizeError(f"{src.name} has no MatMul with an fp32 weight: nothing to quantize "
                            "(already quantized, or an fp16 graph?)")
    return n


def _finish(model, src: Path, dst: Path, *, bits: int, method: str, options: dict, n_matmul: int, head,
            kept_fp32: list[str] = ()) -> dict:
    import onnx

    inits = {i.name for i in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and _initializer(model, n.input[1]).data_type == onnx.TensorProto.FLOAT and n.name not in kept_fp32]
    if left:
        raise QuantizeError(f"{len(left)} of {n_matmul} MatMul weights were left in fp32 (unsupported shape?), "
                            f"e.g. {left[0]}")
    files = _save(model, dst)
    size = sum((dst.parent / f).stat().st_size for f in files)
    from .shared_data import onnx_bytes

    src_size = onnx_bytes(src)
    summary = weight_summary(dst)
    return {
        "variant": f"int{bits}",
        "bits": bits,
        "method": method,
        "options": options,
        "file": dst.name,
        "data_files": files[1:],
        "size": size,
        "source_size": src_size,
        "size_ratio": round(size / src_size, 4),
        "quantized_matmuls": n_matmul - len(kept_fp32),
        "fp32_matmuls": len(kept_fp32),  # narrower than one block (low-rank LoRA factors): kept fp32
        "head": head,
        "head_quantized": summary["head_quantized"],
        "embedding": summary["embedding"],
        "ops": summary["ops"],
    }


def _save(model, dst: Path) -> list[str]:
    """Write atomically: into a temporary folder beside dst, then rename into place (external data first)."""
    import onnx

    if not dst.parent.is_dir():
        raise OutputPathError(f"output folder does not exist: {dst.parent}")
    if dst.exists() and dst.is_dir():
        raise OutputPathError(f"output path is a folder: {dst}")
    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    except OSError as e:
        raise OutputPathError(f"cannot write to {dst.parent}: {e.strerror}") from None
    try:
        files = [dst.name]
        if external:
            files.append(dst.name + ".data")
            onnx.save_model(model, str(tmp / dst.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=files[1], size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp / dst.name))
        for f in reversed(files):  # the .onnx last: once it is there, its data is complete
            os.replace(tmp / f, dst.parent / f)
        return files
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- graph inspection ---------------------------------------------------------------------------------------------------


def _initializer(model, name: str):
    for t in model.graph.initializer:
        if t.name == name:
            return t
    return None


def _head_node(model):
    """The MatMul (or MatMulNBits / MatMulInteger chain) that produces the logits output."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    name = LOGITS_OUTPUT if any(o.name == LOGITS_OUTPUT for o in g.output) else g.output[0].name
    # breadth-first back from the output through the value-preserving ops quantizers put after a matmul (scale Mul,
    # Cast, Reshape, Add); the first matmul-like node found is the head
    frontier, seen = [name], set()
    for _ in range(8):
        nxt = []
        for value in frontier:
            node = producer.get(value)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in _MATMUL_OPS:
                return node
            if node.op_type in ("Mul", "Cast", "Reshape", "Add"):
                nxt.extend(node.input)
        frontier = nxt
    return None


_MATMUL_OPS = ("MatMul", "MatMulNBits", "MatMulInteger", "Gemm")


def _head_weight_name(model) -> str:
    node = _head_node(model)
    if node is None or node.op_type != "MatMul" or _initializer(model, node.input[1]) is None:
        raise QuantizeError("cannot find the head: the logits output is not produced by a MatMul with a weight")
    return node.input[1]


def _weight_kind(node, inits, producer) -> str:
    """How the weight of a matmul/gather node is stored: fp32, uint8/int8 (+ how), int4 ..."""
    import onnx

    if node.op_type == "MatMulNBits":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        return f"int{bits} MatMulNBits"
    if node.op_type == "GatherBlockQuantized":
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        return f"int{bits} GatherBlockQuantized"
    if node.op_type == "MatMulInteger":
        w = inits.get(node.input[1])
        return "uint8 MatMulInteger" if w is not None and w.data_type == onnx.TensorProto.UINT8 else "int8 MatMulInteger"
    if node.op_type == "DequantizeLinear":
        w = inits.get(node.input[0])
        src = producer.get(node.input[0])
        if w is None and src is not None and src.op_type == "Gather":
            w = inits.get(src.input[0])
        names = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT4: "int4",
                 onnx.TensorProto.UINT4: "uint4"}
        return f"{names.get(w.data_type, 'q') if w is not None else 'q'} DequantizeLinear"
    w = inits.get(node.input[1] if node.op_type in ("MatMul", "Gemm") else node.input[0])
    if w is None and node.op_type in ("MatMul", "Gemm") and node.input[1] in producer:
        return _weight_kind(producer[node.input[1]], inits, producer)
    if w is None:
        return "unknown"
    return {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16"}.get(w.data_type, str(w.data_type))


def _embedding_gather(g, inits, producer):
    """The node holding the embedding lookup: the Gather (or its quantized form) fed by the token input."""
    token = g.input[0].name
    for n in g.node:
        if n.op_type in ("Gather", "GatherBlockQuantized") and token in n.input[1:2]:
            if n.op_type == "Gather":
                data = n.input[0]
                if data in inits:
                    # a quantized row gather is followed by the DequantizeLinear that we report instead
                    for m in g.node:
                        if m.op_type == "DequantizeLinear" and m.input[0] == n.output[0]:
                            return m
            return n
    return None


# -- formulations -------------------------------------------------------------------------------------------------------


def _check_nbits_options(block_size: int, accuracy_level: int) -> None:
    if not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= {MIN_BLOCK_SIZE}, got {block_size}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizeError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")


def _nbits(model, *, bits: int, block_size: int, accuracy_level: int, embedding: bool, symmetric: bool = False):
    """(the model with MatMulNBits, the names of the MatMuls kept fp32 because they are narrower than one block)"""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    widths = {n.name: _initializer(model, n.input[1]).dims[0] for n in model.graph.node
              if n.op_type == "MatMul" and _initializer(model, n.input[1]) is not None}
    # A MatMul narrower than one block (RWKV-6/7's low-rank LoRA factors: K = 8..128) would share one scale per
    # output column, padded: it stays fp32 (a few thousand weights per layer, <1% of a step's bytes at real shapes).
    narrow = sorted(name for name, k in widths.items() if k < block_size)
    if any(not name for name in narrow):
        raise QuantizeError("a MatMul without a node name cannot be kept out of quantization")
    if len(narrow) == len(widths):
        raise QuantizeError(f"block_size {block_size} is larger than every MatMul input width "
                            f"(widest {max(widths.values(), default=0)})")
    ops = ("MatMul", "Gather") if embedding else ("MatMul",)
    cfg = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=symmetric,
        accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=bits,
    )
    q = MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=narrow)
    q.process()
    return q.model.model, narrow


def _dynamic(model, per_channel: bool, int7: bool):
    """onnxruntime's quantize_dynamic on the MatMuls: int7 -> QInt8 weights in [-64, 64] (reduce_range), else QUInt8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="rwkv-export-q8-") as d:
        out = Path(d) / "q.onnx"
        quantize_dynamic(
            model,
            str(out),
            weight_type=QuantType.QInt8 if int7 else QuantType.QUInt8,
            per_channel=per_channel,
            reduce_range=int7,
            op_types_to_quantize=["MatMul"],
            use_external_data_format=model.ByteSize() >= EXTERNAL_DATA_THRESHOLD,
            extra_options={"MatMulConstBOnly": True},
        )
        import onnx

        return onnx.load(str(out))


def _qdq_int8(model):
    """DequantizeLinear(int8 weight, per-column fp32 scale, axis=1) -> MatMul; symmetric, zero point 0."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    nodes = []
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            name = n.input[1]
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            q, scale = _symmetric_int8(w, axis=0)  # one scale per output column
            g.initializer.remove(inits.pop(name))
            g.initializer.extend([numpy_helper.from_array(q, name + "_qint8"),
                                  numpy_helper.from_array(scale, name + "_scale")])
            nodes.append(helper.make_node("DequantizeLinear", [name + "_qint8", name + "_scale"], [name + "_dq"],
                                          name=name + "_DequantizeLinear", axis=1))
            n.input[1] = name + "_dq"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return model


def _symmetric_int8(w, axis: int):
    """Round-to-nearest symmetric int8 over `axis` (the reduced one): returns (q int8, scale fp32 per other index)."""
    import numpy as np

    amax = np.abs(w).max(axis=axis)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero row/column: any scale reproduces it
    q = np.clip(np.rint(w / np.expand_dims(scale, axis)), -127, 127).astype(np.int8)
    return q, scale


def _embedding_int8_rows(model) -> bool:
    """Gather(emb fp32, token) -> DequantizeLinear(Gather(emb int8, token), Gather(row scale, token), axis=0)."""
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    token = g.input[0].name
    for idx, n in enumerate(g.node):
        if n.op_type == "Gather" and n.input[1] == token and n.input[0] in inits:
            t = inits[n.input[0]]
            axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
            if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) != 2 or axis != 0:
                return False
            name = t.name
            q, scale = _symmetric_int8(numpy_helper.to_array(t).astype("float32"), axis=1)  # one scale per row
            g.initializer.remove(t)
            g.initializer.extend([numpy_helper.from_array(q, name + "_qint8"),
                                  numpy_helper.from_array(scale, name + "_row_scale")])
            out = n.output[0]
            new = [
                helper.make_node("Gather", [name + "_qint8", token], [out + "_q"], name=n.name + "_rows", axis=0),
                helper.make_node("Gather", [name + "_row_scale", token], [out + "_scale"], name=n.name + "_scales",
                                 axis=0),
                # x [1, C] int8, scale [1]: per-axis on axis 0, whose length is the number of tokens gathered
                helper.make_node("DequantizeLinear", [out + "_q", out + "_scale"], [out], name=n.name + "_dq",
                                 axis=0),
            ]
            g.node.remove(n)
            for k, m in enumerate(new):
                g.node.insert(idx + k, m)
            return True
    return False


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs every node at INFO (its loggers set their own levels); keep output clean."""
    import warnings

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
