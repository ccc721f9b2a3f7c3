"""TFLite target (LiteRT, phones; tfjs-tflite in browsers): per variant two `.tflite` files, each with one named
signature: `step` (one token, RNN mode; `model*.tflite`) and `prefill` (a prompt chunk of exactly PREFILL_CHUNK
tokens, GPT mode; `prefill*.tflite`).

Chain: our own ONNX graphs (the architecture's onnx_graph.py, written node by node: targets/onnx.py's step graph and
onnx_seq.py's prompt graph) translated op by op into TFLite flatbuffers of builtin ops (targets/tflite_write.py), each
weight streamed from the ONNX external-data file into its place in the file. No converter: litert-torch
(torch.export -> TFLite) took 265 of the 291 s of a 169M export and most of its 4.55 GB (issue 19). Quantized variants
are derived from the fp32 files by our own streaming quantizer (tflite_quant.py), file to file (quantize_file): the
files ai-edge-quantizer (the quantizer litert-torch itself calls) makes for the recipes in _recipe, which stays the
oracle its tests hold them against, weight by weight, so neither model is held whole in memory; but for the constant
left operands of BATCH_MATMUL, which its int8 quantizes into files LiteRT cannot run, and ours keeps float32. The
prompt file's weights are the step file's: written once (copied from the step file) and quantized once per variant.

Contract (same as ONNX, read from the file into the manifest): signature `step`, inputs `token` [1] int32 and the
state tensors of the architecture's state spec (float32) under their names; outputs `logits` [1, V] float32 and `<state>_out`.
Every variant keeps float32 I/O; only the weights change. Signature `prefill`: input `tokens` [PREFILL_CHUNK] int32
plus the same states; outputs the last token's `logits` [1, V] and the states after the chunk (the
architecture's sequence module). TFLite wants static shapes, so the chunk is fixed: the manifest entry (kind "sequence") says
`"fixed_chunk": true`, and a runner feeds whole chunks through `prefill` and the rest token by token through `step`.
Why one signature per file, though one file could hold both signatures over one copy of the weights: tfjs-tflite's model runner has no signature API and runs a file's first subgraph only, so a prompt graph behind
the step graph could never be called in a browser. Each graph leads its own file instead, at the cost of a second
copy of the weights in the prompt graph's file (a client that never feeds prompts in one call ships the step file
alone).

Token dtype: int32 (the ONNX graphs' int64 token input is written as int32). TFLite kernels index with int32, TF.js
has no int64 at all, and the mobile APIs (Kotlin/Java IntBuffer, Swift Int32) are int32-native; a vocabulary of
50,277 is far below 2^31.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

from ..errors import GraphFileError, MissingExtraError, RwkvExportError

NAME = "tflite"
SIGNATURE = "step"
TOKEN_INPUT = "token"
LOGITS_OUTPUT = "logits"
TOKEN_DTYPE = "int32"

# variant -> what it is. int8/int4 are dynamic-range: int weights, activations quantized on the fly so XNNPACK runs
# integer kernels (weight-only would be dequantized back to fp32 when the interpreter loads, saving file size only).
VARIANTS = {
    "fp32": "float32 weights and compute",
    "fp16": "float16 weights (dequantized to fp32 at load; a GPU delegate may compute in fp16), fp32 I/O",
    "int8": "dynamic range: int8 weights (one scale per tensor), activations quantized at run time",
    "int4": "dynamic range: int4 weights in blocks of 32 along the input dim, activations quantized at run time "
            "(a matmul whose input dim is no multiple of 32, e.g. a narrow LoRA factor: int8 per channel)",
}
INT4_BLOCK = 32  # ai-edge-quantizer's blockwise int4; channelwise int4 loses ~1/3 of top-1 on small models
PREFILL_SIGNATURE = "prefill"
TOKENS_INPUT = "tokens"
# Tokens per prefill call. A prompt's tail shorter than a chunk goes through `step`, so a small chunk wastes at most
# 15 single-token calls, while 16 rows already make every linear layer a matrix-matrix product (the weights read
# once per 16 tokens instead of once per token).
PREFILL_CHUNK = 16


def file_name(variant: str) -> str:
    return "model.tflite" if variant == "fp32" else f"model_{variant}.tflite"


def prefill_file_name(variant: str) -> str:
    return "prefill.tflite" if variant == "fp32" else f"prefill_{variant}.tflite"


def state_output_name(state: str) -> str:
    return f"{state}_out"


def _import_litert():
    try:
        from ai_edge_litert import schema_py_generated  # noqa: F401  (the flatbuffer schema the writer packs)
        import flatbuffers  # noqa: F401
    except ImportError:
        raise MissingExtraError("ai-edge-litert", "tflite") from None


def check_quantizer(variants) -> None:
    """Fail (MissingExtraError) before any slow work when a variant cannot be made: the quantized variants need
    ai-edge-litert's schema (tflite_quant.py reads and writes with it), no longer ai-edge-quantizer (the tests'
    oracle only)."""
    if any(v != "fp32" for v in variants):
        _import_litert()


def _import_quantizer():
    try:
        import ai_edge_quantizer
        from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager  # noqa: F401
    except ImportError:
        raise MissingExtraError("ai-edge-quantizer", "dev") from None  # the tests' oracle, no longer the export's
    return ai_edge_quantizer


@contextlib.contextmanager
def _quiet():
    """ai-edge-quantizer prints sizes and tqdm bars: keep our CLI's output ours."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _graph_shapes(module, token_input: str, n_tokens: int) -> dict[str, list]:
    """The static shape of every input of a step or prompt graph: the token(s) and the state spec's tensors."""
    return {token_input: [n_tokens], **{t.name: [int(d) for d in t.shape] for t in module.state_spec}}


