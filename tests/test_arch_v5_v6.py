"""RWKV-5.2 and RWKV-6.0: detection and the mapping's one-line errors, RWKV5Step / RWKV6Step and their prompt
graphs (RWKV5Sequence / RWKV6Sequence) against the independent fp64 references (runtime_ref.rwkv5 / rwkv6), the
chunked WKV against the literal recurrence at extreme decays, the fp16 variant, and both graphs exported to ONNX
and run in onnxruntime.

Every error is max|delta| / std(reference) over every compared step, for the logits and for each state tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime_ref.rwkv5 as ref5
import runtime_ref.rwkv6 as ref6
from rwkv_export.arch import ARCHITECTURES, detect
from rwkv_export.arch.base import Checkpoint
from rwkv_export.arch.rwkv5 import RWKV5Arch
from rwkv_export.arch.rwkv5 import synthetic as syn5
from rwkv_export.arch.rwkv5.sequence import DEFAULT_MAX_CHUNK, BlockConstants, RWKV5Sequence, wkv_chunk
from rwkv_export.arch.rwkv5.step import FP16_RESCALE_EVERY, RWKV5Step, StepOptions
from rwkv_export.arch.rwkv6 import RWKV6Arch
from rwkv_export.arch.rwkv6 import synthetic as syn6
from rwkv_export.arch.rwkv6.sequence import RWKV6Sequence
from rwkv_export.arch.rwkv6.step import RWKV6Step
from rwkv_export.errors import CheckpointError, UnsupportedVersionError

# version -> (architecture, synthetic fixtures, reference module, step class, sequence class)
VERSIONS = {
    "5.2": (RWKV5Arch(), syn5, ref5, RWKV5Step, RWKV5Sequence),
    "6": (RWKV6Arch(), syn6, ref6, RWKV6Step, RWKV6Sequence),
}
NAMES = ("att_x", "att_kv", "ffn_x")

# An fp64 build (fp64 checkpoint, StepOptions("float64"): every build-time constant exact) against the fp64
# reference: the same arithmetic in another order. Measured <= 8e-15 (step, 40 tokens) and <= 1.5e-13 (sequence, T
# up to 1000 in chunks). A formula slip is orders above (measured on tiny-ffn): GroupNorm eps 1e-5 instead of 64e-5
# moves logits by 6.7e-2 (v6) / 0.10 (v5.2) of std, dropping the bonus u by 0.87 / 1.1.
FP64_TOL = 1e-10
# `.double()` of the fp32 build: its build-time constants (the LN0-folded embedding, w = exp(-exp(time_decay))) were
# rounded to fp32 once (6e-8 relative), which a slow channel (w ~ 0.998) carries through its ~500-token memory;
# measured <= 3.9e-6 (att_kv, 40 tokens).
DOUBLE_TOL = 1.5e-5
# fp32 (torch and onnxruntime) against fp64: measured <= 5.5e-6 (step), <= 5.9e-6 (sequence, T <= 1000 in chunks),
# logits and every state tensor: the constants' rounding above plus fp32 rounding through LayerNorms, GroupNorm and
# the carried state. The chunked WKV's pair sums are exact sums of their own terms (rwkv5/sequence.py), so it does
# not drift with T. 2e-5: 3x headroom.
FP32_TOL = 2e-5
# fp16 weights and activations, decay / WKV state / GroupNorm in fp32, with ChatRWKV's rescaling: measured <= 7.2e-3
# (step) and 6.5e-3 (sequence), logits and state, tiny / tiny-ffn; 1.0e-2 of std at 12 x 768 x 65536 with synthetic
# weights (the fp16 rounding of activations, the residual stream's most, spread over the layers). 3e-2: 4x headroom.
FP16_TOL = 3e-2
# Rescaling every layer (a harder case than the fp16 variant's every 6th) in fp64 against no rescaling: only
# LayerNorm's eps (1e-5) sees the residual's 2^-i scale; measured 2.3e-4 (tiny, 2 layers, i.e. x / 4 at LN_out).
# A rescaling that leaked into the state (an LN output or k, v scaled) would be O(1).
RESCALE_TOL = 1e-3
# The chunked WKV alone (rwkv5/sequence.wkv_chunk) against the literal recurrence from the same inputs, decays from
# w = 1 - 1e-4 to e^-200 per token with bursts of e^-200, relative to max|y| and max|S|: measured <= 4.5e-16 (fp64)
# and 1.6e-7 (fp32 against the fp64 recurrence). Pair weights taken as differences of one prefix sum instead would
# miss the weight-1 nearest-token term by eps * |prefix| after a burst: 6.7e-14 in fp64, 3e-5 in fp32.
WKV_FP64_TOL = 1e-14
WKV_FP32_TOL = 2e-6


# One intra-op thread: these models take microseconds per op, and on a loaded 2-core machine torch's thread pool
# costs 10-40x that in hand-offs.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sd(version: str, preset: str = "tiny", seed: int = 0) -> dict:
    syn = VERSIONS[version][1]
    return syn.make_state_dict(syn.PRESETS[preset], seed)


def _ckpt(version: str, sd: dict) -> Checkpoint:
    arch = VERSIONS[version][0]
    dtypes = {str(t.dtype).removeprefix("torch.") for t in sd.values()}
    return Checkpoint(arch, arch.validate(sd), sd, dtypes.pop())


def _build(version: str, sd: dict, how: str):
    """The step module of a build: "fp64" (fp64 checkpoint and build), "double" (.double() of the fp32 build),
    "fp32" or "fp16" (the exported variants). Returns (module, the dtype of its I/O)."""
    arch, step_cls = VERSIONS[version][0], VERSIONS[version][3]
    if how == "fp64":
        sd64 = {k: t.double() for k, t in sd.items()}
        return step_cls(_ckpt(version, sd64), StepOptions(dtype="float64")), torch.float64
    if how == "double":
        return arch.step_module(_ckpt(version, sd)).double(), torch.float64
    return arch.step_module(_ckpt(version, sd), how), torch.float32


def rel(x, ref) -> float:
    return float((x.double() - ref.double()).abs().max() / ref.double().std())


class Trajectories:
    """A checkpoint, its fp64 reference and the reference's runs (T single steps), computed once and shared."""

    def __init__(self, version: str, preset: str):
        self.version, self.preset = version, preset
        self.sd = _sd(version, preset)
        self.ref = VERSIONS[version][0].reference(self.sd, torch.float64)
        self.V = self.ref.vocab_size
        self._cache: dict = {}

    def tokens(self, n: int, seed: int) -> list[int]:
        return torch.randint(0, self.V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()

    def state(self, start: str) -> dict:
        """"fresh" (zeros) or "used" (after 12 other tokens)."""
        return self.ref.new_state() if start == "fresh" else self.steps(self.tokens(12, 99), "fresh")[1]

    def steps(self, tokens: list[int], start: str = "fresh"):
        """(logits [T, V], final state) of T reference steps."""
        key = (tuple(tokens), start)
        if key not in self._cache:
            s, rows = self.state(start), []
            for t in tokens:
                logits, s = self.ref.step(t, s)
                rows.append(logits)
            self._cache[key] = (torch.stack(rows), s)
        return self._cache[key]

    def check(self, logits, state, want, tol: float, what) -> None:
        want_logits, want_state = want
        assert logits.shape == want_logits.shape, what
        assert torch.isfinite(logits).all(), what
        assert rel(logits, want_logits) < tol, (what, rel(logits, want_logits))
        for n in NAMES:
            assert rel(state[n], want_state[n]) < tol, (what, n, rel(state[n], want_state[n]))


@pytest.fixture(scope="module", params=[(v, p) for v in VERSIONS for p in ("tiny", "tiny-ffn")],
                ids=lambda vp: f"v{vp[0]}-{vp[1]}")
def traj(request):
    return Trajectories(*request.param)


def _feed(module, tokens: list[int], state: dict, dtype, chunk: int | None = None):
    """Run a step module token by token (chunk=None) or a sequence module in calls of <= chunk tokens; returns
    (the logits of every call stacked, the final state)."""
    s = {n: state[n].to(dtype) for n in NAMES}
    size = chunk or 1
    rows = []
    with torch.no_grad():
        for i in range(0, len(tokens), size):
            logits, *new = module(torch.tensor(tokens[i:i + size]), *(s[n] for n in NAMES))
            s = dict(zip(NAMES, new))
            rows.append(logits)
    return torch.cat(rows), s


# -- detection and mapping ------------------------------------------------------------------------------------------


def test_detection_and_registry():
    order = [type(a) for a in ARCHITECTURES]
    for version, (arch, *_rest) in VERSIONS.items():
        assert type(detect(set(_sd(version).keys()))) is type(arch), version
    # a v6 file carries every v5.2 marker: it is taken for v6 because the registry tries v6 first, and v5.2's strict
    # mapping, asked directly, refuses it naming a v6 tensor
    v6 = _sd("6")
    assert all(any(k.endswith("." + m) for k in v6) for m in RWKV5Arch.markers)
    assert order.index(RWKV6Arch) < order.index(RWKV5Arch)
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.att\.time_"):
        RWKV5Arch().validate(v6)
    assert not RWKV6Arch().matches(set(_sd("5.2")))


@pytest.mark.parametrize("version", VERSIONS)
def test_mapping_matches_the_reference_layout(version):
    arch, _syn, ref_mod, *_ = VERSIONS[version]
    for preset in ("tiny", "tiny-ffn"):
        sd = _sd(version, preset)
        d = arch.validate(sd)
        cfg = VERSIONS[version][1].PRESETS[preset]
        assert (d.n_layer, d.n_embd, d.ffn_dim, d.vocab_size) == (cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size)
        assert (d.n_head, d.head_size) == (cfg.n_embd // 64, 64)
        if version == "6":
            assert dict(d.lora) == {"decay": cfg.decay_lora, "maa": cfg.mix_lora}
        else:
            assert d.lora == ()
        ref_cfg = (ref5.RWKV5Config if version == "5.2" else ref6.RWKV6Config).from_state_dict(sd)
        assert arch.expected_shapes(d) == ref_mod.expected_shapes(ref_cfg)
        spec = arch.state(d)
        L, C, H = cfg.n_layer, cfg.n_embd, cfg.n_embd // 64
        assert [(s.name, s.shape, s.dtype, s.init) for s in spec] == [
            ("att_x", (L, C), "float32", 0.0), ("att_kv", (L, H, 64, 64), "float32", 0.0),
            ("ffn_x", (L, C), "float32", 0.0)]
        assert "(head, key, value)" in spec[1].doc


@pytest.mark.parametrize("version, case, error, needle", [
    ("6", "missing_decay_lora", CheckpointError, "missing tensor 'blocks.1.att.time_decay_w2'"),
    ("6", "missing_maa_w1", CheckpointError, "missing tensor 'blocks.0.att.time_maa_w1'"),
    ("6", "maa_w1_width", CheckpointError, "tensor 'blocks.0.att.time_maa_w1' has shape [128, 161], expected "
                                           "[128, 5 * mix lora width]"),
    ("6", "maa_w2_layer1", CheckpointError, "tensor 'blocks.1.att.time_maa_w2' has shape [5, 16, 128], expected "
                                            "[5, 32, 128]"),
    ("6", "decay_w1_rank", CheckpointError, "tensor 'blocks.0.att.time_decay_w1' has shape [1, 128, 64]"),
    ("6", "decay_w1_layer1", CheckpointError, "tensor 'blocks.1.att.time_decay_w1' has shape [128, 32], expected "
                                              "[128, 64]"),
    ("6", "head_size", CheckpointError, "tensor 'blocks.0.att.time_faaaa' has shape [3, 48]: head size 48 does not "
                                        "divide n_embd 128"),
    ("5.2", "head_size", CheckpointError, "tensor 'blocks.0.att.time_faaaa' has shape [3, 48]: head size 48 does "
                                          "not divide n_embd 128"),
    ("5.2", "heads_times_size", CheckpointError, "tensor 'blocks.0.att.time_faaaa' has shape [1, 64]: n_head * "
                                                 "head_size = 64, expected n_embd 128"),
    ("5.2", "decay_1d", UnsupportedVersionError, "tensor 'blocks.0.att.time_decay' has shape [128]: a 1-D decay is "
                                                 "RWKV-5.0/5.1"),
    ("5.2", "foreign_key", CheckpointError, "unexpected tensor 'blocks.0.att.time_maa_x'"),
])
def test_mapping_errors_are_one_line_and_name_the_tensor(version, case, error, needle):
    sd = _sd(version)
    if case.startswith("missing"):
        del sd[needle.split("'")[1]]
    elif case == "maa_w1_width":
        sd["blocks.0.att.time_maa_w1"] = torch.zeros(128, 161)
    elif case == "maa_w2_layer1":
        sd["blocks.1.att.time_maa_w2"] = torch.zeros(5, 16, 128)
    elif case == "decay_w1_rank":
        sd["blocks.0.att.time_decay_w1"] = sd["blocks.0.att.time_decay_w1"].unsqueeze(0)
    elif case == "decay_w1_layer1":
        sd["blocks.1.att.time_decay_w1"] = torch.zeros(128, 32)
    elif case == "head_size":
        sd["blocks.0.att.time_faaaa"] = torch.zeros(3, 48)
    elif case == "heads_times_size":
        sd["blocks.0.att.time_faaaa"] = torch.zeros(1, 64)
    elif case == "decay_1d":
        sd["blocks.0.att.time_decay"] = torch.zeros(128)
    elif case == "foreign_key":
        sd["blocks.0.att.time_maa_x"] = torch.zeros(1, 1, 128)
    with pytest.raises(error) as e:
        VERSIONS[version][0].validate(sd)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- step -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, tol", [("fp64", FP64_TOL), ("double", DOUBLE_TOL), ("fp32", FP32_TOL),
                                        ("fp16", FP16_TOL)])
