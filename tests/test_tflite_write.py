"""targets/tflite_write.py: ONNX graphs written as TFLite flatbuffers, checked against onnxruntime on the same graph.

- each ONNX op the writer translates, as a one-node graph on random inputs: once on run-time inputs (the TFLite op
  or ops it becomes) and once on constants (folded by the writer in numpy, the file then holds the constant);
- the whole step and prompt graphs of each RWKV version's tiny model on random tokens and states;
- the > 2 GB layout (weights after the flatbuffer, at offsets), forced on a tiny model;
- an op without a translation: a one-line error naming it.

Why onnxruntime is the reference: it runs the very graph translated, so a difference is the translation's (or float32
kernel rounding), not the model's. The model against runtime_ref's fp64 forward is test_tflite.py's.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rwkv_export.errors import RwkvExportError

# One op against onnxruntime, both in float32: the same formula, kernels that round differently (XNNPACK's exp,
# sigmoid and tanh are polynomial approximations; LayerNorm is decomposed into MEAN, RSQRT, ...). Measured <= 1.4e-7
# of max|ref| over the cases below; the bound leaves room for other CPUs' kernels, and a wrong translation (an axis,
# a layout, a transposed weight) is off by O(1).
OP_MAX_REL = 1e-5
# A whole graph (tiny models: 2 layers, step and 16-token prompt graphs) against onnxruntime, every output, max|Δ|
# over max|ref|: measured <= 7.2e-7 (RWKV-5.2's prompt graph); the bound is the TFLite fp32 parity gate's
# (parity.py: 1e-5), which these files must pass against fp64 anyway.
GRAPH_MAX_REL = 1e-5
OPSET = 18
INT64_MAX = np.iinfo(np.int64).max


def _run_both(model, feeds: dict, tmp_path, shapes=None, inline_limit=None):
    """(onnxruntime outputs, LiteRT outputs) of `model` on `feeds` (int64 feeds go to TFLite as int32)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from rwkv_export.targets.tflite_write import translate, write_tflite

    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    shapes = shapes or {k: list(v.shape) for k, v in feeds.items()}
    tfl = translate(onnx.load(str(path), load_external_data=False), tmp_path, "sig", shapes)
    kw = {} if inline_limit is None else {"inline_limit": inline_limit}
    write_tflite(tfl, tmp_path / "m.tflite", **kw)
    runner = Interpreter(model_path=str(tmp_path / "m.tflite")).get_signature_runner("sig")
    got = runner(**{k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds.items()})
    return ref, {k: np.array(v) for k, v in got.items()}


def _rel(got, ref) -> float:
    ref = np.asarray(ref, np.float64)
    scale = max(float(np.abs(ref).max()), 1e-30) if ref.size else 1.0
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / scale) if ref.size else 0.0


_ONNX_TYPE = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("int64"): TensorProto.INT64,
              np.dtype("bool"): TensorProto.BOOL, np.dtype("int32"): TensorProto.INT32}