def write_fp32(module, out_dir: Path, prefill_chunk: int | None = PREFILL_CHUNK) -> dict[str, Path]:
    """A step module -> {signature name: the fp32 .tflite written in `out_dir` with that one signature}: `step`
    (file_name("fp32")) and, unless prefill_chunk is None, `prefill` (prefill_file_name("fp32")) for chunks of exactly
    prefill_chunk tokens. The ONNX graphs and their one shared weight file are written to a temporary folder first
    (the weights once; each .tflite then holds its own copy, read from there as it is built)."""
    import tempfile

    import onnx

    from ..onnx_build import WeightStore
    from . import onnx as onnx_target
    from . import onnx_seq
    from .tflite_write import FileRange, _Weight, translate, write_tflite

    _import_litert()
    if prefill_chunk is not None and prefill_chunk < 1:
        raise RwkvExportError(f"the prefill chunk must be a positive number of tokens, got {prefill_chunk}")
    if getattr(getattr(module, "options", None), "dtype", "float32") != "float32":
        raise RwkvExportError("the TFLite writer needs the float32 step module (variants are made from its file)")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="rwkv-tflite-") as tmp:
        tmp = Path(tmp)
        graphs = {SIGNATURE: (tmp / "step.onnx", TOKEN_INPUT, 1, file_name("fp32"))}
        with WeightStore(tmp / "weights.data", durable=False) as store:  # read back below, then deleted
            onnx_target.export_step(module, graphs[SIGNATURE][0], store=store)
            if prefill_chunk is not None:
                # the architecture is asked for exactly this chunk: what it builds from that is its own (RWKV-4's
                # scan rounds up to 2**m - 1 tokens, RWKV-5/6 unroll chunk / 8 blocks, RWKV-7's solve takes
                # log2(chunk) levels), so the chunk costs no more than it needs
                path = tmp / "prefill.onnx"
                onnx_seq.export_sequence(module, path, max_chunk=prefill_chunk, store=store)
                held = onnx_seq.graph_meta(path)["max_chunk"]
                if held < prefill_chunk:
                    raise RwkvExportError(f"the {module.arch.title} prompt graph holds {held} tokens per call, "
                                          f"fewer than the prefill chunk of {prefill_chunk}")
                graphs[PREFILL_SIGNATURE] = (path, TOKENS_INPUT, prefill_chunk, prefill_file_name("fp32"))
        out = {}
        written: dict[tuple, FileRange] = {}  # a weight's source and layout -> its bytes in a file written already
        for sig, (path, token_input, n, name) in graphs.items():
            model = translate(onnx.load(str(path), load_external_data=False), tmp, sig,
                              _graph_shapes(module, token_input, n))
            for i, b in enumerate(model.buffers):
                # the prompt file's copy of a weight the step file holds (the same bytes of the same ONNX data file,
                # in the same layout): copied from there, not read and transposed a second time
                if isinstance(b, _Weight) and _source_key(b) in written:
                    model.buffers[i] = _Weight(written[_source_key(b)])
            write_tflite(model, out_dir / name)
            for b in model.buffers:
                if isinstance(b, _Weight) and _source_key(b) is not None and b.file_offset is not None:
                    written.setdefault(_source_key(b), FileRange(out_dir / name, b.file_offset, b.nbytes,
                                                                 b.const.name))
            del model
            out[sig] = out_dir / name
    return out