def test_step_matches_reference(traj, build, tol):
    step, dtype = _build(traj.version, traj.sd, build)
    assert type(step.arch) is type(VERSIONS[traj.version][0])
    tokens = traj.tokens(40, 1)
    logits, state = _feed(step, tokens, traj.ref.new_state(), dtype)
    assert logits.dtype == dtype and all(state[n].dtype == dtype for n in NAMES)  # fp16: I/O stays fp32
    traj.check(logits, state, traj.steps(tokens), tol, build)


def test_fp16_variant_rescales_without_changing_the_state():
    """ChatRWKV's fp16 rescaling (the residual halved every 6 layers): the state is the unscaled model's."""
    assert StepOptions.for_variant("fp16") == StepOptions(dtype="float16", rescale_every=FP16_RESCALE_EVERY)
    sd = _sd("6", "tiny")
    ck = _ckpt("6", sd)
    plain, every1 = (RWKV6Step(ck, StepOptions(dtype="float64", rescale_every=e)) for e in (0, 1))
    tokens = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    state = plain.new_state()
    a, sa = _feed(plain, tokens, state, torch.float64)
    b, sb = _feed(every1, tokens, state, torch.float64)
    assert rel(b, a) < RESCALE_TOL
    for n in NAMES:
        assert rel(sb[n], sa[n]) < RESCALE_TOL, n


