"""Tests of the RWKV-4 reference runner (runtime_ref): GPT mode vs RNN mode, the official `rwkv` package as an
outside oracle, sampling, state immutability, fp32 vs fp64, loading and autograd."""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch
import torch.nn.functional as F

from runtime_ref import PP_INIT, STATE_KEYS, RWKV4, sample_logits, sampling_probs
from rwkv_export.synthetic import make_checkpoint
from rwkv_export.arch.rwkv4.synthetic import PRESETS, make_state_dict

SEED = 1
PRESETS_UNDER_TEST = ("tiny", "tiny-ffn")  # tiny-ffn has F != 4C

# GPT mode and RNN mode do the same fp64 arithmetic in a different order (matrix-matrix vs matrix-vector sums,
# cat/stack of the shift): differences are a few fp64 ulps (~1e-15); 1e-10 leaves 1e5 of headroom and still fails
# on any real discrepancy (a wrong token shift or state hand-over is O(1)).
SEQ_VS_STEP_RTOL = 1e-10

# rwkv 0.8.32 `cpu fp32` computes in fp32 (unit roundoff 6e-8) through LayerNorms, matmuls over C <= 256 inputs
# and the WKV recurrence; measured here ~8e-7 of std(logits) over 24 tokens. 1e-5 keeps >10x headroom, while a
# formula error (wrong decay sign, missing u, shift off by one) moves logits by >= 1e-2 of their std.
PKG_LOGITS_TOL = 1e-5
# Same reasoning for the state, measured as max|Δ| / max|ref| per tensor (aa/bb are O(1): they are stored scaled by
# e^-pp, and bb >= 1 after the first token).
PKG_STATE_TOL = 1e-5
# rwkv 0.8.32 applies LN0 to the whole embedding matrix *in the checkpoint's dtype* at load time ("precompute
# embedding" in rwkv/model.py), so from a bf16 checkpoint every embedding it feeds block 0 is rounded to bf16
# (relative 2^-9 = 2e-3). Against our exact LN0 that costs ~7e-3 of std(logits) (measured); bound it at 3e-2.
PKG_BF16_LN0_TOL = 3e-2

# fp32 runtime_ref vs fp64 runtime_ref: the same fp32 roundoff argument as PKG_LOGITS_TOL.
FP32_VS_FP64_TOL = 1e-5
FP32_VS_FP64_STATE_TOL = 1e-5

N_PKG_TOKENS = 24  # >= 16 as asked; each step of both models takes well under a millisecond at these sizes


# -- helpers ------------------------------------------------------------------------------------------------------


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max|x - ref| / max|ref|, in fp64."""
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.abs().max())


def logits_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The scale-aware logits metric: max|x - ref| / std(ref)."""
    x, ref = x.double(), ref.double()
    return float((x - ref).abs().max() / ref.std())


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def run_steps(model: RWKV4, tokens, state):
    logits = []
    for t in tokens:
        out, state = model.step(t, state)
        logits.append(out)
    return torch.stack(logits), state


def used_state(model: RWKV4, n: int = 5, seed: int = 123) -> dict:
    _, state = run_steps(model, random_tokens(n, model.vocab_size, seed), model.new_state())
    return state


@pytest.fixture(scope="module")
def fp64_models() -> dict[str, RWKV4]:
    return {p: RWKV4(make_state_dict(PRESETS[p], seed=SEED), dtype=torch.float64) for p in PRESETS_UNDER_TEST}


# -- shapes and loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS_UNDER_TEST)
def test_dimensions_read_from_tensors(fp64_models, preset):
    cfg, m = PRESETS[preset], fp64_models[preset]
    assert (m.n_layer, m.n_embd, m.ffn_dim, m.vocab_size) == (cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size)
    assert m.dtype == torch.float64
    assert set(m.state_dict()) == set(make_state_dict(cfg, seed=SEED))  # writes back the checkpoint layout
    state = m.new_state()
    assert set(state) == set(STATE_KEYS)
    for k in STATE_KEYS:
        assert state[k].shape == (cfg.n_layer, cfg.n_embd) and state[k].dtype == torch.float64
    assert torch.all(state["att_pp"] == PP_INIT)
    assert all(torch.all(state[k] == 0) for k in STATE_KEYS if k != "att_pp")
    logits, _ = m.step(0, state)
    assert logits.shape == (cfg.vocab_size,) and logits.dtype == torch.float64


