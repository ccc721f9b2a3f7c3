"""Our streaming quantizers (quantize.py) against onnxruntime's own quantizers on the same fp32 graphs: the same
initializers bit for bit, the same nodes (op, name, inputs, outputs, attributes), the same opsets; and the shared data
file that quantize_graphs writes for a step and prompt graph pair.

The reference files are made here by onnxruntime.quantization (quantize_dynamic, MatMulNBitsQuantizer) with the
options the module docstring names for each method, so a difference is a formulation that moved, not a rounding
detail: every comparison is exact (the tolerance is zero, because both sides compute the same float32 operations).
"""

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from rwkv_export import quantize as q
from rwkv_export.errors import OutputPathError, RwkvExportError
from rwkv_export.export import export_onnx
from rwkv_export.quantize import QuantizeError, quantize_graphs, quantize_int4, quantize_int8
from rwkv_export.shared_data import share_weights

# A chunk far smaller than any weight, so that every quantizer goes through its multi-chunk path (row blocks, the
# two passes of the per-column formats, partial K blocks) at tiny shapes.
SMALL_CHUNK = 1000


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """tiny-ffn (C=48, ffn 160, vocab 300): K = 48 and 160 are not multiples of the 64/128 blocks, 160 / 32 is an odd
    block count; with the prompt graph, so that both graphs point into one external-data file."""
    out = tmp_path_factory.mktemp("own") / "fp32"
    export_onnx("builtin:tiny-ffn", out, check=False, tokenizer="bytes")
    assert (out / "model.onnx.data").exists() and (out / "prefill.onnx").exists()
    return out


def ort_dynamic(src: Path, dst: Path, *, int7: bool, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8 if int7 else QuantType.QUInt8,
                     per_channel=per_channel, reduce_range=int7, op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": True})


def ort_nbits(src: Path, dst: Path, *, bits: int, block_size: int, accuracy_level: int, symmetric: bool = False,
              gather: bool = False) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    from onnxruntime.quantization.quant_utils import QuantFormat

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    narrow = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
              and inits[n.input[1]].dims[0] < block_size]
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                       quant_format=QuantFormat.QOperator,
                                       op_types_to_quantize=("MatMul", "Gather") if gather else ("MatMul",),
                                       quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=narrow)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst))


def tensors(model) -> dict:
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


def node_set(model) -> set:
    return {(n.op_type, n.domain, n.name, tuple(n.input), tuple(n.output),
             tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)))
            for n in model.graph.node}


def differences(own_path: Path, ref_path: Path) -> dict:
    """What differs between two graphs: names of nodes / initializers only in one, initializers whose type, shape or
    bytes differ, and the opsets and IR version."""
    own, ref = onnx.load(str(own_path)), onnx.load(str(ref_path))
    t_own, t_ref = tensors(own), tensors(ref)
    n_own, n_ref = node_set(own), node_set(ref)
    return {
        "nodes_own_only": sorted(n[2] for n in n_own - n_ref),
        "nodes_ref_only": sorted(n[2] for n in n_ref - n_own),
        "inits_own_only": sorted(set(t_own) - set(t_ref)),
        "inits_ref_only": sorted(set(t_ref) - set(t_own)),
        "inits_unequal": sorted(k for k in set(t_own) & set(t_ref) if t_own[k] != t_ref[k]),
        "opsets": ({(o.domain, o.version) for o in own.opset_import}
                   == {(o.domain, o.version) for o in ref.opset_import} and own.ir_version == ref.ir_version),
    }


SAME = {"nodes_own_only": [], "nodes_ref_only": [], "inits_own_only": [], "inits_ref_only": [], "inits_unequal": [],
        "opsets": True}


def embedding_names(path: Path) -> tuple[str, str]:
    """(the embedding Gather's node name, its table's name) in an fp32 graph."""
    model = onnx.load(str(path), load_external_data=False)
    token = model.graph.input[0].name
    n = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == token)
    return n.name, n.input[0]