# -- the chunked WKV ---------------------------------------------------------------------------------------------------


def _recurrence(r, k, v, lw, u, S):
    """The literal v5/v6 recurrence, token by token: r, k, v, lw [T, H, N]; u [H, N]; S [H, N, N] (key, value)."""
    ys = []
    for t in range(r.shape[0]):
        a = k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        ys.append((r[t].unsqueeze(-2) @ (u.unsqueeze(-1) * a + S)).squeeze(-2))
        S = a + torch.exp(lw[t]).unsqueeze(-1) * S
    return torch.stack(ys), S


@pytest.mark.parametrize("block", [1, 4, 16])
def test_wkv_chunk_is_exact_at_extreme_decays(block):
    """Decays from w = 1 - 1e-4 to e^-200 per token, with bursts of very fast decay followed by slow tokens (the
    case a difference of prefix sums gets wrong), at every T across block boundaries, against the recurrence."""
    H, N = 2, 8
    g = torch.Generator().manual_seed(6)
    for T in (1, 2, 3, block, block + 1, 3 * block + 2, 37):
        r, k, v = (torch.randn(T, H, N, generator=g, dtype=torch.float64) for _ in range(3))
        lw = -torch.exp(torch.empty(T, H, N, dtype=torch.float64).uniform_(-9.2, 5.3, generator=g))  # -1e-4 .. -200
        lw[::5] = -200.0  # bursts
        u = torch.randn(H, N, generator=g, dtype=torch.float64)
        S0 = torch.randn(H, N, N, generator=g, dtype=torch.float64)
        want_y, want_S = _recurrence(r, k, v, lw, u, S0)
        n_blocks = -(-T // block)
        consts = BlockConstants(block, torch.float64)
        for dt, tol in ((torch.float64, WKV_FP64_TOL), (torch.float32, WKV_FP32_TOL)):
            y, S = wkv_chunk(*(x.reshape(T, -1).to(dt) for x in (r, k, v, lw)), u.reshape(H, N, 1).to(dt),
                             S0.unsqueeze(0).to(dt), consts.to(dt), n_blocks)
            assert float((y.reshape(T, H, N) - want_y).abs().max() / want_y.abs().max()) < tol, (T, dt)
            assert float((S[0] - want_S).abs().max() / want_S.abs().max()) < tol, (T, dt)
        # v5's form: one decay for every token
        y, S = wkv_chunk(r.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1), lw[:1].reshape(1, -1),
                         u.reshape(H, N, 1), S0.unsqueeze(0), consts.double(), n_blocks, per_token_decay=False)
        want_y, want_S = _recurrence(r, k, v, lw[:1].expand(T, H, N), u, S0)
        assert float((y.reshape(T, H, N) - want_y).abs().max() / want_y.abs().max()) < WKV_FP64_TOL, T
        assert float((S[0] - want_S).abs().max() / want_S.abs().max()) < WKV_FP64_TOL, T


