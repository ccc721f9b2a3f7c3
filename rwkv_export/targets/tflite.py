"""TFLite target (LiteRT, phones; tfjs-tflite in browsers): per variant two `.tflite` files, each with one named
signature: `step` (one token, RNN mode; `model*.tflite`) and `prefill` (a prompt chunk of exactly PREFILL_CHUNK
tokens, GPT mode; `prefill*.tflite`).

Chain: litert-torch converts our torch step module (the architecture's) directly — one model definition for every target, no
TensorFlow install, no ONNX round trip. Quantized variants are derived from the converted fp32 flatbuffer with
ai-edge-quantizer (the quantizer litert-torch itself calls for its recipes), so the slow torch conversion runs once
however many variants are asked for.

Contract (same as ONNX, read from the file into the manifest): signature `step`, inputs `token` [1] int32 and the
state tensors of the architecture's state spec (float32) under their names; outputs `logits` [1, V] float32 and `<state>_out`.
Every variant keeps float32 I/O; only the weights change. Signature `prefill`: input `tokens` [PREFILL_CHUNK] int32
plus the same states; outputs the last token's `logits` [1, V] and the states after the chunk (the
architecture's sequence module). TFLite wants static shapes, so the chunk is fixed: the manifest entry (kind "sequence") says
`"fixed_chunk": true`, and a runner feeds whole chunks through `prefill` and the rest token by token through `step`.
Why one signature per file, though the converter would keep one copy of the weights for both signatures of one
file: tfjs-tflite's model runner has no signature API and runs a file's first subgraph only, so a prompt graph behind
the step graph could never be called in a browser. Each graph leads its own file instead, at the cost of a second
copy of the weights in the prompt graph's file (a client that never feeds prompts in one call ships the step file
alone).

Token dtype: int32. LiteRT's converter lowers int64 to int32 unless told otherwise, TF.js has no int64 at all, and the
mobile APIs (Kotlin/Java IntBuffer, Swift Int32) are int32-native; a vocabulary of 50,277 is far below 2^31. The
wrapper takes int32 explicitly so the signature says what it is instead of relying on a silent downcast.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

from ..errors import MissingExtraError, RwkvExportError

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


def _import_litert_torch():
    try:
        with _quiet():  # its import prints torchao's optional-kernel notices
            import litert_torch
    except ImportError:
        raise MissingExtraError("litert-torch", "tflite", "then run tools/install_edge_extras.sh") from None
    return litert_torch


def _import_quantizer():
    try:
        import ai_edge_quantizer
        from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager  # noqa: F401
    except ImportError:
        raise MissingExtraError("ai-edge-quantizer", "tflite") from None
    return ai_edge_quantizer


@contextlib.contextmanager
def _quiet():
    """litert-torch prints a progress tree and ai-edge-quantizer prints sizes and tqdm bars: keep our CLI's output ours."""
    old = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        if old is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = old


def _named_outputs(logits, names, states) -> dict:
    """A graph's outputs as the converter's dict (its keys become the signature's output names)."""
    return {LOGITS_OUTPUT: logits, **{state_output_name(n): s for n, s in zip(names, states)}}


