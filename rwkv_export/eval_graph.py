"""The "eval graph" of a folder's prompt graph: the same file, rewritten to give the logits of every token ([T, V]),
for the quality gate (quality.py) to read the eval text in chunks instead of one step-graph call per token.

A prompt graph (arch/rwkvN/onnx_graph.py `build_sequence`) returns only the last token's logits: before the last
layer's channel mix it selects the last row of the residual stream and of the FFN's two inputs, and the head reads
that row only. Each of those selections is a Slice node named with LAST_ROW_PREFIX (`last_row_for_logits`, which
every build_sequence uses for them and for nothing else). The rewrite, on the file's own proto and weights:

1. every LAST_ROW_PREFIX node becomes an Identity of its input: the last layer's FFN and the head then see every
   row, which is what build_sequence computes with all_logits (the state outputs have their own last-row nodes and
   are untouched); the logits output is declared [T, V]. No such node is an error (EvalGraphError): a prompt graph
   written before the names, or by other code, cannot be rewritten blindly.
2. int8 (onnxruntime's dynamic formulation, quantize.py): DynamicQuantizeLinear quantizes its whole input with one
   scale and zero point. A step graph's input is one token, so each token gets its own; in a [T, K] chunk the T
   tokens would share one, and the eval graph would not compute what the step graph computes. Each
   DynamicQuantizeLinear is replaced by the same formula per row (per token: every axis but the MatMul's row axis
   -2 is reduced, so RWKV-6's [5, T, Dm] mix LoRA input is quantized over its 5 slices per token, as the step graph's
   [5, 1, Dm]): onnxruntime's definition, scale = (max(0, max x) - min(0, min x)) / 255 (1 where that is 0),
   zero point = round_half_even(clip(0 - min / scale, 0, 255)), q = clip(round_half_even(x / scale) + zero point,
   0, 255). Its MatMulIntegers get a zero point per row, which onnxruntime's MatMulInteger does not take (a_zero_point
   must be a scalar): each computes (a - za)(w - zw) = a (w - zw) - za colsum(w - zw) instead, in int32, exact
   (colsum(w - zw) a constant computed from the file's weights).
   What follows (Cast, the scale products) broadcasts the [T, 1] scale as it did the scalar one.
   int4 (MatMulNBits, accuracy_level 4: activations quantized to int8 per row and block of K inside the kernel), the
   other int8 formulations (MatMulNBits; qdq: weights dequantized, fp32 matmul) and fp16 compute each row on its own
   already: nothing to rewrite. tests/test_eval_graph.py checks every (version, variant) against its step graph.

The rewritten proto is written beside the prompt graph as a hidden temporary file (onnxruntime reads the weights from
the folder's own data file; the file is removed once the session has started, which then holds them), or where the
folder cannot be written to, into a temporary folder with the data files hard-linked or copied. EvalGraphRunner
wraps one such graph.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import RwkvExportError

LAST_ROW_PREFIX = "last_row_for_logits/"
_INT64_MAX = (1 << 63) - 1


class EvalGraphError(RwkvExportError):
    """A prompt graph cannot be rewritten into an eval graph (no named last-row nodes, an unexpected node)."""


def last_row_for_logits(g, x: str, axis: int = 0) -> str:
    """x[-1:] along `axis` in a prompt graph under construction (onnx_build.Graph), as a node the eval graph's rewrite
    finds by name: use it for the selections that keep the last layer's FFN and the head to the last token, and for
    nothing else (not for the states)."""
    out = g.op("Slice", x, g.ints(-1), g.ints(_INT64_MAX), g.ints(axis))
    node = g.nodes[-1]
    node.name = LAST_ROW_PREFIX + node.name
    return out


# -- the rewrite ------------------------------------------------------------------------------------------------------


class _Nodes:
    """New nodes (collected in `new`, which the caller empties per replaced node) and constants (added to the graph's
    initializers once each), with unique names."""

    def __init__(self, graph, tag: str):
        self.graph, self.tag, self.n, self.consts = graph, tag, 0, {}
        self.new: list = []

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.tag}/{hint}_{self.n}"

    def op(self, op_type: str, *inputs, out: str | None = None, **attrs) -> str:
        from onnx import helper

        name = self.name(op_type)
        out = out or name
        self.new.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        return out

    def const(self, value, dtype) -> str:
        from onnx import numpy_helper

        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self.consts:
            t = numpy_helper.from_array(a, self.name("const"))
            self.graph.initializer.append(t)
            self.consts[key] = t.name
        return self.consts[key]


def _rows_of_logits(model) -> int:
    """Step 1 of the module docstring; returns how many nodes were rewritten."""
    from onnx import helper

    g = model.graph
    found = 0
    for i, n in enumerate(g.node):
        if not n.name.startswith(LAST_ROW_PREFIX):
            continue
        if n.op_type != "Slice":
            raise EvalGraphError(f"node {n.name} is a {n.op_type}, not the Slice the eval graph rewrite expects")
        g.node[i].CopyFrom(helper.make_node("Identity", [n.input[0]], list(n.output), name=n.name + "/all_rows"))
        found += 1
    if not found:
        raise EvalGraphError(f"the prompt graph has no '{LAST_ROW_PREFIX}' nodes (the last-row selections before the "
                             "head): written by an older rwkv-export or other code; re-export it to check it in chunks")
    logits = [o for o in g.output if o.name == "logits"]
    if len(logits) != 1:
        raise EvalGraphError("the prompt graph has no 'logits' output")
    dim = logits[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "T"
    return found


def _column_sums(folder: Path, w, zw) -> np.ndarray:
    """sum over K of (w - zw) for a MatMulInteger weight [.., K, N] and its zero point, as int32 [.., 1, N]: computed
    here from the file (a constant of N values), where onnxruntime would fold an int32 copy of every weight at
    session start (at 169M shapes ~0.5 GB more peak memory)."""
    q = _array(folder, w).astype(np.int64)
    z = _array(folder, zw).astype(np.int64)
    return ((q - z).sum(axis=-2, keepdims=True)).astype(np.int32)


def _array(folder: Path, t) -> np.ndarray:
    """An initializer's values, read from its external-data file (memory-mapped) where it has one."""
    from onnx import TensorProto, helper, numpy_helper

    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    return np.memmap(folder / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(t.dims))