# -- sequence ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, tol", [("fp64", FP64_TOL), ("fp32", FP32_TOL)])
def test_sequence_matches_reference_steps(traj, build, tol):
    step, dtype = _build(traj.version, traj.sd, build)
    seq = VERSIONS[traj.version][4](step, all_logits=True)
    assert seq.max_chunk == DEFAULT_MAX_CHUNK and seq.emb is step.emb and seq.layers is step.layers
    assert seq.layers[0].att_key is step.layers[0].att_key  # the step graph's Parameter objects, not copies
    long = 1000 if traj.preset == "tiny" else 150  # in calls of <= max_chunk, each after the first from a used state
    cases = [(T, start) for T in (1, 2, 7, 64) for start in ("fresh", "used")] + [(long, "fresh")]
    for i, (T, start) in enumerate(cases):
        tokens = traj.tokens(T, 10 + i)
        logits, state = _feed(seq, tokens, traj.state(start), dtype, chunk=seq.max_chunk)
        assert logits.dtype == dtype
        traj.check(logits, state, traj.steps(tokens, start), tol, (T, start))
    # the shipped form: the last token's logits only
    with torch.no_grad():
        last, *_ = VERSIONS[traj.version][0].sequence_module(step)(torch.tensor(tokens[:7]),
                                                                   *(traj.ref.new_state()[n].to(dtype) for n in NAMES))
    assert last.shape == (1, traj.V) and rel(last[0], traj.steps(tokens[:7])[0][-1]) < tol


