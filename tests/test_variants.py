"""Variants of the step graph (fp16 here; int8/int4 in test_quantize.py): same I/O contract, own parity tolerance,
made at export time or added to an existing folder atomically."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rwkv_export.checkpoint import from_state_dict
from rwkv_export.shared_data import onnx_bytes
from rwkv_export.cli import app
from rwkv_export.manifest import MANIFEST_NAME
from rwkv_export.arch.rwkv4.step import STATE_NAMES, RWKV4Step, StepOptions

from ckpts import state_dict, write

runner = CliRunner()

# The rescale (halve x every N layers, weights of later layers pre-divided) is exact in real arithmetic because every
# LayerNorm is scale-invariant, except for LayerNorm's eps (1e-5): halving x quarters var(x), so eps weighs 4x more.
# With this synthetic model's var(x) ~ 1 that moves logits by ~6e-5 of their std (measured); real RWKV-4 activations
# are far larger, so eps matters even less there. A wrong rescale (a missed halving) moves them by O(1).
RESCALE_EQUIVALENCE_REL = 5e-4


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def ffn_pth(tmp_path_factory):
    return write(tmp_path_factory.mktemp("ck") / "tiny-ffn.pth", state_dict("tiny-ffn"))


@pytest.fixture(scope="module")
def exported_fp16(tmp_path_factory, ffn_pth):
    out = tmp_path_factory.mktemp("exp") / "out"
    res = run("onnx", ffn_pth, "-o", out, "--tokenizer", "bytes", "--quant", "fp16", "-q")
    assert res.exit_code == 0, res.output
    return out


def test_fp16_variant_has_the_same_io_contract(exported_fp16):
    m = json.loads((exported_fp16 / MANIFEST_NAME).read_text())
    graphs = {g["variant"]: g for g in m["graphs"] if g["kind"] == "step"}
    assert set(graphs) == {"fp32", "fp16"}
    assert graphs["fp16"]["file"] == "model_fp16.onnx"
    seqs = {g["variant"]: g["file"] for g in m["graphs"] if g["kind"] == "sequence"}
    assert seqs == {"fp32": "prefill.onnx", "fp16": "prefill_fp16.onnx"}
    strip = lambda ios: [{k: v for k, v in io.items()} for io in ios]  # noqa: E731
    assert strip(graphs["fp16"]["inputs"]) == strip(graphs["fp32"]["inputs"])
    assert strip(graphs["fp16"]["outputs"]) == strip(graphs["fp32"]["outputs"])
    assert graphs["fp16"]["quantization"]["state_dtype"] == "float32"


def test_fp16_parity_within_its_tolerance(exported_fp16):
    m = json.loads((exported_fp16 / MANIFEST_NAME).read_text())
    p = next(g for g in m["graphs"] if g["variant"] == "fp16")["parity"]
    assert p["passed"] and p["max_rel"] <= p["tolerance"]["max_rel"] and p["top1_agreement"] >= 0.95
    # fp16 must really be fp16: its error is far above fp32 rounding (else the variant silently stayed fp32)
    assert p["max_rel"] > 1e-5


def test_fp16_file_stores_every_weight_matrix_in_fp16(exported_fp16):
    import onnx

    model = onnx.load(str(exported_fp16 / "model_fp16.onnx"))
    mats = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert len(mats) == 3 * (7 + 2) + 2  # per layer 7 matrices and the 2 stacked token-shift mixes; head; embedding
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in mats), [t.name for t in mats if t.data_type != 10]
    assert onnx_bytes(exported_fp16 / "model_fp16.onnx") < 0.7 * onnx_bytes(exported_fp16 / "model.onnx")


def test_rescale_is_mathematically_neutral():
    """rescale_every changes weights and halves x, and LN_out undoes it: fp32 results must not change."""
    ck = from_state_dict(state_dict("tiny-ffn"))  # 3 layers: rescale_every=2 halves x once, after layer 1
    plain, rescaled = RWKV4Step(ck), RWKV4Step(ck, StepOptions(rescale_every=2))
    s1 = s2 = plain.new_state()
    with torch.no_grad():
        for tok in [1, 7, 42, 99, 3, 250]:
            o1, o2 = plain(torch.tensor([tok]), *[s1[n] for n in STATE_NAMES]), rescaled(
                torch.tensor([tok]), *[s2[n] for n in STATE_NAMES])
            rel = float((o1[0] - o2[0]).abs().max() / o1[0].std())
            assert rel < RESCALE_EQUIVALENCE_REL, rel
            s1, s2 = dict(zip(STATE_NAMES, o1[1:])), dict(zip(STATE_NAMES, o2[1:]))
    # and the weights really were rescaled (layer 2's output weights divided by 2**(2 // 2))
    torch.testing.assert_close(rescaled.layers[2].att_output * 2, plain.layers[2].att_output)


def test_quantize_command_adds_a_variant_to_an_existing_folder(tmp_path, ffn_pth):
    out = tmp_path / "out"
    assert run("onnx", ffn_pth, "-o", out, "--tokenizer", "bytes", "-q").exit_code == 0
    before = (out / "model.onnx").read_bytes()
    res = run("quantize", out, "--quant", "fp16", "-q")
    assert res.exit_code == 0, res.output
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert [(g["variant"], g["kind"]) for g in m["graphs"]] == [
        ("fp32", "step"), ("fp32", "sequence"), ("fp16", "step"), ("fp16", "sequence")]
    assert next(g for g in m["graphs"] if g["variant"] == "fp16" and g["kind"] == "step")["quality"]["passed"]
    assert {f["file"] for f in m["files"]} == {"model.onnx", "model_fp16.onnx", "prefill.onnx", "prefill_fp16.onnx",
                                               "model.onnx.data", "model_fp16.onnx.data"}
    assert (out / "model.onnx").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert run("check", out, "-q").exit_code == 0
    # adding it again needs --force
    res = run("quantize", out, "--quant", "fp16", "-q")
    assert res.exit_code != 0 and "use --force" in res.stderr


def test_quantize_failure_leaves_the_folder_as_it_was(tmp_path, ffn_pth, monkeypatch):
    from rwkv_export import parity

    out = tmp_path / "out"
    assert run("onnx", ffn_pth, "-o", out, "--tokenizer", "bytes", "-q").exit_code == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    # a tolerance nothing can meet: the variant is made, fails its gate, and must not land
    monkeypatch.setitem(parity.TOLERANCES, ("onnx", "fp16"), parity.Tolerance(0.0, 1.0, True, "impossible"))
    res = run("quantize", out, "--quant", "fp16", "-q")
    assert res.exit_code == 3, res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot


def test_quantize_refuses_a_different_checkpoint(tmp_path, ffn_pth):
    out = tmp_path / "out"
    assert run("onnx", ffn_pth, "-o", out, "--tokenizer", "bytes", "-q", "--no-check").exit_code == 0
    other = write(tmp_path / "other.pth", state_dict("tiny-ffn", seed=7))
    res = run("quantize", out, "--quant", "fp16", "--checkpoint", other, "-q")
    assert res.exit_code != 0 and "is not the checkpoint" in res.stderr


def test_unknown_quant_variant_is_a_clear_error(tmp_path):
    res = run("onnx", "builtin:tiny", "-o", tmp_path / "o", "--quant", "fp8")
    assert res.exit_code != 0 and "unknown --quant variant 'fp8'" in res.stderr
    assert not (tmp_path / "o").exists()