def test_pth_and_safetensors_load_the_same_model(tmp_path, fp64_models):
    pytest.importorskip("safetensors")
    ref = fp64_models["tiny-ffn"]
    state, tokens = ref.new_state(), random_tokens(4, ref.vocab_size, 7)
    want, _ = ref.forward_seq(tokens, state)
    for name in ("m.pth", "m.safetensors"):
        path = make_checkpoint(tmp_path / name, "tiny-ffn", seed=SEED)
        got, _ = RWKV4.from_checkpoint(path, dtype=torch.float64).forward_seq(tokens, state)
        assert torch.equal(got, want), name


def test_bad_shapes_and_keys_are_rejected():
    sd = make_state_dict(PRESETS["tiny"], seed=SEED)
    bad = dict(sd, **{"blocks.1.ffn.value.weight": sd["blocks.1.ffn.value.weight"][:, :-1]})
    with pytest.raises(ValueError, match="ffn.value.weight"):
        RWKV4(bad)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.time_first"}
    with pytest.raises(ValueError, match="missing"):
        RWKV4(missing)
    with pytest.raises(ValueError, match="dtype"):
        RWKV4(sd, dtype=torch.float16)


def test_bad_tokens_and_state_are_rejected(fp64_models):
    m = fp64_models["tiny"]
    with pytest.raises(ValueError):
        m.step(m.vocab_size, m.new_state())
    with pytest.raises(ValueError):
        m.step(-1, m.new_state())  # would silently wrap around in plain indexing
    with pytest.raises(ValueError):
        m.forward_seq([], m.new_state())
    with pytest.raises(ValueError):
        m.step(0, {k: v for k, v in m.new_state().items() if k != "ffn_x"})


# -- 1. GPT mode vs RNN mode --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS_UNDER_TEST)
@pytest.mark.parametrize("T", [1, 2, 7, 33])
@pytest.mark.parametrize("start", ["fresh", "used"])
def test_gpt_mode_equals_rnn_steps(fp64_models, preset, T, start):
    m = fp64_models[preset]
    state = m.new_state() if start == "fresh" else used_state(m)
    tokens = random_tokens(T, m.vocab_size, seed=T)

    step_logits, step_state = run_steps(m, tokens, state)
    seq_logits, seq_state = m.forward_seq(tokens, state, all_logits=True)
    last_logits, last_state = m.forward_seq(torch.tensor(tokens), state)

    assert seq_logits.shape == (T, m.vocab_size)
    assert rel_err(seq_logits, step_logits) < SEQ_VS_STEP_RTOL
    assert rel_err(last_logits, seq_logits[-1]) < SEQ_VS_STEP_RTOL  # head over [C] vs [T, C]: not bit-equal
    for k in STATE_KEYS:
        assert rel_err(seq_state[k], step_state[k]) < SEQ_VS_STEP_RTOL, k
        assert torch.equal(last_state[k], seq_state[k]), k


def test_greedy_matches_manual_argmax_loop(fp64_models):
    m = fp64_models["tiny-ffn"]
    prompt = random_tokens(5, m.vocab_size, 3)
    out, state = m.greedy(prompt, 6)
    logits, want_state = m.forward_seq(prompt, m.new_state())
    want = []
    for _ in range(6):
        want.append(int(torch.argmax(logits)))
        logits, want_state = m.step(want[-1], want_state)
    assert out == want
    assert all(torch.equal(state[k], want_state[k]) for k in STATE_KEYS)


# -- 2. the official rwkv package (BlinkDL's runtime) as an outside oracle ----------------------------------------


@pytest.fixture(scope="module")
def rwkv_pkg():
    """rwkv.model.RWKV, imported with its TorchScript and CUDA switches off (it reads them at import time, and its
    sequence mode reads RWKV_CUDA_ON again on every call, so they stay set for the session)."""
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ["RWKV_CUDA_ON"] = "0"
    from rwkv.model import RWKV

    return RWKV


def test_rwkv_package_importable_offline(rwkv_pkg):
    # The state layout used below ([sx, aa, bb, pp, fx] per layer) was read from this version's rwkv/model.py.
    assert importlib.metadata.version("rwkv") == "0.8.32"
    assert callable(rwkv_pkg)


