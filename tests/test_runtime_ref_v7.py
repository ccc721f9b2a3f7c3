"""Tests of the RWKV-7 reference runner (runtime_ref/rwkv7.py): GPT mode vs RNN mode, the official `rwkv` package
(its RWKV_x070, run in a subprocess) as an outside oracle, bad inputs, the synthetic checkpoints and the 0.1B shapes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime_ref.rwkv7 import STATE_KEYS_V7, RWKV7, RWKV7Config, expected_shapes
from rwkv_export.arch.rwkv7.synthetic import PRESETS, make_state_dict
from rwkv_export.synthetic import save_checkpoint

SEED = 1
PRESETS_UNDER_TEST = ("tiny", "tiny-ffn")  # tiny-ffn: F != 4C, 3 heads, other LoRA ranks

# GPT mode and RNN mode do the same fp64 arithmetic in a different order (matrix-matrix vs matrix-vector sums,
# cat/stack of the shift): differences are a few fp64 ulps (measured <= 1.7e-15 relative); 1e-10 leaves >1e4 of
# headroom and still fails on any real discrepancy (a wrong token shift, v_first or state hand-over is O(1)).
SEQ_VS_STEP_RTOL = 1e-10

# rwkv 0.8.32 `cpu fp32` vs runtime_ref fp64, as max|Δ| / std(ref logits), worst position. Measured with the tokens
# below: 1.7e-6 .. 2.9e-6 (steps, prompt from a fresh and from a used state, fp32 and bf16 checkpoints); with other
# token draws the worst seen was 1.7e-5, at the first token from a fresh state: there S = v k^T, a head's ln_x input
# is v (k·r), and when k·r nearly cancels the head's variance (7e-5 measured) is below ln_x's eps 64e-5, so
# GroupNorm scales fp32's cancellation error up by as much as 1/sqrt(eps) = 40. 1e-4 bounds that worst case (40 x
# the typical 2e-6) while every formula error we tried moves logits far more: GroupNorm eps 1e-5 instead of 64e-5
# by 2.6e-3, dropping the delta-rule term by 0.34, dropping the r·k·r_k bonus by 1.3.
PKG_LOGITS_TOL = 1e-4
# The state, as max|Δ| / max|ref| per tensor: measured <= 7.4e-7 (fp32 roundoff of O(1)..O(10) entries).
PKG_STATE_TOL = 1e-5
# A bf16 checkpoint: the x070 loader casts every tensor to fp32 *before* applying LN0 to the embedding (unlike its
# RWKV-4 path, which rounds LN0's output to bf16; see Bf16LayerNorm in test_runtime_ref.py), so bf16 storage costs
# nothing beyond the exact bf16 -> fp32 cast: measured errors are the fp32 checkpoints' (1.9e-6 .. 2.9e-6), and
# the same tolerances apply. Reproducing the RWKV-4-style bf16 rounding of LN0 in our runner moves it away from the
# package by 8.3e-3 (tiny) and 1.4e-2 (tiny-ffn), so a gap above 1e-3 shows the package did not round.
PKG_BF16_LN0_MIN_GAP = 1e-3
# A transposed att_kv mapping must be told apart: measured 1.1 relative difference.
TRANSPOSED_KV_MIN_ERR = 1e-2

# fp32 runtime_ref vs fp64 runtime_ref: the same fp32 roundoff argument as PKG_LOGITS_TOL (measured 1.3e-6 for
# the logits, <= 3.6e-7 for the state).
FP32_VS_FP64_TOL = 1e-4
FP32_VS_FP64_STATE_TOL = 1e-5

N_PKG_STEPS = 24  # >= 16 tokens one by one
N_PKG_SEQ = 20  # a prompt in one call (the package's sequence mode)
N_PKG_PREFIX = 5  # tokens fed one by one before the prompt, for the "used state" case
PKG_VOCAB = 256  # token ids drawn below the smallest vocab under test
PKG_CASES = [(p, d) for p in PRESETS_UNDER_TEST for d in ("float32", "bfloat16")]
LAYER0_V_KEYS = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
ORACLE = Path(__file__).with_name("pkg_v7_oracle.py")


# -- helpers ------------------------------------------------------------------------------------------------------


def rel_err(x, ref) -> float:
    """max|x - ref| / max|ref|, in fp64."""
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return float((x - ref).abs().max() / ref.abs().max())


def logits_err(x, ref) -> float:
    """The scale-aware logits metric: max|x - ref| / std(ref), per position (last dim), worst position."""
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return float(((x - ref).abs().amax(-1) / ref.std(-1)).max())


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def run_steps(model: RWKV7, tokens, state):
    logits = []
    for t in tokens:
        out, state = model.step(t, state)
        logits.append(out)
    return torch.stack(logits), state


def used_state(model: RWKV7, n: int = 5, seed: int = 123) -> dict:
    _, state = run_steps(model, random_tokens(n, model.vocab_size, seed), model.new_state())
    return state


def sd_of(preset: str, dtype: str = "float32", **kw) -> dict:
    return make_state_dict(replace(PRESETS[preset], dtype=dtype, **kw), seed=SEED)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: each op is microseconds, and on a small shared machine torch's intra-op thread pool
    costs 10-40x that in hand-offs (measured: 24 steps 1.6 s with 2 threads, 0.13 s with 1). Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fp64_models() -> dict[str, RWKV7]:
    return {p: RWKV7(sd_of(p), dtype=torch.float64) for p in PRESETS_UNDER_TEST}


# -- shapes, loading, synthetic checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS_UNDER_TEST)
def test_dimensions_read_from_tensors(fp64_models, preset):
    cfg, m = PRESETS[preset], fp64_models[preset]
    got = m.config
    assert (got.n_layer, got.n_embd, got.n_head, got.head_size, got.ffn_dim, got.vocab_size) == (
        cfg.n_layer, cfg.n_embd, cfg.n_embd // cfg.head_size, cfg.head_size, cfg.ffn_dim, cfg.vocab_size)
    assert (got.d_decay, got.d_aaa, got.d_mv, got.d_gate) == (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate)
    assert not got.layer0_v_lora and m.dtype == torch.float64
    sd = sd_of(preset, dtype="bfloat16")
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(got)
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    assert "blocks.0.att.v0" not in sd and "blocks.1.att.v0" in sd
    assert set(m.state_dict()) == set(sd)  # writes back the checkpoint layout

    state = m.new_state()
    assert set(state) == set(STATE_KEYS_V7)
    H, N = got.n_head, got.head_size
    want = {"att_x": (cfg.n_layer, cfg.n_embd), "att_kv": (cfg.n_layer, H, N, N), "ffn_x": (cfg.n_layer, cfg.n_embd)}
    for k in STATE_KEYS_V7:
        assert state[k].shape == want[k] and state[k].dtype == torch.float64 and torch.all(state[k] == 0), k
    logits, _ = m.step(0, state)
    assert logits.shape == (cfg.vocab_size,) and logits.dtype == torch.float64


def test_synthetic_is_seeded_and_spread(fp64_models):
    a, b, c = sd_of("tiny"), sd_of("tiny"), make_state_dict(replace(PRESETS["tiny"], dtype="float32"), seed=SEED + 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.1.att.w0"], c["blocks.1.att.w0"])
    # decays spread from fast to slow: w = exp(-e^-0.5 sigmoid(w0)) over the channels of every layer
    for i in range(PRESETS["tiny"].n_layer):
        w = torch.exp(-np.exp(-0.5) * torch.sigmoid(a[f"blocks.{i}.att.w0"].flatten()))
        assert w.min() < 0.7 and w.max() > 0.99, i
    # logits with a real spread, and greedy decoding not decided by rounding: fp32 and fp64 pick the same tokens
    m64 = fp64_models["tiny"]
    logits, _ = m64.forward_seq([1, 2, 3], m64.new_state())
    assert logits.std() > 1.0
    m32 = RWKV7(sd_of("tiny"), dtype=torch.float32)
    assert m32.greedy([1, 2, 3], 16)[0] == m64.greedy([1, 2, 3], 16)[0]


def test_layer0_v_lora_is_accepted_and_unused():
    """RWKV-LM's trainer saves att.v0/v1/v2 in layer 0 too (unused there); such files must load and run the same."""
    with_v = sd_of("tiny", layer0_v_lora=True)
    assert set(LAYER0_V_KEYS) <= set(with_v)
    without = {k: v for k, v in with_v.items() if k not in LAYER0_V_KEYS}
    m_with, m_without = RWKV7(with_v, torch.float64), RWKV7(without, torch.float64)
    assert m_with.config.layer0_v_lora and not m_without.config.layer0_v_lora
    assert set(m_with.state_dict()) == set(with_v)
    tokens = random_tokens(6, m_with.vocab_size, 5)
    a, _ = m_with.forward_seq(tokens, m_with.new_state(), all_logits=True)
    b, _ = m_without.forward_seq(tokens, m_without.new_state(), all_logits=True)
    assert torch.equal(a, b)


