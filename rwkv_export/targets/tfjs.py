"""TF.js target (browsers): the step graph as a TF.js graph model (model.json + weight shards), one folder per variant.

Chain: our own ONNX step graph (targets/onnx.py) translated node by node into a TF.js graph model. RWKV-4's step graph
uses 14 ONNX op types; RWKV-5.2 and 6 add the batched MatMul over the heads (the [H, N, N] WKV state: BatchMatMulV2,
batch dims broadcast) and LayerNormalization over [.., H, N] (GroupNorm); RWKV-7 adds ReduceL2 (Sqrt of Sum of
Square), Clip (Maximum/Minimum) and ReduceSum (Sum). Each has a direct TF op that TF.js executes (`_convert_node`,
`_convert_split`); any other op is a one-line error naming it. We chose this over tensorflowjs_converter on a
SavedModel (onnx2tf) because that chain needs TensorFlow (~1 GB), onnx2tf 1.x's exact pins on Python 3.11 and
tensorflowjs 4.22, whose install is broken on current TensorFlow (it only imports with two modules stubbed). The format
we write is the one TF.js 4.x reads (GraphDef as JSON in `modelTopology`, weights in `weightsManifest`), and it is
checked by running it in Node with @tensorflow/tfjs.

Contract: model.json's `signature` maps the logical names (`token`, the state spec's names, `logits`, `<state>_out`) to
tensors; clients resolve through it, never by position. Token int32 (TF.js has no int64), state and logits float32
in every variant.

Variants only change how the weight matrices (MatMul weights and the embedding table) are stored; TF.js dequantizes
them to float32 when it loads the model, so compute is float32 in all of them:
- fp32: as is;
- fp16: float16 storage (half the download);
- uint8: affine per tensor (TF.js's format: value = q * scale + min), a quarter of the download.
Vectors (LayerNorm, token-shift mixes, decay) stay float32: they are <1% of the bytes and the decay is sensitive.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..errors import RwkvExportError
from . import onnx as onnx_target

NAME = "tfjs"
MODEL_FILE = "model.json"
TOKEN_INPUT = onnx_target.TOKEN_INPUT
LOGITS_OUTPUT = onnx_target.LOGITS_OUTPUT
TOKEN_DTYPE = "int32"
VARIANTS = {
    "fp32": "float32 weights",
    "fp16": "weight matrices stored as float16, dequantized to float32 at load",
    "uint8": "weight matrices stored as uint8 (affine, per tensor), dequantized to float32 at load",
}
# tensorflowjs_converter's default shard size: small enough for browser caches and CDN limits
SHARD_BYTES = 4 * 1024 * 1024
# weights with at least this many elements and rank 2 are quantized; vectors stay float32 (see the module docstring)
QUANTIZE_MIN_ELEMENTS = 1024


def folder_name(variant: str) -> str:
    return f"tfjs_{variant}" if variant != "fp32" else "tfjs"


def state_output_name(state: str) -> str:
    return onnx_target.state_output_name(state)


_TF_DTYPES = {"float32": "DT_FLOAT", "int32": "DT_INT32", "bool": "DT_BOOL"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


class _Graph:
    """Builds TF GraphDef nodes in TF.js's JSON form and collects the constant weights."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.weights: list[tuple[str, "np.ndarray"]] = []  # noqa: F821
        self.names: dict[str, str] = {}  # ONNX tensor name -> TF node name
        self._used: set[str] = set()
        self._n = 0

    def fresh(self, hint: str) -> str:
        base = hint if _SAFE_NAME.match(hint) else re.sub(r"[^A-Za-z0-9_.\-/]", "_", hint).lstrip("_-/") or "t"
        name, i = base, 0
        while name in self._used:
            i += 1
            name = f"{base}_{i}"
        self._used.add(name)
        return name

    def node(self, op: str, inputs: list[str], name_hint: str, attr: dict | None = None, dtype="float32") -> str:
        name = self.fresh(name_hint)
        a = dict(attr or {})
        if op not in ("Placeholder", "Const", "ConcatV2", "GatherV2", "Cast", "ExpandDims", "Mean", "Identity"):
            a.setdefault("T", {"type": _TF_DTYPES[dtype]})
        self.nodes.append({"name": name, "op": op, "input": list(inputs), "attr": a})
        return name

    def const(self, value, hint: str) -> str:
        import numpy as np

        value = np.asarray(value)
        if value.dtype == np.int64:
            if value.size and (value.max() > 2**31 - 1 or value.min() < -(2**31)):
                raise RwkvExportError(f"constant {hint} does not fit int32, which is all TF.js has")
            value = value.astype(np.int32)
        elif value.dtype == np.float64 or value.dtype == np.float16:
            value = value.astype(np.float32)
        dt = _TF_DTYPES.get(value.dtype.name)
        if dt is None:
            raise RwkvExportError(f"constant {hint} has dtype {value.dtype}, which this TF.js writer does not store")
        name = self.fresh(hint)
        self.nodes.append({"name": name, "op": "Const", "input": [], "attr": {
            "value": {"tensor": {"dtype": dt, "tensorShape": _shape(value.shape)}},
            "dtype": {"type": dt},
        }})
        self.weights.append((name, value))
        return name


