"""tf_quality.py: TF.js fp16 / uint8 judged on the eval text through a stand-in (the ONNX fp32 prompt graph with the
variant file's decoded weights, read in chunks by onnxruntime), link-guarded against the real step graph in Node.

On the trained fixture (builtin:tiny-pydoc, exported with --no-check): healthy files pass with the stand-in within
fp32 rounding of the step graph; stand-ins that do not carry the file's weights (the fp32 weights left in place, a
wrong uint8 scale) fail the link guard; broken files (a wrong scale, perturbed weights) fail the quality gate, and
every verdict equals the slow path's (the step graph in TF.js token by token, quality.evaluate_against) over the same
tokens. TFLite fp16 likewise (its stand-in carries model_fp16.tflite's float16 weights; the link guard runs LiteRT),
and TFLite int8 / int4 (hybrid kernels) are read through their own step graphs, sequentially. Needs Node >= 20 and
`npm ci --prefix rwkv_export/js` (fails with that instruction, never skips).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rwkv_export import tf_quality as tq
from rwkv_export.check import QUALITY_KIND, eval_token_ids
from rwkv_export.export import export_target
from rwkv_export.manifest import read_manifest
from rwkv_export.parity import SEQ_LEVELS, quality_gate, tolerance_for
from rwkv_export.quality import Baseline, evaluate_against, judge_quality, level_rows
from rwkv_export.sources import source_from_manifest
from rwkv_export.tf_runners import NODE_DIR, TFJSStepRunner

# Eval tokens of the slow-path comparisons: past the sequential gate's first level (512), so that the stand-in's
# reading has two looks as in a check, and short enough for the step graph in TF.js token by token (~10 s a variant).
COMPARE_TOKENS = 600


@pytest.fixture(scope="module", autouse=True)
def _setup(one_torch_thread):
    if shutil.which("node") is None or not (NODE_DIR / "node_modules" / "@tensorflow" / "tfjs-converter").is_dir():
        pytest.fail(f"needs Node >= 20 and `npm ci --prefix {NODE_DIR}`")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tfjs") / "tiny"
    export_target("tfjs", "builtin:tiny-pydoc", out, quant=["fp16", "uint8"], check=False)
    return out


@pytest.fixture(scope="module")
def ckpt(folder):
    return source_from_manifest(read_manifest(folder)["model"]["source"], None).load()


def _graph(manifest, variant):
    return next(g for g in manifest["graphs"] if g["kind"] == "step" and g["variant"] == variant)


def _baseline(root, manifest, stand_ins, tmp, max_tokens=None, sequential=True):
    ids = eval_token_ids(root, manifest, max_tokens)
    ev, steps = tq.open_baseline(manifest, stand_ins[tq.FP32])
    try:
        upto = level_rows(len(ids) - 1, min(64, len(ids)), SEQ_LEVELS)[0] if sequential else None
        return Baseline.compute(ev, ids, Path(tmp) / "fp32.bin", chunk=min(256, ev.max_chunk), greedy_runner=steps,
                                upto=upto)
    finally:
        ev.close()


def _stand_in_verdict(root, manifest, graph, stand_in, base):
    """The stand-in's quality report, judged, read on as check.py does (extending the baseline where pending)."""
    gate = quality_gate(QUALITY_KIND[graph["variant"]])
    r = tq.evaluate(root, manifest, graph, stand_in, base, gate=gate)
    while not isinstance(r, dict):
        ev, _ = tq.open_baseline(manifest, base.stand_in_fp32)
        try:
            base.extend(ev, r.need, chunk=min(256, ev.max_chunk))
        finally:
            ev.close()
        r = tq.evaluate(root, manifest, graph, stand_in, base, gate=gate, resume=r)
    return judge_quality(r, QUALITY_KIND[graph["variant"]])


@pytest.fixture(scope="module")
def prepared(folder, ckpt, tmp_path_factory):
    m = read_manifest(folder)
    tmp = tmp_path_factory.mktemp("stand-ins")
    stand_ins = tq.prepare(folder, m, ckpt, m["graphs"], tmp)
    base = _baseline(folder, m, stand_ins, tmp)
    base.stand_in_fp32 = stand_ins[tq.FP32]
    return m, stand_ins, base


def test_stand_ins_for_the_storage_variants_only(folder, prepared):
    m, stand_ins, _ = prepared
    assert set(stand_ins) == {tq.FP32, "tfjs_fp16/model.json", "tfjs_uint8/model.json"}
    assert not tq.has_stand_in(_graph(m, "fp32"))


