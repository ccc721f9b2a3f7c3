"""The eval graph (eval_graph.py: a folder's prompt graph rewritten to give every token's logits) computes, row by row,
what the variant's step graph computes token by token, for every version and variant; the quality gate reads the eval
text through it (quality.evaluate_against) and refuses one that does not (quality.guard_link).

Tolerances, and why:
- fp32: 1e-5 of the logits' std, the prompt graph's own parity tolerance against the reference: the eval graph is the
  prompt graph's arithmetic (its scan rounds in another order than T steps; measured ~1.5e-6).
- fp16: 1e-2 of std, half fp16's parity tolerance (0.02): fp16 MatMuls over T rows round otherwise than over one
  (measured 2e-4 to 1.4e-3).
- int8 / int4: a row may differ from the step by flipped rounding steps (an activation that fp32 rounding moves across
  a quantization boundary takes the neighbouring integer; the state carries it), so these are bounded as
  quality.guard_link bounds them, as a share of the variant's own rms deviation from fp32: quality.LINK_MAX_STEP
  against the step graph, quality.LINK_MAX_CHUNK against the eval graph fed one token a call. int8 with the per-row
  quantization left out of the rewrite (per_row_int8=False) must fail the second bound on every version.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from rwkv_export.check import eval_token_ids
from rwkv_export.eval_graph import LAST_ROW_PREFIX, EvalGraphError, EvalGraphRunner, eval_model
from rwkv_export.export import export_onnx
from rwkv_export.quality import (LINK_MAX_CHUNK, LINK_MAX_STEP, Baseline, EvalGraphLinkError, evaluate_against)
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.seq_runner import OnnxSequenceRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = {"v4": "tiny", "v5.2": "v5-tiny", "v6": "v6-tiny", "v7": "v7-tiny"}  # seeded synthetic checkpoints
VARIANTS = ["fp32", "fp16", "int8", "int4"]
TOKENS = 32  # one chunk of eval text
ROUNDING = {"fp32": 1e-5, "fp16": 1e-2}  # max|Δ|/std, see the module docstring


@pytest.fixture(scope="module", params=list(MODELS))
def folder(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    export_onnx(f"builtin:{MODELS[request.param]}", out, quant=["fp16", "int8", "int4"], check=False)
    return out


def _entries(folder, variant):
    manifest = json.loads((folder / "manifest.json").read_text())
    pick = {g["kind"]: g for g in manifest["graphs"] if g["variant"] == variant}
    return manifest, pick["step"], pick["sequence"]


def _step_rows(folder, variant, tokens):
    manifest, step, _ = _entries(folder, variant)
    runner = OnnxStepRunner(folder, manifest, step, threads=1)
    state, rows = runner.new_state(), []
    for t in tokens:
        logits, state = runner.step(t, state)
        rows.append(np.asarray(logits, dtype=np.float64).reshape(-1))
    return np.array(rows), state


def _eval_rows(folder, variant, tokens, per_row_int8=True, one_at_a_time=False):
    manifest, _, seq = _entries(folder, variant)
    runner = EvalGraphRunner(folder, manifest, seq, threads=1, per_row_int8=per_row_int8)
    try:
        state = runner.new_state()
        if not one_at_a_time:
            return runner.logits_seq(tokens, state)
        rows = []
        for t in tokens:
            logits, state = runner.logits_seq([t], state)
            rows.append(logits[0])
        return np.array(rows), state
    finally:
        runner.close()


def _tokens(folder, n=TOKENS):
    manifest = json.loads((folder / "manifest.json").read_text())
    return eval_token_ids(folder, manifest, n)


def _rms(a):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


@pytest.mark.parametrize("variant", VARIANTS)
def test_eval_rows_are_the_step_graph_token_by_token(folder, variant):
    tokens = _tokens(folder)
    want, want_state = _step_rows(folder, variant, tokens)
    got, state = _eval_rows(folder, variant, tokens)
    assert got.shape == want.shape == (TOKENS, want.shape[1])  # every row, not the last one only
    if variant in ROUNDING:
        assert np.abs(got - want).max() / want.std() <= ROUNDING[variant]
        for name, value in want_state.items():  # the state after the chunk too: the next chunk starts from it
            assert np.abs(state[name] - value).max() <= ROUNDING[variant] * max(np.abs(value).max(), 1.0), name
        return
    fp32, _ = _step_rows(folder, "fp32", tokens)
    own = _rms(want - fp32)
    assert own > 0
    assert _rms(got - want) / own <= LINK_MAX_STEP
    ones, _ = _eval_rows(folder, variant, tokens[:16], one_at_a_time=True)
    assert _rms(got[:16] - ones) / _rms(want[:16] - fp32[:16]) <= LINK_MAX_CHUNK


def test_int8_without_the_per_row_rewrite_fails(folder):
    """The same bound with the int8 activations quantized per chunk (one scale for all rows): past it."""
    tokens = _tokens(folder, 16)
    want, _ = _step_rows(folder, "int8", tokens)
    fp32, _ = _step_rows(folder, "fp32", tokens)
    wrong, _ = _eval_rows(folder, "int8", tokens, per_row_int8=False)
    ones, _ = _eval_rows(folder, "int8", tokens, per_row_int8=False, one_at_a_time=True)
    assert _rms(wrong - ones) / _rms(want - fp32) > LINK_MAX_CHUNK
    right, _ = _eval_rows(folder, "int8", tokens)
    ones, _ = _eval_rows(folder, "int8", tokens, one_at_a_time=True)
    assert _rms(right - ones) / _rms(want - fp32) <= LINK_MAX_CHUNK


def test_the_last_row_is_the_prompt_graphs_output(folder):
    """The rewrite changes which rows reach the head, not what a row computes: the eval graph's last row is the
    exported prompt graph's logits (fp32: rounding, 1e-5 of std)."""
    tokens = _tokens(folder)
    manifest, _, seq = _entries(folder, "fp32")
    prompt = OnnxSequenceRunner(folder, manifest, seq, threads=1)
    want, _ = prompt.forward(tokens, prompt.new_state())
    got, _ = _eval_rows(folder, "fp32", tokens)
    assert np.abs(got[-1:] - want).max() / want.std() <= 1e-5