# (our call, onnxruntime's call) per formulation; int8 without the embedding rows, which are ours (checked below)
CASES = {
    "dynamic-int7": (lambda s, d: quantize_int8(s, d, include_embedding=False),
                     lambda s, d: ort_dynamic(s, d, int7=True, per_channel=True)),
    "dynamic-int7-per-tensor": (lambda s, d: quantize_int8(s, d, include_embedding=False, per_channel=False),
                                lambda s, d: ort_dynamic(s, d, int7=True, per_channel=False)),
    "dynamic-uint8": (lambda s, d: quantize_int8(s, d, method="dynamic-uint8", include_embedding=False),
                      lambda s, d: ort_dynamic(s, d, int7=False, per_channel=True)),
    "matmul-nbits-8": (lambda s, d: quantize_int8(s, d, method="matmul-nbits", block_size=32, include_embedding=False),
                       lambda s, d: ort_nbits(s, d, bits=8, block_size=32, accuracy_level=4)),
    "int4-gather-block32": (lambda s, d: quantize_int4(s, d, block_size=32, include_embedding=True),
                            lambda s, d: ort_nbits(s, d, bits=4, block_size=32, accuracy_level=4, gather=True)),
    "int4-gather-block64-level0": (
        lambda s, d: quantize_int4(s, d, block_size=64, include_embedding=True, accuracy_level=0),
        lambda s, d: ort_nbits(s, d, bits=4, block_size=64, accuracy_level=0, gather=True)),
    "int4-symmetric": (lambda s, d: quantize_int4(s, d, block_size=16, include_embedding=True, symmetric=True),
                       lambda s, d: ort_nbits(s, d, bits=4, block_size=16, accuracy_level=4, symmetric=True,
                                              gather=True)),
}


@pytest.mark.parametrize("graph", ["model.onnx", "prefill.onnx"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_same_file_as_onnxruntimes_quantizer(fp32, tmp_path, monkeypatch, case, graph):
    ours, theirs = CASES[case]
    monkeypatch.setattr(q, "CHUNK_VALUES", SMALL_CHUNK)
    ours(fp32 / graph, tmp_path / "own.onnx")
    theirs(fp32 / graph, tmp_path / "ref.onnx")
    assert differences(tmp_path / "own.onnx", tmp_path / "ref.onnx") == SAME


@pytest.mark.parametrize("chunk", [q.CHUNK_VALUES, SMALL_CHUNK])
def test_int4_default_is_onnxruntimes_matmuls_plus_int8_rows(fp32, tmp_path, monkeypatch, chunk):
    """The int4 default (block 128: only the 160-wide FFN output reaches a block; the rest stays fp32 as before)
    differs from MatMulNBitsQuantizer's file only by the embedding, stored as int8 rows (checked by hand below)."""
    monkeypatch.setattr(q, "CHUNK_VALUES", chunk)
    info = quantize_int4(fp32 / "model.onnx", tmp_path / "own.onnx")
    ort_nbits(fp32 / "model.onnx", tmp_path / "ref.onnx", bits=4, block_size=128, accuracy_level=4)
    gather, table = embedding_names(fp32 / "model.onnx")
    assert differences(tmp_path / "own.onnx", tmp_path / "ref.onnx") == {
        **SAME, "nodes_own_only": sorted([gather + "_dq", gather + "_rows", gather + "_scales"]),
        "nodes_ref_only": [gather], "inits_own_only": sorted([table + "_qint8", table + "_row_scale"]),
        "inits_ref_only": [table]}
    assert info["fp32_matmuls"] > 0 and info["quantized_matmuls"] > 0


def test_int8_embedding_rows_by_hand(fp32, tmp_path):
    """The embedding rows (our own format, no onnxruntime reference): q = rint(row / s) with s = max|row| / 127."""
    quantize_int8(fp32 / "model.onnx", tmp_path / "own.onnx")
    _, table = embedding_names(fp32 / "model.onnx")
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32 / "model.onnx")).graph.initializer}
    out = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "own.onnx")).graph.initializer}
    e = src[table].astype(np.float64)
    s = np.abs(e).max(axis=1) / 127
    np.testing.assert_array_equal(out[table + "_row_scale"], s.astype(np.float32))
    np.testing.assert_array_equal(out[table + "_qint8"], np.rint(e / out[table + "_row_scale"][:, None]))
    assert table not in out


