"""The sequence (prompt / prefill) graph: T tokens in one call must equal T calls of the step graph.

One tiny checkpoint (tiny-ffn, F != 4C) whose layer-0 time_decay spans -8 .. +3 (decay per token from e^-0.0003 to
e^-20), so every test also runs the extreme decays that overflow a naive formulation.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from rwkv_export.checkpoint import from_state_dict
from rwkv_export.errors import ManifestError, RwkvExportError
from rwkv_export.manifest import new_manifest
from rwkv_export.arch.rwkv4.step import STATE_NAMES, RWKV4Step, StepOptions
from rwkv_export.parity import tolerance_for
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.arch.rwkv4.sequence import DEFAULT_MAX_CHUNK, RWKV4Sequence, wkv_scan
from rwkv_export.seq_runner import OnnxSequenceRunner, chunk_sizes
from rwkv_export.targets import onnx as onnx_target
from rwkv_export.targets import onnx_seq

from ckpts import state_dict

# Sequence graph vs T step-graph calls, both fp32 in onnxruntime: the same equations summed in another order (the
# WKV scan combines partial sums pairwise instead of left to right, matrix-matrix instead of matrix-vector). Logits and
# states after up to 64 tokens differ by ~1.4e-6 of their scale (measured); 2e-5 leaves >10x headroom, while a wrong
# decay, token shift or state hand-over between chunks is O(1e-2) or more.
SEQ_VS_STEP_TOL = 2e-5
# ... plus, for the WKV state tensors, the step graph's own drift: it adds w to att_pp once per token, so its
# rounding error grows linearly with T (measured against fp64: 2.0e-5 after 1000 tokens, 1.3e-6 after 64, while the
# sequence graph stays at 5e-7). 5e-8 per token is 2.5x the measured rate.
STEP_DRIFT_PER_TOKEN = 5e-8
# The sequence graph (fp32) against runtime_ref in fp64: the step graph's own parity tolerance (parity.py), applied
# to the logits and to every state tensor; it holds at T = 1000 because the scan does not drift.
SEQ_VS_REF_TOL = tolerance_for("onnx", "fp32").max_rel
# RWKV4Sequence in fp64 vs runtime_ref.forward_seq in fp64: exact arithmetic on both sides, but RWKV4Step derives
# its parameters in fp32 (-exp(time_decay), 1 - time_mix, LN0 folded into the embedding: relative 6e-8 each), which
# moves outputs by ~3e-7 of their scale (measured). 5e-6 keeps >10x headroom and still catches any equation error.
TORCH_FP64_VS_REF_TOL = 5e-6
# The fp16 variant, GPT mode vs its own steps: both round activations to fp16 (~5e-4 per op), in another order;
# measured 2.6e-3 of std over 40 tokens. The fp16 step graph's parity tolerance (parity.py) bounds it.
FP16_TOL = tolerance_for("onnx", "fp16").max_rel
# wkv_scan vs the literal recurrence, both fp64 from the same inputs: only summation order differs (~1e-15).
SCAN_FP64_TOL = 1e-12

DECAY_RANGE = (-8.0, 3.0)  # raw time_decay: w = -exp(time_decay) from -3.4e-4 to -20.1 per token
SEED = 7


def rel_err(x, ref) -> float:
    """max|x - ref| / max|ref|, in fp64 (state tensors)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def logits_err(x, ref) -> float:
    """max|x - ref| / std(ref): the parity gate's scale-aware logits metric."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / ref.std())


def extreme_decay_state_dict() -> dict:
    sd = dict(state_dict("tiny-ffn"))
    key = "blocks.0.att.time_decay"
    sd[key] = torch.linspace(*DECAY_RANGE, sd[key].numel()).to(sd[key].dtype)
    return sd


def random_tokens(n: int, vocab: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.fixture(scope="module")
def sd():
    return extreme_decay_state_dict()


@pytest.fixture(scope="module")
def step(sd):
    return RWKV4Step(from_state_dict(sd))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sd, step):
    """An export folder's essentials: step + sequence graph and the manifest entries describing them."""
    root = tmp_path_factory.mktemp("seq")
    onnx_target.export_step(step, root / "model.onnx")
    files = onnx_seq.export_sequence(step, root / "prefill.onnx")
    manifest = new_manifest(arch=step.arch, dims=step.dims, source={}, tokenizer={})
    inputs, outputs, opset = onnx_target.io_spec(root / "model.onnx")
    manifest["graphs"].append({"name": "step", "kind": "step", "format": "onnx", "variant": "fp32",
                               "file": "model.onnx", "data_files": [], "opset": opset,
                               "inputs": inputs, "outputs": outputs, "parity": None})
    manifest["graphs"].append(onnx_seq.graph_entry(root / "prefill.onnx", files=files))
    return root, manifest