@pytest.mark.parametrize("version", VERSIONS)
def test_sequence_chunk_guard_block_sizes_and_fp16(version):
    t = Trajectories(version, "tiny")
    arch, seq_cls = VERSIONS[version][0], VERSIONS[version][4]
    step = arch.step_module(_ckpt(version, t.sd))
    guarded = arch.sequence_module(step, max_chunk=8)
    s = guarded.new_state()
    with torch.no_grad():  # NaN logits and state past max_chunk, finite at it
        assert all(torch.isnan(o).all() for o in guarded(torch.zeros(9, dtype=torch.long), *(s[n] for n in NAMES)))
        assert all(torch.isfinite(o).all() for o in guarded(torch.zeros(8, dtype=torch.long), *(s[n] for n in NAMES)))
    other = "6" if version == "5.2" else "5.2"
    with pytest.raises(TypeError):  # a v6 sequence from a v5.2 step, or the reverse
        seq_cls(VERSIONS[other][0].step_module(_ckpt(other, _sd(other))))
    tokens = t.tokens(70, 3)
    want = t.steps(tokens, "used")
    for block, max_chunk in ((1, 5), (5, 23), (32, 70)):  # one token per block .. one block per call
        seq = seq_cls(step, all_logits=True, max_chunk=max_chunk, block=block)
        t.check(*_feed(seq, tokens, t.state("used"), torch.float32, chunk=max_chunk), want, FP32_TOL, block)
    seq16 = seq_cls(arch.step_module(_ckpt(version, t.sd), "fp16"), all_logits=True)
    logits, state = _feed(seq16, tokens, t.state("used"), torch.float32, chunk=seq16.max_chunk)
    assert logits.dtype == torch.float32
    t.check(logits, state, want, FP16_TOL, "fp16")