def _per_row_dynamic_quantization(model, folder: Path) -> int:
    """Step 2 of the module docstring: every DynamicQuantizeLinear per row, its MatMulIntegers with the per-row zero
    point folded out; returns how many DynamicQuantizeLinear nodes were rewritten."""
    from onnx import TensorProto

    g = model.graph
    consumers: dict[str, list] = {}
    for n in g.node:
        for j, v in enumerate(n.input):
            consumers.setdefault(v, []).append((n, j))
    inits = {t.name: t for t in g.initializer}
    per_row_zps = {n.output[2] for n in g.node if n.op_type == "DynamicQuantizeLinear"}
    nb = _Nodes(g, "eval_per_row")
    out_nodes, count = [], 0
    for n in g.node:
        nb.new = []
        if n.op_type == "DynamicQuantizeLinear":
            _quantize_per_row(nb, n)
            count += 1
            zp = n.output[2]
            for user, j in consumers.get(zp, []):
                if user.op_type != "MatMulInteger" or j != 2:
                    raise EvalGraphError(f"the zero point of {n.name} feeds {user.op_type} {user.name} (input {j}): "
                                         "the per-row rewrite only knows MatMulInteger's a_zero_point")
            out_nodes += nb.new
            continue
        if n.op_type == "MatMulInteger" and len(n.input) > 2 and n.input[2] in per_row_zps:
            if len(n.input) < 4 or n.input[1] not in inits or n.input[3] not in inits:
                raise EvalGraphError(f"{n.name}: a MatMulInteger without a constant weight and its zero point")
            a, w, za, zw = n.input[:4]
            result = n.output[0]
            raw = nb.op("MatMulInteger", a, w, nb.const(0, np.uint8), zw)  # a (w - zw)
            colsum = nb.const(_column_sums(folder, inits[w], inits[zw]), np.int32)  # colsum(w - zw), [.., 1, N]
            nb.op("Sub", raw, nb.op("Mul", nb.op("Cast", za, to=TensorProto.INT32), colsum), out=result)
            out_nodes += nb.new
            continue
        out_nodes.append(n)
    del g.node[:]
    g.node.extend(out_nodes)
    return count


def _quantize_per_row(nb: _Nodes, n) -> None:
    """onnxruntime's DynamicQuantizeLinear (uint8) per row (all axes but -2), into n's own output names."""
    from onnx import TensorProto

    x = n.input[0]
    xq, xs, xzp = n.output
    f32 = np.float32
    rank = nb.op("Size", nb.op("Shape", x))
    lead = nb.op("Range", nb.const(0, np.int64), nb.op("Sub", rank, nb.const(2, np.int64)), nb.const(1, np.int64))
    axes = nb.op("Concat", lead, nb.const([-1], np.int64), axis=0)  # every axis but the rows' (-2)
    lo = nb.op("Min", nb.op("ReduceMin", x, axes, keepdims=1), nb.const(0.0, f32))
    hi = nb.op("Max", nb.op("ReduceMax", x, axes, keepdims=1), nb.const(0.0, f32))
    span = nb.op("Sub", hi, lo)
    scale = nb.op("Where", nb.op("Equal", span, nb.const(0.0, f32)), nb.const(1.0, f32),
                  nb.op("Div", span, nb.const(255.0, f32)), out=xs)
    zp = nb.op("Round", nb.op("Clip", nb.op("Sub", nb.const(0.0, f32), nb.op("Div", lo, scale)), nb.const(0.0, f32),
                               nb.const(255.0, f32)))
    nb.op("Cast", zp, to=TensorProto.UINT8, out=xzp)
    q = nb.op("Clip", nb.op("Add", nb.op("Round", nb.op("Div", x, scale)), zp), nb.const(0.0, f32),
              nb.const(255.0, f32))
    nb.op("Cast", q, to=TensorProto.UINT8, out=xq)