def _one_node(op, inputs: list, consts: dict | None = None, n_out: int = 1, folded: bool = False, **attrs):
    """A graph of one node. `inputs`: arrays, the op's data inputs (graph inputs, or with `folded` initializers);
    `consts`: {position: array} operands that are initializers either way (axes, shapes, weights)."""
    consts = consts or {}
    names, g_inputs, inits, feeds = [], [], [], {}
    data = iter(inputs)
    for i in range(len(inputs) + len(consts)):
        name = f"in{i}"
        arr = consts[i] if i in consts else next(data)
        names.append(name)
        if i in consts or folded:
            inits.append(numpy_helper.from_array(np.asarray(arr), name))
        else:
            g_inputs.append(helper.make_tensor_value_info(name, _ONNX_TYPE[arr.dtype], list(arr.shape)))
            feeds[name] = arr
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"{op}_node", **attrs)
    g = helper.make_graph([node], "g", g_inputs, [helper.make_tensor_value_info(o, 0, None) for o in outs], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    model = onnx.shape_inference.infer_shapes(model)
    for o in model.graph.output:  # the ONNX outputs need their types for onnxruntime
        vi = next((v for v in model.graph.value_info if v.name == o.name), None)
        if vi is not None:
            o.CopyFrom(vi)
    return model, feeds


def _cases():
    r = np.random.default_rng(0)

    def f(*shape, lo=-2.0, hi=2.0):
        return r.uniform(lo, hi, shape).astype(np.float32)

    i64 = np.int64
    return {
        "Add-broadcast": ("Add", [f(2, 3, 4), f(4)], {}, 1, {}),
        "Sub": ("Sub", [f(3, 4), f(3, 1)], {}, 1, {}),
        "Mul": ("Mul", [f(2, 3, 4), f(1, 3, 1)], {}, 1, {}),
        "Div": ("Div", [f(3, 4), f(3, 4, lo=0.5, hi=2.0)], {}, 1, {}),
        "Max-3": ("Max", [f(3, 4), f(4), f(3, 1)], {}, 1, {}),
        "Min": ("Min", [f(3, 4), f(3, 4)], {}, 1, {}),
        "Exp": ("Exp", [f(5, 7)], {}, 1, {}),
        "Sigmoid": ("Sigmoid", [f(5, 7, lo=-6, hi=6)], {}, 1, {}),
        "Relu": ("Relu", [f(5, 7)], {}, 1, {}),
        "Tanh": ("Tanh", [f(5, 7)], {}, 1, {}),
        "Neg": ("Neg", [f(5, 7)], {}, 1, {}),
        "Sqrt": ("Sqrt", [f(5, 7, lo=0.1, hi=4.0)], {}, 1, {}),
        "Clip": ("Clip", [f(4, 6)], {1: np.float32(-0.5), 2: np.float32(0.7)}, 1, {}),
        "Clip-min-only": ("Clip", [f(4, 6)], {1: np.float32(-0.5)}, 1, {}),
        "Where": ("Where", [r.random((3, 4)) > 0.5, f(3, 4), f(4)], {}, 1, {}),
        "Greater": ("Greater", [f(3, 4), f(4)], {}, 1, {}),
        "Less": ("Less", [f(3, 4), f(3, 4)], {}, 1, {}),
        "Equal-int": ("Equal", [r.integers(0, 3, (6,)).astype(i64), r.integers(0, 3, (6,)).astype(i64)], {}, 1, {}),
        "And": ("And", [r.random((5,)) > 0.5, r.random((5,)) > 0.5], {}, 1, {}),
        "Cast-int-float": ("Cast", [r.integers(-5, 5, (4,)).astype(i64)], {}, 1, {"to": TensorProto.FLOAT}),
        "Mod-int": ("Mod", [r.integers(-9, 9, (6,)).astype(i64), np.full(6, 4, i64)], {}, 1, {}),
        "Identity": ("Identity", [f(2, 3)], {}, 1, {}),
        "MatMul-weight": ("MatMul", [f(3, 8)], {1: f(8, 5)}, 1, {}),
        "MatMul-weight-rank3": ("MatMul", [f(2, 3, 8)], {1: f(8, 5)}, 1, {}),
        "MatMul-batched": ("MatMul", [f(2, 3, 4), f(2, 4, 5)], {}, 1, {}),
        "MatMul-broadcast": ("MatMul", [f(2, 1, 3, 4), f(3, 4, 2)], {}, 1, {}),
        "LayerNorm": ("LayerNormalization", [f(3, 16)], {1: f(16), 2: f(16)}, 1, {"axis": -1, "epsilon": 1e-5}),
        "LayerNorm-groups": ("LayerNormalization", [f(1, 4, 8)], {1: f(4, 8), 2: f(4, 8)}, 1,
                             {"axis": 1, "epsilon": 64e-5}),
        "Gather-embedding": ("Gather", [np.array([3, 0, 9], i64)], {0: f(10, 4)}, 1, {"axis": 0}),
        "Gather-axis1": ("Gather", [f(5, 6)], {1: np.array([4, -1], i64)}, 1, {"axis": 1}),
        "Gather-scalar": ("Gather", [f(5, 6)], {1: np.array(2, i64)}, 1, {"axis": 0}),
        "Reshape": ("Reshape", [f(2, 3, 4)], {1: np.array([0, -1], i64)}, 1, {}),
        "Squeeze": ("Squeeze", [f(1, 3, 1, 4)], {1: np.array([0, -2], i64)}, 1, {}),
        "Unsqueeze": ("Unsqueeze", [f(3, 4)], {1: np.array([0, -1], i64)}, 1, {}),
        "Flatten": ("Flatten", [f(2, 3, 4)], {}, 1, {"axis": 2}),
        "Slice": ("Slice", [f(5, 6)], {1: np.array([1, -3], i64), 2: np.array([INT64_MAX, 5], i64),
                                       3: np.array([0, 1], i64)}, 1, {}),
        "Slice-step2": ("Slice", [f(7, 6)], {1: np.array([1], i64), 2: np.array([7], i64), 3: np.array([0], i64),
                                             4: np.array([2], i64)}, 1, {}),
        "Split-sizes": ("Split", [f(6, 4)], {1: np.array([1, 2, 3], i64)}, 3, {"axis": 0}),
        "Split-equal": ("Split", [f(4, 6)], {}, 3, {"axis": 1, "num_outputs": 3}),
        "Concat": ("Concat", [f(2, 3), f(2, 1), f(2, 2)], {}, 1, {"axis": -1}),
        "Transpose": ("Transpose", [f(2, 3, 4)], {}, 1, {"perm": [1, 2, 0]}),
        "Expand": ("Expand", [f(1, 4)], {1: np.array([3, 1, 4], i64)}, 1, {}),
        "ReduceSum": ("ReduceSum", [f(3, 4, 5)], {1: np.array([1], i64)}, 1, {"keepdims": 0}),
        "ReduceSum-keep": ("ReduceSum", [f(3, 4, 5)], {1: np.array([0, 2], i64)}, 1, {"keepdims": 1}),
        "ReduceMean": ("ReduceMean", [f(3, 4)], {1: np.array([-1], i64)}, 1, {"keepdims": 1}),
        "ReduceL2": ("ReduceL2", [f(3, 4)], {1: np.array([-1], i64)}, 1, {"keepdims": 1}),
        "CumSum": ("CumSum", [f(5, 3)], {1: np.array(0, i64)}, 1, {}),
        "CumSum-exclusive-reverse": ("CumSum", [f(5, 3)], {1: np.array(0, i64)}, 1, {"exclusive": 1, "reverse": 1}),
    }


CASES = _cases()


@pytest.mark.parametrize("folded", [False, True], ids=["run-time", "folded"])
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_onnxruntime(case, folded, tmp_path):
    op, inputs, consts, n_out, attrs = CASES[case]
    model, feeds = _one_node(op, inputs, consts, n_out, folded=folded, **attrs)
    ref, got = _run_both(model, feeds, tmp_path)
    assert sorted(got) == sorted(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, (k, got[k].shape, ref[k].shape)
        if ref[k].dtype == np.bool_ or np.issubdtype(ref[k].dtype, np.integer):
            assert np.array_equal(got[k], ref[k]), k
        else:
            assert _rel(got[k], ref[k]) <= OP_MAX_REL, (k, _rel(got[k], ref[k]))


def test_ops_become_the_intended_tflite_ops(tmp_path):
    """The layouts the quantizer and XNNPACK need: a constant 2-D MatMul weight is a FULLY_CONNECTED weight stored
    [out, in]; rows of a constant table by a run-time index are EMBEDDING_LOOKUP; a run-time MatMul is BATCH_MATMUL;
    ops on constants leave no op behind."""
    from rwkv_export.targets.tflite_write import translate

    def ops_of(case, folded=False):
        op, inputs, consts, n_out, attrs = CASES[case]
        model, feeds = _one_node(op, inputs, consts, n_out, folded=folded, **attrs)
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        m = translate(model, tmp_path, "sig", shapes)
        from ai_edge_litert import schema_py_generated as schema

        names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        sg = m.subgraphs[0]
        return [names[m.operatorCodes[o.opcodeIndex].builtinCode] for o in sg.operators], sg, m

    ops, sg, m = ops_of("MatMul-weight")
    assert ops == ["FULLY_CONNECTED"]
    fc = sg.operators[0]
    assert list(sg.tensors[fc.inputs[1]].shape) == [5, 8] and fc.inputs[2] == -1
    assert ops_of("Gather-embedding")[0] == ["EMBEDDING_LOOKUP"]
    assert ops_of("MatMul-batched")[0] == ["BATCH_MATMUL"]
    assert ops_of("Split-sizes")[0] == ["SPLIT_V"]
    # folded: the constant result copied to the output tensor (one RESHAPE), nothing computed at run time
    assert ops_of("LayerNorm", folded=True)[0] == ["RESHAPE"]


def test_unknown_op_is_a_one_line_error_naming_it(tmp_path):
    from rwkv_export.targets.tflite_write import translate

    x = np.ones((2, 3), np.float32)
    model, feeds = _one_node("Softmax", [x], axis=-1)
    with pytest.raises(RwkvExportError, match=r"ONNX op Softmax \(node Softmax_node\) has no TFLite translation") as e:
        translate(model, tmp_path, "sig", {"in0": [2, 3]})
    assert "\n" not in str(e.value)


def test_input_without_a_static_shape_is_an_error(tmp_path):
    from rwkv_export.targets.tflite_write import translate

    model, _ = _one_node("Relu", [np.ones((2, 3), np.float32)])
    with pytest.raises(RwkvExportError, match="no static shape given for graph input in0"):
        translate(model, tmp_path, "sig", {})


# -- whole graphs -----------------------------------------------------------------------------------------------------
VERSIONS = ["4", "5.2", "6", "7"]
CHUNK = 16


@pytest.fixture(scope="module", params=VERSIONS, ids=lambda v: f"v{v}")
def onnx_graphs(request, tmp_path_factory):
    """The tiny model's step and 16-token prompt graph, written as ONNX with one shared external-data file."""
    import torch

    from rwkv_export.arch import get
    from rwkv_export.checkpoint import from_state_dict
    from rwkv_export.onnx_build import WeightStore
    from rwkv_export.targets import onnx as onnx_target
    from rwkv_export.targets import onnx_seq

    torch.set_num_threads(1)
    arch = get(request.param)
    module = arch.step_module(from_state_dict(arch.fake_state_dict("tiny")))
    d = tmp_path_factory.mktemp(f"onnx-v{request.param}")
    with WeightStore(d / "weights.data") as store:
        onnx_target.export_step(module, d / "step.onnx", store=store)
        onnx_seq.export_sequence(module, d / "prefill.onnx", max_chunk=CHUNK, store=store)
    states = {t.name: [int(x) for x in t.shape] for t in module.state_spec}
    return request.param, d, states, module.dims.vocab_size


def _graph_feeds(states, vocab, token_input, n, seed):
    r = np.random.default_rng(seed)
    feeds = {token_input: r.integers(0, vocab, n).astype(np.int64)}
    for name, shape in states.items():
        feeds[name] = (r.standard_normal(shape) * 0.5).astype(np.float32)
    if "att_pp" in feeds:  # RWKV-4's running max exponent: a plausible (negative) level
        feeds["att_pp"] -= 5.0
    return feeds


def _compare_graph(onnx_path, feeds, tmp_path, signature, inline_limit=None):
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from rwkv_export.targets.tflite_write import translate, write_tflite

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    m = translate(onnx.load(str(onnx_path), load_external_data=False), onnx_path.parent, signature, shapes)
    kw = {} if inline_limit is None else {"inline_limit": inline_limit}
    out = tmp_path / f"{signature}.tflite"
    write_tflite(m, out, **kw)
    runner = Interpreter(model_path=str(out)).get_signature_runner(signature)
    got = runner(**{k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds.items()})
    assert sorted(got) == sorted(ref)
    return {k: _rel(got[k], ref[k]) for k in ref}, out


@pytest.mark.parametrize("graph", ["step", "prefill"])
def test_whole_graph_matches_onnxruntime(onnx_graphs, graph, tmp_path):
    version, d, states, vocab = onnx_graphs
    token_input, n = ("token", 1) if graph == "step" else ("tokens", CHUNK)
    for seed in (0, 1):
        errs, _ = _compare_graph(d / f"{graph}.onnx", _graph_feeds(states, vocab, token_input, n, seed), tmp_path,
                                 graph)
        assert max(errs.values()) <= GRAPH_MAX_REL, (version, graph, errs)


def test_tensor_names_are_the_clients(onnx_graphs, tmp_path):
    """tfjs-tflite has no signature API: web_demo/rt_tflite.js binds the first subgraph's tensors by the names
    litert-torch gave them, `<signature>_<name>` and `<signature>_<name>_output`."""
    from ai_edge_litert import schema_py_generated as schema

    version, d, states, vocab = onnx_graphs
    _, path = _compare_graph(d / "step.onnx", _graph_feeds(states, vocab, "token", 1, 0), tmp_path, "step")
    sg = schema.Model.GetRootAs(path.read_bytes(), 0).Subgraphs(0)
    ins = [sg.Tensors(sg.Inputs(i)).Name().decode() for i in range(sg.InputsLength())]
    outs = [sg.Tensors(sg.Outputs(i)).Name().decode() for i in range(sg.OutputsLength())]
    assert sorted(ins) == sorted(["step_token", *(f"step_{s}" for s in states)])
    assert sorted(outs) == sorted(["step_logits_output", *(f"step_{s}_out_output" for s in states)])


def test_offsets_layout_runs_as_the_inline_one(onnx_graphs, tmp_path):
    """Past the 2 GB a flatbuffer can address, weights go after it at offsets: forced here (inline_limit=0) on the
    tiny prompt graph, the file must give the inline file's outputs bit for bit, with its weights at offsets."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    version, d, states, vocab = onnx_graphs
    feeds = _graph_feeds(states, vocab, "tokens", CHUNK, 3)
    (tmp_path / "inline").mkdir()
    (tmp_path / "offsets").mkdir()
    _, inline = _compare_graph(d / "prefill.onnx", feeds, tmp_path / "inline", "prefill")
    errs, offsets = _compare_graph(d / "prefill.onnx", feeds, tmp_path / "offsets", "prefill", inline_limit=0)
    assert max(errs.values()) <= GRAPH_MAX_REL, errs
    model = schema.Model.GetRootAs(offsets.read_bytes(), 0)
    with_offset = [model.Buffers(i) for i in range(model.BuffersLength()) if model.Buffers(i).Offset() > 1]
    assert with_offset and all(b.DataLength() == 0 for b in with_offset)
    feeds32 = {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds.items()}
    a = Interpreter(model_path=str(inline)).get_signature_runner("prefill")(**feeds32)
    b = Interpreter(model_path=str(offsets)).get_signature_runner("prefill")(**feeds32)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_quantizer_reads_the_offsets_layout(onnx_graphs, tmp_path):
    """A model past 2 GB reaches ai-edge-quantizer in the offsets layout: its int8 variant of the offsets file (forced
    on the tiny step graph) must be the int8 variant of the inline file, output for output, and come back inline."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.interpreter import Interpreter

    from rwkv_export.targets.tflite import quantize_file

    version, d, states, vocab = onnx_graphs
    feeds = _graph_feeds(states, vocab, "token", 1, 4)
    (tmp_path / "inline").mkdir()
    (tmp_path / "offsets").mkdir()
    _, inline = _compare_graph(d / "step.onnx", feeds, tmp_path / "inline", "step")
    _, offsets = _compare_graph(d / "step.onnx", feeds, tmp_path / "offsets", "step", inline_limit=0)
    feeds32 = {k: v.astype(np.int32) if v.dtype == np.int64 else v for k, v in feeds.items()}
    outs = []
    for src in (inline, offsets):
        q = src.with_name("model_int8.tflite")
        quantize_file(src, "int8", q)
        model = schema.Model.GetRootAs(q.read_bytes(), 0)
        assert all(model.Buffers(i).Offset() == 0 for i in range(model.BuffersLength()))
        outs.append(Interpreter(model_path=str(q)).get_signature_runner("step")(**feeds32))
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_prompt_file_copies_the_step_files_weights(tmp_path, monkeypatch):
    """write_fp32 copies the prompt file's weights from the step file where they are the same bytes of the ONNX data
    file in the same layout (FULLY_CONNECTED weights transposed once): both files are the same bytes as when each is
    written from the ONNX data alone, and as when the copy is made by reads and writes (no os.copy_file_range)."""
    import os

    import torch

    from rwkv_export.arch import get
    from rwkv_export.checkpoint import from_state_dict
    from rwkv_export.targets import tflite, tflite_write

    torch.set_num_threads(1)
    arch = get("6")
    module = arch.step_module(from_state_dict(arch.fake_state_dict("tiny")))
    copied = []
    write_to = tflite_write.FileRange.write_to
    monkeypatch.setattr(tflite_write.FileRange, "write_to", lambda self, f: (copied.append(self.path.name),
                                                                             write_to(self, f)))
    files = {}
    for how in ("copied", "alone", "by reads"):
        with monkeypatch.context() as m:
            if how == "alone":
                m.setattr(tflite, "_source_key", lambda w: None)
            if how == "by reads":
                m.delattr(os, "copy_file_range", raising=False)
            copied.clear()
            (tmp_path / how.replace(" ", "_")).mkdir()
            out = tflite.write_fp32(module, tmp_path / how.replace(" ", "_"))
            files[how] = {k: p.read_bytes() for k, p in out.items()}
            n_from_step = copied.count("model.tflite")
        if how == "alone":
            assert n_from_step == 0
        else:  # every FULLY_CONNECTED weight and the embedding at least (tiny v6: 2 layers x 7 + head + emb)
            assert n_from_step >= 16, (how, n_from_step)
    assert files["copied"] == files["alone"] == files["by reads"]
