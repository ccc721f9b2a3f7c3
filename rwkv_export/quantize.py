"""Quantized variants of an exported step (or prompt) graph: ONNX file in, ONNX file out, options as arguments.

Only weights are quantized; the graph's inputs, outputs and state stay fp32, so a quantized file is a drop-in
replacement for model.onnx (same manifest I/O entry). Every MatMul with a constant weight is quantized, the head
(the [n_embd, vocab] MatMul, ~30% of the bytes a 169M step reads) included; the embedding table is one row per step,
so quantizing it only shrinks the file, and is optional.

Measured with benchmarks/bench_quant.py (169M shapes, 2-core AVX2 box without VNNI, all rows timed interleaved;
quality = perplexity increase on tiny-pydoc; "web" = onnxruntime-web's wasm backend against native onnxruntime on the
same file over 512 tokens, state fed back; the README has the tables).

int8 (`quantize_int8`), four formulations:
- "dynamic-int7" (default): what onnxruntime's quantize_dynamic writes with QInt8 weights and reduce_range, i.e.
  symmetric weights in [-64, 64] with a scale per output column; MatMul becomes DynamicQuantizeLinear + MatMulInteger
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
A weight of rank 3 applied as a batched MatMul (RWKV-6's mix LoRA maa_w2 [5, Dm, C]) gets a scale per column of
each [Dm, C] slice, stored [5, 1, C]: quantize_dynamic's [C] over all slices is refused by onnxruntime at run time
("b zero point is not valid"). Quantized rather than kept fp32: at v6-tiny keeping it fp32 made the int8 step 17%
larger (791 vs 676 kB; ~1.4% at 1.6B shapes) for the same quality (KL to fp32 1.508e-3 vs 1.500e-3, top-1 96.3 vs
96.6% over 2000 tokens); the product is [5, 1, Dm] x [5, Dm, C] per step, too small for its speed to matter either way.
The embedding (include_embedding=True, the default for int8) becomes Gather(int8 rows) + Gather(row scales) ->
DequantizeLinear: standard ops, one row dequantized per step.

int4 (`quantize_int4`): MatMulNBits bits=4 (as onnxruntime's MatMulNBitsQuantizer: round-to-nearest, asymmetric),
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
`quantize_graphs` quantizes a variant's step and prompt graphs together into one external-data file, each weight once.

The files are those onnxruntime.quantization writes (quantize_dynamic, MatMulNBitsQuantizer; the embedding rows,
"qdq" and the rank-3 weights' slices are our own), the same nodes and the same integers bit for bit
(tests/test_quantize_own.py), but written by a streaming rewrite here (see "the rewrite" below): at 169M shapes
int8 went from 223 + 238 s (step + prompt graph) and a 2.9 GB peak to 5-9 s for both graphs together and 0.14 GB,
int4 from 28 + 17 s and 1.3 GB to 7-12 s and 0.19 GB (2-core box shared with other jobs, so ranges).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import OutputPathError, RwkvExportError

DYNAMIC_METHODS = ("dynamic-int7", "dynamic-uint8")  # onnxruntime quantize_dynamic's formats; per_channel applies
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

LOGITS_OUTPUT = "logits"


class QuantizeError(RwkvExportError):
    """A model cannot be quantized as asked (unreadable file, nothing to quantize, bad option)."""


# Which onnxruntime-web backends a variant suits (the manifest's graph entry "backends"; the web demo picks a variant
# per backend from it). Measured in headless Chromium (benchmarks/bench_web.py; README): on WebGPU (onnxruntime-web
# 1.30's WebGPU EP) fp32 and MatMulNBits (int4, int8 "matmul-nbits") run every node of the step graph on the GPU, while
# the dynamic int8 formulations' DynamicQuantizeMatMul has no WebGPU kernel and runs on the CPU (~3 tok/s at 169M);
# fp16 computes in fp16 and needs the adapter's shader-f16 ("webgpu-f16"). On wasm, MatMulNBits has no fast kernel
# (2-4 tok/s at 169M) and the dynamic int8 is the fastest.
# "webgpu-native" is the demo's own WGSL runtime (web_demo/rt_webgpu.js, RWKV-4 only, so only with rwkv_version "4"):
# fp32, fp16 (f32 arithmetic: no shader-f16 needed), int8 "dynamic-int7" (the same integer arithmetic as onnxruntime,
# on the GPU) and int4 MatMulNBits with int8-row embeddings; not the other int8 formulations nor a 4-bit embedding.
def web_backends(variant: str, info: dict | None = None, rwkv_version: str | int | None = None) -> list[str]:
    info = info or {}
    method = info.get("method")
    options = info.get("options") or {}
    if variant == "fp32":
        out = ["wasm", "webgpu"]
    elif variant == "fp16":
        out = ["wasm", "webgpu-f16"]
    elif method == "matmul-nbits":
        out = ["webgpu"]
    elif method in DYNAMIC_METHODS:
        out = ["wasm"]
    else:
        out = []  # not measured (qdq)
    native = (variant in ("fp32", "fp16") or (info.get("bits") == 8 and method == "dynamic-int7")
              or (info.get("bits") == 4 and method == "matmul-nbits" and options.get("embedding_bits", 8) == 8))
    if native and str(rwkv_version) == "4":
        out.append("webgpu-native")
    return out


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
    recipe = _int8_recipe(method=method, include_embedding=include_embedding, per_channel=per_channel,
                          block_size=block_size, accuracy_level=accuracy_level)
    return _quantize([(src, dst)], recipe)[0]


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
    recipe = _int4_recipe(block_size=block_size, include_embedding=include_embedding, accuracy_level=accuracy_level,
                          symmetric=symmetric)
    return _quantize([(src, dst)], recipe)[0]


def quantize_graphs(variant: str, graphs: Sequence[tuple[str | Path, str | Path]], **options) -> list[dict]:
    """Quantize several graphs of one variant (a step graph and its prompt graph: [(src, dst), ...], destinations in
    one folder) into one external-data file shared by all of them, named after the first destination
    (shared_data.data_file_name). The graphs are built from the same parameters, so a weight they share (the same
    bytes in the source data file) is quantized and stored once: no share_weights pass is needed afterwards.
    variant: "int8" or "int4"; options: those of quantize_int8 / quantize_int4. Returns one info dict per graph."""
    recipes = {"int8": _int8_recipe, "int4": _int4_recipe}
    if variant not in recipes:
        raise QuantizeError(f"unknown quantized variant '{variant}': choose from {', '.join(recipes)}")
    return _quantize(graphs, recipes[variant](**options))


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


# -- loading ----------------------------------------------------------------------------------------------------


def _load(src: Path):
    import onnx

    if not src.exists():
        raise QuantizeError(f"model not found: {src}")
    if not src.is_file():
        raise QuantizeError(f"not a file: {src}")
    try:
        model = onnx.load(str(src), load_external_data=False)  # weights are read one at a time (_Source)
    except Exception as e:  # protobuf's DecodeError, ...
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


# -- graph inspection --------------------------------------------------------------------------------------------------


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


# -- options -----------------------------------------------------------------------------------------------------------


def _check_nbits_options(block_size: int, accuracy_level: int) -> None:
    if not isinstance(block_size, int) or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise QuantizeError(f"block_size must be a power of two >= {MIN_BLOCK_SIZE}, got {block_size}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizeError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {accuracy_level}")


# -- the rewrite: recipes, streaming, atomic output --------------------------------------------------------------------
#
# Why our own writer rather than onnxruntime.quantization: quantize_dynamic loads the whole model, quantizes the
# per-channel weights one column at a time in Python (the 50277-column head alone is 50277 calls) and keeps several
# copies of the model; at 169M shapes it took 223 s (step) + 238 s (prompt graph) with a 2.9 GB peak on the 2-core
# box (under load), MatMulNBitsQuantizer 28 + 17 s and 1.3 GB. Here a graph is loaded without its external data,
# each weight is read from the data file a block of rows at a time, quantized in numpy with the very formulas those
# quantizers use (tests/test_quantize_own.py compares the files, weight for weight), written to the destination's
# data file and dropped. The nodes written are the ones those quantizers write, under the same names.

CHUNK_VALUES = 1 << 22  # fp32 values read and quantized at a time (16 MB): bounds the temporaries of the biggest weight
SMALL_BYTES = 1024  # smaller tensors stay inside the graph (as shared_data.SHARED_MIN_BYTES)
ALIGN = 64  # every tensor starts at a multiple of 64 bytes in the data file (as shared_data.ALIGN)
_FLOAT, _UINT8, _INT8, _UINT4, _INT4 = 1, 2, 3, 21, 22  # onnx.TensorProto element types
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class _Recipe:
    variant: str  # "int8" / "int4"
    bits: int  # of the MatMul weights
    method: str  # the manifest's name: dynamic-int7, dynamic-uint8, matmul-nbits, qdq
    embedding: str | None  # "int8-rows", "int4-blocks" (GatherBlockQuantized) or None (left fp32)
    options: dict  # as the manifest records them
    per_channel: bool = True
    block_size: int = 0
    accuracy_level: int = 0
    symmetric: bool = False


def _int8_recipe(*, method: str = DEFAULT_INT8_METHOD, include_embedding: bool = True, per_channel: bool = True,
                 block_size: int = DEFAULT_INT8_BLOCK_SIZE,
                 accuracy_level: int = DEFAULT_INT8_ACCURACY_LEVEL) -> _Recipe:
    if method not in INT8_METHODS:
        raise QuantizeError(f"unknown int8 method '{method}': choose from {', '.join(INT8_METHODS)}")
    options = {"include_embedding": include_embedding}
    if method in DYNAMIC_METHODS:
        options["per_channel"] = per_channel
    if method == "matmul-nbits":
        _check_nbits_options(block_size, accuracy_level)
        options.update(block_size=block_size, accuracy_level=accuracy_level)
    return _Recipe("int8", 8, method, "int8-rows" if include_embedding else None, options, per_channel=per_channel,
                   block_size=block_size, accuracy_level=accuracy_level)


def _int4_recipe(*, block_size: int = DEFAULT_INT4_BLOCK_SIZE, include_embedding: bool = False,
                 accuracy_level: int = DEFAULT_INT4_ACCURACY_LEVEL, symmetric: bool = False) -> _Recipe:
    _check_nbits_options(block_size, accuracy_level)
    options = {"block_size": block_size, "accuracy_level": accuracy_level, "include_embedding": include_embedding,
               "embedding_bits": 4 if include_embedding else 8, "symmetric": symmetric}
    return _Recipe("int4", 4, "matmul-nbits", "int4-blocks" if include_embedding else "int8-rows", options,
                   block_size=block_size, accuracy_level=accuracy_level, symmetric=symmetric)


def _quantize(graphs, recipe: _Recipe) -> list[dict]:
    """Rewrite every (src, dst) of `graphs` with `recipe`; write all destinations (and their one data file) into a
    temporary folder beside them, then rename them into place, the data file first: a failure leaves what was there.
    The weights go to an external-data file when there are several graphs or a source has one (as the source: a
    graph small enough to hold its weights stays one file)."""
    import onnx

    pairs = [(Path(s), Path(d)) for s, d in graphs]
    if not pairs:
        raise QuantizeError("no graphs to quantize")
    folder = pairs[0][1].parent
    for _, dst in pairs:
        if dst.parent != folder:
            raise OutputPathError(f"graphs quantized together must go to one folder: {dst} is not in {folder}")
        if not dst.parent.is_dir():
            raise OutputPathError(f"output folder does not exist: {dst.parent}")
        if dst.exists() and dst.is_dir():
            raise OutputPathError(f"output path is a folder: {dst}")
    sources = [_Source(src) for src, _ in pairs]
    try:
        checked = [(_check_has_weights(s.model, s.path), _head_weight_name(s.model)) for s in sources]
        data_name = pairs[0][1].name + ".data"  # = shared_data.data_file_name(the step graph)
        external = len(sources) > 1 or any(s.has_external for s in sources)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{pairs[0][1].name}.partial-", dir=folder))
        except OSError as e:
            raise OutputPathError(f"cannot write to {folder}: {e.strerror}") from None
        try:
            writer = _Writer(tmp / data_name if external else None)
            kept, files = [], []
            try:
                for source, (_, dst), (n_matmul, _) in zip(sources, pairs, checked):
                    model, fp32 = _rewrite(source, recipe, writer)
                    _check_all_quantized(model, fp32, n_matmul)
                    onnx.save_model(model, str(tmp / dst.name))
                    uses_data = any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
                    kept.append(fp32)
                    files.append([dst.name, *([data_name] if uses_data else [])])
            finally:
                writer.close()
            names = ([data_name] if writer.written else []) + [dst.name for _, dst in pairs]
            for f in names:  # the .onnx files last: once one is there, its data is complete
                os.replace(tmp / f, folder / f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        for s in sources:
            s.close()
    return [_info(src, dst, recipe, n_matmul, head, fp32, f)
            for (src, dst), (n_matmul, head), fp32, f in zip(pairs, checked, kept, files)]


def _check_all_quantized(model, kept_fp32: list[str], n_matmul: int) -> None:
    inits = {t.name: t for t in model.graph.initializer}
    left = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and inits[n.input[1]].data_type == _FLOAT and n.name not in kept_fp32]
    if left:
        raise QuantizeError(f"{len(left)} of {n_matmul} MatMul weights were left in fp32 (unsupported shape?), "
                            f"e.g. {left[0]}")


def _info(src: Path, dst: Path, recipe: _Recipe, n_matmul: int, head: str, kept_fp32: list[str],
          files: list[str]) -> dict:
    from .shared_data import onnx_bytes

    size, src_size = onnx_bytes(dst), onnx_bytes(src)
    summary = weight_summary(dst)
    return {
        "variant": recipe.variant,
        "bits": recipe.bits,
        "method": recipe.method,
        "options": dict(recipe.options),
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


class _Source:
    """An ONNX graph loaded without its external data; the initializers' values are read from their data files on
    demand, a block of rows at a time (plain reads, not a memory map, so what was read does not stay resident)."""

    def __init__(self, path: Path):
        self.path = path
        self.model = _load(path)
        self._files: dict[Path, object] = {}
        self._inline: tuple[str, object] | None = None  # the last graph-stored tensor converted, for its next rows
        self.has_external = False
        for t in self.model.graph.initializer:
            if t.data_location == 1:  # TensorProto.EXTERNAL
                self.has_external = True
                where, offset, length = self.where(t)
                if not where.is_file():
                    raise QuantizeError(f"cannot read {path.name}: its external data file {where.name} is missing")
                if offset + length > where.stat().st_size:
                    raise QuantizeError(f"cannot read {path.name}: tensor '{t.name}' runs past the end of {where.name}")

    def where(self, t) -> tuple[Path, int, int]:
        """(data file, offset, length) of an external tensor; without a length, the rest of the file."""
        ext = {e.key: e.value for e in t.external_data}
        where = self.path.parent / ext["location"]
        offset = int(ext.get("offset", 0))
        if "length" in ext:
            return where, offset, int(ext["length"])
        return where, offset, (where.stat().st_size - offset) if where.is_file() else 0

    def key(self, t) -> tuple:
        """What identifies a tensor's values across the graphs quantized together: where its bytes are (the step and
        prompt graphs point at the same range of one data file), or a hash of them when they are in the graph."""
        if t.data_location == 1:
            where, offset, length = self.where(t)
            return ("file", str(where.resolve()), offset, length)
        copy = type(t)()
        copy.CopyFrom(t)
        copy.name = ""  # by content: the same tensor under another name in the other graph is the same
        return ("raw", hashlib.sha256(copy.SerializeToString()).digest())

    def rows(self, t, r0: int, r1: int):
        """Rows r0:r1 of an fp32 initializer seen as a matrix (_matrix_shape), as a float32 array."""
        import numpy as np
        from onnx import numpy_helper

        n = t.dims[-1]
        if t.data_location != 1:
            if self._inline is None or self._inline[0] != t.name:
                self._inline = (t.name, numpy_helper.to_array(t).astype(np.float32, copy=False).reshape(-1, n))
            return self._inline[1][r0:r1]
        where, offset, _ = self.where(t)
        f = self._open(where)
        f.seek(offset + 4 * r0 * n)
        a = np.fromfile(f, dtype="<f4", count=(r1 - r0) * n)
        if a.size != (r1 - r0) * n:
            raise QuantizeError(f"cannot read tensor '{t.name}' from {where.name}: the file is short")
        return a.reshape(r1 - r0, n)

    def raw(self, t):
        """Yield an external tensor's bytes in pieces of at most CHUNK_VALUES * 4."""
        where, offset, length = self.where(t)
        f = self._open(where)
        f.seek(offset)
        while length > 0:
            piece = f.read(min(length, 4 * CHUNK_VALUES))
            if not piece:
                raise QuantizeError(f"cannot read tensor '{t.name}' from {where.name}: the file is short")
            length -= len(piece)
            yield piece

    def _open(self, where: Path):
        if where not in self._files:
            self._files[where] = open(where, "rb")
        return self._files[where]

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _matrix_shape(t) -> tuple[int, int]:
    """A tensor of rank >= 2 as a matrix: (the product of all dimensions but the last, the last)."""
    rows = 1
    for d in t.dims[:-1]:
        rows *= d
    return rows, t.dims[-1]