@pytest.fixture(scope="module")
def runners(exported):
    root, manifest = exported
    step_graph, seq_graph = manifest["graphs"]
    return OnnxStepRunner(root, manifest, step_graph), OnnxSequenceRunner(root, manifest, seq_graph)


def steps(runner, tokens, state):
    logits = None
    for t in tokens:
        logits, state = runner.step(t, state)
    return logits, state


def test_checkpoint_has_the_extreme_decays(sd):
    td = sd["blocks.0.att.time_decay"].float()
    assert float(td.min()) <= DECAY_RANGE[0] and float(td.max()) >= DECAY_RANGE[1] - 0.02  # bf16 rounds 3.0 down


@pytest.fixture(scope="module")
def ref(sd):
    from runtime_ref import RWKV4

    return RWKV4(sd, dtype=torch.float64)


def check_prompt_against_steps(step_runner, seq_runner, ref, T: int, used_state: bool, ref_tol: float) -> None:
    """A prompt runner's forward over T tokens against T steps of `step_runner` (SEQ_VS_STEP_TOL, states allowed the
    step graph's drift) and against runtime_ref's fp64 forward_seq (ref_tol), from a fresh or a used state (37 tokens
    fed first). Shared by the ONNX and the TFLite prompt graphs."""
    vocab = ref.vocab_size
    state, ref_state = step_runner.new_state(), ref.new_state()
    if used_state:
        warmup = random_tokens(37, vocab, SEED + 1)
        _, state = steps(step_runner, warmup, state)
        _, ref_state = ref.forward_seq(warmup, ref_state)
    before = {k: v.copy() for k, v in state.items()}
    tokens = random_tokens(T, vocab, SEED + T)
    step_logits, step_state = steps(step_runner, tokens, state)
    logits, new_state = seq_runner.forward(tokens, state)

    assert logits.shape == step_logits.shape == (1, vocab) and logits.dtype == np.float32
    assert all(np.array_equal(before[k], state[k]) for k in state)  # the caller's state is left as it was
    assert np.isfinite(logits).all() and all(np.isfinite(v).all() for v in new_state.values())
    assert logits_err(logits, step_logits) <= SEQ_VS_STEP_TOL
    assert int(logits.argmax()) == int(step_logits.argmax())
    state_tol = SEQ_VS_STEP_TOL + STEP_DRIFT_PER_TOKEN * (T + 37 * used_state)
    for name in STATE_NAMES:
        assert new_state[name].shape == step_state[name].shape
        assert rel_err(new_state[name], step_state[name]) <= state_tol, name

    ref_logits, ref_state = ref.forward_seq(tokens, ref_state)
    assert logits_err(logits, ref_logits[None].numpy()) <= ref_tol
    for name in STATE_NAMES:
        assert rel_err(new_state[name], ref_state[name].numpy()) <= ref_tol, name


@pytest.mark.parametrize("used_state", [False, True], ids=["fresh", "used"])
@pytest.mark.parametrize("T", [1, 2, 7, 64, 1000])
def test_sequence_graph_equals_step_graph(runners, ref, T, used_state):
    check_prompt_against_steps(*runners, ref, T, used_state, SEQ_VS_REF_TOL)


def test_prompt_then_steps_continue_the_same_stream(runners, step):
    """State from the sequence graph is the step graph's state: the two runners hand over to each other."""
    step_runner, seq_runner = runners
    tokens = random_tokens(300, step.dims.vocab_size, SEED)
    ref_logits, _ = steps(step_runner, tokens, step_runner.new_state())
    _, state = seq_runner.forward(tokens[:290], seq_runner.new_state())
    logits, _ = steps(step_runner, tokens[290:], state)
    assert logits_err(logits, ref_logits) <= SEQ_VS_STEP_TOL


@pytest.mark.parametrize("all_logits", [False, True], ids=["last", "all"])
@pytest.mark.parametrize("T,max_chunk", [(1, 255), (7, 7), (9, 15), (255, 255)])
def test_torch_sequence_matches_runtime_ref_fp64(ref, step, T, max_chunk, all_logits):
    seq = RWKV4Sequence(copy.deepcopy(step).double(), all_logits=all_logits, max_chunk=max_chunk)
    _, state = ref.forward_seq(random_tokens(5, ref.vocab_size, SEED), ref.new_state())
    tokens = torch.tensor(random_tokens(T, ref.vocab_size, SEED + T))
    ref_logits, ref_state = ref.forward_seq(tokens, state, all_logits=all_logits)
    with torch.no_grad():
        logits, *new = seq(tokens, *(state[n] for n in STATE_NAMES))
    assert logits.dtype == torch.float64
    assert logits.shape == ((T, ref.vocab_size) if all_logits else (1, ref.vocab_size))
    assert logits_err(logits.reshape(ref_logits.shape), ref_logits) <= TORCH_FP64_VS_REF_TOL
    for name, value in zip(STATE_NAMES, new):
        assert rel_err(value, ref_state[name]) <= TORCH_FP64_VS_REF_TOL, name


