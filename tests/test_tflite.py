"""TFLite target: litert-torch conversion with a named `step` signature, ai-edge-quantizer variants, parity in the
LiteRT interpreter (ai-edge-litert) against runtime_ref in fp64. Tiny synthetic models only.

Needs the [tflite] extra (tools/install_edge_extras.sh); without it these tests fail with the install command.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rwkv_export import parity
from rwkv_export.checkpoint import from_state_dict
from rwkv_export.errors import MissingExtraError, RwkvExportError
from rwkv_export.manifest import MANIFEST_NAME, new_manifest, read_manifest, write_manifest
from rwkv_export.model import STATE_NAMES, RWKV4Step

from ckpts import state_dict

SETUP_HINT = "install the TFLite extra: pip install -e '.[tflite]' (or bash tools/install_edge_extras.sh)"

# Same bound as ONNX fp32: the graph is the same fp32 math (XNNPACK kernels sum in a different order), measured
# ~1.5e-6 on the tiny model; a wrong equation shows as > 1e-2.
FP32_MAX_REL = 1e-5
GREEDY_TOKENS = 64  # the issue asks for an identical greedy continuation over at least 64 tokens
QUALITY_TOKENS = 96  # teacher-forced tokens over which quantized variants are judged
# Quantized variants vs the fp64 reference, on the tiny random-weight model (measured: fp16 top1 1.0 KL ~1e-7;
# int8 top1 0.99 KL 5e-4; int4 top1 0.81 KL 0.085). Bounds sit a few times past the measurements so rounding noise
# across machines does not flip them, yet a broken quantization (a wrong scale or layout gives top1 near 1/256 and
# KL of several nats) fails every one.
QUALITY_BOUNDS = {
    "fp16": {"min_top1": 0.98, "max_kl_mean": 1e-4},
    "int8": {"min_top1": 0.9, "max_kl_mean": 1e-2},
    "int4": {"min_top1": 0.6, "max_kl_mean": 0.3},
}
# Each variant must be smaller than the next-wider one by at least this factor of the weight bytes saved; the rest
# of the file (graph, small fp32 vectors) is fixed overhead, sizeable on a tiny model.
SIZE_RATIO_MAX = {"fp16": 0.65, "int8": 0.45, "int4": 0.35}  # file size / fp32 file size, measured 0.55/0.37/0.27
VARIANTS = ["fp32", "fp16", "int8", "int4"]


def _require_extra():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import ai_edge_quantizer  # noqa: F401
        import litert_torch  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{e}: {SETUP_HINT}")


@pytest.fixture(scope="module")
def ckpt():
    return from_state_dict(state_dict("tiny"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt):
    _require_extra()
    from rwkv_export.targets.tflite import export_tflite

    out = tmp_path_factory.mktemp("tflite")
    entries = export_tflite(RWKV4Step(ckpt), out, VARIANTS)
    manifest = new_manifest(dims=ckpt.dims.as_dict(), source={"kind": "test"}, tokenizer={"kind": "bytes"})
    manifest["graphs"] = entries
    write_manifest(out, manifest)
    return out, read_manifest(out)


@pytest.fixture(scope="module")
def ref(ckpt):
    from runtime_ref import RWKV4

    return RWKV4(ckpt.tensors, dtype=torch.float64)


def _graph(manifest, variant):
    return next(g for g in manifest["graphs"] if g["variant"] == variant)


def test_files_and_manifest_entries(exported):
    from rwkv_export.targets.tflite import file_name

    out, m = exported
    assert [g["variant"] for g in m["graphs"]] == VARIANTS
    listed = {f["file"] for f in m["files"]}
    for g in m["graphs"]:
        assert g["format"] == "tflite" and g["kind"] == "step" and g["signature"] == "step"
        assert g["file"] == file_name(g["variant"]) and g["file"] in listed and (out / g["file"]).is_file()
        assert [(i["name"], i["role"], i.get("state")) for i in g["inputs"]] == (
            [("token", "token", None)] + [(s, "state", s) for s in STATE_NAMES])
        assert [(o["name"], o["role"], o.get("state")) for o in g["outputs"]] == (
            [("logits", "logits", None)] + [(f"{s}_out", "state", s) for s in STATE_NAMES])
        token = g["inputs"][0]
        assert token["dtype"] == "int32" and token["shape"] == [1]
        L, C, V = m["model"]["n_layer"], m["model"]["n_embd"], m["model"]["vocab_size"]
        assert all(i["dtype"] == "float32" and i["shape"] == [L, C] for i in g["inputs"][1:] + g["outputs"][1:])
        assert g["outputs"][0]["dtype"] == "float32" and g["outputs"][0]["shape"] == [1, V]


def test_signature_names_are_stable(exported):
    """The names clients bind to, read back from each file by the interpreter itself (not from our manifest)."""
    from ai_edge_litert.interpreter import Interpreter

    out, m = exported
    want = {"inputs": sorted(["token", *STATE_NAMES]), "outputs": sorted(["logits", *(f"{s}_out" for s in STATE_NAMES)])}
    for g in m["graphs"]:
        sigs = Interpreter(model_path=str(out / g["file"])).get_signature_list()
        assert set(sigs) == {"step"}, g["file"]
        assert {k: sorted(v) for k, v in sigs["step"].items()} == want, g["file"]


def test_quantized_files_are_smaller(exported):
    out, m = exported
    size = {g["variant"]: (out / g["file"]).stat().st_size for g in m["graphs"]}
    for v, ratio in SIZE_RATIO_MAX.items():
        assert size[v] <= ratio * size["fp32"], (v, size)
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]


def test_fp32_parity_and_greedy_continuation(exported, ref):
    from rwkv_export.tf_runners import TFLiteStepRunner

    out, m = exported
    assert parity.tolerance_for("tflite", "fp32").max_rel == FP32_MAX_REL  # the declared gate is this bound
    runner = TFLiteStepRunner(out, m, _graph(m, "fp32"))
    report = parity.compare(runner, ref, target="tflite", variant="fp32", n_greedy=GREEDY_TOKENS)
    assert report["max_rel"] <= FP32_MAX_REL, parity.format_report(report)
    assert report["top1_agreement"] == 1.0 and report["tokens"] >= 64
    assert report["greedy_identical"] and report["greedy_tokens"] == GREEDY_TOKENS, parity.format_report(report)
    parity.gate(report)


@pytest.mark.parametrize("variant", ["fp16", "int8", "int4"])
def test_quantized_quality(exported, ref, variant):
    from rwkv_export.tf_runners import TFLiteStepRunner, quality

    out, m = exported
    runner = TFLiteStepRunner(out, m, _graph(m, variant))
    q = quality(runner, ref, parity.parity_tokens(m["model"]["vocab_size"], QUALITY_TOKENS))
    b = QUALITY_BOUNDS[variant]
    assert q["top1_agreement"] >= b["min_top1"] and q["kl_mean"] <= b["max_kl_mean"], (variant, q)


def test_state_is_carried_not_ignored(exported):
    """The same token from two different states must give different logits (the state inputs are wired)."""
    import numpy as np

    from rwkv_export.tf_runners import TFLiteStepRunner

    out, m = exported
    r = TFLiteStepRunner(out, m, _graph(m, "fp32"))
    fresh = r.new_state()
    _, after = r.step(7, fresh)
    a, _ = r.step(3, fresh)
    b, _ = r.step(3, after)
    assert not np.allclose(a, b)
    assert not np.array_equal(after["att_pp"], fresh["att_pp"])


def test_unknown_variant_is_a_one_line_error(tmp_path, ckpt):
    from rwkv_export.targets.tflite import export_tflite

    with pytest.raises(RwkvExportError, match="unknown tflite variant.*int3.*fp32, fp16, int8, int4") as e:
        export_tflite(RWKV4Step(ckpt), tmp_path, ["fp32", "int3"])
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_int4_needs_dims_divisible_by_block(tmp_path):
    from rwkv_export.targets.tflite import export_tflite

    odd = from_state_dict(state_dict("tiny-ffn"))  # n_embd 48
    with pytest.raises(RwkvExportError, match="n_embd=48, not divisible by 32") as e:
        export_tflite(RWKV4Step(odd), tmp_path, ["int4"])
    assert "\n" not in str(e.value)


def test_missing_litert_torch_is_an_actionable_error(tmp_path, ckpt, monkeypatch):
    from rwkv_export.targets.tflite import export_tflite

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # makes `import litert_torch` raise ImportError
    with pytest.raises(MissingExtraError, match=r"litert-torch.*rwkv-export\[tflite\]"):
        export_tflite(RWKV4Step(ckpt), tmp_path, ["fp32"])


def test_manifest_round_trips_as_json(exported):
    out, m = exported
    assert json.loads((out / MANIFEST_NAME).read_text())["graphs"] == m["graphs"]