# -- ONNX --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_onnx_step_and_sequence_in_onnxruntime(version, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from rwkv_export.targets import onnx as onnx_target
    from rwkv_export.targets import onnx_seq

    t = Trajectories(version, "tiny")  # 2 layers: the exports are most of this test's time
    step = VERSIONS[version][0].step_module(_ckpt(version, t.sd))
    max_chunk = DEFAULT_MAX_CHUNK  # the shipped prompt graph (written node by node: no slow trace to shorten)
    onnx_target.export_step(step, tmp_path / "step.onnx")
    onnx_seq.export_sequence(step, tmp_path / "seq.onnx", max_chunk=max_chunk)
    for graph in ("step.onnx", "seq.onnx"):
        ops = onnx_target.op_counts(tmp_path / graph)
        assert "Gemm" not in ops and ops["MatMul"] > 0  # MatMul only: MatMulNBits (4-bit) can take every weight
    inputs, outputs, _ = onnx_target.io_spec(tmp_path / "step.onnx")
    assert [e["name"] for e in inputs] == ["token", *NAMES]
    assert [e["name"] for e in outputs] == ["logits", *(n + "_out" for n in NAMES)]
    assert onnx_seq.graph_meta(tmp_path / "seq.onnx")["max_chunk"] == max_chunk

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sessions = {name: ort.InferenceSession(str(tmp_path / f"{name}.onnx"), opts, providers=["CPUExecutionProvider"])
                for name in ("step", "seq")}

    def call(name, tokens, state):
        feeds = {"token" if name == "step" else "tokens": np.asarray(tokens, np.int64)}
        out = sessions[name].run(None, {**feeds, **{n: state[n].float().numpy() for n in NAMES}})
        return torch.from_numpy(out[0]), {n: torch.from_numpy(o) for n, o in zip(NAMES, out[1:])}

    tokens = t.tokens(32, 4)
    s, rows = t.state("fresh"), []
    for tok in tokens:
        logits, s = call("step", [tok], s)
        rows.append(logits)
    t.check(torch.cat(rows), s, t.steps(tokens), FP32_TOL, "onnx step")
    # the sequence graph, T dynamic: fresh and used states, and a 100-token prompt in calls of <= max_chunk
    for i, (T, start) in enumerate([(1, "fresh"), (7, "used"), (32, "fresh"), (100, "used")]):
        toks = t.tokens(T, 20 + i)
        s = t.state(start)
        for j in range(0, T, max_chunk):
            logits, s = call("seq", toks[j:j + max_chunk], s)
        want_logits, want_state = t.steps(toks, start)
        t.check(logits, s, (want_logits[-1:], want_state), FP32_TOL, ("onnx seq", T, start))
    logits, s = call("seq", [0] * (max_chunk + 1), t.state("fresh"))
    assert np.isnan(logits.numpy()).all() and all(np.isnan(s[n].numpy()).all() for n in NAMES)  # the chunk guard
