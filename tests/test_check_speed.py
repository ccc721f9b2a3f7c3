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


@pytest.fixture(scope="module")
def prompt_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("check-speed-prompt") / "out"
    export_onnx("builtin:tiny", out, quant=["fp16", "int8", "int4"], check=False)
    return out


def test_quality_through_eval_graphs_in_workers_equals_the_serial_check(prompt_folder, tmp_path, capsys):
    """With prompt graphs, the quality gates read the eval text through eval graphs (eval_graph.py) in chunks, the
    baseline through the fp32 one: the same reports in two worker processes as in one, each with its link guard."""
    serial, _, _ = _check(prompt_folder, 1, tmp_path, "serial")
    parallel, _, _ = _check(prompt_folder, 2, tmp_path, "parallel")
    assert parallel == serial
    quality = [r for r in serial if r.get("kind") == "quality"]
    assert [r["variant"] for r in quality] == ["fp16", "int8", "int4"]
    for r in quality:
        assert r["read_by"] == "eval graph" and r["baseline"] == "prefill.onnx (fp32 eval graph)", r
        assert r["tokens"] == EVAL_TOKENS - 1 and r["passed"] and 0 <= r["link"]["step"] <= r["link"]["max_step"]
    err = capsys.readouterr().err
    assert "quality baseline: the fp32 eval graph (prefill.onnx" in err
    # three variants, twice; 300 tokens are short of the sequential gate's first level: judged at the last
    lines = [ln for ln in err.splitlines() if "(eval graph, chunks of 255): " in ln]
    assert len(lines) == 6 and all("at level 1 (the last level" in ln and "): done in" in ln for ln in lines), lines


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


SEQ_EVAL_TOKENS = 1100  # past parity.SEQ_LEVELS (512, 1024): three levels


def test_sequential_gate_in_workers_equals_the_serial_check(prompt_folder, tmp_path, capsys):
    """Past the first level, the sequential gate: the same reports in two (fresh per job) worker processes as here,
    each with where it stopped and why; one line per job, as before."""
    serial, _, _ = _check_n(prompt_folder, 1, tmp_path, "serial", SEQ_EVAL_TOKENS)
    parallel, _, _ = _check_n(prompt_folder, 2, tmp_path, "parallel", SEQ_EVAL_TOKENS)
    assert parallel == serial
    for r in (r for r in serial if r.get("kind") == "quality"):
        look = r["sequential"]
        assert r["passed"] and look["stop"] == "pass" and r["tokens"] == look["tokens_read"] - 1, look
        assert look["level"] == 3 or look["q"] + look["z"] * look["se"] < look["gate"], look
    err = capsys.readouterr().err
    assert err.count("in a worker process, peak RSS") >= 4


def test_undecided_variants_read_on_in_rounds(prompt_folder, tmp_path, capsys, monkeypatch):
    """With no early verdict possible (z = 1e9), every variant comes back pending at each level: the baseline reads
    on from its state, each variant goes on from its own (its Pending through pickle, as to a worker) to the last
    level, and the reports are the full reading's, against the same gates."""
    import pickle

    import rwkv_export.check as check
    import rwkv_export.quality as quality

    look = quality.sequential_look
    monkeypatch.setattr(quality, "sequential_look", lambda *a, **k: look(*a, **{**k, "z": 1e9}))
    job = check._graph_job
    monkeypatch.setattr(check, "_graph_job", lambda *a, **k: pickle.loads(pickle.dumps(
        job(*pickle.loads(pickle.dumps(a)), **k))))
    reports, _, _ = _check_n(prompt_folder, 1, tmp_path, "rounds", SEQ_EVAL_TOKENS)
    quality_reports = [r for r in reports if r.get("kind") == "quality"]
    assert [r["variant"] for r in quality_reports] == ["fp16", "int8", "int4"]
    for r in quality_reports:
        assert r["sequential"]["level"] == 3 and r["tokens"] == SEQ_EVAL_TOKENS - 1 and r["passed"], r["sequential"]
    err = capsys.readouterr().err
    assert "of 1100 tokens of eval text" in err
    assert "quality baseline: the fp32 eval graph on eval tokens 511-1023: done in" in err
    assert "quality baseline: the fp32 eval graph on eval tokens 1023-1099: done in" in err
    assert err.count(" (read on) on ") == 6 and err.count("undecided") == 6  # two resumed jobs a variant