def _shape(shape) -> dict:
    return {"dim": [{"size": str(int(d))} for d in shape]} if len(shape) else {}


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _convert_node(g: _Graph, node, consts: dict, ranks: dict) -> None:
    """Translate one ONNX node; record its output tensor's TF name in g.names."""
    import numpy as np

    op, ins, out = node.op_type, list(node.input), node.output[0]
    a = _attrs(node)
    x = [g.names[i] if i else None for i in ins]
    hint = out
    binary = {"Add": "AddV2", "Sub": "Sub", "Mul": "Mul", "Div": "RealDiv"}
    unary = {"Exp": "Exp", "Sigmoid": "Sigmoid", "Relu": "Relu", "Sqrt": "Sqrt", "Neg": "Neg", "Tanh": "Tanh"}
    if op in binary:
        res = g.node(binary[op], x, hint)
    elif op in unary:
        res = g.node(unary[op], x, hint)
    elif op in ("Max", "Min"):
        tf_op = "Maximum" if op == "Max" else "Minimum"
        res = x[0]
        for i, other in enumerate(x[1:]):
            res = g.node(tf_op, [res, other], hint if i == len(x) - 2 else f"{hint}/{i}")
    elif op == "MatMul":
        ra, rb = ranks.get(ins[0]), ranks.get(ins[1])
        if ra is None or rb is None or ra < 2 or rb < 2:
            raise RwkvExportError(f"MatMul {node.name} on ranks {ra}x{rb}: the TF.js writer handles matmuls of "
                                  "known rank >= 2 only (no shape inference, or a vector operand)")
        if (ra, rb) == (2, 2):
            res = g.node("MatMul", x, hint, {"transpose_a": {"b": False}, "transpose_b": {"b": False}})
        else:  # batched over the leading dims, broadcast as in ONNX/numpy (RWKV-5+: the heads' [H, N, N] state)
            res = g.node("BatchMatMulV2", x, hint, {"adj_x": {"b": False}, "adj_y": {"b": False}})
    elif op in ("ReduceSum", "ReduceL2"):
        # opset 18: the axes are the second input (a constant in our graphs; reducing over all axes is not needed)
        if len(ins) < 2 or ins[1] not in consts or consts[ins[1]].size == 0:
            raise RwkvExportError(f"{op} {node.name}: only constant, non-empty axes are handled")
        ax = g.const(consts[ins[1]].reshape(-1).astype(np.int32), f"{hint}/axes")
        keep = {"keep_dims": {"b": bool(a.get("keepdims", 1))}, "T": {"type": "DT_FLOAT"},
                "Tidx": {"type": "DT_INT32"}}
        if op == "ReduceL2":  # sqrt(sum(x^2)): TF has no L2-norm reduction op
            res = g.node("Sqrt", [g.node("Sum", [g.node("Square", [x[0]], f"{hint}/sq"), ax], f"{hint}/sum_sq",
                                         keep)], hint)
        else:
            res = g.node("Sum", [x[0], ax], hint, keep)
    elif op == "Clip":
        # opset >= 11: min and max are optional inputs; an absent one leaves that side unbounded
        lo, hi = (x + [None, None])[1:3]
        res = x[0]
        if lo is not None:
            res = g.node("Maximum", [res, lo], hint if hi is None else f"{hint}/min")
        if hi is not None:
            res = g.node("Minimum", [res, hi], hint)
        if res == x[0]:
            res = g.node("Identity", [res], hint, {"T": {"type": "DT_FLOAT"}})
    elif op == "Gather":
        axis = g.const(np.int32(a.get("axis", 0)), f"{hint}/axis")
        res = g.node("GatherV2", [x[0], x[1], axis], hint, {"batch_dims": {"i": "0"}})
    elif op == "Unsqueeze":
        axes = consts[ins[1]].reshape(-1) if len(ins) > 1 else np.array(a["axes"])
        res = x[0]
        for i, ax in enumerate(sorted(int(v) for v in axes)):
            axc = g.const(np.int32(ax), f"{hint}/axis{i}")
            res = g.node("ExpandDims", [res, axc], hint if i == len(axes) - 1 else f"{hint}/{i}")
    elif op == "Concat":
        axis = g.const(np.int32(a["axis"]), f"{hint}/axis")
        res = g.node("ConcatV2", [*x, axis], hint, {"N": {"i": str(len(x))}, "T": {"type": "DT_FLOAT"}})
    elif op == "Reshape":
        shape = g.const(consts[ins[1]].astype(np.int64), f"{hint}/shape")
        res = g.node("Reshape", [x[0], shape], hint)
    elif op == "LayerNormalization":
        axis = a.get("axis", -1)
        rank = ranks.get(ins[0])
        if axis != -1 and not (rank is not None and axis == rank - 1):
            raise RwkvExportError(f"LayerNormalization {node.name} over axis {axis}: only the last axis is handled")
        ax = g.const(np.array([-1], np.int32), f"{hint}/axis")
        eps = g.const(np.float32(a.get("epsilon", 1e-5)), f"{hint}/epsilon")
        keep = {"keep_dims": {"b": True}, "T": {"type": "DT_FLOAT"}, "Tidx": {"type": "DT_INT32"}}
        mean = g.node("Mean", [x[0], ax], f"{hint}/mean", keep)
        d = g.node("Sub", [x[0], mean], f"{hint}/centered")
        var = g.node("Mean", [g.node("Square", [d], f"{hint}/sq"), ax], f"{hint}/var", keep)
        inv = g.node("Rsqrt", [g.node("AddV2", [var, eps], f"{hint}/var_eps")], f"{hint}/rstd")
        y = g.node("Mul", [d, inv], f"{hint}/normed")
        if len(x) > 1 and x[1]:
            y = g.node("Mul", [y, x[1]], f"{hint}/scaled")
        if len(x) > 2 and x[2]:
            y = g.node("AddV2", [y, x[2]], f"{hint}/shifted")
        res = g.node("Identity", [y], hint, {"T": {"type": "DT_FLOAT"}})
    elif op == "Cast":
        import onnx

        to = onnx.helper.tensor_dtype_to_np_dtype(a["to"]).name
        to = {"int64": "int32", "float16": "float32", "float64": "float32"}.get(to, to)
        res = g.node("Cast", x, hint, {"DstT": {"type": _TF_DTYPES[to]}})
    elif op == "Identity":
        res = g.node("Identity", x, hint, {"T": {"type": "DT_FLOAT"}})
    else:
        raise RwkvExportError(f"ONNX op {op} (node {node.name}) has no TF.js translation in this writer")
    g.names[out] = res