def test_a_prompt_graph_without_the_named_nodes_is_refused(folder, tmp_path):
    _, _, seq = _entries(folder, "int8")
    model = onnx.load(str(folder / seq["file"]), load_external_data=False)
    named = [n for n in model.graph.node if n.name.startswith(LAST_ROW_PREFIX)]
    assert len(named) >= 3  # the residual, the FFN input and its token shift (RWKV-4 and 5/6/7 alike)
    for n in named:
        n.name = n.name.removeprefix(LAST_ROW_PREFIX)
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(EvalGraphError, match=LAST_ROW_PREFIX.rstrip("/")) as e:
        eval_model(tmp_path / "old.onnx")
    assert "\n" not in str(e.value)


def test_the_quality_gate_refuses_a_broken_eval_graph(folder, tmp_path):
    """evaluate_against through an eval graph whose int8 rows share one scale per chunk: EvalGraphLinkError, a
    one-line error naming what differs; through the correct one, the report says how it was read."""
    root = tmp_path / "f"
    shutil.copytree(folder, root)
    manifest, step, seq = _entries(root, "int8")
    _, fp32_step, fp32_seq = _entries(root, "fp32")
    tokens = _tokens(root, 300)
    evals = EvalGraphRunner(root, manifest, fp32_seq, threads=1)
    base = Baseline.compute(evals, tokens, root / "base.bin", chunk=128,
                            greedy_runner=OnnxStepRunner(root, manifest, fp32_step, threads=1))
    runner = OnnxStepRunner(root, manifest, step, threads=1)
    report = evaluate_against(runner, base, EvalGraphRunner(root, manifest, seq, threads=1))
    assert report["read_by"] == "eval graph" and report["link"]["step"] <= LINK_MAX_STEP
    assert report["tokens"] == len(tokens) - 1 and report["kl"] > 0
    stepwise = evaluate_against(runner, base)  # the same text token by token: the same judgement, within flips
    assert stepwise["read_by"] == "step graph"
    # (synthetic weights: the gate reads KL, info_loss; their perplexity change is noise of either sign)
    assert abs(report["kl"] - stepwise["kl"]) <= 0.25 * stepwise["kl"], (report["kl"], stepwise["kl"])
    assert abs(report["top1_agreement"] - stepwise["top1_agreement"]) <= 0.05
    with pytest.raises(EvalGraphLinkError, match="one token a call") as e:
        evaluate_against(runner, base, EvalGraphRunner(root, manifest, seq, threads=1, per_row_int8=False))
    assert "\n" not in str(e.value)
    assert not list(root.glob(".eval-*"))  # the rewritten protos do not stay in the folder
