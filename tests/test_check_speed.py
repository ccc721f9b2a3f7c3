"""The check's speed-ups keep every gate's numbers (issue 19): the reference's side computed once in GPT mode and
replayed, the fp32 baseline of the quality gate computed once, step graphs checked in worker processes.

- GPT mode (runtime_ref's forward_seq) and RNN steps compute the same equations; in fp64 they differ by rounding
  only, ~1e-16 of the logits' std, asserted below 1e-12 here: ten million times below the tightest parity
  tolerance (1e-5), so no verdict can move.
- a recorded reference replays exactly the logits the reference computed (bit for bit);
- the reports of a check in two worker processes equal those of the serial check bit for bit (onnxruntime on one
  thread is deterministic, and each number is computed by the same code from the same inputs), and a typed error
  raised in a worker reaches the caller as itself.
Fixtures are exported here from synthetic built-ins without prompt graphs (their export is the slow part); the
prompt graph's gate is unchanged apart from its probe steps in GPT mode, covered by the first test.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from rwkv_export.check import SharedReference, check_graphs
from rwkv_export.errors import GraphFileError
from rwkv_export.export import export_onnx
from rwkv_export.manifest import read_manifest
from rwkv_export.parity import N_GREEDY, compare, parity_tokens, record_reference, sequence_calls, state_effect
from rwkv_export.progress import Progress
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.sources import Source

GPT_VS_RNN_MAX_REL = 1e-12  # fp64 rounding of the same equations in another order (measured ~1e-16)
EVAL_TOKENS = 300  # enough for every quality metric to be non-trivial, small enough for a test


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("check-speed") / "out"
    export_onnx("builtin:tiny", out, quant=["fp16", "int8"], check=False, prefill=False)
    return out


@pytest.mark.parametrize("builtin", ["tiny", "v7-tiny"])
def test_gpt_mode_reference_matches_its_steps(builtin):
    ckpt = Source(f"builtin:{builtin}").load()
    model = ckpt.arch.reference(ckpt.tensors, torch.float64)
    tokens = parity_tokens(model.vocab_size)
    gpt = SharedReference(model)
    fed = []
    for call in sequence_calls(tokens):
        fed += call
        gpt.prefill(fed)
    state, worst = gpt.new_state(), 0.0
    raw = model.new_state()
    with torch.no_grad():
        for tok in tokens:
            want, raw = model.step(tok, raw)
            got, state = gpt.step(tok, state)
            worst = max(worst, float((got - want).abs().max() / want.std()))
        probe = parity_tokens(model.vocab_size, 8, 99)
        # the state effect of a state from elsewhere: GPT mode (SharedReference) against the steps (a bare model)
        other = {k: (v * 1.001).numpy() for k, v in raw.items()}
        effect_gpt = state_effect(gpt, other, state, probe)
        effect_rnn = state_effect(model, other, dict(state), probe)
    assert worst < GPT_VS_RNN_MAX_REL
    assert effect_gpt > 0 and abs(effect_gpt - effect_rnn) < GPT_VS_RNN_MAX_REL


def test_recorded_reference_replays_the_reference_exactly(folder):
    ckpt = Source("builtin:tiny").load()
    model = ckpt.arch.reference(ckpt.tensors, torch.float64)
    m = read_manifest(folder)
    graph = next(g for g in m["graphs"] if g["variant"] == "int8")
    recorded = record_reference(SharedReference(model))
    assert len(recorded.logits) == len(parity_tokens(model.vocab_size)) + N_GREEDY
    with torch.no_grad():
        direct = compare(OnnxStepRunner(folder, m, graph), model, target="onnx", variant="int8")
    replayed = compare(OnnxStepRunner(folder, m, graph), recorded, target="onnx", variant="int8")
    assert replayed == direct


def _check(folder, processes, tmp_path, name):
    root = tmp_path / name
    shutil.copytree(folder, root)
    manifest = read_manifest(root)
    progress = Progress()
    reports = check_graphs(root, manifest, Source("builtin:tiny").load(), progress=progress, eval_tokens=EVAL_TOKENS,
                           processes=processes)
    return reports, manifest, progress


def test_parallel_check_reports_equal_the_serial_ones(folder, tmp_path, capsys):
    serial, m1, _ = _check(folder, 1, tmp_path, "serial")
    parallel, m2, _ = _check(folder, 2, tmp_path, "parallel")
    assert [r.get("kind", "parity") for r in serial] == ["parity", "parity", "quality", "parity", "quality"]
    assert parallel == serial
    assert [g.get("quality") for g in m2["graphs"]] == [g.get("quality") for g in m1["graphs"]]
    assert all(r["passed"] for r in serial)
    quality = [r for r in serial if r.get("kind") == "quality"]
    assert all(r["tokens"] == EVAL_TOKENS - 1 and 0 < r["kl"] for r in quality)
    err = capsys.readouterr().err
    for variant in ("fp32", "fp16", "int8"):  # one line per step graph, with its time and peak memory
        assert f"parity onnx/{variant}" in err
    assert err.count("in a worker process, peak RSS") == 3
    assert "reference fp64" in err and "quality baseline" in err


def test_a_failure_in_a_worker_reaches_the_caller(folder, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(folder, root)
    manifest = read_manifest(root)  # (before the damage, which it would refuse by its sha256)
    (root / "model_int8.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(GraphFileError, match="model_int8.onnx"):
        check_graphs(root, manifest, Source("builtin:tiny").load(), eval_tokens=EVAL_TOKENS, processes=2)


def test_recorded_reference_refuses_a_path_it_did_not_record():
    from rwkv_export.errors import RwkvExportError
    from rwkv_export.parity import RecordedReference

    rec = RecordedReference(4, {(1,): np.zeros(4)})
    assert rec.step(1, rec.new_state())[1] == (1,)
    with pytest.raises(RwkvExportError, match="no step after 0 tokens"):
        rec.step(2, rec.new_state())
