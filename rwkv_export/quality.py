"""Quality of a quantized/fp16 variant against the fp32 graph, on real text.

"The file got smaller" is not a test: a variant is judged by what it does to next-token prediction. Both sides read
the same text with their own state fed back, and we compare the logits they give after each token. Where the folder
has prompt graphs (ONNX), each side reads it in chunks through its prompt graph's "eval graph" (eval_graph.py: the
same file giving every token's logits, each row computed as the step graph computes its token; guard_link checks that
on the text's first tokens in every check); else (--no-prompt, TFLite, TF.js) token by token through the step graph,
exactly as an app runs it. We compare:
- perplexity of each (exp of the mean next-token NLL) and the relative increase of the variant's;
- mean KL(fp32 || variant) over the predicted distributions (nats/token);
- top-1 agreement: fraction of positions where both put the same token first;
- greedy agreement: after a prompt, each side continues greedily from its own state; the number of identical tokens
  before the first difference (out of n_greedy).

The gate is on the perplexity increase, per variant kind (parity.QUALITY_GATES, the one table of thresholds), because
that is what a user feels; KL, top-1 and greedy agreement are reported alongside. One exception, because a judgement
must be judged: when the fp32 model predicts the eval text no better than a uniform guess (perplexity >= its
vocabulary: synthetic weights, or text in a language the model never saw), the perplexity change measures noise at
tokens the model finds improbable, not what quantization did (seen: a synthetic RWKV-7 at perplexity 1.26e4 over 256
byte ids, int8 +1.9% at KL 0.0024; at 169M shapes int4 -2.5%). Then the gate bounds the share of what the fp32 model
knows that the variant loses: KL(fp32 || variant) / KL(fp32 || uniform) ("info_loss"), the distance the variant moves
the distribution over the distance the model's own distribution stands from knowing nothing. A plain bound on KL
would judge the model instead of the file: a random-weight model is noisy, and a correct int4 file moves it by KL
0.07-0.14 (as far as a file with zeroed head rows moves a trained model) while keeping 97% of what it knows.
The report says which quantity was gated ("gated_on": "ppl" or "info_loss").

Sequential reading (evaluate_in_chunks with a gate; check.py): a variant reads the text in levels
(parity.SEQ_LEVELS, then the whole text) and stops at the first level where the gated quantity is more than
parity.SEQ_Z standard errors (batch means over blocks of parity.SEQ_BLOCK tokens) on one side of its gate; at the
last level the point estimate is judged as before. The fp32 baseline is read as far as some variant needs
(Baseline.extend, from its state). The report's "sequential" says where and why a reading stopped.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from .errors import ParityNonFiniteError, ParityToleranceError, RwkvExportError
from .parity import QUALITY_GATES, SEQ_BLOCK, SEQ_LEVELS, SEQ_Z, QualityGate, quality_gate

# The perplexity bounds of parity.QUALITY_GATES (where the reasons are), by variant kind.
PPL_GATES: dict[str, float] = {kind: g.max_ppl_delta for kind, g in QUALITY_GATES.items()}
EVAL_TEXT = Path(__file__).parent / "data" / "tiny-pydoc-eval.txt"  # held-out English/Python prose (arch/rwkv4/train.py)
# Tokens of eval text per check: the paired perplexity delta is within ~1% (int4) at 1,500 tokens and ~0.3% at 24,000
# on tiny-pydoc; 2,000 keeps a 169M check to about a minute on two cores (fp32 ~36 tok/s + the variant).
DEFAULT_EVAL_TOKENS = 2000
DEFAULT_N_GREEDY = 64  # greedy tokens compared after the prompt
DEFAULT_PROMPT_LEN = 64  # the prompt for the greedy comparison: the first tokens of the text


# The eval graph (eval_graph.py) reads the text in chunks of at most this many tokens (less where the graph's
# max_chunk is less: 255 for RWKV-4): [256, 50277] fp32 logits are 51 MB, and a chunk costs one read of the weights.
EVAL_CHUNK = 256
# guard_link's bounds, each a share of the variant's own rms deviation from fp32 over the rows compared. Measured
# (tiny-pydoc / v7-tiny-pydoc / v7-tiny / v5-tiny / v6-tiny; 169M shapes in the README):
# - step, the first LINK_TOKENS rows vs the step graph token by token: fp16 0.04-0.46, int8 0-0.65, int4 0-0.11 --
#   rounding: onnxruntime's MatMul over T rows sums in another order than over one (~1e-6 of the logits' std in
#   fp32), and the prompt graph's scan rounds otherwise than the step; a quantized activation sitting on a rounding
#   boundary then takes the neighbouring step, and the state carries it (RWKV-7's int8 prompt graph does so from
#   the first token: 0.6-0.8 of int8's own deviation per row). int8 with the per-row rewrite left out: 0.76-1.05.
# - chunk, the first CHUNK_TOKENS rows vs the eval graph fed one token a call: int8 0 (the same integers), fp16 and
#   int4 within the same flips; int8 with the per-row rewrite left out 0.7-2.
LINK_TOKENS = 32
CHUNK_TOKENS = 16
LINK_MAX_STEP = 1.5
LINK_MAX_CHUNK = 0.5


class QualityGateError(ParityToleranceError):
    """A variant's perplexity on the eval text rose past its gate."""