def pkg_state_to_ours(pkg_state: list, n_layer: int) -> dict:
    """rwkv package v4 state: a list of 5*L tensors, per layer [att xx (sx), aa, bb, pp, ffn xx (fx)]."""
    return {k: torch.stack([pkg_state[5 * i + j] for i in range(n_layer)]) for j, k in enumerate(STATE_KEYS)}


class Bf16LayerNorm(torch.nn.Module):
    """LN0 as rwkv 0.8.32 computes it from a bf16 checkpoint: F.layer_norm on the bf16 tensors, result in bf16."""

    def __init__(self, ln: torch.nn.LayerNorm):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        w, b = self.ln.weight.bfloat16(), self.ln.bias.bfloat16()  # exact: the weights came from bf16
        return F.layer_norm(x.bfloat16(), w.shape, w, b).to(x.dtype)


@pytest.fixture(scope="module")
def pkg_pairs(tmp_path_factory, rwkv_pkg):
    """(runtime_ref fp64, rwkv package cpu fp32) loaded from the same .pth, per (preset, checkpoint dtype)."""
    pairs = {}
    for preset in PRESETS_UNDER_TEST:
        for ckpt_dtype in ("bfloat16", "float32"):
            path = make_checkpoint(tmp_path_factory.mktemp("pkg") / f"{preset}.pth", preset, SEED, dtype=ckpt_dtype)
            ours = RWKV4.from_checkpoint(path, dtype=torch.float64)
            pkg = rwkv_pkg(model=str(path), strategy="cpu fp32", verbose=False)
            pairs[preset, ckpt_dtype] = (ours, pkg)
    return pairs


def run_pkg_steps(pkg, tokens, state=None):
    logits = []
    for t in tokens:
        out, state = pkg.forward([t], state)  # it rebinds the list's items in place and returns the same list
        logits.append(out)
    return torch.stack(logits), state


@pytest.mark.parametrize("preset", PRESETS_UNDER_TEST)
@pytest.mark.parametrize("ckpt_dtype", ["bfloat16", "float32"])
def test_step_mode_matches_rwkv_package(pkg_pairs, preset, ckpt_dtype):
    ours, pkg = pkg_pairs[preset, ckpt_dtype]
    tokens = random_tokens(N_PKG_TOKENS, ours.vocab_size, seed=11)
    pkg_logits, pkg_state = run_pkg_steps(pkg, tokens)

    if ckpt_dtype == "bfloat16":
        # Our exact LN0 differs from the package's bf16-rounded embedding by a bounded amount ...
        plain_logits, _ = run_steps(ours, tokens, ours.new_state())
        assert max(logits_err(p, o) for p, o in zip(pkg_logits, plain_logits)) < PKG_BF16_LN0_TOL
        # ... and with that rounding reproduced, the two agree to fp32 roundoff.
        ln0 = ours.blocks[0].ln0
        ours.blocks[0].ln0 = Bf16LayerNorm(ln0)
        try:
            our_logits, our_state = run_steps(ours, tokens, ours.new_state())
        finally:
            ours.blocks[0].ln0 = ln0
    else:
        our_logits, our_state = run_steps(ours, tokens, ours.new_state())

    errs = [logits_err(p, o) for p, o in zip(pkg_logits, our_logits)]
    assert max(errs) < PKG_LOGITS_TOL, f"worst position {errs.index(max(errs))}: {max(errs):.3g}"
    assert torch.equal(pkg_logits.argmax(-1), our_logits.argmax(-1))
    converted = pkg_state_to_ours(pkg_state, ours.n_layer)
    for k in STATE_KEYS:
        assert rel_err(converted[k], our_state[k]) < PKG_STATE_TOL, k