def test_fp16_variant_follows_the_step_module(sd):
    """The fp16 variant (fp16 weights/activations, WKV and I/O in fp32) in GPT mode vs the same module's steps."""
    step = RWKV4Step(from_state_dict(sd), StepOptions.for_variant("fp16"))
    seq = RWKV4Sequence(step, all_logits=True)
    tokens = random_tokens(40, step.dims.vocab_size, SEED)
    state = step.new_state()
    with torch.no_grad():
        ref, s = [], state
        for t in tokens:
            logits, *new = step(torch.tensor([t]), *(s[n] for n in STATE_NAMES))
            ref.append(logits)
            s = dict(zip(STATE_NAMES, new))
        logits, *new = seq(torch.tensor(tokens), *(state[n] for n in STATE_NAMES))
    assert logits.dtype == torch.float32 and all(t.dtype == torch.float32 for t in new)
    assert logits_err(logits, torch.cat(ref)) <= FP16_TOL
    for name, value in zip(STATE_NAMES, new):
        assert rel_err(value, s[name]) <= FP16_TOL, name


def literal_wkv(w, u, k, v, aa, bb, pp):
    """The step recurrence of rwkv4.md, token by token."""
    out = []
    for t in range(k.shape[0]):
        ww = u + k[t]
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        out.append((e1 * aa + e2 * v[t]) / (e1 * bb + e2))
        ww = pp + w
        p = torch.maximum(ww, k[t])
        e1, e2 = torch.exp(ww - p), torch.exp(k[t] - p)
        aa, bb, pp = e1 * aa + e2 * v[t], e1 * bb + e2, p
    return torch.stack(out), aa, bb, pp


@pytest.mark.parametrize("block_steps,group_steps", [(1, 0), (3, 0), (3, 2), (2, 3)])
def test_wkv_scan_equals_the_recurrence(block_steps, group_steps):
    g = torch.Generator().manual_seed(SEED)
    C = 24
    w = -torch.exp(torch.linspace(*DECAY_RANGE, C, dtype=torch.float64))
    u = torch.randn(C, generator=g, dtype=torch.float64)
    max_T = (1 << (block_steps + group_steps)) - 1
    for T in sorted({1, 2, 3, max_T} - set(range(max_T + 1, 4))):
        k = torch.randn(T, C, generator=g, dtype=torch.float64) * 5  # exp(k) spans e^-15 .. e^15
        v = torch.randn(T, C, generator=g, dtype=torch.float64)
        aa, bb = torch.randn(C, generator=g, dtype=torch.float64), torch.rand(C, generator=g, dtype=torch.float64)
        pp = torch.randn(C, generator=g, dtype=torch.float64)
        wkv, (a, b, p) = wkv_scan(w, u, k, v, aa, bb, pp, block_steps, group_steps)
        for got, want in zip((wkv, a, b, p), literal_wkv(w, u, k, v, aa, bb, pp)):
            assert rel_err(got, want) <= SCAN_FP64_TOL, T


def test_wkv_scan_fp32_finite_with_extreme_exponents():
    """Decays of -20 per token over 255 tokens (exponents near -5100), k spread over +-40, a fresh pp of -1e4: no
    inf/NaN, and the values still match the fp64 recurrence."""
    g = torch.Generator().manual_seed(SEED)
    C, T = 16, 255
    w = -torch.exp(torch.linspace(*DECAY_RANGE, C))
    u = torch.randn(C, generator=g)
    k = torch.randn(T, C, generator=g) * 20
    v = torch.randn(T, C, generator=g)
    zeros, fresh_pp = torch.zeros(C), torch.full((C,), -1.0e4)
    wkv, (a, b, p) = wkv_scan(w, u, k, v, zeros, zeros, fresh_pp, 3, 5)
    assert all(torch.isfinite(x).all() for x in (wkv, a, b, p))
    ref = literal_wkv(*(x.double() for x in (w, u, k, v, zeros, zeros, fresh_pp)))
    assert rel_err(wkv, ref[0]) <= SEQ_VS_STEP_TOL