def _check_n(folder, processes, tmp_path, name, tokens):
    root = tmp_path / name
    shutil.copytree(folder, root)
    manifest = read_manifest(root)
    reports = check_graphs(root, manifest, Source("builtin:tiny").load(), progress=Progress(), eval_tokens=tokens,
                           processes=processes)
    return reports, manifest, None


@pytest.mark.parametrize("builtin", ["tiny", "v7-tiny"])
def test_verified_guess_records_the_reference_s_own_greedy_path(builtin):
    """check.verify_greedy: the reference's greedy continuation checked in one GPT-mode run from a guess records the
    same tokens as the reference stepping (identical paths) and the same logits to GPT/RNN rounding, whether the
    guess is right all the way, wrong from some token on (the reference steps from there), or wrong at once."""
    from rwkv_export.check import verify_greedy

    ckpt = Source(f"builtin:{builtin}").load()
    model = ckpt.arch.reference(ckpt.tensors, torch.float64)
    tokens = parity_tokens(model.vocab_size)
    stepped = record_reference(model, tokens)
    path = list(stepped.logits)[-1]
    right = list(path[len(tokens):])
    assert len(right) == N_GREEDY
    wrong_from = [*right[:10], (right[10] + 1) % model.vocab_size, *right[11:]]
    for guess, confirmed in ((right, N_GREEDY), (wrong_from, 10), ([(right[0] + 1) % model.vocab_size] * N_GREEDY, 0)):
        ref = SharedReference(model)
        ref.prefill(tokens)
        assert verify_greedy(ref, tokens, guess) == confirmed
        recorded = record_reference(ref, tokens)
        assert list(recorded.logits) == list(stepped.logits)  # the same paths: the same tokens, in order
        worst = max(float(np.abs(recorded.logits[p] - want).max() / want.std()) for p, want in stepped.logits.items())
        assert worst < GPT_VS_RNN_MAX_REL


def test_export_reads_the_baseline_while_it_writes_the_variants(tmp_path, capsys, monkeypatch):
    """export_onnx starts the quality gates' fp32 baseline in a worker process (check.start_baseline) once its fp32
    graphs are written, before any variant is; the export's reports are those of a serial check of its folder."""
    import rwkv_export.check as check

    seen = []
    start = check.start_baseline
    monkeypatch.setattr(check, "start_baseline", lambda root, manifest, **k: (
        seen.append([g["variant"] for g in manifest["graphs"]]), start(root, manifest, **k))[1])
    out = tmp_path / "out"
    res = export_onnx("builtin:tiny", out, quant=["int8", "int4"], progress=Progress())
    assert seen == [["fp32", "fp32"]]  # the step and prompt graphs of fp32 only
    err = capsys.readouterr().err
    assert any(ln.startswith("quality baseline: the fp32 eval graph (prefill.onnx") and "(in a worker process, peak RSS"
               in ln for ln in err.splitlines()), err
    serial = check_graphs(out, read_manifest(out), Source("builtin:tiny").load(), processes=1)
    assert serial == res.reports
    assert [r["variant"] for r in serial if r.get("kind") == "quality"] == ["int8", "int4"]


@pytest.mark.parametrize("builtin", ["tiny", "v7-tiny"])
def test_batched_probe_logits_are_each_state_s_own(builtin):
    """SharedReference.logits_seq_many (the prompt graphs' state probes in one vmapped GPT-mode run) gives each
    state's logits_seq: the same equations, batched matrix products rounding in their own order (RWKV-4 measured the
    same bits, RWKV-7's matrix state not), within the GPT/RNN bound, ten million times below the tightest tolerance."""
    ckpt = Source(f"builtin:{builtin}").load()
    model = ckpt.arch.reference(ckpt.tensors, torch.float64)
    ref = SharedReference(model)
    probe = parity_tokens(model.vocab_size, 8, 99)
    states, state = [], model.new_state()
    with torch.no_grad():
        for tok in parity_tokens(model.vocab_size, 5, 7):
            _, state = model.step(tok, state)
            states.append({k: v * 1.001 for k, v in state.items()})
    many = ref.logits_seq_many(probe, states)
    assert many is not None and len(many) == len(states)
    for got, state in zip(many, states):
        want = ref.logits_seq(probe, state)
        assert len(got) == len(want) == len(probe)
        worst = max(float((g - w).abs().max() / w.std()) for g, w in zip(got, want))
        assert worst < GPT_VS_RNN_MAX_REL