class EvalGraphLinkError(ParityToleranceError):
    """The eval graph does not compute what the variant's step graph computes (quality.guard_link)."""


class EvalTextError(RwkvExportError):
    """The eval text is too short to measure anything."""


def eval_tokens(encode, max_tokens: int = DEFAULT_EVAL_TOKENS, text_path: Path = EVAL_TEXT) -> list[int]:
    """The eval text as token ids: `encode(str) -> list[int]` is the model's tokenizer (bytes for byte models)."""
    text = Path(text_path).read_text(encoding="utf-8")
    ids = [int(t) for t in encode(text)]
    return ids[:max_tokens]


def _log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def evaluate_variant(variant_runner, fp32_runner, tokens, *, n_greedy: int = DEFAULT_N_GREEDY,
                     prompt_len: int = DEFAULT_PROMPT_LEN) -> dict:
    """Run both runners over `tokens` (state fed back) and report perplexities, KL, top-1 and greedy agreement.

    Runners have `.new_state()` and `.step(token, state) -> (logits [1, V], state)` (rwkv_export.runners).
    """
    return evaluate_variants([variant_runner], fp32_runner, tokens, n_greedy=n_greedy, prompt_len=prompt_len)[0]


def evaluate_variants(variant_runners: list, fp32_runner, tokens, *, n_greedy: int = DEFAULT_N_GREEDY,
                      prompt_len: int = DEFAULT_PROMPT_LEN, chunk: int = 128) -> list[dict]:
    """evaluate_variant for several variants against one fp32 run: the fp32 side (its logits over the text, its
    greedy continuation after the prompt) does not depend on the variant, so it is computed once (Baseline) and each
    variant is compared with it in turn. When fp32_runner also has `.logits_seq(tokens, state) -> (logits [T, V],
    state)` (ReferenceRunner: the reference's GPT mode, the same equations as T steps, rounded in a different order),
    the text is read in chunks of `chunk` tokens through it; the greedy continuation always uses `.step`."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rwkv-quality-") as tmp:
        base = Baseline.compute(fp32_runner, tokens, Path(tmp) / "fp32_logits.bin", n_greedy=n_greedy,
                                prompt_len=prompt_len, chunk=chunk)
        return [evaluate_against(r, base) for r in variant_runners]


class Baseline:
    """The fp32 side of the quality comparison, computed once for every variant: its logits after each eval token
    (in a file, `rows` of `vocab_size` values of `dtype`: 2000 x 50277 fp32 is 400 MB, more than the check may hold
    in memory), its total NLL, and its greedy continuation after the prompt. Picklable (path and small fields), so
    variants can be judged in other processes (check.py); the numbers a variant's report is computed from are the
    ones evaluate_variants read before the fp32 side was shared."""

    def __init__(self, path: Path, tokens: list[int], dtype: str, vocab_size: int, nll: float, greedy: list[int],
                 n_greedy: int, prompt_len: int, nlls=None, read: int | None = None, state=None):
        self.path, self.tokens, self.dtype, self.vocab_size = Path(path), tokens, dtype, vocab_size
        self.nll, self.greedy, self.n_greedy, self.prompt_len = nll, greedy, n_greedy, prompt_len
        self.fed = max(len(tokens) - 1, prompt_len)  # rows of the whole reading (all tokens but the last)
        # fp32's NLL at each scored row read so far; the rows read (in the file); the fp32 state after them
        self.nlls = np.zeros(0) if nlls is None else np.asarray(nlls, dtype=np.float64)
        self.read, self.state = (self.fed if read is None else read), state

    @property
    def complete(self) -> bool:
        return self.read >= self.fed

    @classmethod
    def compute(cls, fp32_runner, tokens, path: Path, *, n_greedy: int = DEFAULT_N_GREEDY,
                prompt_len: int = DEFAULT_PROMPT_LEN, chunk: int = 128, greedy_runner=None,
                open_greedy=None, upto: int | None = None) -> "Baseline":
        """fp32_runner: `.step` (token by token) or `.logits_seq` (read in chunks: ReferenceRunner's GPT mode, or an
        EvalGraphRunner, whose chunks are at most its max_chunk); the greedy continuation is run by greedy_runner
        (default fp32_runner) from fp32_runner's state after the prompt, by `.step`, or by the runner of
        open_greedy() (a context manager), opened once the text is read (the caller may close fp32_runner then:
        one session at a time). `upto`: read only the first `upto` rows (at least the prompt), the rest later by
        extend() (the sequential gate: a variant reads only as far as its verdict needs, and so does fp32)."""
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise EvalTextError(f"need at least 2 tokens of eval text to measure perplexity, got {len(tokens)}")
        prompt_len = max(1, min(prompt_len, len(tokens)))
        base = cls(path, tokens, "", 0, 0.0, [], n_greedy, prompt_len, read=0)
        open(path, "wb").close()
        start = base.extend(fp32_runner, base.fed if upto is None else max(upto, prompt_len), chunk=chunk)
        with (open_greedy() if open_greedy is not None else contextlib.nullcontext(greedy_runner or fp32_runner)) as g:
            greedy = _Greedy(g, *start, n_greedy)
            greedy.token(n_greedy - 1)  # all of it now: the fp32 runner stays here, the variants may not
        base.vocab_size, base.greedy = int(start[0].size), greedy.tokens[:max(n_greedy, 1)]
        return base

    def extend(self, fp32_runner, upto: int, *, chunk: int = 128):
        """Read the text on to row `upto` (at most the whole reading) from the fp32 state after the rows read so far;
        returns (logits, state) after the prompt where this call read it, else None."""
        tokens, n, p = self.tokens, len(self.tokens) - 1, self.prompt_len
        upto, start, nlls = min(upto, self.fed), None, []
        if upto <= self.read:
            return None
        with open(self.path, "ab") as f:
            for i, lf, sf in _fp32_logits(fp32_runner, tokens[:upto], p, chunk, lo=self.read, state=self.state):
                lf = np.asarray(lf).reshape(-1)
                self.dtype = self.dtype or lf.dtype.str
                f.write(np.ascontiguousarray(lf, dtype=self.dtype).tobytes())
                if sf is not None:
                    self.state = sf
                if i == p - 1:
                    start = (lf, sf)
                if i < n:
                    pf = _log_softmax(lf)
                    if not np.isfinite(pf).all():
                        raise ParityNonFiniteError(f"NaN/Inf fp32 logits at token {i} of the eval text")
                    nlls.append(-pf[tokens[i + 1]])
        self.nlls = np.concatenate([self.nlls, np.asarray(nlls, dtype=np.float64)])
        self.nll, self.read = float(self.nlls.sum()), upto
        return start

    def block(self, lo: int, hi: int) -> np.ndarray:
        """The fp32 logits after tokens lo..hi - 1, [hi - lo, V]."""
        size = np.dtype(self.dtype).itemsize * self.vocab_size
        return np.fromfile(self.path, dtype=self.dtype, count=(hi - lo) * self.vocab_size,
                           offset=lo * size).reshape(hi - lo, self.vocab_size)

    def rows(self, chunk: int = 64):
        """The fp32 logits row by row (as float64 log-probabilities are computed from them), read `chunk` at a time."""
        with open(self.path, "rb") as f:
            while True:
                block = np.fromfile(f, dtype=self.dtype, count=chunk * self.vocab_size)
                if block.size == 0:
                    return
                yield from block.reshape(-1, self.vocab_size)


ADD_ROWS = 16  # rows of logits _Metrics.add computes at a time


class _Metrics:
    """The sums the report is made of, added a block of rows at a time (float64 log-probabilities)."""

    def __init__(self, tokens: list[int], n: int):
        self.tokens, self.n = tokens, n
        # per scored row: the variant's NLL of the next token, KL(fp32 || variant), KL(fp32 || uniform), top-1 equal
        self.nlls, self.kls, self.kl_uniforms, self.top1s = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool)
        self.scored = 0  # rows scored so far

    @property
    def nll(self) -> float:
        return float(self.nlls[:self.scored].sum())

    @property
    def kl(self) -> float:
        return float(self.kls[:self.scored].sum())

    @property
    def kl_uniform(self) -> float:
        return float(self.kl_uniforms[:self.scored].sum())

    @property
    def top1(self) -> int:
        return int(self.top1s[:self.scored].sum())

    def add(self, lo: int, lf, lv) -> None:
        """Rows lo.. of the fp32 side (lf) and the variant's (lv), [B, V]; rows at or past n are not scored. Computed
        ADD_ROWS rows at a time: every number is a row's own (the same bits in any grouping of rows), and the float64
        temporaries stay a few MB, reused from the heap, instead of ~100 MB each fresh from the system for a chunk of
        255 rows at a vocabulary of 50277 (measured at 169M shapes: 2x less CPU, ~0.4 GB less peak memory)."""
        hi = min(lo + len(lv), self.n)
        if hi <= lo:
            return
        lf, lv = np.asarray(lf)[:hi - lo], np.asarray(lv)[:hi - lo]
        for a in range(lo, hi, ADD_ROWS):
            b = min(a + ADD_ROWS, hi)
            self._add(a, b, lf[a - lo:b - lo], lv[a - lo:b - lo])
        self.scored = max(self.scored, hi)

    def _add(self, lo: int, hi: int, lf, lv) -> None:
        pf, pv = _log_softmax_rows(lf), _log_softmax_rows(lv)
        bad = ~np.isfinite(pv).all(axis=1)
        if bad.any():
            raise ParityNonFiniteError(f"NaN/Inf logits at token {lo + int(np.argmax(bad))} of the eval text")
        self.nlls[lo:hi] = -pv[np.arange(hi - lo), self.tokens[lo + 1:hi + 1]]
        p = np.exp(pf)
        self.kls[lo:hi] = np.sum(p * (pf - pv), axis=1)
        self.kl_uniforms[lo:hi] = np.sum(p * pf, axis=1) + np.log(pf.shape[1])  # KL(fp32 || uniform) = log V - H
        self.top1s[lo:hi] = pv.argmax(axis=1) == pf.argmax(axis=1)


def _log_softmax_rows(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def evaluate_against(variant_runner, base: Baseline, eval_runner=None, *, chunk: int = EVAL_CHUNK) -> dict:
    """One variant over the eval text against the fp32 Baseline: perplexities, KL(fp32 || variant), top-1 and greedy
    agreement. Without eval_runner the text goes through variant_runner's step graph token by token (state fed
    back, as an app runs it); with it (eval_graph.EvalGraphRunner of the variant's prompt graph), as
    evaluate_in_chunks reads it. The greedy continuation always runs variant_runner's `.step`."""
    if eval_runner is not None:
        return evaluate_in_chunks(lambda: contextlib.nullcontext(variant_runner),
                                  lambda: contextlib.nullcontext(eval_runner), base, chunk=chunk)
    tokens, prompt_len = base.tokens, base.prompt_len
    if not base.complete:
        raise RwkvExportError(f"the fp32 baseline has read {base.read} of the text's {base.fed} rows: a variant read "
                              "token by token needs all of them (Baseline.extend)")
    metrics, start = _Metrics(tokens, len(tokens) - 1), None
    state = variant_runner.new_state()
    for i, lf in enumerate(base.rows()):
        lv, state = variant_runner.step(tokens[i], state)
        if i == prompt_len - 1:
            start = (lv, state)
        metrics.add(i, np.asarray(lf).reshape(1, -1), np.asarray(lv).reshape(1, -1))
    greedy = _greedy_agreement(base.greedy, base.n_greedy, variant_runner, *start)
    return _report(metrics, base, greedy, {"read_by": "step graph"})


def evaluate_in_chunks(open_step, open_eval, base: Baseline, *, chunk: int = EVAL_CHUNK,
                       gate: QualityGate | None = None, levels=SEQ_LEVELS, resume: "Pending | None" = None):
    """evaluate_against through the variant's eval graph: the text in chunks of up to `chunk` tokens (at most the
    graph's max_chunk), state fed between chunks, guarded by guard_link; then the greedy continuation by the step
    graph from the eval graph's state after the prompt. open_eval() and open_step() are context managers giving the
    eval graph's runner and the step graph's, opened one after the other, not side by side (at 169M shapes each
    session holds the variant's weights: 0.7 GB in fp32, and fp16's as fp32 copies where onnxruntime's CPU kernels
    want them).

    With `gate` (the variant's parity.QualityGate), sequentially: the text is read in `levels` (tokens; then the
    whole text), and after each the gated quantity is judged with its standard error (sequential_look); the reading
    stops at the first level whose verdict is beyond doubt. Where the next level needs fp32 rows the baseline has
    not read yet, a Pending comes back instead of the report (the variant's place in the text: its state, its
    sums); the caller extends the baseline (Baseline.extend) and calls again with resume=that Pending."""
    tokens, prompt_len = base.tokens, base.prompt_len
    n = len(tokens) - 1
    r = resume or Pending(_Metrics(tokens, n))
    r.need = None
    looks = level_rows(n, prompt_len, levels if gate is not None else ())
    with open_eval() as ev:
        size = _read_chunk(ev, chunk)
        if r.state is None:
            r.state = ev.new_state()
        for rows in looks:
            if rows <= r.metrics.scored:
                continue  # judged before this call
            target = base.fed if rows == n else rows  # the rows read for it
            if target > base.read:
                r.need = target
                break
            for lo, hi in chunk_bounds(target, prompt_len, size, lo=r.read):
                lv, r.state = ev.logits_seq(tokens[lo:hi], r.state)
                if lo < LINK_TOKENS:
                    r.head.append(np.asarray(lv[:LINK_TOKENS - lo], dtype=np.float64))
                if hi == prompt_len:
                    r.start = (lv[-1:], r.state)
                r.metrics.add(lo, base.block(lo, hi), lv)
            r.read = target
            if gate is not None:
                r.look = sequential_look(r.metrics, base, gate, last=rows == n, level=looks.index(rows) + 1)
                if r.look["stop"] is None:
                    continue
            r.need = None
            break
        if r.ones is None:  # the first rows again, one token a call
            state, ones = ev.new_state(), []
            for t in tokens[:min(CHUNK_TOKENS, sum(len(h) for h in r.head))]:
                lv, state = ev.logits_seq([t], state)
                ones.append(np.asarray(lv, dtype=np.float64).reshape(-1))
            r.ones = np.array(ones)
    if r.need is not None:
        return r
    with open_step() as step:
        link = guard_link(step, base, np.concatenate(r.head), r.ones)
        greedy = _greedy_agreement(base.greedy, base.n_greedy, step, *r.start)
    how = {"read_by": "eval graph", "chunk": size, "link": link}
    if r.look is not None:
        how["sequential"] = r.look
    return _report(r.metrics, base, greedy, how)


class Pending:
    """A sequential reading that needs more of the fp32 baseline than it has (evaluate_in_chunks): the variant's
    state after the rows read, its per-row sums, the link guard's rows, the state after the prompt, the last look.
    Picklable: a worker process hands it back and another goes on from it."""

    def __init__(self, metrics: "_Metrics"):
        self.metrics, self.read, self.state, self.start = metrics, 0, None, None
        self.head, self.ones, self.look, self.need = [], None, None, None


def level_rows(n: int, prompt_len: int, levels) -> list[int]:
    """The scored rows at each look of a reading of n + 1 tokens: each level of `levels` (tokens) short of the whole
    text and past the prompt, then all n."""
    return sorted({*(int(t) - 1 for t in levels if prompt_len <= int(t) - 1 < n), n})


def batch_means_se(x, block: int = SEQ_BLOCK) -> float:
    """The standard error of the mean of a correlated series by batch means: the means of consecutive blocks of
    `block` values (a trailing part block left out) are nearly independent where the correlation is shorter than a
    block, so the SE is their standard deviation over sqrt(blocks). inf with fewer than 2 blocks."""
    x = np.asarray(x, dtype=np.float64)
    nb = len(x) // block
    if nb < 2:
        return float("inf")
    means = x[:nb * block].reshape(nb, block).mean(axis=1)
    return float(means.std(ddof=1) / np.sqrt(nb))


def sequential_look(metrics: "_Metrics", base: Baseline, gate: QualityGate, *, last: bool, level: int = 0,
                    z: float = SEQ_Z, block: int = SEQ_BLOCK) -> dict:
    """One look of the sequential gate at the rows scored so far: the quantity judge_quality gates (the perplexity
    change, or the information lost where fp32 is no better than uniform), its standard error by batch means, and
    whether to stop: "pass" when q + z*SE < gate, "fail" when q - z*SE > gate, only where the choice of quantity is
    itself beyond doubt (fp32's mean NLL more than z SE from log V); at the last look the point estimate is judged
    as the full gate does; else None (read on).
    - ppl: q = exp(mean d) - 1, d the per-row NLL of the variant minus fp32's; SE = exp(mean d) * SE(d) (delta).
    - info_loss: q = sum KL / sum KL_uniform, a ratio of means; SE by batch means of its linearisation
      (KL_i - q * KL_uniform_i) / mean(KL_uniform)."""
    k = metrics.scored
    nll_f, nll_v = base.nlls[:k], metrics.nlls[:k]
    log_v = np.log(base.vocab_size)
    f = nll_f - log_v
    sure = abs(f.mean()) > z * batch_means_se(f, block)
    if f.mean() >= 0:  # judge_quality's ppl_fp32 >= vocab
        kl, klu = metrics.kls[:k], metrics.kl_uniforms[:k]
        q = float(kl.sum() / max(klu.sum(), 1e-12))
        se = batch_means_se((kl - q * klu) / max(klu.mean(), 1e-12), block)
        gated_on, bound = "info_loss", gate.max_info_loss
    else:
        d = nll_v - nll_f
        q, se = float(np.expm1(d.mean())), float(np.exp(d.mean()) * batch_means_se(d, block))
        gated_on, bound = "ppl", gate.max_ppl_delta
    if last:
        stop = "pass" if q <= bound else "fail"
        why = "the last level: the point estimate, as the full gate"
    elif sure and q + z * se < bound:
        stop, why = "pass", f"q + {z:g} SE < the gate"
    elif sure and q - z * se > bound:
        stop, why = "fail", f"q - {z:g} SE > the gate"
    else:
        stop, why = None, "undecided: the gate within " + (f"{z:g} SE" if sure else f"{z:g} SE of the quantity's choice")
    return {"tokens_read": k + 1, "level": level, "gated_on": gated_on, "q": q, "se": se, "gate": bound, "z": z,
            "block": block, "stop": stop, "why": why}


def _report(metrics: _Metrics, base: Baseline, greedy: int, how: dict) -> dict:
    n = metrics.scored
    ppl_v, ppl_f = float(np.exp(metrics.nll / n)), float(np.exp(base.nlls[:n].sum() / n))
    return {
        "tokens": n,
        "ppl": ppl_v,
        "ppl_fp32": ppl_f,
        "ppl_delta": ppl_v / ppl_f - 1.0,
        "kl": metrics.kl / n,
        "kl_uniform": metrics.kl_uniform / n,
        "vocab_size": base.vocab_size,
        "top1_agreement": metrics.top1 / n,
        "greedy_match": greedy,
        "greedy_tokens": base.n_greedy,
        "prompt_tokens": base.prompt_len,
        "baseline": getattr(base, "source", "fp32"),
        **how,
    }


def guard_link(step_runner, base: Baseline, head, ones) -> dict:
    """The eval graph computes what the step graph computes, or EvalGraphLinkError. `head`: the eval graph's rows
    over the text's first tokens as the quality run read them (its first chunk); `ones`: its first rows again, fed
    one token a call. Two measures, each as a share of the variant's own deviation from fp32 (rms over the rows'
    logits; fp32 = the baseline's rows):
    - step: `head` vs the step graph run token by token over the first LINK_TOKENS (LINK_MAX_STEP);
    - chunk: `head` vs `ones` (LINK_MAX_CHUNK): what a row computes must not depend on the other rows of its chunk
      (eval_graph.py's per-row int8 quantization)."""
    k, k1 = len(head), len(ones)
    state, steps = step_runner.new_state(), []
    for t in base.tokens[:k]:
        lv, state = step_runner.step(t, state)
        steps.append(np.asarray(lv, dtype=np.float64).reshape(-1))
    steps = np.array(steps)
    fp32 = base.block(0, k)
    floor = 1e-6 * _rms(steps)  # a variant equal to fp32 (rounding apart) is judged against rounding
    link = {"tokens": k, "step": _rms(head - steps) / max(_rms(steps - fp32), floor), "max_step": LINK_MAX_STEP,
            "chunk_tokens": k1, "chunk": _rms(head[:k1] - ones) / max(_rms(steps[:k1] - fp32[:k1]), floor),
            "max_chunk": LINK_MAX_CHUNK}
    for value, bound, how in ((link["step"], LINK_MAX_STEP, f"the step graph's over {k} tokens"),
                              (link["chunk"], LINK_MAX_CHUNK, f"its own fed one token a call ({k1} tokens)")):
        if not value <= bound:
            raise EvalGraphLinkError(
                f"the eval graph's logits differ from {how} by {value:.3g} of the variant's own rms deviation from "
                f"fp32, past {bound:g}: it does not compute what the step graph does, and cannot judge it")
    return link


def _rms(a) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


def chunk_bounds(n: int, prompt_len: int, chunk: int, lo: int = 0) -> list[tuple[int, int]]:
    """The (lo, hi) chunks the text's first n tokens are read in: the prompt first (in chunks of at most `chunk`:
    the greedy comparison starts from the state after it), then `chunk` tokens at a time (the last one shorter);
    from token `lo` on, where a reading goes on from an earlier one's state."""
    p = min(prompt_len, n)
    cuts = sorted(c for c in {*range(0, p, chunk), *range(p, n, chunk), n, lo} if lo <= c <= n)
    return list(zip(cuts, cuts[1:]))


def _read_chunk(runner, chunk: int) -> int:
    """The chunk size to read a runner's text in: `chunk`, or less where the runner's graph takes less."""
    return max(1, min(chunk, getattr(runner, "max_chunk", chunk)))


def _fp32_logits(runner, tokens, prompt_len: int, chunk: int, lo: int = 0, state=None):
    """(i, logits after tokens[i], the state after it or None) for every i from `lo` (from `state`, the state after
    tokens[:lo]; a new one at 0); the state is given at least after the prompt (i = prompt_len - 1), where the greedy
    comparison starts, and after the last token."""
    state = runner.new_state() if lo == 0 or state is None else state
    if not hasattr(runner, "logits_seq"):
        for i in range(lo, len(tokens)):
            logits, state = runner.step(tokens[i], state)
            yield i, logits, state
        return
    for lo, hi in chunk_bounds(len(tokens), prompt_len, _read_chunk(runner, chunk), lo=lo):
        logits, state = runner.logits_seq(tokens[lo:hi], state)
        for j in range(hi - lo):
            yield lo + j, logits[j], (state if lo + j == hi - 1 else None)


class _Greedy:
    """The fp32 side's greedy continuation from its state after the prompt, computed as far as asked."""

    def __init__(self, runner, logits, state, n: int):
        self.runner, self.logits, self.state, self.n = runner, logits, state, n
        self.tokens = [int(np.argmax(logits))]

    def token(self, i: int) -> int:
        while len(self.tokens) <= i:
            self.logits, self.state = self.runner.step(self.tokens[-1], self.state)
            self.tokens.append(int(np.argmax(self.logits)))
        return self.tokens[i]


def _greedy_agreement(fp32_tokens: list[int], n: int, runner, lv, sv) -> int:
    """Identical greedy tokens before the first difference, `runner` continuing from its own state after the
    prompt (logits lv, state sv) against the fp32 side's continuation."""
    for i in range(n):
        tv = int(np.argmax(lv))
        if tv != fp32_tokens[i]:
            return i
        if i + 1 < n:
            lv, sv = runner.step(tv, sv)
    return n


def gate_for(variant: str) -> float:
    """The perplexity gate of a variant name: 'int8', 'int4', 'fp16', or a suffixed form like 'int8-matmul-nbits'."""
    return quality_gate(variant).max_ppl_delta


def judge_quality(report: dict, variant: str, max_ppl_delta: float | None = None) -> dict:
    """The report with the variant's gate, the quantity gated and the verdict added (no exception); see the module
    docstring for when the gate bounds the information lost instead of the perplexity change. max_ppl_delta
    overrides the perplexity bound."""
    bounds = quality_gate(variant)
    gate = bounds.max_ppl_delta if max_ppl_delta is None else max_ppl_delta
    vocab = report.get("vocab_size")
    if vocab and report["ppl_fp32"] >= vocab:
        gated_on, value, bound = "info_loss", report["kl"] / max(report["kl_uniform"], 1e-12), bounds.max_info_loss
    else:
        gated_on, value, bound = "ppl", report["ppl_delta"], gate
    return {**report, "variant": variant, "max_ppl_delta": gate, "max_info_loss": bounds.max_info_loss,
            "gated_on": gated_on, "gated_value": float(value), "gated_max": bound, "passed": bool(value <= bound)}


def raise_if_failed(report: dict, where: str | None = None) -> None:
    """QualityGateError for a judged report past its gate; `where` names it (default: its variant)."""
    if not report["passed"] and report.get("gated_on") == "info_loss":
        raise QualityGateError(
            f"{where or report['variant']}: loses {report['gated_value'] * 100:.1f}% of what the fp32 model knows "
            f"(KL(fp32 || variant) {report['kl']:.3g} over KL(fp32 || uniform) {report['kl_uniform']:.3g} "
            f"nats/token), past the {report['max_info_loss'] * 100:g}% gate (fp32 perplexity {report['ppl_fp32']:.4g} "
            f"on the eval text is no better than uniform over {report['vocab_size']} ids, so its perplexity change "
            f"says nothing; top-1 {report['top1_agreement']:.3f})")
    if not report["passed"]:
        raise QualityGateError(
            f"{where or report['variant']}: perplexity {report['ppl']:.4g} is {report['ppl_delta'] * 100:+.2f}% over "
            f"fp32's {report['ppl_fp32']:.4g} on {report['tokens']} tokens, past the "
            f"{report['max_ppl_delta'] * 100:g}% gate (KL {report['kl']:.3g}, top-1 {report['top1_agreement']:.3f})"
        )


def check_quality(report: dict, variant: str, max_ppl_delta: float | None = None) -> dict:
    """Raise QualityGateError if the report's perplexity increase exceeds the variant's gate; return the report
    with the gate and verdict added."""
    report = judge_quality(report, variant, max_ppl_delta)
    raise_if_failed(report)
    return report


def format_quality(report: dict) -> str:
    status = "" if "passed" not in report else ("PASS  " if report["passed"] else "FAIL  ")
    return (
        f"quality {report.get('variant', '?')}: {status}ppl {report['ppl']:.4f} vs fp32 {report['ppl_fp32']:.4f} "
        f"({report['ppl_delta'] * 100:+.3f}%)  KL {report['kl']:.2e}"
        f"{_info_loss_note(report)}  top1 {report['top1_agreement']:.4f}  "
        f"greedy {report['greedy_match']}/{report['greedy_tokens']} over {report['tokens']} tokens"
        f"{_link_note(report)}"
    )


def _link_note(report: dict) -> str:
    link = report.get("link")
    if not link:
        return ""
    return (f" (eval graph in chunks of {report['chunk']}; vs the step graph {link['step']:.3g} <= {link['max_step']:g}"
            f", one token a call {link['chunk']:.3g} <= {link['max_chunk']:g})")


def _info_loss_note(report: dict) -> str:
    if report.get("gated_on") != "info_loss":
        return ""
    return (f"  info lost {report['gated_value'] * 100:.2f}% (<= {report['max_info_loss'] * 100:g}%; gated on this: "
            "fp32 no better than uniform on this text)")
