"""TF.js target (browsers): the step graph and the prompt graph as one TF.js graph model (model.json + weight shards),
one folder per variant.

Chain: our own ONNX graphs (targets/onnx.py's step graph, targets/onnx_seq.py's prompt graph) translated node by node
into a TF.js graph model. RWKV-4's step graph uses 14 ONNX op types; RWKV-5.2 and 6 add the batched MatMul over the
heads (the [H, N, N] WKV state: BatchMatMulV2, batch dims broadcast) and LayerNormalization over [.., H, N]
(GroupNorm); RWKV-7 adds ReduceL2 (Sqrt of Sum of Square), Clip (Maximum/Minimum) and ReduceSum (Sum). Each has a
direct TF op that TF.js executes (`_Translation`); any other op is a one-line error naming it. We chose this over
tensorflowjs_converter on a SavedModel (onnx2tf) because that chain needs TensorFlow (~1 GB), onnx2tf 1.x's exact pins
on Python 3.11 and tensorflowjs 4.22, whose install is broken on current TensorFlow (it only imports with two modules
stubbed). The format we write is the one TF.js 4.x reads (GraphDef as JSON in `modelTopology`, weights in
`weightsManifest`), and it is checked by running it in Node with @tensorflow/tfjs.

The prompt graph (T tokens + state -> last logits + state, T dynamic, 1 <= T <= max_chunk as in the ONNX folder) needs
the shape arithmetic of the scans: Shape, Size, Range, ConstantOfShape (Fill), Expand (BroadcastTo), Slice with
computed ends (StridedSlice, its begin/end vectors gathered into place), Split with computed sizes (SplitV), Where
(SelectV2), Greater/Less/Equal/And, integer Div and Mod, CumSum, Transpose, Squeeze. TF.js executes them with dynamic
shapes (it reads shape tensors on the CPU at run time), so no fixed chunk is needed, unlike TFLite. What does not carry
over as it is, and what we write instead:
- int64: TF.js has none. Every integer is int32 (T, positions, indices: far below 2**31); a constant that does not fit
  is an error, except Slice's "to the end" (INT64_MAX), which becomes StridedSlice's end mask.
- ONNX's integer Div truncates toward zero, TF's FloorDiv floors: written as sign(a) sign(b) FloorDiv(|a|, |b|).
  Integer Mod (fmod=0) is floor modulo in both (FloorMod); float Mod (fmod=1) is not handled.
- Expand broadcasts both ways, BroadcastTo one way: only an input of size-1 dims (the scalars we expand) is handled.
- Reshape's 0 copies a dim in ONNX and means 0 in TF: a constant shape's 0 is replaced by the static dim; a computed
  shape is passed as it is (ours are built from sizes >= 1); allowzero is refused.
The prompt graph lives in the step graph's model.json: its nodes beside the step graph's (named `prefill/...`), every
weight and the state inputs shared, so a page downloads and holds the weights once; TF.js runs only the nodes the
requested outputs need. TF.js reads one `signature` per model: it stays the step graph's, and the prompt graph's
(keys `tokens`, the states, `logits`, `<state>_out`) is userDefinedMetadata.rwkv_export.signatures.prefill, with
max_chunk. The manifest gives the prompt graph an entry of kind "sequence" naming the same file, "signature":
"prefill", and each input/output's `tensor`. userDefinedMetadata.rwkv_export.onnx_weights records, per graph ("step",
"prefill"), which TF.js weight each ONNX initializer read as a tensor became ({initializer: weight name}; the
translation shares a weight both graphs name alike and renames where names clash): what tf_quality.py's stand-ins
(an ONNX prompt graph carrying the file's weights) look the file's weights up by, without translating again.

Contract: model.json's `signature` maps the logical names (`token`, the state spec's names, `logits`, `<state>_out`) to
tensors; clients resolve through it, never by position. Token int32 (TF.js has no int64), state and logits float32
in every variant.

Variants only change how the weight matrices (the step graph's MatMul weights and embedding table) are stored; TF.js
dequantizes them to float32 when it loads the model, so compute is float32 in all of them:
- fp32: as is;
- fp16: float16 storage (half the download);
- uint8: affine per tensor (TF.js's format: value = q * scale + min), a quarter of the download.
Vectors (LayerNorm, token-shift mixes, decay) stay float32: they are <1% of the bytes and the decay is sensitive. The
prompt graph's own constants (scan masks and index tables) stay exact in every variant.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from ..errors import RwkvExportError
from . import onnx as onnx_target
from .onnx_seq import SEQ_DIM, TOKENS_INPUT, TOKENS_ROLE

NAME = "tfjs"
MODEL_FILE = "model.json"
TOKEN_INPUT = onnx_target.TOKEN_INPUT
LOGITS_OUTPUT = onnx_target.LOGITS_OUTPUT
TOKEN_DTYPE = "int32"
PREFILL = "prefill"  # the prompt graph: its manifest entry's name and signature, in the step graph's model.json
PREFIX = "prefill/"  # the TF node names of the prompt graph's own nodes
# userDefinedMetadata.rwkv_export key: {graph ("step", "prefill"): {ONNX initializer: TF.js weight}} (module docstring)
WEIGHT_NAMES = "onnx_weights"
VARIANTS = {
    "fp32": "float32 weights",
    "fp16": "weight matrices stored as float16, dequantized to float32 at load",
    "uint8": "weight matrices stored as uint8 (affine, per tensor), dequantized to float32 at load",
}
# tensorflowjs_converter's default shard size: small enough for browser caches and CDN limits
SHARD_BYTES = 4 * 1024 * 1024
# weights with at least this many elements and rank 2 are quantized; vectors stay float32 (see the module docstring)
QUANTIZE_MIN_ELEMENTS = 1024
# weights are encoded into the shards this many elements at a time: the float16 or uint8 copy of one block (and
# uint8's float32 temporaries) is all an export holds beside the module, not a copy of a 0.15 GB embedding matrix
ENCODE_BLOCK = 1 << 20


def folder_name(variant: str) -> str:
    return f"tfjs_{variant}" if variant != "fp32" else "tfjs"


def state_output_name(state: str) -> str:
    return onnx_target.state_output_name(state)


_TF_DTYPES = {"float32": "DT_FLOAT", "int32": "DT_INT32", "bool": "DT_BOOL"}
# ONNX dtypes as TF.js holds them: it has no int64 and computes in float32
_AS_TFJS = {"int64": "int32", "float16": "float32", "float64": "float32"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")
_INT32 = (-(2**31), 2**31 - 1)
_CONST_OPERANDS = {"Slice", "Reshape", "Unsqueeze", "Squeeze", "ReduceSum", "ReduceL2"}


class _Graph:
    """Builds TF GraphDef nodes in TF.js's JSON form and collects the constant weights. One _Graph may hold the step
    and the prompt graph: `param` shares a weight both translations name alike (the same module parameter),
    `placeholder` an input both have (a state)."""

    def __init__(self):
        self.nodes: list[dict] = []
        self.weights: list[tuple] = []  # (TF name, array) of every constant
        self.params: dict[str, tuple] = {}  # ONNX initializer name -> (TF name, array)
        self.placeholders: dict[str, tuple[str, str, list]] = {}  # input name -> (TF name, TF dtype, shape)
        self.outputs: set[str] = set()  # TF nodes that are some graph's output
        self._used: set[str] = set()

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
        if op not in ("Placeholder", "Const", "GatherV2", "Cast", "ExpandDims", "Shape", "Size", "Range"):
            a.setdefault("T", {"type": _TF_DTYPES[dtype]})
        self.nodes.append({"name": name, "op": op, "input": list(inputs), "attr": a})
        return name

    def const(self, value, hint: str) -> str:
        import numpy as np

        value = np.asarray(value)
        if value.dtype == np.int64:
            if value.size and (value.max() > _INT32[1] or value.min() < _INT32[0]):
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

    def param(self, value, name: str) -> str:
        """An ONNX initializer as a constant; a second graph's initializer of the same name and value is the same
        constant (the step and prompt graphs share every weight)."""
        import numpy as np

        if name in self.params:
            tf_name, have = self.params[name]
            if have.shape == value.shape and have.dtype == value.dtype and (_same_memory(have, value) or
                                                                            np.array_equal(have, value)):
                return tf_name
        tf_name = self.const(value, name)
        self.params.setdefault(name, (tf_name, value))
        return tf_name

    def placeholder(self, name: str, dtype: str, dims: list) -> str:
        if name in self.placeholders:
            tf_name, have_dt, have_dims = self.placeholders[name]
            if (have_dt, have_dims) != (dtype, dims):
                raise RwkvExportError(f"input {name} is {dtype} {dims} in one graph and {have_dt} {have_dims} in the "
                                      "other")
            return tf_name
        tf_name = self.fresh(name)
        self.nodes.append({"name": tf_name, "op": "Placeholder", "input": [], "attr": {
            "dtype": {"type": dtype}, "shape": {"shape": _shape(dims)}}})
        self.placeholders[name] = (tf_name, dtype, dims)
        return tf_name

    def pruned(self) -> tuple[list[dict], list]:
        """(nodes, weights) without the constants nothing reads (e.g. ONNX initializers folded away)."""
        used = {i.split(":")[0] for n in self.nodes for i in n["input"]} | self.outputs
        keep = {n["name"] for n in self.nodes if n["op"] != "Const" or n["name"] in used}
        return [n for n in self.nodes if n["name"] in keep], [(n, a) for n, a in self.weights if n in keep]


def _same_memory(a, b) -> bool:
    """Whether two arrays of the same shape and dtype are views of the same bytes (the same module parameter, as
    both graphs' initializers are when their weights come from an _ArrayStore): equal without reading them."""
    ia, ib = a.__array_interface__, b.__array_interface__
    return ia["data"][0] == ib["data"][0] and ia["strides"] == ib["strides"]


class _ArrayStore:
    """onnx_build.WeightStore's interface for the graphs we translate and never save with their weights: each
    weight is kept as the array it was given (a view of the module's parameter, no copy) and its initializer points
    at it (external data at location LOCATION, offset = its index here), so the ONNX files written and read back on
    the way hold no weights (protobuf serializing and shape inference over 0.7 GB at 169M shapes took most of
    this export's time) and every weight is in memory once, as the module holds it. Like a WeightStore it shares a
    name placed twice (the step and prompt graphs' same parameter), unless the second array is another one."""

    LOCATION = "rwkv-export-tfjs-weights-in-memory"

    def __init__(self):
        self.path = Path(self.LOCATION)  # onnx_build names the external-data location after it; nothing is written
        self.arrays: list = []
        self.placed: dict[str, tuple[int, int, tuple, int]] = {}  # as WeightStore's: name -> (offset, length, ...)

    def place(self, name: str, a) -> tuple[int, int]:
        from ..onnx_build import onnx_dtype

        have = self.placed.get(name)
        if have is None or not (self.arrays[have[0]].shape == a.shape and self.arrays[have[0]].dtype == a.dtype
                                and _same_memory(self.arrays[have[0]], a)):
            have = self.placed[name] = (len(self.arrays), int(a.nbytes), tuple(a.shape), onnx_dtype(a.dtype))
            self.arrays.append(a)
        return have[0], have[1]

    def array(self, init):
        """The array of an initializer placed here, or None for one stored any other way."""
        from onnx import TensorProto

        if init.data_location != TensorProto.EXTERNAL:
            return None
        info = {e.key: e.value for e in init.external_data}
        if info.get("location") != self.LOCATION:
            return None
        return self.arrays[int(info["offset"])]

    def close(self) -> None:
        pass


def _shape(shape) -> dict:
    """A TF TensorShapeProto; None or a negative size is a dimension of unknown size (-1)."""
    return {"dim": [{"size": str(-1 if d is None or int(d) < 0 else int(d))} for d in shape]} if len(shape) else {}


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(values) -> dict:
    return {"list": {"i": [str(int(v)) for v in values]}}


class _Translation:
    """One ONNX graph translated into a _Graph: each ONNX value's TF tensor in `names`, constants made on first use
    (an int64 constant that does not fit int32, such as Slice's "to the end", is read here and never stored)."""

    def __init__(self, g: _Graph, model, prefix: str = "", store: _ArrayStore | None = None):
        from onnx import numpy_helper, shape_inference

        try:
            model = shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - ranks and dtypes are then unknown where needed, which errors clearly
            pass
        self.g, self.prefix = g, prefix
        self.consts = {}
        for init in model.graph.initializer:
            arr = store.array(init) if store is not None else None
            self.consts[init.name] = numpy_helper.to_array(init) if arr is None else arr
        self.initializers = set(self.consts)
        self.shapes: dict[str, list] = {}  # value -> static shape, None for a dimension of unknown size
        self.types: dict[str, str] = {}  # value -> numpy dtype name as TF.js holds it
        for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
            tt = v.type.tensor_type
            if tt.HasField("shape"):
                self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            if tt.elem_type:
                self.types[v.name] = self._np_type(tt.elem_type)
        for name, arr in self.consts.items():
            self.shapes[name], self.types[name] = list(arr.shape), _AS_TFJS.get(arr.dtype.name, arr.dtype.name)
        self.names: dict[str, str] = {}
        self.model = model

    @staticmethod
    def _np_type(elem_type: int) -> str:
        import onnx

        name = onnx.helper.tensor_dtype_to_np_dtype(elem_type).name
        return _AS_TFJS.get(name, name)

    def tf(self, name: str) -> str:
        if name not in self.names:
            if name not in self.consts:
                raise RwkvExportError(f"ONNX value {name} is read before it is computed")
            arr = self.consts[name]
            self.names[name] = self.g.param(arr, name) if name in self.initializers else self.g.const(
                arr, self.prefix + name)
        return self.names[name]

    def weight_names(self) -> dict[str, str]:
        """ONNX initializer -> the TF.js weight it became, for the initializers read as tensors (not as shapes or
        axes, which are folded into the nodes)."""
        return {n: self.names[n] for n in self.consts if n in self.initializers and n in self.names}

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def dtype(self, name: str) -> str:
        dt = self.types.get(name)
        if dt not in _TF_DTYPES:
            raise RwkvExportError(f"ONNX value {name} has dtype {dt or 'unknown'}; the TF.js writer handles float32, "
                                  "int32 (int64) and bool")
        return dt

    def const_of(self, name: str, what: str):
        if name not in self.consts:
            raise RwkvExportError(f"{what}: only a constant is handled here")
        return self.consts[name]

    def int_const(self, values, hint: str) -> str:
        import numpy as np

        return self.g.const(np.asarray(values, np.int32), self.prefix + hint)

    def run(self) -> dict:
        """Translate every node and return the graph's signature ({inputs, outputs}: ONNX name -> TF tensor spec)."""
        sig_in, sig_out = {}, {}
        for v in self.model.graph.input:
            if v.name in self.consts:
                continue
            dims = self.shapes.get(v.name, [])
            dt = _TF_DTYPES[self.dtype(v.name)]
            self.names[v.name] = self.g.placeholder(v.name, dt, dims)
            sig_in[v.name] = {"name": f"{self.names[v.name]}:0", "dtype": dt, "tensorShape": _shape(dims)}
        for node in self.model.graph.node:
            if node.op_type == "Constant":
                from onnx import numpy_helper

                self.consts[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
            elif node.op_type == "Split":
                self._split(node)
            elif len(node.output) != 1:
                raise RwkvExportError(f"ONNX op {node.op_type} (node {node.name}) has several outputs; not handled")
            else:
                self.names[node.output[0]] = self._node(node)
        for v in self.model.graph.output:
            # a graph output that is a node's output keeps its ONNX name; give it a stable Identity if it was renamed
            src = self.tf(v.name)
            if src != self.prefix + v.name:
                src = self.g.node("Identity", [src], self.prefix + v.name, dtype=self.dtype(v.name))
            self.g.outputs.add(src)
            sig_out[v.name] = {"name": f"{src}:0", "dtype": _TF_DTYPES[self.dtype(v.name)],
                               "tensorShape": _shape(self.shapes.get(v.name, []))}
        return {"inputs": sig_in, "outputs": sig_out}

    # -- ops -------------------------------------------------------------------------------------------------------
    def _node(self, node) -> str:
        """Translate one single-output ONNX node; return its TF tensor."""
        import numpy as np

        g, op, ins, out = self.g, node.op_type, list(node.input), node.output[0]
        a = _attrs(node)
        # the inputs an op reads as constants (axes, shapes, slice bounds) are read there, not stored
        x = [self.tf(i) if i else None for i in (ins[:1] if op in _CONST_OPERANDS else ins)]
        hint = self.prefix + out
        dt = self.dtype(out)
        binary = {"Add": "AddV2", "Sub": "Sub", "Mul": "Mul", "Greater": "Greater", "Less": "Less",
                  "Equal": "Equal", "And": "LogicalAnd"}
        unary = {"Exp": "Exp", "Sigmoid": "Sigmoid", "Relu": "Relu", "Sqrt": "Sqrt", "Neg": "Neg", "Tanh": "Tanh"}
        if op in binary:
            return g.node(binary[op], x, hint, dtype=self.dtype(ins[0]))
        if op in unary:
            return g.node(unary[op], x, hint, dtype=dt)
        if op == "Div":
            if dt == "float32":
                return g.node("RealDiv", x, hint)
            # ONNX's integer Div truncates toward zero, TF's FloorDiv floors: sign(a) sign(b) (|a| // |b|)
            sign = g.node("Mul", [g.node("Sign", [x[0]], f"{hint}/sign_a", dtype=dt),
                                  g.node("Sign", [x[1]], f"{hint}/sign_b", dtype=dt)], f"{hint}/sign", dtype=dt)
            q = g.node("FloorDiv", [g.node("Abs", [x[0]], f"{hint}/abs_a", dtype=dt),
                                    g.node("Abs", [x[1]], f"{hint}/abs_b", dtype=dt)], f"{hint}/abs_q", dtype=dt)
            return g.node("Mul", [sign, q], hint, dtype=dt)
        if op == "Mod":
            if a.get("fmod", 0) or dt != "int32":
                raise RwkvExportError(f"Mod {node.name}: only integer Mod with fmod=0 (floor modulo) is handled")
            return g.node("FloorMod", x, hint, dtype=dt)
        if op in ("Max", "Min"):
            tf_op = "Maximum" if op == "Max" else "Minimum"
            res = x[0]
            for i, other in enumerate(x[1:]):
                res = g.node(tf_op, [res, other], hint if i == len(x) - 2 else f"{hint}/{i}", dtype=dt)
            return res
        if op == "Where":  # TF's Where is the one-input "indices of true"; the three-input select is SelectV2
            return g.node("SelectV2", x, hint, dtype=dt)
        if op == "MatMul":
            ra, rb = self.rank(ins[0]), self.rank(ins[1])
            if ra is None or rb is None or ra < 2 or rb < 2:
                raise RwkvExportError(f"MatMul {node.name} on ranks {ra}x{rb}: the TF.js writer handles matmuls of "
                                      "known rank >= 2 only (no shape inference, or a vector operand)")
            if (ra, rb) == (2, 2):
                return g.node("MatMul", x, hint, {"transpose_a": {"b": False}, "transpose_b": {"b": False}})
            # batched over the leading dims, broadcast as in ONNX/numpy (RWKV-5+: the heads' [H, N, N] state)
            return g.node("BatchMatMulV2", x, hint, {"adj_x": {"b": False}, "adj_y": {"b": False}})
        if op in ("ReduceSum", "ReduceL2"):
            # opset 18: the axes are the second input (a constant in our graphs; reducing over all axes is not needed)
            if len(ins) < 2 or ins[1] not in self.consts or self.consts[ins[1]].size == 0:
                raise RwkvExportError(f"{op} {node.name}: only constant, non-empty axes are handled")
            ax = self.int_const(self.consts[ins[1]].reshape(-1), f"{out}/axes")
            keep = {"keep_dims": {"b": bool(a.get("keepdims", 1))}, "Tidx": {"type": "DT_INT32"}}
            if op == "ReduceL2":  # sqrt(sum(x^2)): TF has no L2-norm reduction op
                sq = g.node("Sum", [g.node("Square", [x[0]], f"{hint}/sq"), ax], f"{hint}/sum_sq", keep)
                return g.node("Sqrt", [sq], hint)
            return g.node("Sum", [x[0], ax], hint, keep, dtype=dt)
        if op == "CumSum":
            keep = {"exclusive": {"b": bool(a.get("exclusive", 0))}, "reverse": {"b": bool(a.get("reverse", 0))},
                    "Tidx": {"type": "DT_INT32"}}
            return g.node("Cumsum", x, hint, keep, dtype=dt)
        if op == "Clip":
            # opset >= 11: min and max are optional inputs; an absent one leaves that side unbounded
            lo, hi = (x + [None, None])[1:3]
            res = x[0]
            if lo is not None:
                res = g.node("Maximum", [res, lo], hint if hi is None else f"{hint}/min", dtype=dt)
            if hi is not None:
                res = g.node("Minimum", [res, hi], hint, dtype=dt)
            return res if res != x[0] else g.node("Identity", [res], hint, dtype=dt)
        if op == "Gather":
            axis = self.int_const(a.get("axis", 0), f"{out}/axis")
            return g.node("GatherV2", [x[0], x[1], axis], hint, {"batch_dims": {"i": "0"}})
        if op == "Unsqueeze":
            axes = self.const_of(ins[1], f"Unsqueeze {node.name}'s axes").reshape(-1) if len(ins) > 1 else np.array(
                a["axes"])
            rank = self.rank(out)
            if rank is None and any(int(v) < 0 for v in axes):
                raise RwkvExportError(f"Unsqueeze {node.name}: negative axes on a value of unknown rank")
            axes = sorted(int(v) + rank if int(v) < 0 else int(v) for v in axes)
            res = x[0]
            for i, ax in enumerate(axes):
                res = g.node("ExpandDims", [res, self.int_const(ax, f"{out}/axis{i}")],
                             hint if i == len(axes) - 1 else f"{hint}/{i}", {"Tdim": {"type": "DT_INT32"}})
            return res
        if op == "Squeeze":
            axes = self.const_of(ins[1], f"Squeeze {node.name}'s axes").reshape(-1) if len(ins) > 1 else a.get(
                "axes", [])
            rank = self.rank(ins[0])
            if rank is None and any(int(v) < 0 for v in axes):
                raise RwkvExportError(f"Squeeze {node.name}: negative axes on a value of unknown rank")
            axes = [int(v) + rank if int(v) < 0 else int(v) for v in axes]
            return g.node("Squeeze", x[:1], hint, {"squeeze_dims": _ints(axes)}, dtype=dt)
        if op == "Transpose":
            perm = a.get("perm") or list(range(self.rank(ins[0]) - 1, -1, -1))
            return g.node("Transpose", [x[0], self.int_const(perm, f"{out}/perm")], hint,
                          {"Tperm": {"type": "DT_INT32"}}, dtype=dt)
        if op == "Concat":
            axis = self.int_const(a["axis"], f"{out}/axis")
            return g.node("ConcatV2", [*x, axis], hint, {"N": {"i": str(len(x))}, "Tidx": {"type": "DT_INT32"}},
                          dtype=dt)
        if op == "Reshape":
            return g.node("Reshape", [x[0], self._reshape_shape(node)], hint, {"Tshape": {"type": "DT_INT32"}},
                          dtype=dt)
        if op == "Slice":
            return self._slice(node, x, hint, dt)
        if op == "Shape":
            if "start" in a or "end" in a:
                raise RwkvExportError(f"Shape {node.name}: the start/end attributes are not handled")
            return g.node("Shape", x, hint, {"T": {"type": _TF_DTYPES[self.dtype(ins[0])]},
                                             "out_type": {"type": "DT_INT32"}})
        if op == "Size":
            return g.node("Size", x, hint, {"T": {"type": _TF_DTYPES[self.dtype(ins[0])]},
                                            "out_type": {"type": "DT_INT32"}})
        if op == "Range":
            return g.node("Range", x, hint, {"Tidx": {"type": _TF_DTYPES[dt]}})
        if op == "ConstantOfShape":
            from onnx import numpy_helper

            value = numpy_helper.to_array(a["value"]).reshape(()) if "value" in a else np.float32(0)
            return g.node("Fill", [x[0], g.const(value, f"{hint}/value")], hint, {"index_type": {"type": "DT_INT32"}},
                          dtype=dt)
        if op == "Expand":
            # ONNX broadcasts both ways, TF's BroadcastTo one way: the same where x has size-1 dims only and no
            # more of them than the target shape (Expand of a scalar or [1, .., 1] constant, which is all we write)
            shape, target = self.shapes.get(ins[0]), self.shapes.get(ins[1])
            if shape is None or target is None or target[0] is None or any(d != 1 for d in shape) or len(
                    shape) > target[0]:
                raise RwkvExportError(f"Expand {node.name}: only an input of known size-1 dims, expanded to a "
                                      "shape of known length at least its rank, is handled")
            return g.node("BroadcastTo", x, hint, {"Tidx": {"type": "DT_INT32"}}, dtype=dt)
        if op == "LayerNormalization":
            return self._layer_norm(node, x, a, hint)
        if op == "Cast":
            return g.node("Cast", x[:1], hint, {"SrcT": {"type": _TF_DTYPES[self.dtype(ins[0])]},
                                                "DstT": {"type": _TF_DTYPES[dt]}})
        if op == "Identity":
            return g.node("Identity", x, hint, dtype=dt)
        raise RwkvExportError(f"ONNX op {op} (node {node.name}) has no TF.js translation in this writer")

    def _reshape_shape(self, node) -> str:
        """Reshape's target shape. ONNX's 0 copies the input's dim (TF's would mean size 0): a constant shape's 0
        becomes that dim where it is static; a computed shape is used as it is (ours come from Shape/Concat of
        sizes >= 1), unless the node asks for allowzero."""
        import numpy as np

        src, shape = node.input
        if _attrs(node).get("allowzero", 0):
            raise RwkvExportError(f"Reshape {node.name} with allowzero is not handled")
        if shape not in self.consts:
            return self.tf(shape)
        target = self.consts[shape].astype(np.int64).copy()
        for i in np.flatnonzero(target == 0):
            dims = self.shapes.get(src)
            if dims is None or i >= len(dims) or dims[i] is None:
                raise RwkvExportError(f"Reshape {node.name}: a 0 (copy this dim) over a dim of unknown size")
            target[i] = dims[i]
        return self.int_const(target, f"{node.output[0]}/shape")

    def _slice(self, node, x, hint: str, dt: str) -> str:
        """ONNX Slice -> TF StridedSlice over every axis (the unsliced ones masked). Constant starts and ends are
        clamped to int32, an end past int32 (INT64_MAX: "to the end") is the end mask; computed ones are gathered
        into place from their own tensor."""
        import numpy as np

        ins = list(node.input) + [""] * (5 - len(node.input))
        rank = self.rank(ins[0])
        if rank is None:
            raise RwkvExportError(f"Slice {node.name}: the input's rank is unknown")
        n = len(self.consts[ins[1]].reshape(-1)) if ins[1] in self.consts else (self.shapes.get(ins[1]) or [None])[0]
        if n is None:
            raise RwkvExportError(f"Slice {node.name}: the number of sliced axes is unknown")
        axes = self.const_of(ins[3], f"Slice {node.name}'s axes").reshape(-1) if ins[3] else np.arange(n)
        steps = self.const_of(ins[4], f"Slice {node.name}'s steps").reshape(-1) if ins[4] else np.ones(n, np.int64)
        if (steps <= 0).any():
            raise RwkvExportError(f"Slice {node.name}: only positive steps are handled")
        axes = [int(v) + rank if int(v) < 0 else int(v) for v in axes]
        begin_mask = end_mask = sum(1 << i for i in range(rank) if i not in axes)
        strides = np.ones(rank, np.int64)
        strides[axes] = steps

        def vector(which, j):
            nonlocal end_mask
            name = ins[j]
            if name in self.consts:
                full = np.zeros(rank, np.int64)
                for ax, v in zip(axes, self.consts[name].reshape(-1)):
                    if v >= _INT32[1] and which == "end":
                        end_mask |= 1 << ax
                    full[ax] = np.clip(v, *_INT32)
                return self.int_const(full, f"{node.output[0]}/{which}")
            # computed: [0, values...] gathered so that axis ax reads its value and every other axis the 0
            pick = np.zeros(rank, np.int64)
            pick[axes] = np.arange(1, len(axes) + 1)
            padded = self.g.node("ConcatV2", [self.int_const([0], f"{node.output[0]}/{which}_zero"), self.tf(name),
                                              self.int_const(0, f"{node.output[0]}/{which}_axis")],
                                 f"{hint}/{which}_padded", {"N": {"i": "2"}, "Tidx": {"type": "DT_INT32"}},
                                 dtype="int32")
            return self.g.node("GatherV2", [padded, self.int_const(pick, f"{node.output[0]}/{which}_pick"),
                                            self.int_const(0, f"{node.output[0]}/{which}_gather_axis")],
                               f"{hint}/{which}", {"batch_dims": {"i": "0"}})

        begin, end = vector("begin", 1), vector("end", 2)
        return self.g.node("StridedSlice", [x[0], begin, end, self.int_const(strides, f"{node.output[0]}/strides")],
                           hint, {"begin_mask": {"i": str(begin_mask)}, "end_mask": {"i": str(end_mask)},
                                  "ellipsis_mask": {"i": "0"}, "new_axis_mask": {"i": "0"},
                                  "shrink_axis_mask": {"i": "0"}, "Index": {"type": "DT_INT32"}}, dtype=dt)

    def _layer_norm(self, node, x, a, hint: str) -> str:
        g = self.g
        axis = a.get("axis", -1)
        rank = self.rank(node.input[0])
        if axis != -1 and not (rank is not None and axis == rank - 1):
            raise RwkvExportError(f"LayerNormalization {node.name} over axis {axis}: only the last axis is handled")
        ax = self.int_const([-1], f"{node.output[0]}/axis")
        import numpy as np

        eps = g.const(np.float32(a.get("epsilon", 1e-5)), f"{hint}/epsilon")
        keep = {"keep_dims": {"b": True}, "Tidx": {"type": "DT_INT32"}}
        mean = g.node("Mean", [x[0], ax], f"{hint}/mean", keep)
        d = g.node("Sub", [x[0], mean], f"{hint}/centered")
        var = g.node("Mean", [g.node("Square", [d], f"{hint}/sq"), ax], f"{hint}/var", keep)
        inv = g.node("Rsqrt", [g.node("AddV2", [var, eps], f"{hint}/var_eps")], f"{hint}/rstd")
        y = g.node("Mul", [d, inv], f"{hint}/normed")
        if len(x) > 1 and x[1]:
            y = g.node("Mul", [y, x[1]], f"{hint}/scaled")
        if len(x) > 2 and x[2]:
            y = g.node("AddV2", [y, x[2]], f"{hint}/shifted")
        return g.node("Identity", [y], hint)

    def _split(self, node) -> None:
        """ONNX Split -> TF SplitV; output i is the TF tensor `name:i`. The sizes: a constant, a computed tensor
        (RWKV-7's prompt graph splits [2T] into [T, T]), or equal parts of an axis of static size."""
        import numpy as np

        axis = int(_attrs(node).get("axis", 0))
        n = len(node.output)
        out = node.output[0]
        if len(node.input) > 1 and node.input[1]:
            name = node.input[1]
            sizes = self.int_const(self.consts[name].reshape(-1), f"{out}/sizes") if name in self.consts else self.tf(
                name)
        else:  # equal parts (opset 18's num_outputs): the axis must have a static size
            shape = self.shapes.get(node.input[0])
            if shape is None or shape[axis] is None:
                raise RwkvExportError(f"Split {node.name}: equal parts of an axis of unknown size are not handled")
            sizes = self.int_const(np.full(n, shape[axis] // n), f"{out}/sizes")
        res = self.g.node("SplitV", [self.tf(node.input[0]), sizes, self.int_const(axis, f"{out}/axis")],
                          self.prefix + out, {"num_split": {"i": str(n)}, "Tlen": {"type": "DT_INT32"}},
                          dtype=self.dtype(node.input[0]))
        for i, o in enumerate(node.output):
            self.names[o] = f"{res}:{i}" if i else res


def onnx_to_graph(onnx_path: Path) -> tuple[list[dict], list, dict]:
    """ONNX graph -> (TF nodes, [(const name, array)], signature)."""
    import onnx

    g = _Graph()
    signature = _Translation(g, onnx.load(str(onnx_path))).run()
    nodes, weights = g.pruned()
    return nodes, weights, signature


def _affine_uint8(w):
    """TF.js's uint8 format: q = round((w - min) / scale), value = q * scale + min, with 0.0 exactly representable
    (as tensorflowjs_converter does), so zeros stay zeros."""
    lo, scale, spec = _affine_params(w)
    return _affine_q(w, lo, scale), spec


def _affine_params(w) -> tuple[float, float, dict]:
    """(min, scale, the weight spec's quantization entry) of _affine_uint8, from the whole tensor's range."""
    lo, hi = float(min(w.min(), 0.0)), float(max(w.max(), 0.0))
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = round(-lo / scale)
    lo = -zero_point * scale
    return lo, scale, {"dtype": "uint8", "min": lo, "scale": scale, "original_dtype": "float32"}


def _affine_q(w, lo: float, scale: float):
    """_affine_uint8's codes of `w`: clip(round((w - min) / scale), 0, 255), in float32 as numpy computes that
    expression, in place in one temporary (elementwise: any part of the tensor gives its part of the bytes)."""
    import numpy as np

    t = np.subtract(w, lo, dtype=np.float32)
    np.divide(t, scale, out=t)
    np.rint(t, out=t)  # np.round with no decimals: half to even
    np.clip(t, 0, 255, out=t)
    return t.astype(np.uint8)


def _to_float16(w):
    """w (float32) as float16. torch's cast (F16C) is ~9x numpy's on the 2-core box and gives numpy's bytes for every
    float32 that is not a NaN (round to nearest even, subnormals, overflow to inf; tests/test_tfjs.py checks); NaN
    payloads differ, so a block with a NaN is cast by numpy."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():  # a read-only array: torch warns that it may write to it, which it does not here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        t = torch.from_numpy(w)
    if bool(torch.isnan(t).any()):
        return w.astype(np.float16)
    return t.to(torch.float16).numpy()


def _weight_spec(name: str, arr, variant: str, quantizable=None) -> tuple[dict, str | None, int]:
    """(spec, storage, bytes) of one weight: storage None (as it is), "float16" or "uint8"; the uint8 spec's
    min and scale are added when it is encoded (_encoded). `quantizable`: the names a storage variant may quantize
    (None: any that qualifies)."""
    import numpy as np

    spec = {"name": name, "shape": [int(d) for d in arr.shape], "dtype": arr.dtype.name}
    if spec["dtype"] not in ("float32", "int32", "bool"):
        raise RwkvExportError(f"weight {name} has dtype {arr.dtype}; TF.js weights are float32, int32 or bool")
    quantize = variant != "fp32" and arr.dtype == np.float32 and arr.ndim == 2 and arr.size >= QUANTIZE_MIN_ELEMENTS
    if not quantize or (quantizable is not None and name not in quantizable):
        return spec, None, int(arr.nbytes)
    if variant == "fp16":
        spec["quantization"] = {"dtype": "float16", "original_dtype": "float32"}
        return spec, "float16", int(arr.size) * 2
    if variant == "uint8":
        return spec, "uint8", int(arr.size)
    raise ValueError(variant)


def _encoded(arr, spec: dict, storage: str | None, block: int):
    """The stored bytes of one weight as uint8 arrays, `block` elements at a time (a float16 or uint8 copy of one
    block is all that is made; float32 and int32 weights are their own bytes, not copied)."""
    import numpy as np

    flat = np.ascontiguousarray(arr).reshape(-1)
    if storage is None:
        yield flat.view(np.uint8)
        return
    if storage == "uint8":
        lo, scale, spec["quantization"] = _affine_params(flat)
    for i in range(0, flat.size, block):
        part = flat[i:i + block]
        yield (_to_float16(part) if storage == "float16" else _affine_q(part, lo, scale)).view(np.uint8)


class _ShardFiles:
    """`total` bytes written in order into files of `shard_bytes` each (the last one shorter): the shards of one
    concatenation of every weight's bytes, written as they come (never the concatenation itself)."""

    def __init__(self, out_dir: Path, total: int, shard_bytes: int):
        n = max(1, -(-total // shard_bytes))
        self.names = [f"group1-shard{i + 1}of{n}.bin" for i in range(n)]
        self.out_dir, self.total, self.shard_bytes = out_dir, total, shard_bytes
        self._f, self._opened, self._room, self.written = None, 0, 0, 0

    def write(self, data) -> None:
        """Write `data` (a uint8 array) at the current place, across shard boundaries."""
        mv = memoryview(data)
        while len(mv):
            if self._room == 0:
                self._next()
            k = min(self._room, len(mv))
            self._f.write(mv[:k])
            mv, self._room, self.written = mv[k:], self._room - k, self.written + k

    def _next(self) -> None:
        if self._f is not None:
            self._f.close()
        if self._opened == len(self.names):
            raise RwkvExportError(f"the weights came to more than the {self.total} bytes their specs give")
        self._f = open(self.out_dir / self.names[self._opened], "wb")
        self._opened, self._room = self._opened + 1, self.shard_bytes

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None and self._f is None:  # no bytes at all: one empty shard, as the manifest names one
            self._next()
        if self._f is not None:
            self._f.close()
        if exc_type is None and self.written != self.total:
            raise RwkvExportError(f"wrote {self.written} bytes of weights, not the {self.total} their specs give")


def write_graph_model(nodes, weights, signature, out_dir: Path, variant: str, shard_bytes: int = SHARD_BYTES,
                      producer: str = "rwkv-export", *, quantizable=None, metadata: dict | None = None) -> list[str]:
    """Write model.json and its shards into out_dir; return the shard file names. `metadata`: more entries for
    userDefinedMetadata.rwkv_export (the prompt graph's signature). The weights are encoded and written one at a
    time, ENCODE_BLOCK elements at a time: the bytes are the concatenation of every weight's (in order) cut into
    shards of `shard_bytes`, without holding that concatenation or a whole encoded copy of the model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = [(arr, *_weight_spec(name, arr, variant, quantizable)) for name, arr in weights]
    with _ShardFiles(out_dir, sum(n for *_, n in plan), shard_bytes) as shards:
        for arr, spec, storage, _ in plan:
            for part in _encoded(arr, spec, storage, ENCODE_BLOCK):
                shards.write(part)
    paths = shards.names
    specs = [spec for _, spec, _, _ in plan]
    model = {
        "format": "graph-model",
        "generatedBy": producer,
        "convertedBy": f"{producer} (ONNX graphs -> TF.js graph model)",
        "signature": signature,
        "modelTopology": {"node": nodes, "library": {}, "versions": {"producer": 1}},
        "weightsManifest": [{"paths": paths, "weights": specs}],
        "userDefinedMetadata": {"rwkv_export": {"variant": variant, "quantization": VARIANTS[variant],
                                                **(metadata or {})}},
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


def build_graph_model(module, onnx_path: Path | None, tmp: Path, prefill: bool) -> tuple[list, list, dict, set, dict]:
    """(nodes, weights, step signature, names a storage variant may quantize, rwkv_export metadata) of one TF.js graph
    model holding the step graph and, with `prefill`, the prompt graph: our ONNX graphs translated into one GraphDef.
    `onnx_path`: the module's ONNX step graph if already written (else written into `tmp`, as the prompt graph is)."""
    nodes, weights, signature, quantizable, meta, _ = _build_graph_model(module, onnx_path, tmp, prefill)
    return nodes, weights, signature, quantizable, meta


def prompt_graph_weights(module, tmp: Path) -> tuple[Path, "_ArrayStore", dict[str, str], set[str]]:
    """(the module's ONNX prompt graph, written weightless into `tmp`; the _ArrayStore holding its weights; ONNX
    initializer name -> the name of the TF.js weight export_tfjs writes for it; the TF.js names of the step graph's
    weights, which a storage variant may quantize) by the very translation export_tfjs runs (the step graph first,
    then the prompt graph: a shared weight gets the step graph's name, one of the same name and other values a fresh
    one, stored exactly in every variant). tf_quality.py builds its stand-in from these."""
    _, _, _, quantizable, _, (path, store, names) = _build_graph_model(module, None, Path(tmp), True)
    return path, store, names, quantizable


def _build_graph_model(module, onnx_path: Path | None, tmp: Path, prefill: bool):
    import onnx

    from . import onnx_seq

    if getattr(getattr(module, "options", None), "dtype", "float32") != "float32":
        raise RwkvExportError("the TF.js writer needs the float32 step module (variants only change storage)")
    # the graphs are written without their weights, which stay the module's arrays (_ArrayStore)
    store = _ArrayStore()
    if onnx_path is None:
        onnx_target.export_step(module, tmp / "step.onnx", store=store)
        step = onnx.load(str(tmp / "step.onnx"), load_external_data=False)
    else:
        step = onnx.load(str(onnx_path))
    g = _Graph()
    tr = _Translation(g, step, store=store)
    signature = tr.run()
    del step
    # which TF.js weight each ONNX initializer became, per graph (tf_quality builds its stand-ins from it)
    weight_names = {"step": tr.weight_names()}
    del tr
    states = [t.name for t in module.state_spec]
    _check_signature(signature, states)
    # the step graph's matrices are what a storage variant quantizes; the prompt graph's own constants (its scan's
    # masks and index tables) stay exact
    quantizable = {tf_name for tf_name, _ in g.params.values()}
    meta = {}
    if prefill:
        path = tmp / "prefill.onnx"
        onnx_seq.export_sequence(module, path, store=store)
        seq = _Translation(g, onnx.load(str(path), load_external_data=False), PREFIX, store)
        prompt = seq.run()
        _check_signature(prompt, states, TOKENS_INPUT)
        # the prompt graph's weights as TF.js names them (the initializers read as tensors, not as shapes or axes)
        weight_names[PREFILL] = seq.weight_names()
        meta = {"signatures": {PREFILL: prompt}, **onnx_seq.graph_meta(path)}
        prompt_names = (path, store, weight_names[PREFILL])
    else:
        meta, prompt_names = {}, (None, store, {})
    meta[WEIGHT_NAMES] = weight_names
    nodes, weights = g.pruned()
    return nodes, weights, signature, quantizable, meta, prompt_names


def export_tfjs(module, out_dir: Path, variants=("fp32",), *, onnx_path: Path | None = None,
                shard_bytes: int = SHARD_BYTES, prefill: bool = True) -> list[dict]:
    """Write one TF.js graph model folder per variant under `out_dir`; return their manifest graph entries: the step
    graph and, with `prefill` (the default, as `rwkv-export tfjs`), the prompt graph (kind "sequence"), which lives in
    the same model.json (`rwkv-export check` runs it through check.SEQUENCE_RUNNERS; an --embedding export has none).

    `module` is the fp32 step module; it is exported to ONNX in a temporary folder unless `onnx_path` (the same module's
    fp32 ONNX step graph, e.g. from an `onnx` export in the same run) is given. The prompt graph is always written
    here (node by node: milliseconds)."""
    out_dir = Path(out_dir)
    variants = check_variants(variants)
    with tempfile.TemporaryDirectory(prefix="rwkv-tfjs-") as tmp:
        nodes, weights, signature, quantizable, meta = build_graph_model(module, onnx_path, Path(tmp), prefill)
    states = [t.name for t in module.state_spec]
    entries = []
    for variant in variants:
        folder = folder_name(variant)
        shards = write_graph_model(nodes, weights, signature, out_dir / folder, variant, shard_bytes,
                                   quantizable=quantizable, metadata=meta)
        files = {"file": f"{folder}/{MODEL_FILE}", "data_files": [f"{folder}/{p}" for p in shards]}
        # the signatures just written into model.json (io_spec would read them back)
        inputs, outputs = signature_io(signature, states)
        entries.append({
            "name": "step", "kind": "step", "format": NAME, "variant": variant, **files,
            "quantization": VARIANTS[variant], "inputs": inputs, "outputs": outputs, "parity": None,
        })
        if prefill:
            inputs, outputs = signature_io(meta["signatures"][PREFILL], states, PREFILL)
            entries.append({
                "name": PREFILL, "kind": "sequence", "format": NAME, "variant": variant, **files,
                "signature": PREFILL, "quantization": VARIANTS[variant], "max_chunk": meta["max_chunk"],
                "all_logits": meta["all_logits"], "inputs": inputs, "outputs": outputs, "parity": None,
            })
    return entries


def _check_signature(signature: dict, states: list[str], token: str = TOKEN_INPUT) -> None:
    from ..embed import HIDDEN, HIDDEN_SUM

    want_in = {token, *states}
    want_out = {LOGITS_OUTPUT, *(state_output_name(s) for s in states)}
    if HIDDEN in signature["outputs"]:  # a step module made with embedding
        want_out |= {HIDDEN} | ({HIDDEN_SUM} if token == TOKENS_INPUT else set())
    if set(signature["inputs"]) != want_in or set(signature["outputs"]) != want_out:
        what = "prompt" if token == TOKENS_INPUT else "step"
        raise RwkvExportError(f"{what} graph I/O {sorted(signature['inputs'])} -> {sorted(signature['outputs'])} "
                              f"is not the {what} contract")


_FROM_TF = {"DT_FLOAT": "float32", "DT_INT32": "int32"}


def model_signature(model_json: dict, name: str = "step") -> dict:
    """A graph's signature in a model.json: the step graph's is TF.js's own `signature`; the prompt graph's is
    userDefinedMetadata.rwkv_export.signatures.prefill (TF.js reads one signature per model)."""
    if name == "step":
        return model_json["signature"]
    sigs = model_json.get("userDefinedMetadata", {}).get("rwkv_export", {}).get("signatures", {})
    if name not in sigs:
        raise RwkvExportError(f"model.json has no '{name}' signature (has step{''.join(', ' + k for k in sigs)})")
    return sigs[name]


def io_spec(model_json: Path, states: list[str] | None = None, graph: str = "step") -> tuple[list[dict], list[dict]]:
    """Manifest inputs/outputs read from model.json's signature of `graph` ("step" or "prefill"): `name` is the
    signature key a client looks up, `tensor` the TF tensor it resolves to. States in `states` order (the state
    spec's); without it, every input NAME with an output NAME_out. The prompt graph's token dimension is SEQ_DIM."""
    return signature_io(model_signature(json.loads(Path(model_json).read_text()), graph), states, graph)


def signature_io(sig: dict, states: list[str] | None = None, graph: str = "step") -> tuple[list[dict], list[dict]]:
    """io_spec from the signature itself (model_signature's value)."""

    def describe(key, spec, role, state=None):
        shape = [int(d["size"]) for d in spec["tensorShape"].get("dim", [])]
        e = {"name": key, "dtype": _FROM_TF[spec["dtype"]], "shape": [SEQ_DIM if d < 0 else d for d in shape],
             "role": role, "tensor": spec["name"]}
        if state:
            e["state"] = state
        return e

    ins, outs = sig["inputs"], sig["outputs"]
    if states is None:
        states = [n for n in ins if state_output_name(n) in outs]
    token = (TOKENS_INPUT, TOKENS_ROLE) if graph == PREFILL else (TOKEN_INPUT, "token")
    inputs = [describe(token[0], ins[token[0]], token[1])] + [describe(s, ins[s], "state", s) for s in states]
    outputs = [describe(LOGITS_OUTPUT, outs[LOGITS_OUTPUT], "logits")] + [
        describe(state_output_name(s), outs[state_output_name(s)], "state", s) for s in states]
    from ..embed import OUTPUT_ROLES

    outputs += [describe(name, outs[name], role) for name, role in OUTPUT_ROLES.items() if name in outs]
    return inputs, outputs


class TFJSSequenceRunner:
    """new_state() / forward(tokens, state) -> (logits [1, V] of the last token, state) over a TF.js prompt graph, in
    chunks of at most max_chunk (any size: T is dynamic). It lives in its step graph's model.json, so one Node process
    (tf_runners.TFJSStepRunner on the step entry of the same file, on its `backend`) serves both, through its `prefill`
    request."""

    def __init__(self, root: Path, manifest: dict, graph: dict, node_dir: Path | None = None,
                 chunk: int | None = None, backend: str | None = None):
        from ..errors import ManifestError
        from ..seq_runner import sequence_io
        from ..tf_runners import TFJSStepRunner

        self.manifest, self.graph = manifest, graph
        self.io = sequence_io(graph)
        if chunk is not None and not 1 <= chunk <= self.io["max_chunk"]:
            raise RwkvExportError(f"chunk must lie in [1, {self.io['max_chunk']}] (the graph's max_chunk), got {chunk}")
        self.chunk = chunk or self.io["max_chunk"]
        self.vocab_size = int(manifest["model"]["vocab_size"])
        step = [g for g in manifest["graphs"] if g["kind"] == "step" and g["format"] == graph["format"]
                and g["file"] == graph["file"]]
        if not step:
            raise ManifestError(f"graph {graph['file']} ({graph['variant']}): no step graph in the same file, whose "
                                "Node process runs the prompt graph")
        self.step_runner = TFJSStepRunner(root, manifest, step[0], node_dir=node_dir, backend=backend)
        self.backend, self.engine = self.step_runner.backend, self.step_runner.engine  # TFJSStepRunner's, in words
        by_tensor = {spec["tensor"]: s for s, spec in self.io["state_in"].items()}
        step_io = self.step_runner.io["state_in"]
        if {s: spec["tensor"] for s, spec in step_io.items()} != {s: t for t, s in by_tensor.items()}:
            self.close()
            raise ManifestError(f"{graph['file']}: the prompt graph's state inputs are not the step graph's")
        self.last_seconds = None  # time the last forward spent in Node's prompt graph calls

    def new_state(self) -> dict:
        return self.step_runner.new_state()

    def forward(self, tokens, state: dict):
        """Feed the tokens (in chunks of at most `chunk`) from `state` (not modified); return the last token's logits
        [1, V] and the state after it."""
        import numpy as np

        from ..seq_runner import check_tokens, chunk_sizes

        arr = check_tokens(tokens, self.vocab_size, np.int64)
        missing = [s for s in self.io["state_in"] if s not in state]
        if missing:
            raise RwkvExportError(f"state is missing {missing}")
        r = self.step_runner
        start, logits, self.last_seconds = 0, None, 0.0
        for size in chunk_sizes(len(arr), self.chunk):
            resp = r._ask({"op": PREFILL, "tokens": [int(t) for t in arr[start:start + size]],
                           "state": r._state_req(state)})
            logits = resp["logits"].reshape(1, -1)
            state = r._state_resp(resp)
            self.last_seconds += resp["seconds"]
            start += size
        return logits, state

    def close(self) -> None:
        self.step_runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