def test_stand_in_carries_the_files_decoded_weights(folder, prepared):
    """Every quantized weight of the uint8 file is in the stand-in as TF.js decodes it (q * scale + min, within half
    a step of the checkpoint's fp32 weight), and the fp32 stand-in has the checkpoint's own."""
    import onnx
    from onnx import numpy_helper

    m, stand_ins, _ = prepared
    weights = tq.TFJSWeights(folder / "tfjs_uint8" / "model.json")
    fp32 = tq.TFJSWeights(folder / "tfjs" / "model.json")

    def inits(key):
        d, entry = stand_ins[key]
        model = onnx.load(str(Path(d) / entry["file"]))
        return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    got, want = inits("tfjs_uint8/model.json"), inits(tq.FP32)
    assert "head" in got and "emb" in got
    spec = weights.specs["head"][0]["quantization"]
    np.testing.assert_array_equal(got["head"], weights.array("head"))
    # half a step, plus the float32 rounding of the encoder's (w - min) / scale (a quotient up to 255: 255 ulp of 1)
    assert np.abs(got["head"] - want["head"]).max() <= spec["scale"] * (0.5 + 255 * 2.0**-23)
    assert np.abs(got["head"] - want["head"]).max() > 0  # the stand-in does hold the quantized values
    np.testing.assert_array_equal(want["head"], fp32.array("head"))


def _assert_healthy_link(r: dict, target: str) -> None:
    """A healthy file passes, its link distance within the bound (LINK_TOL_FACTOR x the target's fp32 parity
    tolerance), and the guard tells the variant from fp32: the variant's own distance is well past the bound."""
    assert r["passed"], r
    link = r["stand_in"]
    assert link["bound"] == tq.LINK_TOL_FACTOR * tolerance_for(target, "fp32", "4").max_rel
    assert link["max_rel"] <= link["bound"]
    assert link["variant_vs_fp32"] > 10 * link["bound"]


@pytest.mark.parametrize("variant", ["fp16", "uint8"])
def test_healthy_variant_passes_with_the_stand_in_within_fp32_rounding(folder, prepared, variant):
    m, stand_ins, base = prepared
    g = _graph(m, variant)
    r = _stand_in_verdict(folder, m, g, stand_ins[g["file"]], base)
    _assert_healthy_link(r, "tfjs")  # the variant's own distance from fp32: measured 37x the bound for fp16
    assert r["sequential"]["stop"] == "pass" and r["tokens"] < len(base.tokens) - 1  # decided early


@pytest.mark.parametrize("variant", ["fp16", "uint8"])
def test_stand_in_without_the_files_weights_fails_the_link_guard(folder, prepared, variant):
    """The fp32 weights left in place (the fp32 stand-in for a variant's file): the logits differ from the file's by
    the variant's own distance from fp32, past fp32 rounding."""
    m, stand_ins, base = prepared
    with pytest.raises(tq.StandInLinkError, match="does not compute what"):
        tq.evaluate(folder, m, _graph(m, variant), stand_ins[tq.FP32], base, gate=quality_gate("int8"))


