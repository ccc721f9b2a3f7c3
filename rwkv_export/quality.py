"""Quality of a quantized/fp16 variant against the fp32 graph, on real text, through the step graph.

"The file got smaller" is not a test: a variant is judged by what it does to next-token prediction. Both runners read
the same text token by token with their own state fed back (exactly as an app runs them), and we compare:
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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ParityNonFiniteError, ParityToleranceError, RwkvExportError
from .parity import QUALITY_GATES, quality_gate

# The perplexity bounds of parity.QUALITY_GATES (where the reasons are), by variant kind.
PPL_GATES: dict[str, float] = {kind: g.max_ppl_delta for kind, g in QUALITY_GATES.items()}
EVAL_TEXT = Path(__file__).parent / "data" / "tiny-pydoc-eval.txt"  # held-out English/Python prose (arch/rwkv4/train.py)
# Tokens of eval text per check: the paired perplexity delta is within ~1% (int4) at 1,500 tokens and ~0.3% at 24,000
# on tiny-pydoc; 2,000 keeps a 169M check to about a minute on two cores (fp32 ~36 tok/s + the variant).
DEFAULT_EVAL_TOKENS = 2000
DEFAULT_N_GREEDY = 64  # greedy tokens compared after the prompt
DEFAULT_PROMPT_LEN = 64  # the prompt for the greedy comparison: the first tokens of the text


class QualityGateError(ParityToleranceError):
    """A variant's perplexity on the eval text rose past its gate."""


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
                 n_greedy: int, prompt_len: int):
        self.path, self.tokens, self.dtype, self.vocab_size = Path(path), tokens, dtype, vocab_size
        self.nll, self.greedy, self.n_greedy, self.prompt_len = nll, greedy, n_greedy, prompt_len

    @classmethod
    def compute(cls, fp32_runner, tokens, path: Path, *, n_greedy: int = DEFAULT_N_GREEDY,
                prompt_len: int = DEFAULT_PROMPT_LEN, chunk: int = 128) -> "Baseline":
        tokens = [int(t) for t in tokens]
        if len(tokens) < 2:
            raise EvalTextError(f"need at least 2 tokens of eval text to measure perplexity, got {len(tokens)}")
        prompt_len = max(1, min(prompt_len, len(tokens)))
        n = len(tokens) - 1
        fed = max(n, prompt_len)  # tokens each side reads: all but the last, or all when the prompt is the whole text
        nll, start, dtype = 0.0, None, None
        with open(path, "wb") as f:
            for i, lf, sf in _fp32_logits(fp32_runner, tokens[:fed], prompt_len, chunk):
                lf = np.asarray(lf).reshape(-1)
                dtype = dtype or lf.dtype.str
                f.write(np.ascontiguousarray(lf, dtype=dtype).tobytes())
                if i == prompt_len - 1:
                    start = (lf, sf)
                if i < n:
                    pf = _log_softmax(lf)
                    if not np.isfinite(pf).all():
                        raise ParityNonFiniteError(f"NaN/Inf fp32 logits at token {i} of the eval text")
                    nll -= pf[tokens[i + 1]]
        greedy = _Greedy(fp32_runner, *start, n_greedy)
        greedy.token(n_greedy - 1)  # all of it now: the fp32 runner stays here, the variants may not
        return cls(path, tokens, dtype, int(start[0].size), float(nll), greedy.tokens[:max(n_greedy, 1)], n_greedy,
                   prompt_len)

    def rows(self, chunk: int = 64):
        """The fp32 logits row by row (as float64 log-probabilities are computed from them), read `chunk` at a time."""
        with open(self.path, "rb") as f:
            while True:
                block = np.fromfile(f, dtype=self.dtype, count=chunk * self.vocab_size)
                if block.size == 0:
                    return
                yield from block.reshape(-1, self.vocab_size)


def evaluate_against(variant_runner, base: Baseline) -> dict:
    """One variant over the eval text (state fed back, token by token, as an app runs it) against the fp32 Baseline:
    perplexities, KL(fp32 || variant), top-1 and greedy agreement."""
    tokens, prompt_len = base.tokens, base.prompt_len
    n = len(tokens) - 1
    nll = kl = kl_uniform = 0.0
    top1, state, start = 0, variant_runner.new_state(), None
    for i, lf in enumerate(base.rows()):
        lv, state = variant_runner.step(tokens[i], state)
        if i == prompt_len - 1:
            start = (lv, state)
        if i >= n:
            continue
        pf, pv = _log_softmax(lf), _log_softmax(lv)
        if not np.isfinite(pv).all():
            raise ParityNonFiniteError(f"NaN/Inf logits at token {i} of the eval text")
        nll -= pv[tokens[i + 1]]
        p = np.exp(pf)
        kl += float(np.sum(p * (pf - pv)))
        kl_uniform += float(np.sum(p * pf) + np.log(pf.size))  # KL(fp32 || uniform) = log V - H(fp32)
        top1 += int(pv.argmax() == pf.argmax())
    ppl_v, ppl_f = float(np.exp(nll / n)), float(np.exp(base.nll / n))
    return {
        "tokens": n,
        "ppl": ppl_v,
        "ppl_fp32": ppl_f,
        "ppl_delta": ppl_v / ppl_f - 1.0,
        "kl": kl / n,
        "kl_uniform": kl_uniform / n,
        "vocab_size": base.vocab_size,
        "top1_agreement": top1 / n,
        "greedy_match": _greedy_agreement(base.greedy, base.n_greedy, variant_runner, *start),
        "greedy_tokens": base.n_greedy,
        "prompt_tokens": prompt_len,
    }


def _fp32_logits(runner, tokens, prompt_len: int, chunk: int):
    """(i, logits after tokens[i], the state after it or None) for every i; the state is given at least after the
    prompt (i = prompt_len - 1), where the greedy comparison starts."""
    state = runner.new_state()
    if not hasattr(runner, "logits_seq"):
        for i, tok in enumerate(tokens):
            logits, state = runner.step(tok, state)
            yield i, logits, state
        return
    bounds = [0, *range(prompt_len, len(tokens), chunk), len(tokens)]  # a chunk ends where the prompt does
    for lo, hi in zip(bounds, bounds[1:]):
        if hi <= lo:
            continue
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
    )


def _info_loss_note(report: dict) -> str:
    if report.get("gated_on") != "info_loss":
        return ""
    return (f"  info lost {report['gated_value'] * 100:.2f}% (<= {report['max_info_loss'] * 100:g}%; gated on this: "
            "fp32 no better than uniform on this text)")
