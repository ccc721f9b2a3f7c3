"""shared_data.share_weights: a variant's step and prompt graphs keep their weights in one external-data file, each
distinct tensor once (matched by content, not name), and compute exactly what they computed before."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from rwkv_export.shared_data import ALIGN, SHARED_MIN_BYTES, share_weights


def _chain(path, weights: dict[str, np.ndarray]) -> None:
    """y = x @ W1 @ W2 ... with the given initializers, plus a small bias that stays in the graph."""
    nodes, prev = [], "x"
    for i, name in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [prev, name], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Add", [prev, "bias"], ["y"]))
    n = list(weights.values())[-1].shape[1]
    inits = [numpy_helper.from_array(w, name) for name, w in weights.items()]
    inits.append(numpy_helper.from_array(np.arange(n, dtype=np.float32), "bias"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_shared_tensors_stored_once_and_outputs_unchanged(tmp_path):
    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal(s).astype(np.float32) for s in ((32, 32), (32, 16), (32, 8)))
    _chain(tmp_path / "a.onnx", {"w1": w1, "w2": w2})
    _chain(tmp_path / "b.onnx", {"other_name_for_w1": w1.copy(), "w3": w3})  # w1's bytes under another name
    x = rng.standard_normal((1, 32)).astype(np.float32)
    before = [_run(tmp_path / f, x) for f in ("a.onnx", "b.onnx")]

    assert share_weights(tmp_path, ["a.onnx", "b.onnx"], "w.data") == ["w.data"]

    after = [_run(tmp_path / f, x) for f in ("a.onnx", "b.onnx")]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)  # the same bytes, so the same numbers, exactly
    refs = {}
    for f in ("a.onnx", "b.onnx"):
        m = onnx.load(str(tmp_path / f), load_external_data=False)
        for t in m.graph.initializer:
            if t.name == "bias":  # 64 bytes < SHARED_MIN_BYTES: stays in the graph
                assert t.data_location != TensorProto.EXTERNAL and len(t.raw_data) < SHARED_MIN_BYTES
                continue
            info = {e.key: e.value for e in t.external_data}
            assert t.data_location == TensorProto.EXTERNAL and info["location"] == "w.data"
            refs[(f, t.name)] = (int(info["offset"]), int(info["length"]))
    assert refs[("a.onnx", "w1")] == refs[("b.onnx", "other_name_for_w1")]  # stored once, found by content
    assert all(off % ALIGN == 0 for off, _ in refs.values())
    assert sorted(n for _, n in set(refs.values())) == sorted([w1.nbytes, w2.nbytes, w3.nbytes])
    assert (tmp_path / "w.data").stat().st_size < w1.nbytes + w2.nbytes + w3.nbytes + 3 * ALIGN
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "w.data"]  # nothing partial left


def test_export_folder_shares_one_data_file_per_variant(tmp_path):
    """An export with the prompt graph: each variant's two graphs list the same single data file, which holds the
    step graph's weights once (the prompt graph adds no copy), and the manifest lists it once."""
    from rwkv_export.export import export_onnx
    from rwkv_export.arch.rwkv4.sequence import BLOCK_STEPS

    out = tmp_path / "out"
    export_onnx("builtin:tiny", out, quant=["int8"], check=False)
    m = json.loads((out / "manifest.json").read_text())
    listed = [f["file"] for f in m["files"]]
    assert len(listed) == len(set(listed))
    C = m["model"]["n_embd"]

    def external(path):
        model = onnx.load(str(path), load_external_data=False)
        return {(d["offset"], d["length"]): list(t.dims) for t in model.graph.initializer
                if t.data_location == TensorProto.EXTERNAL
                for d in [{e.key: e.value for e in t.external_data}]}

    for variant in ("fp32", "int8"):
        step, seq = (next(g for g in m["graphs"] if g["variant"] == variant and g["kind"] == k)
                     for k in ("step", "sequence"))
        assert step["data_files"] == seq["data_files"] == [step["file"] + ".data"]
        data = out / step["data_files"][0]
        assert data.name in listed
        step_ext, seq_ext = external(out / step["file"]), external(out / seq["file"])
        # the prompt graph's weights are the step graph's (same ranges); what it has of its own are the scan's small
        # derived tables (a decay per block position, [2**BLOCK_STEPS, C] per layer), no weight copy
        own = {r: dims for r, dims in seq_ext.items() if r not in step_ext}
        assert all(math.prod(dims) <= (1 << BLOCK_STEPS) * C for dims in own.values()), own
        assert set(step_ext) <= set(seq_ext)  # every step weight is the prompt graph's too, at the same place
        # every byte in the data file is one of those tensors, each once (plus alignment)
        used = sum(int(length) for _, length in set(step_ext) | set(own))
        assert used <= data.stat().st_size <= used + ALIGN * (len(step_ext) + len(own))
