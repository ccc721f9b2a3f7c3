"""Long contexts (issue 18, point 10): a 10,000-token prompt through the prompt graph, then 100 step-graph steps from
its state, equals the reference; the runner's memory stays flat in T; `generate` streams text as it goes with work
per token independent of the output's length."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import torch

from rwkv_export.export import export_onnx
from rwkv_export.manifest import read_manifest
from rwkv_export.parity import tolerance_for
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.seq_runner import OnnxSequenceRunner
from rwkv_export.sources import Source

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T_LONG = 10_000
N_STEPS = 100
# The fp32 prompt graph against the fp64 reference: its parity tolerance, as at T = 1000 (test_sequence.py,
# test_arch_v7.py): the chunked scan does not drift with T, each chunk starts from the state handed over; the 100 step
# graph steps add their own drift (~5e-8 per token on att_pp, test_sequence.STEP_DRIFT_PER_TOKEN), far below it.
MODELS = ["tiny-pydoc", "v7-tiny-pydoc"]  # trained: RWKV-4 and RWKV-7


@pytest.fixture(scope="module", params=MODELS)
def model(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "out"
    export_onnx(f"builtin:{name}", out, check=False)
    m = read_manifest(out)
    step = next(g for g in m["graphs"] if g["kind"] == "step" and g["variant"] == "fp32")
    seq = next(g for g in m["graphs"] if g["kind"] == "sequence" and g["variant"] == "fp32")
    ckpt = Source(f"builtin:{name}").load()
    return name, ckpt, OnnxStepRunner(out, m, step), OnnxSequenceRunner(out, m, seq)


def _tokens(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def _rel(m, r) -> float:
    m, r = np.asarray(m, np.float64).reshape(-1), r.double().numpy().reshape(-1)
    return float(np.abs(m - r).max() / r.std())


def test_10k_prompt_then_100_steps_equals_reference(model):
    name, ckpt, step, seq = model
    ref = ckpt.arch.reference(ckpt.tensors, torch.float64)
    prompt = _tokens(T_LONG, ref.vocab_size)
    tol = tolerance_for("onnx", "fp32", ckpt.arch.version).max_rel
    with torch.no_grad():
        m_logits, m_state = seq.forward(prompt, seq.new_state())
        r_logits, r_state = ref.forward(prompt, ref.new_state())  # GPT mode (tested against its RNN mode)
        worst = _rel(m_logits, r_logits)
        agree = int(np.argmax(m_logits) == int(r_logits.argmax()))
        for tok in _tokens(N_STEPS, ref.vocab_size, seed=1):
            m_logits, m_state = step.step(tok, m_state)
            r_logits, r_state = ref.step(tok, r_state)
            worst = max(worst, _rel(m_logits, r_logits))
            agree += int(np.argmax(m_logits) == int(r_logits.argmax()))
    print(name, f"10k prompt + {N_STEPS} steps: max|Δ|/std = {worst:.3g} (tolerance {tol:g})")
    assert worst <= tol and agree == N_STEPS + 1


def _peak_python_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_prompt_graph_memory_is_flat_in_T(model):
    """numpy's buffers are traced (onnxruntime's arena is not, and holds one chunk's worth: the chunks are of equal
    size): the peak while feeding 10,000 tokens must not pass the peak at 1,000 by as much as a runner keeping half of
    its chunks' logits or states would add."""
    _, ckpt, _, seq = model
    vocab = ckpt.dims.vocab_size
    short_ids, long_ids = (np.asarray(_tokens(n, vocab), np.int64) for n in (1_000, T_LONG))
    short = _peak_python_bytes(lambda: seq.forward(short_ids, seq.new_state()))
    long = _peak_python_bytes(lambda: seq.forward(long_ids, seq.new_state()))
    chunks = -(-T_LONG // seq.chunk)
    state_bytes = sum(v.nbytes for v in seq.new_state().values())
    per_chunk = min(state_bytes, 4 * vocab)  # one chunk's state, or its last-token logits (fp32)
    print(f"peak traced bytes: {short} (1,000 tokens), {long} (10,000); {chunks} chunks of {per_chunk} bytes")
    assert long - short < chunks * per_chunk / 2


# ---- generate: streaming -------------------------------------------------------------------------------------------


class _FixedRunner:
    """A runner whose logits make every token equally likely: generation cost is then the sampler's and the
    detokenizer's alone."""

    def __init__(self, vocab: int):
        self.logits = np.zeros((1, vocab), np.float32)

    def new_state(self):
        return {}

    def step(self, token, state):
        return self.logits, state


class _CountingTokenizer:
    """Wraps a tokenizer, counting the ids its decode / decode_bytes are given."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0
        self.vocab_size, self.eos_token_id = tok.vocab_size, None
        if hasattr(tok, "decode_bytes"):
            self.decode_bytes = self._decode_bytes

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)

    def _decode_bytes(self, ids):
        self.decoded += len(ids)
        return self.tok.decode_bytes(ids)


@pytest.fixture(params=["bytes", "hf-tokenizers", "rwkv-world"])
def tokenizer(request):
    from rwkv_export.tokenizer import NEOX_FILE, WORLD_FILE, TokenizerSpec, load_tokenizer

    path = {"bytes": None, "hf-tokenizers": NEOX_FILE, "rwkv-world": WORLD_FILE}[request.param]
    return load_tokenizer(TokenizerSpec(request.param, path))


@pytest.mark.parametrize("n", [2_000, 8_000])
def test_generate_streams_as_it_goes_with_constant_work_per_token(tokenizer, n):
    from rwkv_export.generate import generate

    tok = _CountingTokenizer(tokenizer)
    pieces: list[tuple[int, str]] = []
    stats = generate(_FixedRunner(tokenizer.vocab_size), tok, "hi", max_tokens=n, temperature=1.0, top_p=1.0,
                     min_p_ratio=0.0, stop_at_eos=False, on_text=lambda s: pieces.append((len(pieces), s)))
    text = "".join(s for _, s in pieces)
    assert stats.generated_tokens == n
    assert text == tokenizer.decode(stats.token_ids)  # streamed pieces join to the one-shot decode
    # every token's push is one call (plus flush): the text came out as it went, not at the end
    early = "".join(s for i, s in pieces if i < n // 2)
    assert len(early) >= 0.4 * len(text), (len(early), len(text))
    assert tok.decoded <= 40 * n, tok.decoded  # ids decoded in all: a bounded window per token, never the whole text


def test_generate_time_per_token_does_not_grow_with_length():
    """The issue's symptom (1,594 tok/s at 2,000 tokens, 840 at 8,000) measured directly, interleaved to cancel load;
    with the byte tokenizer and a fixed runner, what is left is sampling and detokenizing."""
    from rwkv_export.generate import generate
    from rwkv_export.tokenizer import ByteTokenizer

    def per_token(n: int) -> float:
        t0 = time.perf_counter()
        generate(_FixedRunner(256), ByteTokenizer(), "hi", max_tokens=n, top_p=1.0, min_p_ratio=0.0,
                 stop_at_eos=False)
        return (time.perf_counter() - t0) / n

    rounds = [(per_token(1_000), per_token(8_000)) for _ in range(3)]
    ratio = min(long / short for short, long in rounds)
    print(f"time per token, 8,000 vs 1,000 tokens: x{ratio:.2f}")
    assert ratio < 1.6