def _row_chunks(t, multiple: int = 1):
    """(r0, r1) ranges covering the rows of t (as _matrix_shape), about CHUNK_VALUES values each, r0 a multiple of
    `multiple`."""
    rows, cols = _matrix_shape(t)
    step = max(multiple, (CHUNK_VALUES // max(cols, 1)) // multiple * multiple)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _Writer:
    """Where the rewritten graphs' initializers go: those of at least SMALL_BYTES into one external-data file (each
    distinct tensor once, by key), the others, and all of them when there is no data file, inside the graph."""

    def __init__(self, path: Path | None):
        self.path = path
        self._f = open(path, "wb") if path is not None else None
        self.placed: dict[tuple, tuple] = {}  # key -> ("external", offset, length) or ("raw", bytes)
        self.written = False

    def tensor(self, name: str, data_type: int, dims, data, key: tuple | None = None):
        """A TensorProto holding `data` (an array or bytes) or, when `key` was placed before, what was placed."""
        from onnx import TensorProto

        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(int(d) for d in dims)
        where = self.placed.get(key) if key is not None else None
        if where is None:
            where = self._place(data if isinstance(data, bytes) else data.tobytes())
            if key is not None:
                self.placed[key] = where
        self._point(t, where)
        return t

    def copy(self, t, source: _Source, key: tuple):
        """An initializer that is not quantized, as the writer lays tensors out (streamed when it is external)."""
        if t.data_location != 1:
            if not t.HasField("raw_data") or len(t.raw_data) < SMALL_BYTES or self._f is None:
                return t  # small, or in typed fields (float_data ...): stays in the graph as it is
            return self.tensor(t.name, t.data_type, t.dims, t.raw_data, key)
        where = self.placed.get(key)
        if where is None:
            _, _, length = source.where(t)
            if length < SMALL_BYTES or self._f is None:
                where = ("raw", b"".join(source.raw(t)))
            else:
                offset = self._start()
                for piece in source.raw(t):
                    self._f.write(piece)
                where = ("external", offset, length)
            self.placed[key] = where
        out = type(t)()
        out.name, out.data_type = t.name, t.data_type
        out.dims.extend(t.dims)
        self._point(out, where)
        return out

    def has(self, key: tuple) -> bool:
        return key in self.placed

    def _place(self, data: bytes) -> tuple:
        if len(data) < SMALL_BYTES or self._f is None:
            return ("raw", data)
        offset = self._start()
        self._f.write(data)
        return ("external", offset, len(data))

    def _start(self) -> int:
        self._f.write(b"\0" * (-self._f.tell() % ALIGN))
        self.written = True
        return self._f.tell()

    def _point(self, t, where: tuple) -> None:
        if where[0] == "raw":
            t.raw_data = where[1]
            return
        t.data_location = 1
        for k, v in (("location", self.path.name), ("offset", where[1]), ("length", where[2])):
            e = t.external_data.add()
            e.key, e.value = k, str(v)

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


def _rewrite(source: _Source, recipe: _Recipe, writer: _Writer):
    """(the rewritten model, the names of the MatMuls kept fp32). Node by node: each constant-weight MatMul becomes
    its quantized form (its weight quantized and written at once), the embedding Gather its quantized lookup; every
    initializer still used afterwards is copied; those no node uses any more (the fp32 weights) are dropped."""
    from onnx import helper

    model = source.model
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    kept = []
    if recipe.method == "matmul-nbits":
        # A MatMul narrower than one block (RWKV-6/7's low-rank LoRA factors: K = 8..128; RWKV-7's [heads, 64, 1]
        # r_k by its first dimension) would share one scale per output column, padded: it stays fp32 (a few thousand
        # weights per layer, <1% of a step's bytes at real shapes), as MatMulNBitsQuantizer's nodes_to_exclude kept it.
        widths = {n.name: inits[n.input[1]].dims[0] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}
        kept = sorted(name for name, k in widths.items() if k < recipe.block_size)
        if any(not name for name in kept):
            raise QuantizeError("a MatMul without a node name cannot be kept out of quantization")
        if len(kept) == len(widths):
            raise QuantizeError(f"block_size {recipe.block_size} is larger than every MatMul input width "
                                f"(widest {max(widths.values(), default=0)})")
    token = g.input[0].name
    emb_done = False
    added, nodes = [], []
    activations: dict[str, list[str]] = {}  # dynamic: activation -> its DynamicQuantizeLinear outputs
    for n in g.node:
        if _is_weight_matmul(n, inits, recipe) and n.name not in kept:
            w = inits[n.input[1]]
            if recipe.method in DYNAMIC_METHODS:
                nodes += _dynamic_matmul(n, w, source, writer, added, activations, recipe)
            elif recipe.method == "qdq":
                nodes += _qdq_matmul(n, w, source, writer, added)
            else:
                nodes += _nbits_matmul(n, w, source, writer, added, recipe)
        elif recipe.embedding == "int4-blocks" and n.op_type == "Gather" and _is_2d_float(inits.get(n.input[0])):
            nodes += _gather_int4_blocks(n, inits[n.input[0]], source, writer, added, recipe)
        elif (recipe.embedding == "int8-rows" and not emb_done and n.op_type == "Gather" and n.input[1] == token
              and n.input[0] in inits):
            emb_done = True  # only the first lookup of the token is the embedding (as before)
            new = _gather_int8_rows(n, inits[n.input[0]], source, writer, added, token)
            nodes += new if new is not None else [n]
        else:
            nodes.append(n)
    used = {i for n in nodes for i in n.input} | {o.name for o in g.output}
    copies = [writer.copy(t, source, source.key(t)) for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(copies + added)
    for inp in [i for i in g.input if i.name in inits and i.name not in used]:  # a weight listed as an input too
        g.input.remove(inp)
    if recipe.method == "matmul-nbits" and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if recipe.embedding == "int4-blocks":
        # MatMulNBitsQuantizer sets these whenever it quantizes Gathers: 4-bit tensors need opset 21 and IR 10
        for o in model.opset_import:
            if o.domain in ("", "ai.onnx") and o.version < 21:
                o.version = 21
        model.ir_version = max(model.ir_version, 10)
    return model, kept


def _is_2d_float(t) -> bool:
    return t is not None and t.data_type == _FLOAT and len(t.dims) == 2


def _is_weight_matmul(n, inits, recipe: _Recipe) -> bool:
    """A MatMul whose weight the recipe quantizes: fp32, 2-D; the dynamic formats take any rank >= 2 (RWKV-6's
    [5, Dm, C] maa_w2, a batched MatMul), per column of each [K, N] slice (_dynamic_param_dims)."""
    if n.op_type != "MatMul":
        return False
    t = inits.get(n.input[1])
    if recipe.method in DYNAMIC_METHODS:
        return t is not None and t.data_type == _FLOAT and len(t.dims) >= 2
    return _is_2d_float(t)


# -- formulations, node side: the nodes (and names) onnxruntime's quantizers write -------------------------------------


def _dynamic_matmul(n, w, source, writer, added, activations, recipe):
    """quantize_dynamic's MatMulInteger form: DynamicQuantizeLinear(x) (one per activation, shared by the MatMuls
    that read it); MatMulInteger(x_q, w_q, x_zp, w_zp) -> Cast(float) -> Mul by (x_scale * w_scale)."""
    from onnx import helper

    int7 = recipe.method == "dynamic-int7"
    per_channel = recipe.per_channel
    name, x, out = w.name, n.input[0], n.output[0]
    dims = _dynamic_param_dims(w, per_channel)
    q_type = _INT8 if int7 else _UINT8
    key = (source.key(w), "dynamic", int7, per_channel)
    q, scale, zp = _group(writer, key, 3, lambda: _dynamic_weight(source, w, int7=int7, per_channel=per_channel))
    added += [writer.tensor(name + "_quantized", q_type, w.dims, q, (key, 0)),
              writer.tensor(name + "_scale", _FLOAT, dims, scale, (key, 1)),
              writer.tensor(name + "_zero_point", q_type, dims, zp, (key, 2))]
    nodes = []
    if x not in activations:
        activations[x] = [x + "_quantized", x + "_scale", x + "_zero_point"]
        nodes.append(helper.make_node("DynamicQuantizeLinear", [x], activations[x], x + "_QuantizeLinear"))
    xq, xs, xzp = activations[x]
    mm = n.name + "_quant"
    nodes += [
        helper.make_node("Mul", [xs, name + "_scale"], [mm + "_scales_mul:0"], mm + "_scales_mul"),
        helper.make_node("MatMulInteger", [xq, name + "_quantized", xzp, name + "_zero_point"],
                         [out + "_output_quantized"], mm),
        helper.make_node("Cast", [out + "_output_quantized"], [out + "_output_quantized_cast_output"],
                         out + "_output_quantized_cast", to=_FLOAT),
        helper.make_node("Mul", [out + "_output_quantized_cast_output", mm + "_scales_mul:0"], [out],
                         mm + "_output_scale_mul"),
    ]
    return nodes


def _nbits_matmul(n, w, source, writer, added, recipe):
    """MatMulNBitsQuantizer's form: com.microsoft MatMulNBits(x, blocks, scales[, zero points])."""
    from onnx import helper

    bits, block = recipe.bits, recipe.block_size
    k, cols = w.dims
    key = (source.key(w), "nbits", bits, block, recipe.symmetric)
    packed, scales, zp = _group(writer, key, 3, lambda: _nbits_weight(source, w, bits, block, recipe.symmetric))
    kb = -(-k // block)
    added += [writer.tensor(f"{w.name}_Q{bits}", _UINT8, (cols, kb, block * bits // 8), packed, (key, 0)),
              writer.tensor(w.name + "_scales", _FLOAT, (cols, kb), scales, (key, 1))]
    inputs = [n.input[0], f"{w.name}_Q{bits}", w.name + "_scales"]
    if not recipe.symmetric:
        zp_dims = (cols, kb) if bits == 8 else (cols, -(-kb // 2))
        added.append(writer.tensor(w.name + "_zero_points", _UINT8, zp_dims, zp, (key, 2)))
        inputs.append(w.name + "_zero_points")
    attrs = {"K": k, "N": cols, "bits": bits, "block_size": block}
    if recipe.accuracy_level:  # left out when 0, as MatMulNBitsQuantizer does (optional, and not every EP reads it)
        attrs["accuracy_level"] = recipe.accuracy_level
    return [helper.make_node("MatMulNBits", inputs, [n.output[0]], f"{n.name}_Q{bits}", domain=MS_DOMAIN, **attrs)]


def _qdq_matmul(n, w, source, writer, added):
    """DequantizeLinear(int8 weight, per-column fp32 scale, axis=1) -> MatMul; symmetric, zero point 0."""
    from onnx import helper

    key = (source.key(w), "qdq")
    q, scale = _group(writer, key, 2, lambda: _symmetric_int8_columns(source, w))
    added += [writer.tensor(w.name + "_qint8", _INT8, w.dims, q, (key, 0)),
              writer.tensor(w.name + "_scale", _FLOAT, [w.dims[1]], scale, (key, 1))]
    dq = helper.make_node("DequantizeLinear", [w.name + "_qint8", w.name + "_scale"], [w.name + "_dq"],
                          name=w.name + "_DequantizeLinear", axis=1)
    mm = type(n)()
    mm.CopyFrom(n)
    mm.input[1] = w.name + "_dq"
    return [dq, mm]


def _gather_int8_rows(n, t, source, writer, added, token):
    """Gather(emb fp32, token) -> DequantizeLinear(Gather(emb int8, token), Gather(row scale, token), axis=0); None
    when the table is not a 2-D fp32 one gathered along axis 0 (left as it is)."""
    from onnx import helper

    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
    if not _is_2d_float(t) or axis != 0:
        return None
    name, out = t.name, n.output[0]
    key = (source.key(t), "int8-rows")
    q, scale = _group(writer, key, 2, lambda: _int8_rows(source, t))
    added += [writer.tensor(name + "_qint8", _INT8, t.dims, q, (key, 0)),
              writer.tensor(name + "_row_scale", _FLOAT, [t.dims[0]], scale, (key, 1))]
    return [
        helper.make_node("Gather", [name + "_qint8", token], [out + "_q"], name=n.name + "_rows", axis=0),
        helper.make_node("Gather", [name + "_row_scale", token], [out + "_scale"], name=n.name + "_scales", axis=0),
        # x [1, C] int8, scale [1]: per-axis on axis 0, whose length is the number of tokens gathered
        helper.make_node("DequantizeLinear", [out + "_q", out + "_scale"], [out], name=n.name + "_dq", axis=0),
    ]


def _gather_int4_blocks(n, t, source, writer, added, recipe):
    """MatMulNBitsQuantizer's Gather form: com.microsoft GatherBlockQuantized with 4-bit blocks along axis 1 (uint4
    values and zero points; int4 values and no zero point when symmetric)."""
    from onnx import helper

    rows, cols = t.dims
    block, symmetric = recipe.block_size, recipe.symmetric
    kb = -(-cols // block)
    key = (source.key(t), "int4-blocks", block, symmetric)
    q, scales, zp = _group(writer, key, 3, lambda: _int4_row_blocks(source, t, block, symmetric))
    added += [writer.tensor(t.name + "_Q4", _INT4 if symmetric else _UINT4, t.dims, q, (key, 0)),
              writer.tensor(t.name + "_scales", _FLOAT, (rows, kb), scales, (key, 1))]
    inputs = [t.name + "_Q4", n.input[1], t.name + "_scales"]
    if not symmetric:
        added.append(writer.tensor(t.name + "_zero_points", _UINT4, (rows, kb), zp, (key, 2)))
        inputs.append(t.name + "_zero_points")
    axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
    return [helper.make_node("GatherBlockQuantized", inputs, [n.output[0]], n.name + "_Q4", domain=MS_DOMAIN,
                             gather_axis=axis, quantize_axis=1, block_size=block)]


def _group(writer: _Writer, key: tuple, n: int, compute):
    """The n arrays one weight quantizes to: computed, unless a graph quantized before in the same call placed them
    already (its tensors are placed together, the values first): then placeholders, and writer.tensor points at what
    was placed."""
    return (None,) * n if writer.has((key, 0)) else compute()


# -- formulations, weight side: numpy, a block of rows at a time -------------------------------------------------------
#
# Each function reproduces the arithmetic of the quantizer that defined the format, operation for operation in the same
# precision, so that the stored integers and scales are the same bits (tests/test_quantize_own.py).


def _dynamic_weight(source, w, *, int7: bool, per_channel: bool):
    """quantize_dynamic's weights (onnxruntime quant_utils.compute_scale_zp + quantize_nparray), per output column
    (axis -1) or per tensor: int7 = QInt8, symmetric, reduce_range: q in [-64, 64], scale = max|w| / 64, zero point 0;
    else QUInt8, asymmetric over [min(w, 0), max(w, 0)]: scale = range / 255 (computed in float64, stored float32),
    zero point round(-min / scale). q = clip(rint(w / scale) + zero point). An all-zero column gets scale 1.
    A per-channel weight of rank >= 3 ([B, K, N], applied as a batched MatMul: RWKV-6's maa_w2 [5, Dm, C]) gets a
    scale per column of each [K, N] slice, as [B, 1, N] (_dynamic_param_dims says why)."""
    import numpy as np

    rows, cols = _matrix_shape(w)
    k = w.dims[-2]
    sliced = per_channel and len(w.dims) > 2
    groups = rows // k if sliced else 1  # row r belongs to group r // k
    lo = np.zeros((groups, cols) if per_channel else (1, 1), np.float32)
    hi = np.zeros_like(lo)
    chunks = _row_chunks(w, k if sliced else 1)  # sliced: whole slices per chunk

    def by_group(r0, r1):  # rows r0:r1 as [groups in them, rows of each, cols], and those groups' slot in lo / hi
        x = source.rows(w, r0, r1)
        return (x.reshape(-1, k, cols), slice(r0 // k, r1 // k)) if sliced else (x[None], slice(0, 1))

    for r0, r1 in chunks:
        x, at = by_group(r0, r1)
        np.minimum(lo[at], x.min(axis=1) if per_channel else x.min(), out=lo[at])
        np.maximum(hi[at], x.max(axis=1) if per_channel else x.max(), out=hi[at])
    if int7:
        absmax = np.maximum(-lo, hi)
        scale64 = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / 128.0  # qmax - qmin = 64 - -64
        zp = np.zeros_like(scale64)
    else:
        scale64 = (hi.astype(np.float64) - lo.astype(np.float64)) / 255.0
        with np.errstate(divide="ignore", invalid="ignore"):
            zp = np.round(0.0 - lo / scale64)
    degenerate = scale64 < np.finfo(np.float32).tiny
    scale = np.where(degenerate, 1.0, scale64).astype(np.float32)
    zp = np.where(degenerate, 0, zp)
    dtype, (qmin, qmax) = (np.int8, (-128, 127)) if int7 else (np.uint8, (0, 255))
    zp_q = zp.astype(dtype)
    zp_f = zp_q.astype(np.float32)
    q = np.empty((rows, cols), dtype)  # written as w's dims: the same bytes
    for r0, r1 in chunks:
        x, at = by_group(r0, r1)
        y = np.rint(x / scale[at][:, None]) + zp_f[at][:, None]
        q[r0:r1] = np.clip(y, qmin, qmax, out=y).reshape(r1 - r0, cols)
    dims = _dynamic_param_dims(w, per_channel)
    return q, scale.reshape(dims), zp_q.reshape(dims)


def _dynamic_param_dims(w, per_channel: bool) -> list[int]:
    """The shape of a dynamic-format weight's scale and zero point: [] per tensor, [N] per column of a 2-D weight, and
    for a weight of rank >= 3 [..., 1, N], a scale per column of each [K, N] slice. Why not [N] there, as
    quantize_dynamic writes it: onnxruntime's MatMulInteger / DynamicQuantizeMatMul accept per-column parameters of a
    batched B only in B's rank with K set to 1 ("b zero point is not valid" at run time otherwise: the int8 RWKV-6
    graphs, whose maa_w2 is [5, Dm, C]). Quantized rather than kept fp32: its five slices are five different LoRA
    maps, each with its own column scale is exactly the 2-D format applied slice by slice."""
    if not per_channel:
        return []
    return [*w.dims[:-2], 1, w.dims[-1]] if len(w.dims) > 2 else [w.dims[-1]]


def _nbits_weight(source, w, bits: int, block: int, symmetric: bool):
    """MatMulNBits blocks as onnxruntime's MLAS blockwise quantizer (quantize_matmul_{4,8}bits) writes them: along K
    in blocks of `block` (the last padded), per output column. Asymmetric: scale = (max(b, 0) - min(b, 0)) / (2^bits -
    1), zero point roundf(-min / scale) clamped; symmetric: scale = (the extreme of larger magnitude) / -2^(bits-1),
    zero point 2^(bits-1) (not stored). q = clamp(roundf(w * (1 / scale) + zero point)), roundf rounding half away
    from zero, float32 throughout; padding stored as 0. 4-bit values pack two to a byte, the first in the low nibble;
    4-bit zero points too, an odd block count padded with 8. Layouts: q [N, blocks, block * bits / 8], scales
    [N, blocks], zero points [N, blocks] (8-bit) or [N, ceil(blocks / 2)] (4-bit)."""
    import numpy as np

    k, cols = w.dims
    kb = -(-k // block)
    qmax = (1 << bits) - 1
    mid = 1 << (bits - 1)
    q = np.empty((cols, kb, block), np.uint8)
    scales = np.empty((cols, kb), np.float32)
    zps = np.empty((cols, kb), np.uint8)
    for r0, r1 in _row_chunks(w, block):
        x = source.rows(w, r0, r1)
        b0, nb = r0 // block, -(-(r1 - r0) // block)
        if nb * block != r1 - r0:  # the last block of K: padded with zeros, which min(., 0) / max(., 0) ignore
            x = np.concatenate([x, np.zeros((nb * block - (r1 - r0), cols), np.float32)])
        blocks = x.reshape(nb, block, cols)  # computed as [block, row in block, column]; transposed once quantized
        hi, lo = blocks.max(axis=1), blocks.min(axis=1)
        if symmetric:
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-mid)
            zp = np.full(scale.shape, mid, np.float32)
        else:
            lo, hi = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
            scale = (hi - lo) / np.float32(qmax)
            with np.errstate(divide="ignore", invalid="ignore"):
                zf = np.where(scale != 0, np.float32(0) - lo / scale, lo)
            zp = np.clip(_roundf(zf), 0, qmax)
        with np.errstate(divide="ignore"):
            inv = np.where(scale != 0, np.float32(1) / scale, np.float32(0)).astype(np.float32)
        y = np.multiply(blocks, inv[:, None, :])
        y += zp[:, None, :]
        q[:, b0:b0 + nb] = np.clip(_roundf(y), 0, qmax, out=y).astype(np.uint8).transpose(2, 0, 1)
        scales[:, b0:b0 + nb] = scale.T
        zps[:, b0:b0 + nb] = zp.T
    pad = kb * block - k
    if pad:
        q[:, -1, block - pad:] = 0
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
        if kb % 2:
            zps = np.concatenate([zps, np.full((cols, 1), 8, np.uint8)], axis=1)
        zps = zps[:, 0::2] | (zps[:, 1::2] << 4)
    return q, scales, zps


def _roundf(x):
    """C's roundf (half away from zero) for x >= -0.5, in place, in x's precision (np.rint rounds half to even).
    floor(x + 0.5) is exact in float32 there except at the float just below 0.5, where the sum rounds up to 1."""
    import numpy as np

    below_half = x == np.nextafter(np.float32(0.5), np.float32(0), dtype=x.dtype)
    x += 0.5
    np.floor(x, out=x)
    x[below_half] = 0
    return x


def _int4_row_blocks(source, t, block: int, symmetric: bool):
    """GatherBlockQuantized's tables as MatMulNBitsQuantizer.quantize_ndarray writes them (numpy), 4-bit blocks along
    each row. Asymmetric: scale = (max(b, 0) - min(b, 0)) / 15, zero point = rint(-min / scale), q = rint(x / scale +
    zero point) clipped to [0, 15], a block whose scale is 0 stores 8s; symmetric: scale = (the extreme of larger
    magnitude) / -8, q = rint(x / scale) clipped to [-8, 7], no zero point. Values and zero points pack two to a byte
    over the flattened [rows, C] / [rows, blocks] tables, the first in the low nibble."""
    import numpy as np

    rows, cols = t.dims
    kb = -(-cols // block)
    q = np.empty((rows, cols), np.int8 if symmetric else np.uint8)
    scales = np.empty((rows, kb), np.float32)
    zps = np.empty((rows, kb), np.uint8)
    for r0, r1 in _row_chunks(t, 2):  # an even number of rows: nibble pairs never straddle two chunks
        x = source.rows(t, r0, r1)
        for j, c0 in enumerate(range(0, cols, block)):
            s = x[:, c0:c0 + block]
            hi, lo = s.max(axis=1, keepdims=True), s.min(axis=1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                if symmetric:
                    scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
                    q[r0:r1, c0:c0 + block] = np.where(scale == 0, 0, s / scale).round().clip(-8, 7)
                else:
                    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
                    scale = (hi - lo) / 15.0
                    zp = np.where(scale == 0, 8, -lo / scale).round().clip(0, 15).astype(np.uint8)
                    q[r0:r1, c0:c0 + block] = np.where(scale == 0, 8, s / scale + zp).round().clip(0, 15)
                    zps[r0:r1, j] = zp[:, 0]
            scales[r0:r1, j] = scale[:, 0]
    return _pack_nibbles(q), scales, None if symmetric else _pack_nibbles(zps)


def _pack_nibbles(a):
    import numpy as np

    flat = a.reshape(-1).view(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)


def _symmetric_int8(w, axis: int):
    """Round-to-nearest symmetric int8 over `axis` (the reduced one): returns (q int8, scale fp32 per other index)."""
    import numpy as np

    return _symmetric_int8_with(w, _symmetric_scale(np.abs(w).max(axis=axis)), axis)


def _symmetric_scale(amax):
    import numpy as np

    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0  # an all-zero row/column: any scale reproduces it
    return scale


def _symmetric_int8_with(w, scale, axis: int):
    import numpy as np

    return np.clip(np.rint(w / np.expand_dims(scale, axis)), -127, 127).astype(np.int8), scale


def _symmetric_int8_columns(source, w):
    """qdq's weights: symmetric int8 with a scale per output column (max|w| / 127), two passes over the rows."""
    import numpy as np

    k, cols = w.dims
    amax = np.zeros(cols, np.float32)
    chunks = _row_chunks(w)
    for r0, r1 in chunks:
        np.maximum(amax, np.abs(source.rows(w, r0, r1)).max(axis=0), out=amax)
    scale = _symmetric_scale(amax)
    q = np.empty((k, cols), np.int8)
    for r0, r1 in chunks:
        q[r0:r1] = _symmetric_int8_with(source.rows(w, r0, r1), scale, 0)[0]
    return q, scale


def _int8_rows(source, t):
    """The embedding's int8 rows: symmetric, a scale per row (max|row| / 127), one pass."""
    import numpy as np

    rows, cols = t.dims
    q = np.empty((rows, cols), np.int8)
    scale = np.empty(rows, np.float32)
    for r0, r1 in _row_chunks(t):
        q[r0:r1], scale[r0:r1] = _symmetric_int8(source.rows(t, r0, r1), axis=1)
    return q, scale


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