@pytest.mark.parametrize("preset", PRESETS_UNDER_TEST)
def test_sequence_mode_matches_rwkv_package(pkg_pairs, preset):
    ours, pkg = pkg_pairs[preset, "float32"]  # fp32 checkpoint: no bf16 LN0 rounding in the package
    prefix = random_tokens(5, ours.vocab_size, seed=12)
    tokens = random_tokens(N_PKG_TOKENS, ours.vocab_size, seed=13)
    _, pkg_state = run_pkg_steps(pkg, prefix)
    _, our_state = run_steps(ours, prefix, ours.new_state())
    # from a fresh state, and from a used one (the package's own, converted)
    for pkg_start, our_start in ((None, ours.new_state()), (pkg_state, our_state)):
        pkg_start = None if pkg_start is None else list(pkg_start)
        pkg_logits, pkg_end = pkg.forward(tokens, pkg_start)
        our_logits, our_end = ours.forward_seq(tokens, our_start)
        assert logits_err(pkg_logits, our_logits) < PKG_LOGITS_TOL
        assert int(pkg_logits.argmax()) == int(our_logits.argmax())
        converted = pkg_state_to_ours(pkg_end, ours.n_layer)
        for k in STATE_KEYS:
            assert rel_err(converted[k], our_end[k]) < PKG_STATE_TOL, k


# -- 3. sampling --------------------------------------------------------------------------------------------------

# Probabilities chosen around the min-p threshold 0.02 * 0.4**2 = 0.0032: tokens 0-4 survive (0.004 by a 25% margin),
# tokens 5-24 (0.003 and 0.0016) are removed. Together the removed ones hold 4.6% of the mass.
MINP_PROBS = [0.4, 0.3, 0.2, 0.05, 0.004] + [0.003] * 10 + [0.0016] * 10
MINP_KEPT = 5
N_SAMPLES = 4000  # token 4 then has renormalised prob 0.0042: ~17 expected draws; the removed set ~180 if unfiltered


def minp_logits() -> torch.Tensor:
    return torch.tensor(MINP_PROBS, dtype=torch.float64).log()


def draw(logits, n, seed, **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([sample_logits(logits, generator=g, **kw) for _ in range(n)])


def test_temperature_zero_is_argmax():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(300, generator=g) * 3
        assert sample_logits(logits, temperature=0.0) == int(torch.argmax(logits))


def test_min_p_removes_exactly_the_tokens_below_threshold():
    probs = sampling_probs(minp_logits())
    assert torch.all(probs[MINP_KEPT:] == 0)
    want = torch.tensor(MINP_PROBS[:MINP_KEPT], dtype=torch.float64)
    assert torch.allclose(probs[:MINP_KEPT], want / want.sum(), rtol=1e-12, atol=0)

    counts = torch.bincount(draw(minp_logits(), N_SAMPLES, seed=0), minlength=len(MINP_PROBS))
    assert counts[MINP_KEPT:].sum() == 0
    assert torch.all(counts[:MINP_KEPT] > 0)

    # control: with the rule off, the same draws do reach the low tokens
    counts_off = torch.bincount(draw(minp_logits(), N_SAMPLES, seed=0, min_p_ratio=0.0), minlength=len(MINP_PROBS))
    assert counts_off[MINP_KEPT:].sum() > 0


def test_min_p_power_and_ratio_are_used():
    # power 1: threshold 0.02 * 0.4 = 0.008 also removes token 4 (0.004)
    assert sampling_probs(minp_logits(), min_p_power=1.0)[4] == 0
    # ratio 0.01: threshold 0.0016 keeps the 0.003 tokens, removes nothing at 0.0016 (not below)
    assert torch.all(sampling_probs(minp_logits(), min_p_ratio=0.01) > 0)
    # a ratio that would remove everything still keeps the most likely token
    assert int(torch.argmax(sampling_probs(minp_logits(), min_p_ratio=100.0))) == 0


def test_top_p_keeps_smallest_set_reaching_mass():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64).log()
    cases = {0.4: {1}, 0.7: {1, 3}, 0.85: {1, 3, 2}, 1.0: {0, 1, 2, 3}}
    for top_p, want in cases.items():
        probs = sampling_probs(logits, top_p=top_p, min_p_ratio=0.0)
        assert set(torch.nonzero(probs).flatten().tolist()) == want, top_p
        drawn = set(draw(logits, 300, seed=1, top_p=top_p, min_p_ratio=0.0).tolist())
        assert drawn == want, top_p
    # at the boundary, mass exactly top_p suffices: binary fractions make the softmax and the cumsum exact
    exact = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64).log()
    assert torch.nonzero(sampling_probs(exact, top_p=0.75, min_p_ratio=0.0)).flatten().tolist() == [0, 1]