def _signature(inner, token_input: str):
    """Named I/O for the converter around a step or sequence module: keyword inputs (the token input and one per
    state tensor, by the state spec's names), a dict of outputs (names become the signature's names; a module made
    with embedding adds its `hidden` outputs after the states)."""
    import torch

    from ..embed import output_names

    names = [t.name for t in inner.state_spec]
    extra = output_names(inner)

    class Signature(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            logits, *rest = self.inner(inputs[token_input], *(inputs[n] for n in names))
            states, hidden = rest[:len(names)], rest[len(names):]
            return {**_named_outputs(logits, names, states), **dict(zip(extra, hidden))}

    return Signature().eval()


def _prefill_module(module, chunk: int):
    """The prompt graph over `module`'s very parameters, for calls of `chunk` tokens. The architecture is asked for
    exactly `chunk`: what it builds from that is its own (RWKV-4's scan rounds up to 2**m - 1 tokens, RWKV-5/6 unroll
    chunk / 8 blocks, RWKV-7's solve takes log2(chunk) levels), so the chunk costs no more than it needs."""
    seq = module.arch.sequence_module(module, max_chunk=chunk)
    if seq.max_chunk < chunk:
        raise RwkvExportError(f"the {module.arch.title} prompt graph holds {seq.max_chunk} tokens per call, "
                              f"fewer than the prefill chunk of {chunk}")
    return seq


def convert_fp32(module, prefill_chunk: int | None = PREFILL_CHUNK) -> dict[str, bytes]:
    """A step module -> {signature name: fp32 .tflite flatbuffer bytes with that one signature}: `step` and, unless
    prefill_chunk is None, `prefill` for chunks of exactly prefill_chunk tokens."""
    import torch

    lt = _import_litert_torch()
    if prefill_chunk is not None and prefill_chunk < 1:
        raise RwkvExportError(f"the prefill chunk must be a positive number of tokens, got {prefill_chunk}")
    state = module.new_state()
    states = {t.name: state[t.name] for t in module.state_spec}
    token_dtype = getattr(torch, TOKEN_DTYPE)
    graphs = {SIGNATURE: (_signature(module, TOKEN_INPUT), {TOKEN_INPUT: torch.zeros(1, dtype=token_dtype), **states})}
    if prefill_chunk is not None:
        graphs[PREFILL_SIGNATURE] = (_signature(_prefill_module(module, prefill_chunk), TOKENS_INPUT),
                                     {TOKENS_INPUT: torch.zeros(prefill_chunk, dtype=token_dtype), **states})
    out = {}
    with _quiet(), torch.no_grad():
        for name, (wrapper, sample) in graphs.items():
            out[name] = bytes(lt.signature(name, wrapper, sample_kwargs=sample).convert().model_content())
    return out


def unblockable_scopes(fp32_model: bytes, block: int = INT4_BLOCK) -> list[str]:
    """The op scopes (ai-edge-quantizer's name for an op: its output tensor names) of the weight ops whose blockwise
    quantized dimension (the input dim of a FULLY_CONNECTED, the row of an EMBEDDING_LOOKUP table) is not a multiple
    of `block`, in every signature. int4 cannot quantize those in blocks; they get int8 channelwise instead. A LoRA
    up-projection's input is its rank: 16 and 8 in RWKV-7's tiny preset (10 ops over the step and prompt graphs);
    the released RWKV-6/7 ranks (32 .. 128) are multiples of 32, so real models have none."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    model = fu.read_model(bytearray(fp32_model))
    scopes = []
    for sg in model.subgraphs:
        for op in sg.operators:
            name = fu.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
            dim = fu.TFL_OP_TO_BLOCKWISE_WEIGHT_QUANTIZED_DIM.get(name)
            if dim is None or len(op.inputs) < 2 or op.inputs[1] < 0:
                continue
            w = sg.tensors[op.inputs[1]]
            if model.buffers[w.buffer].data is None or w.shape is None or len(w.shape) <= dim:
                continue
            if int(w.shape[dim]) % block:
                scopes.append(fu.get_op_scope(op, sg.tensors))
    return scopes


def _recipe(variant: str, fp32_model: bytes | None = None):
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


def quantize(fp32_model: bytes, variant: str) -> bytes:
    """Derive a quantized variant from the fp32 flatbuffer."""
    if variant == "fp32":
        return fp32_model
    rec = _recipe(variant, fp32_model)
    from ai_edge_quantizer import quantizer

    with _quiet():
        return inline_buffers(bytes(quantizer.Quantizer(bytearray(fp32_model), rec).quantize().quantized_model))


BUFFER_ALIGN = 16  # what TFLite's own converter aligns weight buffers to (SIMD loads)
INLINE_LIMIT = 2**31 - 2**24  # a flatbuffer addresses 2 GB; keep a margin for the graph itself


class _InlineBuffer:
    """A flatbuffer `Buffer` with its bytes inside the flatbuffer, BUFFER_ALIGN-aligned (the schema's generated
    BufferT.Pack aligns to 1 byte, and copies a non-numpy buffer byte by byte)."""

    def __init__(self, data):
        self.data = memoryview(data).cast("B")

    def Pack(self, builder):
        from ai_edge_litert import schema_py_generated as schema

        n = len(self.data)
        builder.StartVector(1, n, BUFFER_ALIGN)
        builder.head -= n
        builder.Bytes[builder.head:builder.head + n] = self.data
        vec = builder.EndVector(n)
        schema.BufferStart(builder)
        schema.BufferAddData(builder, vec)
        return schema.BufferEnd(builder)


def inline_buffers(model: bytes) -> bytes:
    """`model` with every weight inside the flatbuffer. ai-edge-quantizer writes a model's weights after the
    flatbuffer, each addressed by an offset (the layout TFLite added for models over 2 GB); a runtime older than that
    layout, such as tfjs-tflite's TFLite build, reads such a weight as a tensor without data and fails at the first op
    that reads one ("Input tensor 54 lacks data": the embedding table, whose lookup is not delegated to XNNPACK).
    Written the way litert-torch writes the fp32 model, the file opens in old and new runtimes alike. Models of 2 GB
    and more keep the offsets (no flatbuffer can hold them; no browser runtime opens them either)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    root = schema.Model.GetRootAs(model, 0)
    if not any(root.Buffers(i).Offset() > 1 for i in range(root.BuffersLength())) or len(model) > INLINE_LIMIT:
        return model
    obj = flatbuffer_utils.read_model_from_bytearray(model)  # resolves the offsets into the buffers' data
    obj.buffers = [_InlineBuffer(b.data) if b.data is not None and len(b.data) else b for b in obj.buffers]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


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
    """Convert `module` (a step module) once, write the .tflite files of each variant into `out_dir`, return their
    manifest graph entries (format "tflite", "parity": None until a check fills it in): per variant the step graph
    and, unless prefill_chunk is None, the prompt graph (kind "sequence", its own file's `prefill` signature)."""
    out_dir = Path(out_dir)
    variants = check_variants(variants, getattr(module, "dims", None))
    if any(v != "fp32" for v in variants):
        _import_quantizer()  # fail before the slow conversion
    fp32 = convert_fp32(module, prefill_chunk)
    states = [t.name for t in module.state_spec]
    entries = []
    for variant in variants:
        path = out_dir / file_name(variant)
        path.write_bytes(quantize(fp32[SIGNATURE], variant))
        inputs, outputs = io_spec(path, SIGNATURE, states)
        entries.append({
            "name": "step", "kind": "step", "format": NAME, "variant": variant, "file": path.name,
            "data_files": [], "signature": SIGNATURE, "quantization": VARIANTS[variant],
            "inputs": inputs, "outputs": outputs, "parity": None,
        })
        if prefill_chunk is not None:
            path = out_dir / prefill_file_name(variant)
            path.write_bytes(quantize(fp32[PREFILL_SIGNATURE], variant))
            inputs, outputs = io_spec(path, PREFILL_SIGNATURE, states)
            entries.append({
                "name": "prefill", "kind": "sequence", "format": NAME, "variant": variant, "file": path.name,
                "data_files": [], "signature": PREFILL_SIGNATURE, "quantization": VARIANTS[variant],
                "max_chunk": prefill_chunk, "fixed_chunk": True, "all_logits": False,
                "inputs": inputs, "outputs": outputs, "parity": None,
            })
    return entries


def _interpreter(path_or_bytes, threads: int | None = None):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise MissingExtraError("ai-edge-litert", "tflite") from None
    kw = {"model_path": str(path_or_bytes)} if isinstance(path_or_bytes, (str, Path)) else {
        "model_content": bytes(path_or_bytes)}
    return Interpreter(num_threads=threads, **kw)


_NP_NAMES = {"float32": "float32", "float16": "float16", "int32": "int32", "int64": "int64"}


def io_spec(path: Path, signature: str = SIGNATURE, states: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Read a signature (`step` or `prefill`) from the file itself and give each input/output its role in the
    contract. Order follows the contract (token(s), then `states` in the state spec's order), not the converter's
    alphabetical order; without `states`, every input NAME with an output NAME_out is a state, in the file's order."""
    import numpy as np

    interpreter = _interpreter(path)
    sigs = interpreter.get_signature_list()
    if signature not in sigs:
        raise RwkvExportError(f"{Path(path).name} has no signature '{signature}' (has {', '.join(sigs) or 'none'})")
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
