"""`rwkv-export tflite` and `rwkv-export tfjs` end to end, on the trained tiny-pydoc: the fp32 parity gate, a quantized
variant through the same quality gate as ONNX's (perplexity on the eval text), the manifest, then `rwkv-export check`
on the folder. Needs the [tflite] extra and `npm ci --prefix rwkv_export/js` (CI installs both; missing ones fail here)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from rwkv_export.cli import app
from rwkv_export.manifest import read_manifest
from rwkv_export.parity import SEQ_LEVELS

runner = CliRunner()


@pytest.mark.parametrize("target, variant", [("tflite", "int8"), ("tfjs", "uint8")])
def test_cli_export_with_a_variant_then_check(tmp_path, target, variant):
    out = tmp_path / "out"
    res = runner.invoke(app, [target, "builtin:tiny-pydoc", "-o", str(out), "--quant", variant, "-q"])
    assert res.exit_code == 0, res.output
    assert f"parity {target}/fp32" in res.stdout and f"quality {target}/{variant}: PASS" in res.stdout, res.stdout
    m = read_manifest(out)
    steps = [g for g in m["graphs"] if g["kind"] == "step"]
    assert [(g["format"], g["variant"]) for g in steps] == [(target, "fp32"), (target, variant)]
    assert steps[0]["parity"]["max_rel"] <= 1e-5 and steps[0]["parity"]["greedy_identical"]
    # both targets also hold the prompt graph (TFLite: a prefill*.tflite beside each step file; TF.js: in the step graph's
    # model.json), checked against fp64 steps
    prompts = [g for g in m["graphs"] if g["kind"] == "sequence"]
    assert [(g["variant"], g["signature"]) for g in prompts] == [("fp32", "prefill"), (variant, "prefill")]
    assert all(g["parity"]["passed"] for g in prompts)
    assert not prompts or prompts[0]["parity"]["max_rel"] <= 1e-5
    q = steps[1]["quality"]
    # an 8-bit variant is held to the int8 gate (+1 % perplexity) on held-out text, read at least to the sequential
    # gate's first level (parity.SEQ_LEVELS: 512 tokens, 511 predictions) and further only where that does not decide
    assert q["passed"] and q["ppl_delta"] <= q["max_ppl_delta"] == 0.01 and q["tokens"] >= SEQ_LEVELS[0] - 1
    res = runner.invoke(app, ["check", str(out), "-q"])
    assert res.exit_code == 0, res.output
    # fp32 parity, the variant's parity layer, its quality gate, the two prompt graphs' parity
    assert res.stdout.count("PASS") == 3 + 2


@pytest.mark.parametrize("target", ["tflite", "tfjs"])
def test_unknown_variant_for_the_target_is_a_one_line_error(tmp_path, target):
    res = runner.invoke(app, [target, "builtin:tiny", "-o", str(tmp_path / "o"), "--quant", "int3"])
    assert res.exit_code == 2 and f"unknown --quant variant 'int3' for {target}" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