def _source_key(w) -> tuple | None:
    """What makes two weights of write_fp32's files the same bytes: the same range of the same ONNX data file, read
    as the same dtype and shape, written in the same layout (transposed or not); None for a constant made in memory
    (folded)."""
    c = w.const
    if not getattr(c, "external", False):
        return None
    return str(Path(c.file).resolve()), int(c.offset), tuple(c.shape), str(c.dtype), bool(w.transpose)


def unblockable_scopes(fp32_model: bytes | Path, block: int = INT4_BLOCK) -> list[str]:
    """The op scopes (ai-edge-quantizer's name for an op: its output tensor names) of the weight ops whose blockwise
    quantized dimension (the input dim of a FULLY_CONNECTED, the row of an EMBEDDING_LOOKUP table) is not a multiple
    of `block`, in every signature. int4 cannot quantize those in blocks; they get int8 channelwise instead. A LoRA
    up-projection's input is its rank: 16 and 8 in RWKV-7's tiny preset (10 ops over the step and prompt graphs);
    the released RWKV-6/7 ranks (32 .. 128) are multiples of 32, so real models have none."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    def scan(data) -> list[str]:  # its flatbuffer views die with it, before a mapped file is closed
        model = schema.Model.GetRootAs(data, 0)
        codes = [model.OperatorCodes(i).BuiltinCode() for i in range(model.OperatorCodesLength())]
        scopes = []
        for g in range(model.SubgraphsLength()):
            sg = schema.SubGraphT.InitFromObj(model.Subgraphs(g))
            for op in sg.operators:
                name = fu.TFL_OP_CODE_TO_NAME.get(codes[op.opcodeIndex])
                dim = fu.TFL_OP_TO_BLOCKWISE_WEIGHT_QUANTIZED_DIM.get(name)
                if dim is None or len(op.inputs) < 2 or op.inputs[1] < 0:
                    continue
                w = sg.tensors[op.inputs[1]]
                buf = model.Buffers(w.buffer)
                if (buf.DataLength() == 0 and buf.Offset() <= 1) or w.shape is None or len(w.shape) <= dim:
                    continue
                if int(w.shape[dim]) % block:
                    scopes.append(str(fu.get_op_scope(op, sg.tensors)))
        return scopes

    with _model_bytes(fp32_model) as data:  # the flatbuffer read in place: the graph's objects, not the weights
        return scan(data)


@contextlib.contextmanager
def _model_bytes(model: bytes | Path):
    """A model's bytes: as given, or its file memory-mapped (read-only) for the duration."""
    if not isinstance(model, Path):
        yield model
        return
    import mmap

    with open(model, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        yield m


def _recipe(variant: str, fp32_model: bytes | None = None):
    """ai-edge-quantizer's recipe for `variant`: what tflite_quant.py makes without it, kept as its tests' oracle
    (_oracle_quantize_file)."""
    _import_quantizer()
    from ai_edge_quantizer import qtyping, recipe, recipe_manager

    if variant == "int8":
        # One scale per tensor, not per channel: tfjs-tflite's TFLite build (the browser runtime) computes a
        # dynamic-range FULLY_CONNECTED with per-channel scales as zeros and looks an EMBEDDING_LOOKUP row with
        # per-row scales up with the wrong scale; per tensor, both run there and in LiteRT alike. The cost, measured
        # on tiny-pydoc's first 1,000 tokens against fp32: KL 2.6e-4 instead of 1.6e-4, top-1 0.986 instead of 0.993.
        rm = recipe_manager.RecipeManager()
        rm.add_dynamic_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=8,
                              granularity=qtyping.QuantGranularity.TENSORWISE)
        return rm.get_quantization_recipe()
    if variant == "int4":
        rec = recipe.dynamic_wi4b32_afp32()
        scopes = unblockable_scopes(fp32_model) if fp32_model is not None else []
        if not scopes:
            return rec
        import re

        rm = recipe_manager.RecipeManager()
        rm.load_quantization_recipe(rec)
        # a later matching entry wins: these ops (exact scope) get int8 channelwise instead of int4 blocks
        for scope in dict.fromkeys(scopes):
            rm.add_dynamic_config(regex="^" + re.escape(scope) + "$",
                                  operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=8)
        return rm.get_quantization_recipe()
    if variant == "fp16":  # litert-torch's full_fp16_recipe, spelled out for ai-edge-quantizer
        rm = recipe_manager.RecipeManager()
        rm.add_quantization_config(
            regex=".*",
            operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            op_config=qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(
                    num_bits=16, symmetric=True, granularity=qtyping.QuantGranularity.TENSORWISE,
                    dtype=qtyping.TensorDataType.FLOAT),
                compute_precision=qtyping.ComputePrecision.FLOAT,
                explicit_dequantize=True,
            ),
            algorithm_key=recipe.AlgorithmName.FLOAT_CASTING,
        )
        return rm.get_quantization_recipe()
    raise ValueError(f"no quantization recipe for variant '{variant}'")