def test_temperature_reshapes_after_filtering():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()
    p = torch.tensor([0.5, 0.3, 0.15], dtype=torch.float64)
    # top_p 0.9 keeps 3 tokens on the untempered distribution; temperature 0.5 then squares their probabilities
    probs = sampling_probs(logits, temperature=0.5, top_p=0.9, min_p_ratio=0.0)
    assert torch.allclose(probs[:3], p**2 / (p**2).sum(), rtol=1e-12, atol=0) and probs[3] == 0
    # a tiny temperature must not underflow into NaN
    assert int(torch.argmax(sampling_probs(logits * 50, temperature=1e-3))) == 0


def test_same_seed_same_samples():
    logits = torch.randn(256, generator=torch.Generator().manual_seed(5))
    kw = dict(temperature=1.3, top_p=0.95, min_p_ratio=0.0)
    a, b = draw(logits, 64, seed=42, **kw), draw(logits, 64, seed=42, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw(logits, 64, seed=43, **kw))


# -- 4. no mutation -----------------------------------------------------------------------------------------------


def test_step_and_forward_seq_do_not_mutate_state(fp64_models):
    m = fp64_models["tiny"]
    state = used_state(m)
    before = {k: v.clone() for k, v in state.items()}
    versions = {k: v._version for k, v in state.items()}  # counts in-place writes, even ones that restore a value
    m.step(3, state)
    m.forward_seq([3, 4, 5], state, all_logits=True)
    m.greedy([1, 2], 3, state=state)
    for k in STATE_KEYS:
        assert torch.equal(state[k], before[k]), k
        assert state[k]._version == versions[k], k


# -- 5. fp32 vs fp64 ----------------------------------------------------------------------------------------------


def test_fp32_matches_fp64(fp64_models):
    m64 = fp64_models["tiny"]
    m32 = RWKV4(make_state_dict(PRESETS["tiny"], seed=SEED), dtype=torch.float32)
    assert m32.dtype == torch.float32 and m32.new_state()["att_pp"].dtype == torch.float32
    tokens = random_tokens(N_PKG_TOKENS, m64.vocab_size, seed=21)
    l64, s64 = run_steps(m64, tokens, m64.new_state())
    l32, s32 = run_steps(m32, tokens, m32.new_state())
    assert l32.dtype == torch.float32
    assert max(logits_err(a, b) for a, b in zip(l32, l64)) < FP32_VS_FP64_TOL
    for k in STATE_KEYS:
        assert rel_err(s32[k], s64[k]) < FP32_VS_FP64_STATE_TOL, k
    seq32, _ = m32.forward_seq(tokens, m32.new_state(), all_logits=True)
    assert max(logits_err(a, b) for a, b in zip(seq32, l64)) < FP32_VS_FP64_TOL


# -- autograd -----------------------------------------------------------------------------------------------------


def test_forward_seq_is_differentiable():
    m = RWKV4(make_state_dict(PRESETS["tiny"], seed=SEED), dtype=torch.float32).requires_grad_(True)
    tokens = torch.tensor(random_tokens(9, m.vocab_size, seed=31))
    state = {k: v.detach().clone().requires_grad_(True) for k, v in used_state(m).items()}
    logits, new_state = m.forward_seq(tokens[:-1], state, all_logits=True)
    loss = F.cross_entropy(logits, tokens[1:]) + sum(v.square().mean() for v in new_state.values())
    loss.backward()
    for name, p in m.named_parameters():
        if name == "emb.weight":
            continue  # only the rows of the fed tokens get a gradient
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for k in STATE_KEYS:
        assert state[k].grad is not None and torch.isfinite(state[k].grad).all(), k


def test_wkv_gradient_matches_finite_differences():
    m = RWKV4(make_state_dict(PRESETS["tiny"], seed=SEED), dtype=torch.float64)
    state, tokens = used_state(m), random_tokens(4, m.vocab_size, seed=32)
    names = ("blocks.1.att.time_decay", "blocks.1.att.time_first")
    params = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters() if n in names}

    def f(decay, first):
        logits, new_state = torch.func.functional_call(m, {names[0]: decay, names[1]: first}, (tokens, state))
        return logits, new_state["att_aa"], new_state["att_pp"]

    # fast_mode compares random projections v^T J u of the analytic and numeric Jacobians: one backward pass instead
    # of one per output element, and it still fails if any used entry of the gradient is wrong.
    assert torch.autograd.gradcheck(f, tuple(params[n] for n in names), fast_mode=True)