def _copy(folder, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _set_scale(root: Path, variant_dir: str, name: str, factor: float) -> None:
    path = root / variant_dir / "model.json"
    model = json.loads(path.read_text())
    for spec in model["weightsManifest"][0]["weights"]:
        if spec["name"] == name:
            spec["quantization"]["scale"] *= factor
    path.write_text(json.dumps(model))


def test_wrong_uint8_scale_in_the_stand_in_fails_the_link_guard(folder, prepared, ckpt, tmp_path):
    """A stand-in decoded with a scale 1% off (from a copy whose model.json differs) against the real file."""
    m, _, base = prepared
    wrong = _copy(folder, tmp_path)
    _set_scale(wrong, "tfjs_uint8", "layers.1.att_value", 1.01)
    stand_ins = tq.prepare(wrong, m, ckpt, [_graph(m, "uint8")], tmp_path / "si")
    with pytest.raises(tq.StandInLinkError):
        tq.evaluate(folder, m, _graph(m, "uint8"), stand_ins["tfjs_uint8/model.json"], base, gate=quality_gate("int8"))


def _perturb(root: Path, variant_dir: str, name: str, every: int = 10) -> None:
    """Negate every `every`-th stored value of a weight in the shards (fp16: the sign bit of the float16 codes)."""
    w = tq.TFJSWeights(root / variant_dir / "model.json")
    spec, paths, offset = w.specs[name]
    blob = bytearray(b"".join((root / variant_dir / p).read_bytes() for p in paths))
    n = tq._nbytes(spec)
    codes = np.frombuffer(blob, dtype=np.uint16, count=n // 2, offset=offset).copy()
    codes[::every] ^= 0x8000
    blob[offset:offset + n] = codes.tobytes()
    pos = 0
    for p in paths:
        size = (root / variant_dir / p).stat().st_size
        (root / variant_dir / p).write_bytes(bytes(blob[pos:pos + size]))
        pos += size


CASES = {
    "uint8 healthy": ("uint8", None),
    "uint8 head scale x1.2": ("uint8", lambda r: _set_scale(r, "tfjs_uint8", "head", 1.2)),
    "fp16 every 10th value of layers.2.ffn_key negated": ("fp16", lambda r: _perturb(r, "tfjs_fp16",
                                                                                      "layers.2.ffn_key")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verdict_equals_the_slow_paths(folder, ckpt, tmp_path, case):
    """Through the stand-in (sequentially) and through the step graph in TF.js token by token, over the first
    COMPARE_TOKENS tokens: the same verdict; the broken files fail."""
    variant, breaks = CASES[case]
    root = _copy(folder, tmp_path)
    m = read_manifest(root)  # before the edit (a broken file no longer matches its sha256)
    if breaks is not None:
        breaks(root)
    g = _graph(m, variant)
    stand_ins = tq.prepare(root, m, ckpt, [g], tmp_path / "si")
    full = _baseline(root, m, stand_ins, tmp_path, COMPARE_TOKENS, sequential=False)
    with TFJSStepRunner(root, m, g) as runner:
        slow = judge_quality(evaluate_against(runner, full), QUALITY_KIND[variant])
    base = _baseline(root, m, stand_ins, tmp_path / "si", COMPARE_TOKENS)
    base.stand_in_fp32 = stand_ins[tq.FP32]
    fast = _stand_in_verdict(root, m, g, stand_ins[g["file"]], base)
    assert fast["passed"] == slow["passed"] == (breaks is None), (fast, slow)
    if fast["sequential"]["level"] == 2:  # read to the end, as the slow path: the same numbers, rounding apart
        assert abs(fast["ppl_delta"] - slow["ppl_delta"]) <= 1e-4 + 1e-3 * abs(slow["ppl_delta"])


def test_differently_cut_shards_give_the_same_stand_in(folder, prepared, ckpt, tmp_path):
    """A weight across shard files is read whole: the uint8 folder re-cut into 7 kB shards gives the same data."""
    m, stand_ins, _ = prepared
    root = _copy(folder, tmp_path)
    d = root / "tfjs_uint8"
    model = json.loads((d / "model.json").read_text())
    paths = model["weightsManifest"][0]["paths"]
    blob = b"".join((d / p).read_bytes() for p in paths)
    for p in paths:
        (d / p).unlink()
    cut = 7000
    names = [f"piece{i}.bin" for i in range(-(-len(blob) // cut))]
    for i, name in enumerate(names):
        (d / name).write_bytes(blob[i * cut:(i + 1) * cut])
    model["weightsManifest"][0]["paths"] = names
    (d / "model.json").write_text(json.dumps(model))
    again = tq.prepare(root, m, ckpt, [_graph(m, "uint8")], tmp_path / "si")
    a, b = (Path(s[0]) / tq.DATA_FILE for s in (stand_ins["tfjs_uint8/model.json"], again["tfjs_uint8/model.json"]))
    assert len(names) > 100 and a.read_bytes() == b.read_bytes()


def _edit_names(root: Path, variant_dir: str, edit) -> None:
    """Edit userDefinedMetadata.rwkv_export of a copy's model.json (`edit` changes the dict in place)."""
    path = root / variant_dir / "model.json"
    model = json.loads(path.read_text())
    edit(model["userDefinedMetadata"]["rwkv_export"])
    path.write_text(json.dumps(model))


def test_a_quantized_weight_the_stand_in_does_not_carry_is_an_error(folder, ckpt, tmp_path):
    """The file's recorded names without the head's: the stand-in would keep the checkpoint's head."""
    root = _copy(folder, tmp_path)
    m = read_manifest(root)
    _edit_names(root, "tfjs_uint8", lambda meta: meta["onnx_weights"]["prefill"].pop("head"))
    with pytest.raises(tq.StandInError, match="head"):
        tq.prepare(root, m, ckpt, [_graph(m, "uint8")], tmp_path / "si")


def test_the_recorded_names_are_the_translations(folder, ckpt, tmp_path):
    """model.json's onnx_weights (written by export_tfjs) are the names targets/tfjs.prompt_graph_weights' own run
    of the translation gives, in every variant's file."""
    from rwkv_export.embed import step_module
    from rwkv_export.targets import tfjs

    _, _, names, _ = tfjs.prompt_graph_weights(step_module(ckpt, "fp32"), tmp_path)
    for d in ("tfjs", "tfjs_fp16", "tfjs_uint8"):
        meta = json.loads((folder / d / "model.json").read_text())["userDefinedMetadata"]["rwkv_export"]
        assert meta[tfjs.WEIGHT_NAMES][tfjs.PREFILL] == names
        assert set(meta[tfjs.WEIGHT_NAMES]["step"].values()) <= set(names.values())
    assert "head" in names and "emb" in names


def test_a_model_json_without_recorded_names_gets_the_same_stand_in(folder, prepared, ckpt, tmp_path):
    """A file written before the names were recorded: they come from the translation run again, and the stand-in
    is byte for byte the one from the recorded names."""
    m, stand_ins, _ = prepared
    root = _copy(folder, tmp_path)
    _edit_names(root, "tfjs_uint8", lambda meta: meta.pop("onnx_weights"))
    again = tq.prepare(root, m, ckpt, [_graph(m, "uint8")], tmp_path / "si")
    a, b = (Path(s[0]) / tq.DATA_FILE for s in (stand_ins["tfjs_uint8/model.json"], again["tfjs_uint8/model.json"]))
    assert a.read_bytes() == b.read_bytes()


def test_a_model_json_without_its_prompt_graph_gets_a_stand_in(ckpt, tmp_path):
    """An export made without the prompt graph (prefill=False) holds the step graph's weights only; the stand-in's
    prompt graph takes those from the file and its own constants from the checkpoint, and passes."""
    root = tmp_path / "noprefill"
    export_target("tfjs", "builtin:tiny-pydoc", root, quant=["uint8"], check=False, prefill=False)
    m = read_manifest(root)
    assert not [g for g in m["graphs"] if g["kind"] == "sequence"]
    stand_ins = tq.prepare(root, m, ckpt, m["graphs"], tmp_path / "si")
    base = _baseline(root, m, stand_ins, tmp_path / "si")
    base.stand_in_fp32 = stand_ins[tq.FP32]
    g = _graph(m, "uint8")
    r = _stand_in_verdict(root, m, g, stand_ins[g["file"]], base)
    assert r["passed"] and r["stand_in"]["max_rel"] <= r["stand_in"]["bound"]


def test_a_file_of_another_model_is_an_error(folder, ckpt, tmp_path):
    """The checkpoint's prompt graph and a file whose weights have other shapes (here: the head's spec edited)."""
    root = _copy(folder, tmp_path)
    path = root / "tfjs_uint8" / "model.json"
    model = json.loads(path.read_text())
    m = read_manifest(root)
    for spec in model["weightsManifest"][0]["weights"]:
        if spec["name"] == "head":
            spec["shape"] = spec["shape"][::-1]
    path.write_text(json.dumps(model))
    with pytest.raises(tq.StandInError, match="not this model's file"):
        tq.prepare(root, m, ckpt, [_graph(m, "uint8")], tmp_path / "si")


# -- TFLite: its own step graph read sequentially ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tflite_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("tflite") / "tiny"
    export_target("tflite", "builtin:tiny-pydoc", out, quant=["fp16", "int8", "int4"], check=False)
    return out


@pytest.fixture(scope="module")
def tflite_prepared(tflite_folder, ckpt, tmp_path_factory):
    m = read_manifest(tflite_folder)
    tmp = tmp_path_factory.mktemp("tflite-si")
    stand_ins = tq.prepare(tflite_folder, m, ckpt, m["graphs"], tmp)
    return m, stand_ins, tmp


def test_tflite_fp16_gets_a_stand_in_and_the_hybrid_variants_read_their_step_graphs(tflite_prepared):
    m, stand_ins, _ = tflite_prepared
    assert {f: v for f, v in stand_ins.items() if f != tq.FP32 and v == tq.STEPS} == {
        _graph(m, v)["file"]: tq.STEPS for v in ("int8", "int4")}
    assert stand_ins[_graph(m, "fp16")["file"]][1]["variant"] == "fp16"


def test_tflite_fp16_stand_in_carries_the_files_decoded_weights(tflite_folder, tflite_prepared):
    """Every float16 weight of model_fp16.tflite, as LiteRT's interpreter hands it out, is the stand-in's
    initializer of that name (transposed where the file keeps a FULLY_CONNECTED weight [out, in])."""
    import onnx
    from onnx import numpy_helper

    from rwkv_export.targets.tflite import _interpreter

    m, stand_ins, _ = tflite_prepared
    d, entry = stand_ins[_graph(m, "fp16")["file"]]
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(Path(d) / entry["file"])).graph.initializer}
    it = _interpreter(tflite_folder / _graph(m, "fp16")["file"])
    half = [t for t in it.get_tensor_details() if t["dtype"] == np.float16]
    assert len(half) > 20
    for t in half:
        w = it.get_tensor(t["index"]).astype(np.float32)
        want = w if t["name"] == "emb" else w.T
        np.testing.assert_array_equal(got[t["name"]], want, err_msg=t["name"])


def test_tflite_fp16_passes_with_its_stand_in_within_fp32_rounding(tflite_folder, tflite_prepared):
    m, stand_ins, tmp = tflite_prepared
    g = _graph(m, "fp16")
    (tmp / "fp16-healthy").mkdir()
    base = _baseline(tflite_folder, m, stand_ins, tmp / "fp16-healthy")
    base.stand_in_fp32 = stand_ins[tq.FP32]
    r = _stand_in_verdict(tflite_folder, m, g, stand_ins[g["file"]], base)
    _assert_healthy_link(r, "tflite")  # measured 1.6e-6 against fp16's own 7.3e-4 (tiny-pydoc)
    assert r["sequential"]["stop"] == "pass"


def _untransposed(tflite_folder, m, ckpt, tmp_path, name):
    """A stand-in of model_fp16.tflite whose square FULLY_CONNECTED weight `name` is decoded without its
    transposition (the shapes agree; the values are the transpose)."""
    from rwkv_export.targets import onnx_seq

    w = tq.TFLiteWeights(tflite_folder / _graph(m, "fp16")["file"])
    offset, nbytes, shape, transposed = w.tensors[name]
    assert transposed and shape[0] == shape[1]
    w.tensors[name] = (offset, nbytes, shape, False)
    folder = tmp_path / "wrong"
    tq.write_stand_ins(tq._prompt_module(ckpt), [(folder, w)])
    return str(folder), onnx_seq.graph_entry(folder / tq.PROMPT_FILE, files=[tq.PROMPT_FILE, tq.DATA_FILE],
                                             variant="fp16")


def test_tflite_fp16_stand_in_with_a_wrong_decode_fails_the_link_guard(tflite_folder, tflite_prepared, ckpt,
                                                                       tmp_path):
    """The fp32 weights left in place, or one matrix decoded untransposed: the stand-in's logits are not the
    file's, past fp32 rounding."""
    m, stand_ins, tmp = tflite_prepared
    g = _graph(m, "fp16")
    base = _baseline(tflite_folder, m, stand_ins, tmp_path)
    base.stand_in_fp32 = stand_ins[tq.FP32]
    for wrong in (stand_ins[tq.FP32], _untransposed(tflite_folder, m, ckpt, tmp_path, "layers.1.att_key")):
        with pytest.raises(tq.StandInLinkError, match="does not compute what"):
            _stand_in_verdict(tflite_folder, m, g, wrong, base)  # read on to its verdict, then the guard


def _negate_tflite(root: Path, file: str, name: str, every: int = 10) -> None:
    """Negate every `every`-th float16 value of a weight in a .tflite file (the sign bit of its codes)."""
    offset, nbytes, _, _ = tq.TFLiteWeights(root / file).tensors[name]
    blob = bytearray((root / file).read_bytes())
    codes = np.frombuffer(blob, dtype=np.uint16, count=nbytes // 2, offset=offset).copy()
    codes[::every] ^= 0x8000
    blob[offset:offset + nbytes] = codes.tobytes()
    (root / file).write_bytes(bytes(blob))


@pytest.mark.parametrize("broken", [False, True], ids=["healthy", "every 10th value of layers.2.ffn_key negated"])
def test_tflite_fp16_verdict_equals_the_slow_paths(tflite_folder, ckpt, tmp_path, broken):
    """Through the stand-in (sequentially) and through the step graph in LiteRT token by token, over the first
    COMPARE_TOKENS tokens: the same verdict; the broken file fails both, its stand-in (which carries the broken
    weights) passing the link guard."""
    from rwkv_export.tf_runners import TFLiteStepRunner

    root = _copy(tflite_folder, tmp_path)
    m = read_manifest(root)
    g = _graph(m, "fp16")
    if broken:
        _negate_tflite(root, g["file"], "layers.2.ffn_key")
    stand_ins = tq.prepare(root, m, ckpt, [g], tmp_path / "si")
    full = _baseline(root, m, stand_ins, tmp_path, COMPARE_TOKENS, sequential=False)
    slow = judge_quality(evaluate_against(TFLiteStepRunner(root, m, g, threads=1), full), "fp16")
    base = _baseline(root, m, stand_ins, tmp_path / "si", COMPARE_TOKENS)
    base.stand_in_fp32 = stand_ins[tq.FP32]
    fast = _stand_in_verdict(root, m, g, stand_ins[g["file"]], base)
    assert fast["passed"] == slow["passed"] == (not broken), (fast, slow)
    assert fast["stand_in"]["max_rel"] <= fast["stand_in"]["bound"]
    if fast["sequential"]["level"] == 2:
        assert abs(fast["ppl_delta"] - slow["ppl_delta"]) <= 1e-4 + 1e-3 * abs(slow["ppl_delta"])


# (variant, the gate it is judged by): int4 (+2.1 % on tiny-pydoc's first 512 tokens) against its own gate (5 %)
# passes and against int8's (1 %) fails: the sequential reading must give both verdicts as the full reading does
TFLITE_CASES = [("fp16", "fp16"), ("int8", "int8"), ("int4", "int4"), ("int4", "int8")]


@pytest.mark.parametrize("variant,kind", TFLITE_CASES, ids=[f"{v} at the {k} gate" for v, k in TFLITE_CASES])
def test_tflite_sequential_verdict_equals_the_full_reading(tflite_folder, tflite_prepared, variant, kind):
    """The step graph read sequentially (quality.evaluate_in_chunks over its steps; fp16 too, which a check reads
    through its stand-in, as the path any TFLite variant may take) against evaluate_against's full token-by-token
    reading of the same COMPARE_TOKENS tokens: the same verdict; where it read to the end, the same
    numbers (the same variant rows; the fp32 side's read in chunks cut elsewhere, as the sequential baseline goes on
    from row 511: onnxruntime's fp32 rounding, ~1e-8 of the perplexity measured, bound 1e-6)."""
    from rwkv_export.tf_runners import TFLiteStepRunner

    m, stand_ins, tmp = tflite_prepared
    g = _graph(m, variant)
    for side in ("full", "seq"):
        (tmp / f"{side}-{variant}-{kind}").mkdir()
    full = _baseline(tflite_folder, m, stand_ins, tmp / f"full-{variant}-{kind}", COMPARE_TOKENS, sequential=False)
    slow = judge_quality(evaluate_against(TFLiteStepRunner(tflite_folder, m, g, threads=1), full), kind)
    base = _baseline(tflite_folder, m, stand_ins, tmp / f"seq-{variant}-{kind}", COMPARE_TOKENS)
    base.stand_in_fp32 = stand_ins[tq.FP32]
    r = tq.evaluate(tflite_folder, m, g, tq.STEPS, base, gate=quality_gate(kind))
    while not isinstance(r, dict):
        ev, _ = tq.open_baseline(m, stand_ins[tq.FP32])
        try:
            base.extend(ev, r.need, chunk=min(256, ev.max_chunk))
        finally:
            ev.close()
        r = tq.evaluate(tflite_folder, m, g, tq.STEPS, base, gate=quality_gate(kind), resume=r)
    fast = judge_quality(r, kind)
    assert fast["passed"] == slow["passed"] == (kind == variant), (fast, slow)
    assert fast["read_by"] == "step graph, token by token" and "link" not in fast
    if fast["sequential"]["level"] == 2:
        for key in ("ppl", "ppl_fp32", "kl", "top1_agreement"):
            assert fast[key] == pytest.approx(slow[key], rel=1e-6), key
        assert fast["greedy_match"] == slow["greedy_match"]