def eval_model(path: str | Path, per_row_int8: bool = True):
    """The eval graph of the prompt graph file `path` as an ONNX ModelProto whose initializers still point at the
    file's external data (by file name, relative to the folder). per_row_int8=False leaves the int8 activations
    quantized per chunk (wrong: for tests that show the rewrite is needed)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx's DecodeError and friends share no base class
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise EvalGraphError(f"cannot read {Path(path).name} as an ONNX model: {first}") from None
    _rows_of_logits(model)
    if per_row_int8:
        _per_row_dynamic_quantization(model, Path(path).parent)
    return model


def data_files(model) -> list[str]:
    """The external-data file names a model's initializers name."""
    names = set()
    for t in model.graph.initializer:
        if t.data_location == 1:  # TensorProto.EXTERNAL
            names |= {e.value for e in t.external_data if e.key == "location"}
    return sorted(names)


def write_eval_graph(folder: str | Path, file: str, dst: str | Path, per_row_int8: bool = True) -> Path:
    """Write the eval graph of `folder`/`file` as a file named `.eval-*.onnx` into the folder `dst`: `folder` itself
    (it reads its data files where they are), or another folder, given hard links to (or, across file systems,
    copies of) the data files (onnxruntime refuses a symbolic link that leaves the model's folder). Returns its path;
    the caller removes it (a session holds the weights once it has started)."""
    import onnx

    folder, dst = Path(folder), Path(dst)
    model = eval_model(folder / file, per_row_int8)
    if dst.resolve() != folder.resolve():
        for name in data_files(model):
            if Path(name).name != name:
                raise EvalGraphError(f"{file} names a data file outside its folder: {name}")
            try:
                os.link(folder / name, dst / name)
            except OSError:
                shutil.copyfile(folder / name, dst / name)
    fd, out = tempfile.mkstemp(prefix=".eval-", suffix=".onnx", dir=dst)
    os.close(fd)
    try:
        onnx.save(model, out)
    except BaseException:
        os.unlink(out)
        raise
    return Path(out)


class EvalGraphRunner:
    """new_state() / logits_seq(tokens, state) -> (logits [T, V] float32, state) over the eval graph of a manifest's
    prompt graph entry (onnx), at most `max_chunk` tokens a call. close() removes its temporary folder."""

    def __init__(self, root: str | Path, manifest: dict, graph: dict, threads: int | None = None,
                 per_row_int8: bool = True):
        from .runners import OrtSession
        from .seq_runner import sequence_io

        if graph.get("kind") != "sequence" or graph.get("format") not in ("onnx", "ort") \
                or not str(graph["file"]).endswith(".onnx"):
            raise EvalGraphError(f"{graph.get('file')}: an eval graph is made from an ONNX prompt graph only")
        self.manifest, self.graph = manifest, graph
        self.io = sequence_io(graph)
        self.max_chunk = self.io["max_chunk"]
        self._tmp = None
        try:
            path = write_eval_graph(root, graph["file"], root, per_row_int8)
        except OSError:  # a folder we may not write to: a temporary one, with the data files linked or copied
            self._tmp = tempfile.mkdtemp(prefix="rwkv-eval-graph-")
            path = write_eval_graph(root, graph["file"], self._tmp, per_row_int8)
        try:
            self.session = OrtSession(path.parent, {**graph, "file": path.name}, threads)
        finally:
            path.unlink()
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
        self._states = list(self.io["state_in"])
        self._out = [self.io["logits"]["name"]] + [self.io["state_out"][s]["name"] for s in self._states]

    def new_state(self) -> dict:
        from .runners import NP_DTYPES

        state = {}
        for t in self.manifest["state"]["tensors"]:
            spec = self.io["state_in"][t["name"]]
            state[t["name"]] = np.full(spec["shape"], t["init"], dtype=NP_DTYPES[spec["dtype"]])
        return state

    def logits_seq(self, tokens, state: dict):
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if not 1 <= tokens.size <= self.max_chunk:
            raise RwkvExportError(f"an eval graph call takes 1 to {self.max_chunk} tokens, got {tokens.size}")
        feeds = {self.io["tokens"]["name"]: tokens, **{self.io["state_in"][s]["name"]: state[s] for s in self._states}}
        outs = self.session.run(self._out, feeds)
        return outs[0], dict(zip(self._states, outs[1:]))

    def close(self) -> None:
        self.session = None