def test_int7_logits_equal_onnxruntimes_file(fp32, tmp_path):
    """Same weights and nodes must mean the same numbers: 8 steps of both files in onnxruntime, state fed back."""
    quantize_int8(fp32 / "model.onnx", tmp_path / "own.onnx", include_embedding=False)
    ort_dynamic(fp32 / "model.onnx", tmp_path / "ref.onnx", int7=True, per_channel=True)
    manifest = json.loads((fp32 / "manifest.json").read_text())
    step = next(g for g in manifest["graphs"] if g["kind"] == "step")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    runs = [ort.InferenceSession(str(tmp_path / f), opts, providers=["CPUExecutionProvider"])
            for f in ("own.onnx", "ref.onnx")]
    init = {t["name"]: t["init"] for t in manifest["state"]["tensors"]}
    state_in = [i for i in step["inputs"] if i["role"] == "state"]
    states = [{i["name"]: np.full(i["shape"], init[i["state"]], np.float32) for i in state_in} for _ in runs]
    token = next(i["name"] for i in step["inputs"] if i["role"] == "token")
    state_out = [o["name"] for o in step["outputs"] if o["role"] == "state"]
    for t in [1, 7, 42, 99, 3, 250, 17, 0]:
        outs = [dict(zip([o.name for o in s.get_outputs()], s.run(None, {token: np.array([t], np.int64), **st})))
                for s, st in zip(runs, states)]
        np.testing.assert_array_equal(outs[0]["logits"], outs[1]["logits"])
        states = [{i["name"]: o[name] for i, name in zip(state_in, state_out)} for o in outs]


@pytest.mark.parametrize("variant, options", [("int8", {}), ("int4", {"block_size": 32}),
                                              ("int4", {"block_size": 32, "include_embedding": True})])
def test_pair_writes_one_data_file_with_each_weight_once(fp32, tmp_path, variant, options):
    """quantize_graphs: the step and prompt graphs in one data file, as share_weights would lay out the two files
    quantized one by one (content-deduplicated), and each graph's tensors the same as quantized alone."""
    import shutil

    for f in ("model.onnx", "model.onnx.data", "prefill.onnx"):
        shutil.copy(fp32 / f, tmp_path / f)
    one = {"int8": quantize_int8, "int4": quantize_int4}[variant]
    infos = quantize_graphs(variant, [(tmp_path / "model.onnx", tmp_path / "q.onnx"),
                                      (tmp_path / "prefill.onnx", tmp_path / "prefill_q.onnx")], **options)
    assert [i["file"] for i in infos] == ["q.onnx", "prefill_q.onnx"]
    assert all(i["data_files"] == ["q.onnx.data"] for i in infos)
    assert infos[0]["method"] == infos[1]["method"] and infos[0]["options"] == infos[1]["options"]
    for f in ("q.onnx", "prefill_q.onnx"):  # every external tensor of both points into the one file
        model = onnx.load(str(tmp_path / f), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {"q.onnx.data"}
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in ("model.onnx", "model.onnx.data", "prefill.onnx"):
        shutil.copy(fp32 / f, alone / f)
    one(alone / "model.onnx", alone / "q.onnx", **options)
    one(alone / "prefill.onnx", alone / "prefill_q.onnx", **options)
    for f in ("q.onnx", "prefill_q.onnx"):
        assert tensors(onnx.load(str(tmp_path / f))) == tensors(onnx.load(str(alone / f)))
        assert node_set(onnx.load(str(tmp_path / f))) == node_set(onnx.load(str(alone / f)))
    share_weights(alone, ["q.onnx", "prefill_q.onnx"], "q.onnx.data")
    assert (tmp_path / "q.onnx.data").stat().st_size == (alone / "q.onnx.data").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        ["model.onnx", "model.onnx.data", "prefill.onnx", "q.onnx", "q.onnx.data", "prefill_q.onnx"])