def _convert_split(g: _Graph, node, consts: dict, shapes: dict) -> None:
    """ONNX Split -> TF SplitV; output i is the TF tensor `name:i`. `shapes`: tensor name -> its static shape."""
    import numpy as np

    axis = int(_attrs(node).get("axis", 0))
    n = len(node.output)
    if len(node.input) > 1 and node.input[1]:
        sizes = consts[node.input[1]].reshape(-1).astype(np.int32)
    else:  # equal parts (opset 18's num_outputs): the axis must have a static size
        shape = shapes.get(node.input[0])
        if shape is None or shape[axis] <= 0:
            raise RwkvExportError(f"Split {node.name}: equal parts of an axis of unknown size are not handled")
        sizes = np.full(n, shape[axis] // n, np.int32)
    res = g.node("SplitV", [g.names[node.input[0]], g.const(sizes, f"{node.output[0]}/sizes"),
                            g.const(np.int32(axis), f"{node.output[0]}/axis")], node.output[0],
                 {"num_split": {"i": str(n)}, "Tlen": {"type": "DT_INT32"}})
    for i, out in enumerate(node.output):
        g.names[out] = f"{res}:{i}" if i else res


def onnx_to_graph(onnx_path: Path) -> tuple[list[dict], list, dict]:
    """ONNX step graph -> (TF nodes, [(const name, array)], signature)."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = onnx.load(str(onnx_path))
    try:
        model = shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - ranks are only needed for the MatMul check, which then errors clearly
        pass
    ranks, shapes = {}, {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        if v.type.tensor_type.HasField("shape"):
            shapes[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
            ranks[v.name] = len(shapes[v.name])
    g = _Graph()
    consts = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        consts[init.name] = arr
        ranks[init.name] = arr.ndim
        g.names[init.name] = g.const(arr, init.name)
    sig_in = {}
    for v in model.graph.input:
        if v.name in consts:
            continue
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        if any(d <= 0 for d in dims):
            raise RwkvExportError(f"input {v.name} has a dynamic shape; the step graph must be static")
        np_dt = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        dt = {"int64": "int32", "float16": "float32"}.get(np_dt, np_dt)
        name = g.fresh(v.name)
        g.nodes.append({"name": name, "op": "Placeholder", "input": [], "attr": {
            "dtype": {"type": _TF_DTYPES[dt]}, "shape": {"shape": _shape(dims)}}})
        g.names[v.name] = name
        sig_in[v.name] = {"name": f"{name}:0", "dtype": _TF_DTYPES[dt], "tensorShape": _shape(dims)}
    for node in model.graph.node:
        if node.op_type == "Constant":
            arr = numpy_helper.to_array(_attrs(node)["value"])
            consts[node.output[0]] = arr
            ranks[node.output[0]] = arr.ndim
            g.names[node.output[0]] = g.const(arr, node.output[0])
            continue
        if node.op_type == "Split":
            _convert_split(g, node, consts, shapes)
            continue
        if len(node.output) != 1:
            raise RwkvExportError(f"ONNX op {node.op_type} (node {node.name}) has several outputs; not handled")
        _convert_node(g, node, consts, ranks)
    sig_out = {}
    for v in model.graph.output:
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        np_dt = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
        # a graph output that is a node's output keeps its ONNX name; give it a stable Identity if it was renamed
        src = g.names[v.name]
        if src != v.name:
            src = g.node("Identity", [src], v.name, {"T": {"type": "DT_FLOAT"}})
        sig_out[v.name] = {"name": f"{src}:0", "dtype": _TF_DTYPES[np_dt], "tensorShape": _shape(dims)}
    # drop constants nothing reads (e.g. ONNX initializers folded away)
    used = {i.split(":")[0] for n in g.nodes for i in n["input"]} | {s["name"][:-2] for s in sig_out.values()}
    keep = {n["name"] for n in g.nodes if n["op"] != "Const" or n["name"] in used}
    nodes = [n for n in g.nodes if n["name"] in keep]
    weights = [(n, a) for n, a in g.weights if n in keep]
    return nodes, weights, {"inputs": sig_in, "outputs": sig_out}


def _affine_uint8(w):
    """TF.js's uint8 format: q = round((w - min) / scale), value = q * scale + min, with 0.0 exactly representable
    (as tensorflowjs_converter does), so zeros stay zeros."""
    import numpy as np

    lo, hi = float(min(w.min(), 0.0)), float(max(w.max(), 0.0))
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = round(-lo / scale)
    lo = -zero_point * scale
    q = np.clip(np.round((w - lo) / scale), 0, 255).astype(np.uint8)
    return q, {"dtype": "uint8", "min": lo, "scale": scale, "original_dtype": "float32"}


def _encode(name: str, arr, variant: str) -> tuple[bytes, dict]:
    import numpy as np

    spec = {"name": name, "shape": [int(d) for d in arr.shape], "dtype": arr.dtype.name}
    if spec["dtype"] not in ("float32", "int32"):
        raise RwkvExportError(f"weight {name} has dtype {arr.dtype}; TF.js weights are float32 or int32")
    quantize = variant != "fp32" and arr.dtype == np.float32 and arr.ndim == 2 and arr.size >= QUANTIZE_MIN_ELEMENTS
    if not quantize:
        return np.ascontiguousarray(arr).tobytes(), spec
    if variant == "fp16":
        spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
        return arr.astype(np.float16).tobytes(), spec
    if variant == "uint8":
        q, spec["quantization"] = _affine_uint8(arr)
        return q.tobytes(), spec
    raise ValueError(variant)


def write_graph_model(nodes, weights, signature, out_dir: Path, variant: str, shard_bytes: int = SHARD_BYTES,
                      producer: str = "rwkv-export") -> list[str]:
    """Write model.json and its shards into out_dir; return the shard file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    specs, blobs = [], []
    for name, arr in weights:
        b, spec = _encode(name, arr, variant)
        specs.append(spec)
        blobs.append(b)
    data = b"".join(blobs)
    n = max(1, -(-len(data) // shard_bytes))
    paths = [f"group1-shard{i + 1}of{n}.bin" for i in range(n)]
    for i, p in enumerate(paths):
        (out_dir / p).write_bytes(data[i * shard_bytes:(i + 1) * shard_bytes])
    model = {
        "format": "graph-model",
        "generatedBy": producer,
        "convertedBy": f"{producer} (ONNX step graph -> TF.js graph model)",
        "signature": signature,
        "modelTopology": {"node": nodes, "library": {}, "versions": {"producer": 1}},
        "weightsManifest": [{"paths": paths, "weights": specs}],
        "userDefinedMetadata": {"rwkv_export": {"variant": variant, "quantization": VARIANTS[variant]}},
    }
    (out_dir / MODEL_FILE).write_text(json.dumps(model, separators=(",", ":")))
    return paths


def check_variants(variants) -> list[str]:
    variants = list(dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise RwkvExportError(f"unknown tfjs variant(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(VARIANTS)}")
    return variants


def export_tfjs(module, out_dir: Path, variants=("fp32",), *, onnx_path: Path | None = None,
                shard_bytes: int = SHARD_BYTES) -> list[dict]:
    """Write one TF.js graph model folder per variant under `out_dir`; return their manifest graph entries.

    `module` is the fp32 step module; it is exported to ONNX in a temporary folder unless `onnx_path` (the same module's
    fp32 ONNX, e.g. from an `onnx` export in the same run) is given."""
    out_dir = Path(out_dir)
    variants = check_variants(variants)
    with tempfile.TemporaryDirectory(prefix="rwkv-tfjs-") as tmp:
        if onnx_path is None:
            if getattr(getattr(module, "options", None), "dtype", "float32") != "float32":
                raise RwkvExportError("the TF.js writer needs the float32 step module (variants only change storage)")
            onnx_path = Path(tmp) / "step.onnx"
            onnx_target.export_step(module, onnx_path)
        nodes, weights, signature = onnx_to_graph(Path(onnx_path))
    states = [t.name for t in module.state_spec]
    _check_signature(signature, states)
    entries = []
    for variant in variants:
        folder = folder_name(variant)
        shards = write_graph_model(nodes, weights, signature, out_dir / folder, variant, shard_bytes)
        inputs, outputs = io_spec(out_dir / folder / MODEL_FILE, states)
        entries.append({
            "name": "step", "kind": "step", "format": NAME, "variant": variant,
            "file": f"{folder}/{MODEL_FILE}", "data_files": [f"{folder}/{p}" for p in shards],
            "quantization": VARIANTS[variant], "inputs": inputs, "outputs": outputs, "parity": None,
        })
    return entries


def _check_signature(signature: dict, states: list[str]) -> None:
    from ..embed import HIDDEN

    want_in = {TOKEN_INPUT, *states}
    want_out = {LOGITS_OUTPUT, *(state_output_name(s) for s in states)}
    if HIDDEN in signature["outputs"]:  # a step module made with embedding
        want_out.add(HIDDEN)
    if set(signature["inputs"]) != want_in or set(signature["outputs"]) != want_out:
        raise RwkvExportError(f"step graph I/O {sorted(signature['inputs'])} -> {sorted(signature['outputs'])} "
                              f"is not the step contract")


_FROM_TF = {"DT_FLOAT": "float32", "DT_INT32": "int32"}


def io_spec(model_json: Path, states: list[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Manifest inputs/outputs read from model.json's signature: `name` is the signature key a client looks up.
    States in `states` order (the state spec's); without it, every input NAME with an output NAME_out."""
    sig = json.loads(Path(model_json).read_text())["signature"]

    def describe(key, spec, role, state=None):
        e = {"name": key, "dtype": _FROM_TF[spec["dtype"]],
             "shape": [int(d["size"]) for d in spec["tensorShape"].get("dim", [])], "role": role,
             "tensor": spec["name"]}
        if state:
            e["state"] = state
        return e

    ins, outs = sig["inputs"], sig["outputs"]
    if states is None:
        states = [n for n in ins if state_output_name(n) in outs]
    inputs = [describe(TOKEN_INPUT, ins[TOKEN_INPUT], "token")] + [
        describe(s, ins[s], "state", s) for s in states]
    outputs = [describe(LOGITS_OUTPUT, outs[LOGITS_OUTPUT], "logits")] + [
        describe(state_output_name(s), outs[state_output_name(s)], "state", s) for s in states]
    from ..embed import OUTPUT_ROLES

    outputs += [describe(name, outs[name], role) for name, role in OUTPUT_ROLES.items() if name in outs]
    return inputs, outputs