def quantize(fp32_model: bytes | Path, variant: str) -> bytes:
    """Derive a quantized variant from the fp32 flatbuffer (its bytes, or its file): the bytes of quantize_file's
    file."""
    if variant == "fp32":
        return fp32_model.read_bytes() if isinstance(fp32_model, Path) else fp32_model
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rwkv-tflite-q-") as tmp:
        src = fp32_model if isinstance(fp32_model, Path) else Path(tmp) / "fp32.tflite"
        if not isinstance(fp32_model, Path):
            src.write_bytes(fp32_model)
        out = Path(tmp) / file_name(variant)
        quantize_file(src, variant, out)
        return out.read_bytes()


def quantize_file(fp32_path: Path, variant: str, out: Path, reuse=None) -> None:
    """The quantized `variant` (fp16, int8, int4: VARIANTS says what) of the fp32 .tflite `fp32_path`, written to
    `out` with its weights inside the flatbuffer (a runtime older than TFLite's offsets layout, such as tfjs-tflite's
    build, reads a weight at an offset as a tensor without data), weight by weight (tflite_quant.py): the file
    ai-edge-quantizer makes for _recipe(variant), tensor for tensor (but for the one departure tflite_quant.py
    names). Neither model is ever held whole in memory. `reuse`: a tflite_quant.Reuse shared by the calls for one
    model's step and prompt files (each weight quantized once per variant; the same bytes)."""
    from .tflite_quant import quantize_file as _quantize_file

    _quantize_file(Path(fp32_path), variant, Path(out), reuse=reuse)