def test_pth_and_safetensors_load_the_same_model(tmp_path, fp64_models):
    pytest.importorskip("safetensors")
    ref = fp64_models["tiny-ffn"]
    state, tokens = ref.new_state(), random_tokens(4, ref.vocab_size, 7)
    want, _ = ref.forward_seq(tokens, state)
    for name in ("m.pth", "m.safetensors"):
        path = save_checkpoint(sd_of("tiny-ffn"), tmp_path / name)
        got, _ = RWKV7.from_checkpoint(path, dtype=torch.float64).forward_seq(tokens, state)
        assert torch.equal(got, want), name
    with pytest.raises(ValueError, match="expected a .pth"):
        RWKV7.from_checkpoint(tmp_path / "m.bin")


# -- bad inputs -----------------------------------------------------------------------------------------------------


def test_bad_shapes_and_keys_are_rejected():
    sd = sd_of("tiny")
    bad = dict(sd, **{"blocks.1.ffn.value.weight": sd["blocks.1.ffn.value.weight"][:, :-1]})
    with pytest.raises(ValueError, match="ffn.value.weight"):
        RWKV7(bad)
    bad = dict(sd, **{"blocks.1.att.w1": sd["blocks.1.att.w1"][:, :-1]})  # ranks must agree across layers
    with pytest.raises(ValueError, match="att.w1"):
        RWKV7(bad)
    bad = dict(sd, **{"blocks.0.att.r_k": sd["blocks.0.att.r_k"].reshape(4, -1)})  # 4 heads of 32 = C, but
    with pytest.raises(ValueError, match="r_k"):  # the other layers say 2 of 64
        RWKV7(bad)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.att.k_a"}
    with pytest.raises(ValueError, match="missing"):
        RWKV7(missing)
    with pytest.raises(ValueError, match="unexpected"):
        RWKV7(dict(sd, **{"blocks.1.att.time_first": sd["blocks.1.att.k_a"]}))
    with pytest.raises(ValueError, match="DeepEmbed"):
        RWKV7(dict(sd, **{"blocks.0.ffn.s_emb.weight": sd["emb.weight"]}))
    with pytest.raises(ValueError, match="not an RWKV-7"):
        RWKV7({"emb.weight": sd["emb.weight"], "blocks.0.att.time_first": sd["blocks.0.ln1.weight"]})
    with pytest.raises(ValueError, match="dtype"):
        RWKV7(sd, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        RWKV7(sd, dtype=torch.bfloat16)


def test_bad_tokens_and_state_are_rejected(fp64_models):
    m = fp64_models["tiny"]
    with pytest.raises(ValueError):
        m.step(m.vocab_size, m.new_state())
    with pytest.raises(ValueError):
        m.step(-1, m.new_state())  # would silently wrap around in plain indexing
    with pytest.raises(ValueError):
        m.forward_seq([0, m.vocab_size], m.new_state())
    with pytest.raises(ValueError):
        m.forward_seq([], m.new_state())
    with pytest.raises(ValueError):
        m.forward_seq([[1, 2]], m.new_state())
    s = m.new_state()
    with pytest.raises(ValueError, match="keys"):
        m.step(0, {k: v for k, v in s.items() if k != "ffn_x"})
    with pytest.raises(ValueError, match="keys"):
        m.step(0, dict(s, att_aa=s["att_x"]))  # an RWKV-4 state key
    with pytest.raises(ValueError, match="att_kv"):
        m.step(0, dict(s, att_kv=s["att_kv"].reshape(m.n_layer, 4, 32, 64)))
    with pytest.raises(ValueError, match="att_x"):
        m.forward_seq([0], dict(s, att_x=s["att_x"][:, :-1]))


# -- GPT mode vs RNN mode -----------------------------------------------------------------------------------------


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
    for k in STATE_KEYS_V7:
        assert rel_err(seq_state[k], step_state[k]) < SEQ_VS_STEP_RTOL, k
        assert torch.equal(last_state[k], seq_state[k]), k
    assert step_state["att_kv"].abs().max() > 0.1  # the recurrence did carry something


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
    assert all(torch.equal(state[k], want_state[k]) for k in STATE_KEYS_V7)


def test_step_and_forward_seq_do_not_mutate_state(fp64_models):
    m = fp64_models["tiny"]
    state = used_state(m)
    before = {k: v.clone() for k, v in state.items()}
    versions = {k: v._version for k, v in state.items()}  # counts in-place writes, even ones that restore a value
    m.step(3, state)
    m.forward_seq([3, 4, 5], state, all_logits=True)
    m.greedy([1, 2], 3, state=state)
    for k in STATE_KEYS_V7:
        assert torch.equal(state[k], before[k]), k
        assert state[k]._version == versions[k], k


def test_fp32_matches_fp64(fp64_models):
    m64 = fp64_models["tiny"]
    m32 = RWKV7(sd_of("tiny"), dtype=torch.float32)
    assert m32.dtype == torch.float32 and all(v.dtype == torch.float32 for v in m32.new_state().values())
    tokens = random_tokens(N_PKG_STEPS, m64.vocab_size, seed=21)
    l64, s64 = run_steps(m64, tokens, m64.new_state())
    l32, s32 = run_steps(m32, tokens, m32.new_state())
    assert l32.dtype == torch.float32
    assert logits_err(l32, l64) < FP32_VS_FP64_TOL
    for k in STATE_KEYS_V7:
        assert rel_err(s32[k], s64[k]) < FP32_VS_FP64_STATE_TOL, k
    seq32, _ = m32.forward_seq(tokens, m32.new_state(), all_logits=True)
    assert logits_err(seq32, l64) < FP32_VS_FP64_TOL


def test_forward_seq_is_differentiable():
    m = RWKV7(sd_of("tiny"), dtype=torch.float32).requires_grad_(True)
    tokens = torch.tensor(random_tokens(9, m.vocab_size, seed=31))
    state = {k: v.detach().clone().requires_grad_(True) for k, v in used_state(m).items()}
    logits, new_state = m.forward_seq(tokens[:-1], state, all_logits=True)
    loss = F.cross_entropy(logits, tokens[1:]) + sum(v.square().mean() for v in new_state.values())
    loss.backward()
    for name, p in m.named_parameters():
        if name == "emb.weight":
            continue  # only the rows of the fed tokens get a gradient
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    for k in STATE_KEYS_V7:
        assert state[k].grad is not None and torch.isfinite(state[k].grad).all() and state[k].grad.abs().sum() > 0, k


# -- the rwkv pip package (BlinkDL's runtime, RWKV_x070) as an outside oracle --------------------------------------


@pytest.fixture(scope="module")
def pkg_run(tmp_path_factory):
    """Write the checkpoints, run tests/pkg_v7_oracle.py once on all of them in a fresh interpreter (RWKV_V7_ON=1
    must be set before `import rwkv`, and this process may already hold the package imported for RWKV-4), and
    return (tokens, {case: npz arrays})."""
    tmp = tmp_path_factory.mktemp("pkg7")
    models = {}
    for preset, dtype in PKG_CASES:
        models[f"{preset}-{dtype}"] = str(save_checkpoint(sd_of(preset, dtype), tmp / f"{preset}-{dtype}.pth"))
    # tiny (bf16) plus unused layer-0 v0/v1/v2, as RWKV-LM saves them: the package must ignore them too
    extra = {k: v for k, v in sd_of("tiny", "bfloat16", layer0_v_lora=True).items() if k in LAYER0_V_KEYS}
    models["tiny-l0v"] = str(save_checkpoint(dict(sd_of("tiny", "bfloat16"), **extra), tmp / "tiny-l0v.pth"))
    tokens = {
        "steps": random_tokens(N_PKG_STEPS, PKG_VOCAB, seed=11),
        "seq": random_tokens(N_PKG_SEQ, PKG_VOCAB, seed=13),
        "prefix": random_tokens(N_PKG_PREFIX, PKG_VOCAB, seed=12),
    }
    job = tmp / "job.json"
    job.write_text(json.dumps(dict(models=models, **tokens)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RWKV_")}
    proc = subprocess.run([sys.executable, str(ORACLE), str(job), str(tmp / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with np.load(tmp / "out.npz") as z:
        arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    out = {name: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")} for name in models}
    return tokens, out, models


def test_rwkv_package_version():
    # The state layout used here ([att x_prev, att kv (H, value, key), ffn x_prev] per layer) and the loader's
    # handling of bf16 and layer 0's v LoRA were read from this version's rwkv/model.py (class RWKV_x070).
    assert importlib.metadata.version("rwkv") == "0.8.32"


@pytest.mark.parametrize("preset,ckpt_dtype", PKG_CASES)
def test_step_mode_matches_rwkv_package(pkg_run, preset, ckpt_dtype):
    tokens, pkg, models = pkg_run
    got = pkg[f"{preset}-{ckpt_dtype}"]
    ours = RWKV7.from_checkpoint(models[f"{preset}-{ckpt_dtype}"], dtype=torch.float64)
    our_logits, our_state = run_steps(ours, tokens["steps"], ours.new_state())

    assert got["step_logits"].shape == our_logits.shape
    assert logits_err(got["step_logits"], our_logits) < PKG_LOGITS_TOL
    assert torch.equal(got["step_logits"].argmax(-1), our_logits.argmax(-1))
    for k in STATE_KEYS_V7:  # the package's state[3*i + j], stacked over layers: same orientation, no transpose
        assert got[f"step_{k}"].shape == our_state[k].shape, k
        assert rel_err(got[f"step_{k}"], our_state[k]) < PKG_STATE_TOL, k
    # the (head, value, key) orientation is checked, not assumed: the transpose is far off
    assert rel_err(got["step_att_kv"].transpose(-1, -2), our_state["att_kv"]) > TRANSPOSED_KV_MIN_ERR


@pytest.mark.parametrize("preset,ckpt_dtype", PKG_CASES)
@pytest.mark.parametrize("start", ["fresh", "used"])
def test_sequence_mode_matches_rwkv_package(pkg_run, preset, ckpt_dtype, start):
    tokens, pkg, models = pkg_run
    got = pkg[f"{preset}-{ckpt_dtype}"]
    ours = RWKV7.from_checkpoint(models[f"{preset}-{ckpt_dtype}"], dtype=torch.float64)
    state = ours.new_state() if start == "fresh" else run_steps(ours, tokens["prefix"], ours.new_state())[1]
    our_logits, our_state = ours.forward_seq(tokens["seq"], state, all_logits=True)
    tag = "seq" if start == "fresh" else "used"

    assert logits_err(got[f"{tag}_logits"], our_logits) < PKG_LOGITS_TOL
    assert torch.equal(got[f"{tag}_logits"].argmax(-1), our_logits.argmax(-1))
    for k in STATE_KEYS_V7:
        assert rel_err(got[f"{tag}_{k}"], our_state[k]) < PKG_STATE_TOL, k


class Bf16LayerNorm(torch.nn.Module):
    """LN0 computed on bf16 tensors with a bf16 result, as rwkv 0.8.32 does it for RWKV-4 (not for RWKV-7)."""

    def __init__(self, ln: torch.nn.LayerNorm):
        super().__init__()
        self.ln = ln

    def forward(self, x):
        w, b = self.ln.weight.bfloat16(), self.ln.bias.bfloat16()  # exact: the weights came from bf16
        return F.layer_norm(x.bfloat16(), w.shape, w, b).to(x.dtype)


@pytest.mark.parametrize("preset", PRESETS_UNDER_TEST)
def test_package_does_not_round_bf16_checkpoints(pkg_run, preset):
    tokens, pkg, models = pkg_run
    got = pkg[f"{preset}-bfloat16"]["step_logits"]
    ours = RWKV7.from_checkpoint(models[f"{preset}-bfloat16"], dtype=torch.float64)
    exact, _ = run_steps(ours, tokens["steps"], ours.new_state())
    ours.blocks[0].ln0 = Bf16LayerNorm(ours.blocks[0].ln0)
    rounded, _ = run_steps(ours, tokens["steps"], ours.new_state())
    assert logits_err(got, exact) < PKG_LOGITS_TOL
    assert logits_err(got, rounded) > PKG_BF16_LN0_MIN_GAP


def test_package_ignores_layer0_v_lora(pkg_run):
    _, pkg, _ = pkg_run
    plain, with_v = pkg["tiny-bfloat16"], pkg["tiny-l0v"]
    for k in plain:
        assert torch.equal(plain[k], with_v[k]), k


# -- the 0.1B shapes ------------------------------------------------------------------------------------------------


def test_0_1b_preset_shapes_load_and_run():
    cfg = PRESETS["0.1b"]
    sd = make_state_dict(cfg, seed=0)
    assert sd["emb.weight"].dtype == torch.bfloat16
    m = RWKV7(sd, dtype=torch.float32)
    del sd
    got = m.config
    assert (got.n_layer, got.n_embd, got.n_head, got.head_size, got.ffn_dim, got.vocab_size) == (
        12, 768, 12, 64, 3072, 65536)
    assert (got.d_decay, got.d_aaa, got.d_mv, got.d_gate) == (64, 64, 32, 128)
    assert sum(p.numel() for p in m.parameters()) == sum(
        int(np.prod(s)) for s in expected_shapes(got).values())
    state = m.new_state()
    assert state["att_kv"].shape == (12, 12, 64, 64)
    logits, state = m.forward_seq([10, 20, 30], state)
    logits, state = m.step(40, state)
    assert logits.shape == (65536,) and torch.isfinite(logits).all() and logits.std() > 1.0
    assert all(torch.isfinite(v).all() for v in state.values())


def test_config_from_state_dict_reads_ranks_not_presets():
    sd = sd_of("tiny-ffn")
    cfg = RWKV7Config.from_state_dict(sd)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (24, 20, 12, 40)
    assert cfg.ffn_dim == 448 != 4 * cfg.n_embd and cfg.n_head == 3
