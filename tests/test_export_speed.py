"""What makes exports faster must not change what the gates measure: the shared fp64 reference gives the very numbers
(and states) of its own steps, the one-pass quality evaluation of several variants gives each variant's report as
if measured alone, and the reference's GPT mode as the quality baseline is the step mode's computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkv_export.check import SharedReference
from rwkv_export.progress import Progress
from rwkv_export.quality import evaluate_variant, evaluate_variants
from rwkv_export.runners import ReferenceRunner
from rwkv_export.sources import Source


@pytest.fixture(scope="module")
def tiny():
    return Source("builtin:tiny-pydoc").load()


class Counting:
    """A reference model that counts its steps."""

    def __init__(self, model):
        self.model, self.vocab_size, self.steps = model, model.vocab_size, 0

    def new_state(self):
        return self.model.new_state()

    def step(self, token, state):
        self.steps += 1
        return self.model.step(token, state)


def _run(ref, tokens):
    state, out = ref.new_state(), []
    with torch.no_grad():
        for t in tokens:
            logits, state = ref.step(t, state)
            out.append(logits)
    return out, state


@pytest.mark.parametrize("keep_bytes", [SharedReference.KEEP_BYTES, 0])
def test_shared_reference_is_the_reference_computed_once(tiny, keep_bytes):
    model = tiny.arch.reference(tiny.tensors, torch.float64)
    counting = Counting(model)
    shared = SharedReference(counting)
    shared.KEEP_BYTES = keep_bytes  # 0: no state kept, every state read is recomputed from the start
    tokens = [1, 50, 7, 99, 3, 3, 120]
    want, want_state = _run(model, tokens)
    for _ in range(3):  # three "graphs" compared on the same tokens
        got, got_state = _run(shared, tokens)
        for g, w in zip(got, want):
            assert torch.equal(g, w)  # the same fp64 numbers, not merely close
        for name, w in want_state.items():
            assert torch.equal(got_state[name], w)
    assert counting.steps == len(tokens)  # each distinct step once
    branch, _ = _run(shared, tokens[:3] + [11])  # a new path from a shared prefix
    assert torch.equal(branch[-1], _run(model, tokens[:3] + [11])[0][-1])
    # its new step only, or with no state kept, also the replay of the prefix's 3 steps
    assert counting.steps == len(tokens) + 1 + (3 if keep_bytes == 0 else 0)
    # a state from elsewhere (parity.state_effect's, from a graph) is stepped as is
    logits, _ = shared.step(5, model.new_state())
    assert torch.equal(logits, model.step(5, model.new_state())[0])


class FixedRunner:
    """A step runner whose next-token distribution depends on the token fed (so state and order matter)."""

    def __init__(self, table, seq: bool = False):
        self.table = np.log(np.asarray(table, np.float64))
        if seq:
            self.logits_seq = self._logits_seq

    def new_state(self):
        return {"n": 0}

    def step(self, token, state):
        return self.table[token].reshape(1, -1).astype(np.float32), {"n": state["n"] + 1}

    def _logits_seq(self, tokens, state):
        return np.stack([self.table[t] for t in tokens]).astype(np.float32), {"n": state["n"] + len(tokens)}


def test_evaluate_variants_equals_each_variant_alone():
    rng = np.random.default_rng(0)
    V = 6
    fp32 = rng.dirichlet(np.ones(V), size=V)
    variants = [fp32 * rng.uniform(0.8, 1.2, size=(V, V)) for _ in range(3)]
    variants = [v / v.sum(1, keepdims=True) for v in variants]
    tokens = [int(t) for t in rng.integers(0, V, size=300)]
    for prompt_len in (1, 20, len(tokens)):
        alone = [evaluate_variant(FixedRunner(v), FixedRunner(fp32), tokens, prompt_len=prompt_len, n_greedy=16)
                 for v in variants]
        together = evaluate_variants([FixedRunner(v) for v in variants], FixedRunner(fp32), tokens,
                                     prompt_len=prompt_len, n_greedy=16)
        chunked = evaluate_variants([FixedRunner(v) for v in variants], FixedRunner(fp32, seq=True), tokens,
                                    prompt_len=prompt_len, n_greedy=16, chunk=7)
        for a, b, c in zip(alone, together, chunked):
            assert a == b
            assert a.keys() == c.keys()
            for k in a:  # numbers to rounding (GPT mode sums in another order), the rest (e.g. the sequential record) equal
                if isinstance(a[k], (int, float)) and not isinstance(a[k], bool):
                    assert c[k] == pytest.approx(a[k], rel=1e-12), k
                else:
                    assert c[k] == a[k], k


def test_gpt_mode_baseline_is_the_step_mode_computation(tiny):
    """The quality baseline reads the eval text in the reference's GPT mode (ReferenceRunner.logits_seq): the same
    equations as its steps, rounded in another order, so the fp32 perplexity agrees to ~1e-7 (measured 1.5e-8 on
    tiny-pydoc), far below the smallest gate (fp16: 0.1%)."""
    from rwkv_export.quality import eval_tokens
    from rwkv_export.tokenizer import ByteTokenizer

    ids = eval_tokens(ByteTokenizer().encode, 400)
    ref = ReferenceRunner(tiny, "float32")

    class StepOnly:
        new_state, step = ref.new_state, ref.step

    variant = ReferenceRunner(tiny, "float64")  # any other model will do as "the variant"
    by_step = evaluate_variant(variant, StepOnly(), ids)
    by_seq = evaluate_variant(variant, ref, ids)
    assert by_seq["ppl_fp32"] == pytest.approx(by_step["ppl_fp32"], rel=1e-6)
    assert by_seq["kl"] == pytest.approx(by_step["kl"], rel=1e-4, abs=1e-9)
    assert by_seq["top1_agreement"] == by_step["top1_agreement"]
    assert by_seq["greedy_match"] == by_step["greedy_match"]


def test_stage_lines_and_summary_give_time_and_peak_memory(capsys):
    p = Progress()
    with p.stage("doing a thing"):
        pass
    line = p.summary("exported somewhere")
    err = capsys.readouterr().err
    assert "doing a thing: done in" in err and "peak RSS" in err.splitlines()[1]
    assert line.startswith("exported somewhere in ") and "peak RSS" in line and line in err
    assert p.stages and p.stages[0][0] == "doing a thing" and p.stages[0][2] > 0