def _oracle_quantize_file(fp32_path: Path, variant: str, out: Path) -> None:
    """quantize_file by ai-edge-quantizer itself (the [dev] extra): the oracle tests/test_tflite_quant.py holds ours
    against. It memory-maps the fp32 file and serializes into a file of its own layout (weights at offsets), whose
    weights tflite_write.inline_file then streams into `out`'s flatbuffer."""
    import tempfile

    from ai_edge_litert import schema_py_generated as schema

    from .tflite_write import INLINE_LIMIT, inline_file

    out = Path(out)
    rec = _recipe(variant, Path(fp32_path))
    from ai_edge_quantizer import quantizer

    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=out.parent) as tmp:
        q = Path(tmp) / out.name
        with _quiet():
            quantizer.Quantizer(Path(fp32_path), rec).quantize(serialize_to_path=q)
        with _model_bytes(q) as data:
            root = schema.Model.GetRootAs(data, 0)
            offsets = any(root.Buffers(i).Offset() > 1 for i in range(root.BuffersLength()))
            del root
        if offsets and q.stat().st_size <= INLINE_LIMIT:
            inline_file(q, out)
        else:
            os.replace(q, out)


def check_variants(variants, dims=None) -> list[str]:
    """Validate variant names (and, given model dims, that the model's shapes allow them) before any slow work."""
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise RwkvExportError(f"unknown tflite variant(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(VARIANTS)}")
    if "int4" in variants and dims is not None:
        bad = [f"{k}={getattr(dims, k)}" for k in ("n_embd", "ffn_dim") if getattr(dims, k) % INT4_BLOCK]
        if bad:
            raise RwkvExportError(f"int4 quantizes in blocks of {INT4_BLOCK} along each matmul's input; "
                                  f"this model has {', '.join(bad)}, not divisible by {INT4_BLOCK}")
    return variants


def export_tflite(module, out_dir: Path, variants=("fp32",), prefill_chunk: int | None = PREFILL_CHUNK) -> list[dict]:
    """Write `module`'s (a step module's) fp32 .tflite files once, derive each variant from them into `out_dir`, return
    their manifest graph entries (format "tflite", "parity": None until a check fills it in): per variant the step
    graph and, unless prefill_chunk is None, the prompt graph (kind "sequence", its own file's `prefill` signature).
    write_fp32 then derive_variants: a caller that can let go of the module in between (it is not needed to quantize)
    keeps the quantizer's memory from adding to the module's."""
    out_dir = Path(out_dir)
    variants = check_variants(variants, getattr(module, "dims", None))
    check_quantizer(variants)  # fail before the fp32 files are written
    fp32 = write_fp32(module, out_dir, prefill_chunk)
    return derive_variants(out_dir, fp32, variants, [t.name for t in module.state_spec], prefill_chunk)


def derive_variants(out_dir: Path, fp32: dict[str, Path], variants, states: list[str],
                    prefill_chunk: int | None = PREFILL_CHUNK) -> list[dict]:
    """The manifest entries of `variants` (fp32 and those quantized here from the fp32 files `fp32`, write_fp32's
    result) in `out_dir`: per variant the step entry, then the prompt entry if `fp32` has one. An fp32 file is
    removed when fp32 is not among the variants."""
    from .tflite_quant import Reuse

    out_dir = Path(out_dir)
    variants = check_variants(variants)
    graphs = [(SIGNATURE, file_name)] + ([(PREFILL_SIGNATURE, prefill_file_name)] if PREFILL_SIGNATURE in fp32 else [])
    entries = {}
    reuse = Reuse()  # the prompt file's weights are the step file's: quantized once per variant, for the step file
    for signature, name_of in graphs:
        for variant in variants:
            path = out_dir / name_of(variant)
            if variant != "fp32":
                quantize_file(Path(fp32[signature]), variant, path, reuse=reuse)
            try:
                inputs, outputs = io_spec(path, signature, states)
            except GraphFileError:  # a file that cannot run is not left behind as if it could
                path.unlink(missing_ok=True)
                raise
            entry = {"name": "step", "kind": "step", "format": NAME, "variant": variant, "file": path.name,
                     "data_files": [], "signature": signature, "quantization": VARIANTS[variant]}
            if signature == PREFILL_SIGNATURE:
                entry.update(name="prefill", kind="sequence", max_chunk=prefill_chunk, fixed_chunk=True,
                             all_logits=False)
            entries[(variant, signature)] = {**entry, "inputs": inputs, "outputs": outputs, "parity": None}
    if "fp32" not in variants:  # at the end: reuse compares the prompt file's weights with the step file's
        for signature, _ in graphs:
            Path(fp32[signature]).unlink()
    return [entries[(v, sig)] for v in variants for sig, _ in graphs]