def test_bad_pair_and_sources_are_one_line_errors(fp32, tmp_path):
    import shutil

    for f in ("model.onnx", "prefill.onnx"):  # without their data file
        shutil.copy(fp32 / f, tmp_path / f)
    (tmp_path / "sub").mkdir()
    cases = [
        (lambda: quantize_int8(tmp_path / "model.onnx", tmp_path / "o.onnx"), QuantizeError, "model.onnx.data"),
        (lambda: quantize_graphs("int3", [(fp32 / "model.onnx", tmp_path / "o.onnx")]), QuantizeError, "int3"),
        (lambda: quantize_graphs("int8", [(fp32 / "model.onnx", tmp_path / "o.onnx"),
                                          (fp32 / "prefill.onnx", tmp_path / "sub" / "p.onnx")]),
         OutputPathError, "one folder"),
        (lambda: quantize_graphs("int4", [(fp32 / "model.onnx", tmp_path / "o.onnx")], block_size=48),
         QuantizeError, "power of"),
    ]
    for call, err, match in cases:
        with pytest.raises(err, match=match) as e:
            call()
        assert isinstance(e.value, RwkvExportError) and "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "prefill.onnx", "sub"]  # nothing written
    assert os.listdir(tmp_path / "sub") == []


def test_roundf_is_cs_roundf():
    """MatMulNBits' blocks round with C's roundf (half away from zero), not numpy's half-to-even: compared with libm's
    roundf on the ties, the float just below 0.5 (where floor(x + 0.5) alone is wrong) and random values."""
    import ctypes
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.roundf.restype, libm.roundf.argtypes = ctypes.c_float, [ctypes.c_float]
    rng = np.random.default_rng(0)
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    x = np.concatenate([np.arange(0, 512, dtype=np.float32) / 2, [below_half, 1 + below_half, -0.0, -0.25, -0.5],
                        rng.uniform(-0.5, 300, 20000).astype(np.float32)]).astype(np.float32)
    expected = np.array([libm.roundf(float(v)) for v in x], np.float32)
    # -0.5 itself rounds to -1 in C and to 0 here: the same once clipped to the quantized range [0, qmax]
    assert np.array_equal(np.clip(q._roundf(x.copy()), 0, None), np.clip(expected, 0, None))
    assert np.array_equal(q._roundf(x[x > -0.5]), expected[x > -0.5])


def _batched_graph(path: Path, w3: np.ndarray, head: np.ndarray) -> None:
    """x [B, 1, K] @ w3 [B, K, N] (a batched MatMul, as RWKV-6 applies maa_w2 [5, Dm, C]) -> flatten -> @ head."""
    from onnx import TensorProto, helper

    b, k, n = w3.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w3"], ["y"], name="mm3"),
         helper.make_node("Reshape", ["y", "shape"], ["flat"], name="flatten"),
         helper.make_node("MatMul", ["flat", "head"], ["logits"], name="mm_head")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [b, 1, k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, head.shape[1]]),
         helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, 1, n])],
        [numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(np.array([1, b * n], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))


def _slice_graph(path: Path, w: np.ndarray) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, w.shape[1]])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(path))