def test_graph_is_matmul_only_and_described_by_roles(exported, step):
    root, manifest = exported
    ops = onnx_target.op_counts(root / "prefill.onnx")
    assert "Gemm" not in ops
    L = step.dims.n_layer
    assert ops["MatMul"] == 7 * L + 1  # 7 per layer + the head
    entry = manifest["graphs"][1]
    assert entry["kind"] == "sequence" and entry["opset"] >= 18
    assert entry["max_chunk"] == DEFAULT_MAX_CHUNK and entry["all_logits"] is False  # read back from the file
    with pytest.raises(ManifestError, match="not a sequence graph"):
        onnx_seq.graph_entry(root / "model.onnx")
    roles = {i["name"]: i["role"] for i in entry["inputs"]}
    assert roles == {"tokens": "tokens", **{s: "state" for s in STATE_NAMES}}
    tokens = entry["inputs"][0]
    assert tokens["shape"] == [onnx_seq.SEQ_DIM] and tokens["dtype"] == "int64"
    outs = {o["name"]: o for o in entry["outputs"]}
    assert outs["logits"]["shape"] == [1, step.dims.vocab_size]
    assert [o["state"] for o in entry["outputs"] if o["role"] == "state"] == list(STATE_NAMES)


def test_over_long_call_answers_nan_not_wrong_numbers(exported, runners, step):
    """The graph alone (a client that ignores max_chunk): T = max_chunk works, T = max_chunk + 1 gives NaN logits."""
    _, seq_runner = runners
    state = seq_runner.new_state()
    feeds = {s: state[s] for s in STATE_NAMES}
    for T, nan in ((DEFAULT_MAX_CHUNK, False), (DEFAULT_MAX_CHUNK + 1, True)):
        tokens = np.array(random_tokens(T, step.dims.vocab_size, SEED), dtype=np.int64)
        logits = seq_runner.session.run(["logits"], {"tokens": tokens, **feeds})[0]
        assert bool(np.isnan(logits).all()) == nan


def test_chunk_sizes_are_balanced():
    assert chunk_sizes(1000, 255) == [250, 250, 250, 250]
    assert chunk_sizes(256, 255) == [128, 128]
    assert chunk_sizes(7, 255) == [7]
    for n in (1, 63, 64, 511, 777):
        sizes = chunk_sizes(n, 63)
        assert sum(sizes) == n and max(sizes) <= 63 and max(sizes) - min(sizes) <= 1


def test_runner_refuses_bad_input_with_one_line_errors(exported, runners):
    root, manifest = exported
    _, seq_runner = runners
    state = seq_runner.new_state()
    vocab = manifest["model"]["vocab_size"]
    cases = [([], "non-empty"), ([1, vocab], "outside the vocabulary"), ([-1], "outside the vocabulary"),
             ([0.5], "integers"), ([[1, 2]], "1-D")]
    for tokens, match in cases:
        with pytest.raises(RwkvExportError, match=match) as e:
            seq_runner.forward(tokens, state)
        assert "\n" not in str(e.value)
    with pytest.raises(RwkvExportError, match="missing"):
        seq_runner.forward([1], {k: v for k, v in state.items() if k != "att_pp"})
    entry = dict(manifest["graphs"][1])
    with pytest.raises(RwkvExportError, match="chunk must lie"):
        OnnxSequenceRunner(root, manifest, entry, chunk=DEFAULT_MAX_CHUNK + 1)
    del entry["max_chunk"]
    with pytest.raises(ManifestError, match="max_chunk"):
        OnnxSequenceRunner(root, manifest, entry)
    step_entry = manifest["graphs"][0]  # a step graph has a "token" input, not "tokens"
    with pytest.raises(ManifestError, match="'tokens' input"):
        OnnxSequenceRunner(root, manifest, {**step_entry, "max_chunk": 1})


def test_bad_max_chunk_is_refused(step):
    for bad in (0, 6, 64, 1 << 13):
        with pytest.raises(RwkvExportError, match="2\\*\\*m - 1"):
            RWKV4Sequence(step, max_chunk=bad)


def test_export_is_deterministic(tmp_path, step):
    """Identical input, identical bytes."""
    a = onnx_seq.export_sequence(step, tmp_path / "a.onnx", max_chunk=15)
    b = onnx_seq.export_sequence(step, tmp_path / "b.onnx", max_chunk=15)
    assert a == ["a.onnx"] and b == ["b.onnx"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert onnx_seq.graph_meta(tmp_path / "a.onnx") == {"max_chunk": 15, "all_logits": False}