def _interpreter(path_or_bytes, threads: int | None = None, builtin_only: bool = False):
    """LiteRT's interpreter of a file (or bytes); builtin_only: its builtin kernels alone, without the XNNPACK
    delegate it otherwise applies at the first allocation (which packs every weight: ~0.3 s and the file's pages per
    169M file)."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError:
        raise MissingExtraError("ai-edge-litert", "tflite") from None
    kw = {"model_path": str(path_or_bytes)} if isinstance(path_or_bytes, (str, Path)) else {
        "model_content": bytes(path_or_bytes)}
    if builtin_only:
        kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    return Interpreter(num_threads=threads, **kw)


_NP_NAMES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}


def io_spec(path: Path, signature: str = SIGNATURE, states: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Read a signature (`step` or `prefill`) from the file itself and give each input/output its role in the
    contract. Order follows the contract (token(s), then `states` in the state spec's order), not the converter's
    alphabetical order; without `states`, every input NAME with an output NAME_out is a state, in the file's order.
    The file's ops are prepared first (LiteRT's builtin kernels check their operands' types and shapes there), so a
    file that would fail at its first invoke (e.g. an int8 left operand of BATCH_MATMUL, which the kernel refuses) is
    a one-line GraphFileError at export time, not a folder with a broken file: a few ms at 169M, where preparing with
    XNNPACK (what a runner does) would pack the weights."""
    import numpy as np

    interpreter = _interpreter(path, builtin_only=True)
    sigs = interpreter.get_signature_list()
    if signature not in sigs:
        raise RwkvExportError(f"{Path(path).name} has no signature '{signature}' (has {', '.join(sigs) or 'none'})")
    try:
        interpreter.allocate_tensors()  # our files: one subgraph, the signature's
    except (RuntimeError, ValueError) as e:
        why = " ".join(str(e).split())
        raise GraphFileError(f"{Path(path).name} would not run: LiteRT cannot prepare its '{signature}' graph "
                             f"({why})") from None
    sig = interpreter.get_signature_runner(signature)
    ins, outs = sig.get_input_details(), sig.get_output_details()

    def describe(name, d, role, state=None):
        e = {"name": name, "dtype": _NP_NAMES.get(np.dtype(d["dtype"]).name, np.dtype(d["dtype"]).name),
             "shape": [int(x) for x in d["shape"]], "role": role}
        if state:
            e["state"] = state
        return e

    def take(table, name, *args):
        if name not in table:
            raise RwkvExportError(f"{Path(path).name}: signature '{signature}' has no '{name}' "
                                  f"(has {', '.join(sorted(table))})")
        return describe(name, table[name], *args)

    token = (TOKENS_INPUT, "tokens") if signature == PREFILL_SIGNATURE else (TOKEN_INPUT, "token")
    if states is None:
        states = [n for n in ins if state_output_name(n) in outs]
    inputs = [take(ins, *token)] + [take(ins, s, "state", s) for s in states]
    outputs = [take(outs, LOGITS_OUTPUT, "logits")] + [take(outs, state_output_name(s), "state", s) for s in states]
    from ..embed import OUTPUT_ROLES

    outputs += [take(outs, name, role) for name, role in OUTPUT_ROLES.items() if name in outs]  # --embedding
    return inputs, outputs