@pytest.mark.parametrize("method", ["dynamic-int7", "dynamic-uint8"])
def test_3d_weight_is_quantized_slice_by_slice_and_runs(tmp_path, monkeypatch, method):
    """A per-channel MatMul weight [B, K, N] applied as a batched MatMul (RWKV-6's maa_w2 [5, Dm, C]): quantize_dynamic
    writes a scale per last-axis column over all B slices, [N], which onnxruntime refuses at run time ("b zero point
    is not valid"); ours is [B, 1, N], each [K, N] slice exactly what quantize_dynamic writes for that slice as a 2-D
    weight (compared bit for bit), the 2-D head as onnxruntime's. The file runs, and the batched product means what
    the stored integers say, slice by slice: onnxruntime's y equals (x_q - x_zp) (w_q[b] - w_zp[b]) x_scale w_scale[b]
    computed here (x_q as DynamicQuantizeLinear defines it) to fp32 rounding (rtol 1e-5: the integer sums are exact,
    two fp32 products remain)."""
    monkeypatch.setattr(q, "CHUNK_VALUES", 100)  # several slices per chunk and chunks of one slice: both paths
    rng = np.random.default_rng(0)
    # slices of very different magnitude: one scale over all of them would round the small ones away
    w3 = (rng.standard_normal((3, 64, 5)) * np.array([1.0, 0.05, 3.0])[:, None, None]).astype(np.float32)
    head = rng.standard_normal((15, 40)).astype(np.float32)
    _batched_graph(tmp_path / "model.onnx", w3, head)
    int7 = method == "dynamic-int7"
    quantize_int8(tmp_path / "model.onnx", tmp_path / "own.onnx", method=method, include_embedding=False)
    own = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "own.onnx")).graph.initializer}
    assert own["w3_scale"].shape == own["w3_zero_point"].shape == (3, 1, 5)
    for b in range(3):
        _slice_graph(tmp_path / f"slice{b}.onnx", w3[b])
        ort_dynamic(tmp_path / f"slice{b}.onnx", tmp_path / f"slice{b}_ref.onnx", int7=int7, per_channel=True)
        ref = {t.name: numpy_helper.to_array(t)
               for t in onnx.load(str(tmp_path / f"slice{b}_ref.onnx")).graph.initializer}
        np.testing.assert_array_equal(own["w3_quantized"][b], ref["w_quantized"])
        np.testing.assert_array_equal(own["w3_scale"][b, 0], ref["w_scale"])
        np.testing.assert_array_equal(own["w3_zero_point"][b, 0], ref["w_zero_point"])
    ort_dynamic(tmp_path / "model.onnx", tmp_path / "ref.onnx", int7=int7, per_channel=True)
    ref = tensors(onnx.load(str(tmp_path / "ref.onnx")))
    assert all(tensors(onnx.load(str(tmp_path / "own.onnx")))[k] == ref[k]
               for k in ("head_quantized", "head_scale", "head_zero_point"))
    x = rng.standard_normal((3, 1, 64)).astype(np.float32)
    y = ort.InferenceSession(str(tmp_path / "own.onnx"), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    x_scale = (np.maximum(x.max(), 0) - np.minimum(x.min(), 0)) / np.float32(255)
    x_zp = np.clip(np.rint(-x.min() / x_scale), 0, 255)
    x_q = np.clip(np.rint(x / x_scale) + x_zp, 0, 255)
    w_int = own["w3_quantized"].astype(np.float64) - own["w3_zero_point"].astype(np.float64)
    expected = ((x_q - x_zp) @ w_int) * (x_scale * own["w3_scale"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=0)


def test_3d_weight_per_tensor_is_onnxruntimes(tmp_path):
    """per_channel=False: one scale for the whole [B, K, N] weight, which onnxruntime runs; the file is its own."""
    rng = np.random.default_rng(0)
    _batched_graph(tmp_path / "model.onnx", rng.standard_normal((2, 64, 3)).astype(np.float32),
                   rng.standard_normal((6, 40)).astype(np.float32))
    quantize_int8(tmp_path / "model.onnx", tmp_path / "own.onnx", include_embedding=False, per_channel=False)
    ort_dynamic(tmp_path / "model.onnx", tmp_path / "ref.onnx", int7=True, per_channel=False)
    assert differences(tmp_path / "own.onnx", tmp_path / "ref.onnx") == SAME
