"""check.py with tf_quality.py: `rwkv-export tfjs` / `tflite` (every gate on) and `rwkv-export check` read TF.js's
storage variants and TFLite's fp16 through their stand-ins and TFLite's int8 / int4 step graphs sequentially, all
against the fp32 stand-in; a broken file fails the check. builtin:tiny-pydoc (the trained fixture). Needs Node >= 20
with `npm ci --prefix rwkv_export/js` and the tflite extra (fails with their instructions, never skips)."""

from __future__ import annotations

import json

import pytest

from rwkv_export.check import check_folder
from rwkv_export.errors import RwkvExportError
from rwkv_export.export import export_target
from rwkv_export.manifest import read_manifest


@pytest.fixture(scope="module")
def tfjs_folder(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("tfjs") / "tiny"
    export_target("tfjs", "builtin:tiny-pydoc", out, quant=["fp16", "uint8"])  # every gate on: raises if one fails
    return out


def _quality(root, variant):
    g = next(g for g in read_manifest(root)["graphs"] if g["kind"] == "step" and g["variant"] == variant)
    return g["quality"]


@pytest.mark.parametrize("variant", ["fp16", "uint8"])
def test_tfjs_export_judges_its_variants_through_stand_ins(tfjs_folder, variant):
    q = _quality(tfjs_folder, variant)
    assert q["passed"] and q["read_by"].startswith("stand-in")
    assert q["stand_in"]["max_rel"] <= q["stand_in"]["bound"] < q["stand_in"]["variant_vs_fp32"]
    assert q["sequential"]["stop"] == "pass" and q["tokens"] == 511  # decided at the first level
    assert q["baseline"].startswith("fp32 stand-in")


def test_check_of_a_broken_tfjs_file_fails(tfjs_folder, tmp_path):
    """uint8's head scale x1.2 in model.json (its sha256 updated, as an edited folder would have it): the check
    fails on the quality gate."""
    import hashlib
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tfjs_folder, root)
    path = root / "tfjs_uint8" / "model.json"
    model = json.loads(path.read_text())
    for spec in model["weightsManifest"][0]["weights"]:
        if spec["name"] == "head":
            spec["quantization"]["scale"] *= 1.2
    path.write_text(json.dumps(model))
    m = json.loads((root / "manifest.json").read_text())
    for f in m["files"]:
        if f["file"] == "tfjs_uint8/model.json":
            f["size"], f["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RwkvExportError, match="uint8"):
        check_folder(root)


def test_tflite_export_judges_fp16_through_its_stand_in_and_reads_int8_int4_sequentially(tmp_path,
                                                                                          one_torch_thread):
    out = tmp_path / "tiny"
    export_target("tflite", "builtin:tiny-pydoc", out, quant=["fp16", "int8", "int4"])
    q = _quality(out, "fp16")
    assert q["passed"] and q["read_by"] == "stand-in (ONNX eval graph with the weights of model_fp16.tflite)", q
    assert q["stand_in"]["max_rel"] <= q["stand_in"]["bound"] < q["stand_in"]["variant_vs_fp32"]
    assert q["sequential"]["stop"] == "pass" and q["tokens"] == 511
    for variant in ("int8", "int4"):
        q = _quality(out, variant)
        assert q["passed"] and q["read_by"] == "step graph, token by token", q
        assert q["sequential"]["stop"] == "pass" and q["tokens"] == 511
