"""The parity gate: an exported graph against runtime_ref, layer by layer of evidence.

1. names, shapes, dtypes of every output (ParityShapeError);
2. finite values (ParityNonFiniteError);
3. logits over N_TOKENS tokens with each side's state fed back: max|Δ|, max|Δ|/std(ref), top-1 agreement
   (ParityToleranceError);
4. a greedy continuation of N_GREEDY tokens from each side's own state must be identical (ParityGreedyError).

A prompt (sequence) graph's state is judged by its effect, as the user meets it: N_STATE_PROBE reference steps run
from the graph's state and from the reference's own, their logits compared like any logits (state_effect_rel). Its
own relative error (state_max_rel) is reported, not gated: a state tensor of ~1e-6 (an fp16 subnormal, as a trained
model's ffn_x can be) has a large relative error and no effect on the text, and RWKV-4's (aa, bb, pp) is only
defined up to a common scale (aa*e^d, bb*e^d, pp-d is the same state).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import (ParityGreedyError, ParityNonFiniteError, ParityShapeError, ParityToleranceError,
                     RwkvExportError)
from .progress import QUIET, Progress

N_TOKENS = 64  # tokens fed with the state carried over: long enough for the WKV state to matter
N_GREEDY = 32  # greedy continuation compared token by token
TOKEN_SEED = 1234
# reference steps continued from a prompt graph's state (and from the reference's own) to judge that state: the
# token-shift states (att_x, ffn_x) act on the first of them, the WKV state on all, most on the first few
N_STATE_PROBE = 8


@dataclass(frozen=True)
class Tolerance:
    max_rel: float | None  # bound on max|Δlogits| / std(reference logits) over every compared step; None: reported only
    min_top1: float  # fraction of steps whose argmax must agree
    greedy_identical: bool  # the N_GREEDY-token greedy continuation must be identical
    reason: str


TOLERANCES: dict[tuple[str, str], Tolerance] = {
    ("onnx", "fp32"): Tolerance(
        max_rel=1e-5,
        min_top1=1.0,
        greedy_identical=True,
        reason="same math in fp32 vs an fp64 reference: only fp32 rounding differs (~1e-6 of std seen on 169M "
        "shapes); 1e-5 leaves headroom without hiding a wrong equation, which shows as >1e-2",
    ),
    ("onnx", "fp16"): Tolerance(
        max_rel=2e-2,
        min_top1=0.95,
        greedy_identical=False,
        reason="fp16 weights and activations carry ~5e-4 relative rounding per op; measured 1.4e-3 (tiny) and "
        "2.0e-3 (169M shapes) of std; 10x headroom; a near-tie may flip one argmax, so top-1 >= 0.95 and greedy is reported, "
        "not gated. Quality on real text is gated separately (perplexity)",
    ),
}


# Quantized weights change the logits by design, so for them the logits are reported here, not gated: a quantized
# variant is judged by what it does on real text, against fp32 (quality.py: perplexity delta gated per variant, with
# KL, top-1 and greedy agreement). This layer still gates names, shapes, dtypes and finiteness of every output.
_QUANTIZED = ("quantized weights change logits by design: max|Δ| and top-1 on random tokens are reported, not gated; "
              "the gate is quality on the eval text (QUALITY_GATES below) measured by the same check")
for _t, _v in (("onnx", "int8"), ("onnx", "int4"), ("tflite", "int8"), ("tflite", "int4"), ("tfjs", "uint8")):
    TOLERANCES[(_t, _v)] = Tolerance(max_rel=None, min_top1=0.0, greedy_identical=False, reason=_QUANTIZED)

# TFLite (LiteRT interpreter, XNNPACK) and TF.js (its wasm backend, SIMD; the pure-JS cpu backend where wasm cannot
# start) compute the fp32 step graph in fp32, like ONNX, but with their own kernels' summation order and fused
# multiply-adds. Measured max|Δ|/std against the fp64 reference on the 169M shapes: TFLite 6.9e-6; TF.js 7.5e-6 on
# wasm (1.6e-6 on cpu), its prompt graph 5.9e-6. Both sit near 1e-5 already at 169M, and 430M (24 layers, sums over
# 1,024) rounds more, so 1e-5 would reject healthy files; 3e-5 is 4x the worst seen at 169M and still 300x below
# a wrong equation, which shows as >1e-2 (a shift off by one, a lost state hand-over, a wrong decay sign).
TF_FP32_MAX_REL = 3e-5
for _t, _engine in (("tflite", "the LiteRT interpreter (XNNPACK)"), ("tfjs", "TF.js's wasm backend (SIMD)")):
    TOLERANCES[(_t, "fp32")] = Tolerance(
        max_rel=TF_FP32_MAX_REL, min_top1=1.0, greedy_identical=True,
        reason=f"same fp32 math in {_engine} vs an fp64 reference: only rounding differs (measured 6.9e-6 TFLite, "
        "7.5e-6 TF.js wasm on the 169M shapes, more at 430M); 3e-5 does not hide a wrong equation, which shows as "
        ">1e-2")
    TOLERANCES[(_t, "fp16")] = Tolerance(
        max_rel=2e-2, min_top1=0.95, greedy_identical=False,
        reason="float16 weight storage, dequantized to fp32 at load: at most the ONNX fp16 error (which also rounds "
        "activations); same bound and reasons as onnx/fp16; quality on real text is gated separately")

# Per architecture, keyed (target, variant, rwkv_version); where a version has no entry its (target, variant) one holds.
# RWKV-5.2 / 6 / 7 in fp32: the same kind of error as RWKV-4 (fp32 rounding against fp64), but more of it: GroupNorm
# (ln_x, eps 64e-5) divides each head's output by its own spread, amplifying the rounding of a head whose spread is
# small, and the WKV state is an [H, N, N] matrix summed over N per channel. Measured on synthetic checkpoints at the
# 0.1B shapes (12 x 768, vocab 65536; 16-core x86 host, onnxruntime 1.30), max|Δ|/std over the parity run: ONNX step
# graph 5.0e-6 (v5.2), 4.7e-6 (v6), 6.9e-6 (v7), against 3.3e-6 for RWKV-4 at 169M; runtime_ref itself in fp32
# 2.9e-6 / 3.8e-6 / 4.2e-6 (2.0e-6 for v4): the export adds no error of its own, the architecture has more. Issue 15
# measured 1.0e-5 for v5.2 at these shapes: on the RWKV-4 bound. 5e-5 is 5x the worst seen and still 1,000x below
# a formula slip (GroupNorm eps 1e-5 for 64e-5 moves logits by 6.7e-2 to 0.10 of std, tests/test_arch_v5_v6.py).
V5_FP32_MAX_REL = 5e-5
for _version in ("5.2", "6", "7"):
    for _t in ("onnx", "tflite", "tfjs"):
        _base = TOLERANCES[(_t, "fp32")]
        TOLERANCES[(_t, "fp32", _version)] = Tolerance(
            V5_FP32_MAX_REL, _base.min_top1, _base.greedy_identical,
            f"RWKV-{_version}'s fp32 rounding (GroupNorm, the matrix WKV state) against an fp64 reference: measured "
            "5.0e-6 (v5.2), 4.7e-6 (v6), 6.9e-6 (v7) of std for ONNX at the 0.1B shapes, 1.0e-5 in issue 15; 5x the "
            "worst; a wrong equation shows as >6e-2")

# ONNX Runtime's .ort format is the same graph after ORT's own (Fixed-style) optimizations — fusions that reorder
# fp32 arithmetic, not new approximations — so each ONNX tolerance holds for it, for the same reasons.
for _key, _tol in list(TOLERANCES.items()):
    if _key[0] == "onnx":
        TOLERANCES[("ort", *_key[1:])] = Tolerance(_tol.max_rel, _tol.min_top1, _tol.greedy_identical,
                                                   "as ONNX: the .ort file is the same graph after ORT's fusions. "
                                                   + _tol.reason)


@dataclass(frozen=True)
class QualityGate:
    """The quality gate of a variant kind (quality.judge_quality), on the eval text against the fp32 model."""
    max_ppl_delta: float  # relative perplexity increase, where the fp32 model has learned the text (ppl < vocab)
    max_info_loss: float  # elsewhere: KL(fp32 || variant) / KL(fp32 || uniform), the share of what fp32 knows lost
    reason: str


# Measured (2000 tokens of tiny-pydoc-eval.txt, each variant against the fp32 graph; 2-core EPYC; int4 at block 128):
# correct files: int8 ppl +0.15% / +0.07% (tiny-pydoc / v7-tiny-pydoc), info loss 4.8e-4 / 6.2e-4 (v6 / v5-tiny); int4
# ppl +2.4% / +1.9%, info loss 3.3e-3 (tiny-pydoc), 0.021 / 0.024 / 0.030 (v6 / v5 / v7-tiny), 0.032 (169m-synthetic).
# Broken int4 files (tests/test_quality_gate.py builds them): every 10th head column zeroed: ppl +13.9% / +13.2%, info
# loss 0.12 / 0.25 / 0.29 (v7 / v6 / v5-tiny), 0.20 (169m-synthetic); the head's scales halved: ppl +61%, info loss
# 0.19-0.20; the head's K order reversed within blocks: ppl x32 / x45, info loss 2.4-2.6.
# Why the share of information and not exp(KL) - 1 on text a model has not learned: a random-weight model knows little
# and is noisy about it, so a correct 4-bit file moves its distribution far (KL 0.066 at v6-tiny, 0.14 at 169M shapes:
# "+15% perplexity" on its own text) although it keeps 97% of what the model knows; KL / KL(fp32 || uniform) is about
# (logit error / logit spread)^2, the same for a peaked and a nearly uniform model.
QUALITY_GATES: dict[str, QualityGate] = {
    "fp16": QualityGate(0.001, 1e-3, "fp16 changes logits by ~5e-3 of their std (toolchain.md), tiny-pydoc +0.007% "
                        "(KL 6e-6); the gates catch a broken fp16 path (overflow, an fp16 state losing the WKV sums)"),
    "int8": QualityGate(0.01, 0.01, "every int8 formulation measured within +0.15% (info loss <= 6.2e-4); 1% is the "
                        "issue's budget, room for outlier weights; int4's own noise (info loss 0.02-0.03) fails it"),
    "int4": QualityGate(0.05, 0.1, "correct int4 +1.6 to +2.4% on the trained fixtures, info loss at most 0.032 "
                        "(169m-synthetic); 5% is the issue's budget for a usable 4-bit model; 0.1 is 3x the worst "
                        "correct file, below every broken one measured (least: 0.12, v7-tiny, zeroed head columns)"),
}


# The sequential (early-stopping) reading of the gate (quality.sequential_look): a variant reads the eval text in
# levels and stops at the first whose verdict is beyond doubt, at the last judges the point estimate as ever.
# - SEQ_LEVELS: tokens read at each early look, then the whole text (quality.DEFAULT_EVAL_TOKENS). 512 is the least
#   that gives 8 blocks for the standard error; each level doubles the last, so a variant that goes on to the end
#   reads no more than before, and one that stops at 512 reads a quarter (the cost is linear in tokens read).
# - SEQ_BLOCK: the standard error is by batch means over blocks of consecutive tokens, because consecutive tokens'
#   differences are correlated through the recurrent state (an error in the state stays for as long as the state
#   remembers: RWKV's channels decay over a few to some tens of tokens). 64 tokens is long against that and still
#   gives 8 blocks at the first level. Measured on the fixtures (2,000 tokens, 24 variants): the SE of the
#   per-token NLL difference at blocks of 1, 16, 64, 128, 256 tokens agree within a factor 1.6 and do not grow
#   with the block (no correlation long enough to make 64 too short).
# - SEQ_Z: a verdict is taken early only when the gate lies more than SEQ_Z standard errors from the estimate. 4
#   and not 2: 8 blocks give an SE with 7 degrees of freedom (Student t: P(|t_7| > 4) = 0.5%), the SE may still be
#   short by the correlation beyond a block, and every variant looks twice; an early verdict must be one the full
#   reading would give. What is not decided at 4 SE reads on, so a large z costs time, never a verdict. The SE is
#   the noise within the tokens read, not the drift between parts of the text (it is not shuffled): measured, the
#   first 512 tokens' estimate lies 0.1-1.9 SE from the 2,000-token one in 23 of 24 fixture cases, 4.6 SE in one
#   (v5-tiny int4, info loss 0.0219 vs 0.0240, 170 SE inside its gate).
SEQ_LEVELS = (512, 1024)
SEQ_BLOCK = 64
SEQ_Z = 4.0


def quality_gate(variant: str) -> QualityGate:
    """The quality gate of a variant name: 'int8', 'int4', 'fp16', or a suffixed form like 'int8-matmul-nbits'."""
    for kind, g in QUALITY_GATES.items():
        if variant == kind or variant.startswith(kind + "-") or variant.startswith(kind + "_"):
            return g
    raise KeyError(f"no quality gate declared for variant '{variant}' (known: {', '.join(QUALITY_GATES)})")


def tolerance_for(target: str, variant: str, version: str | None = None) -> Tolerance:
    """The tolerance of (target, variant) for RWKV `version` (the manifest's model.rwkv_version): its own entry where
    the table has one, else the (target, variant) entry."""
    if version is not None and (target, variant, str(version)) in TOLERANCES:
        return TOLERANCES[(target, variant, str(version))]
    try:
        return TOLERANCES[(target, variant)]
    except KeyError:
        raise RwkvExportError(f"no parity tolerance is declared for target={target} variant={variant}") from None


def _version(runner) -> str | None:
    """The RWKV version of the graph a runner runs, from its manifest (None: unknown, the version-free entry holds)."""
    model = (getattr(runner, "manifest", None) or {}).get("model") or {}
    return model.get("rwkv_version")


def parity_tokens(vocab_size: int, n: int = N_TOKENS, seed: int = TOKEN_SEED) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, vocab_size, size=n)]


def _check_outputs(logits, state, graph: dict, step: int):
    from .runners import io_by_role

    io = io_by_role(graph)
    exp = io["logits"]
    if list(logits.shape) != list(exp["shape"]) or str(logits.dtype) != exp["dtype"]:
        raise ParityShapeError(
            f"logits output has shape {list(logits.shape)} {logits.dtype}, manifest says {exp['shape']} {exp['dtype']}"
        )
    for name, spec in io["state_out"].items():
        t = state[name]
        if list(t.shape) != list(spec["shape"]) or str(t.dtype) != spec["dtype"]:
            raise ParityShapeError(f"state output '{spec['name']}' has shape {list(t.shape)} {t.dtype}, "
                                   f"manifest says {spec['shape']} {spec['dtype']}")
        if not np.isfinite(t).all():
            raise ParityNonFiniteError(f"state output '{spec['name']}' has NaN/Inf at step {step}")
    if not np.isfinite(logits).all():
        raise ParityNonFiniteError(f"logits have NaN/Inf at step {step}")


def compare(runner, ref, *, target: str, variant: str, tokens: list[int] | None = None, n_greedy: int = N_GREEDY,
            progress: Progress = QUIET) -> dict:
    """Run `runner` (an exported graph) and `ref` (a runtime_ref model, or a RecordedReference of its side) side by
    side; return the report dict."""
    tol = tolerance_for(target, variant, _version(runner))
    tokens = tokens if tokens is not None else parity_tokens(ref.vocab_size)
    m_state, r_state = runner.new_state(), ref.new_state()
    max_abs = max_rel = 0.0
    top1 = 0
    total = len(tokens) + n_greedy
    bar = progress.iter(range(total), desc=f"parity {target}/{variant}", total=total)
    it = iter(bar)
    for i, tok in enumerate(tokens):
        next(it, None)
        m_logits, m_state = runner.step(tok, m_state)
        _check_outputs(m_logits, m_state, runner.graph, i)
        r_logits, r_state = ref.step(tok, r_state)
        r = _f64(r_logits)
        m = m_logits.astype(np.float64).reshape(-1)
        d = float(np.abs(m - r).max())
        max_abs = max(max_abs, d)
        max_rel = max(max_rel, d / float(r.std()))
        top1 += int(m.argmax() == r.argmax())
    m_next, r_next = int(m.argmax()), int(r.argmax())
    m_greedy, r_greedy = [], []
    for i in range(n_greedy):
        next(it, None)
        m_greedy.append(m_next)
        r_greedy.append(r_next)
        m_logits, m_state = runner.step(m_next, m_state)
        _check_outputs(m_logits, m_state, runner.graph, len(tokens) + i)
        r_logits, r_state = ref.step(r_next, r_state)
        m_next, r_next = int(m_logits.reshape(-1).argmax()), int(_f64(r_logits).argmax())
    if hasattr(bar, "close"):
        bar.close()
    match_len = next((i for i, (a, b) in enumerate(zip(m_greedy, r_greedy)) if a != b), n_greedy)
    report = {
        "target": target,
        "variant": variant,
        "reference": "runtime_ref fp64",
        "tokens": len(tokens),
        "max_abs": max_abs,
        "max_rel": max_rel,
        "top1_agreement": top1 / len(tokens),
        "greedy_tokens": n_greedy,
        "greedy_identical": m_greedy == r_greedy,
        "greedy_match_len": match_len,
        "tolerance": asdict(tol),
    }
    report["passed"] = _passes(report, tol)
    return report


def _f64(logits) -> np.ndarray:
    """Logits (a torch tensor from the reference, or an array) as a flat float64 array: exact for fp64 and fp32."""
    return np.asarray(logits, dtype=np.float64).reshape(-1)


class RecordedReference:
    """The reference's side of `compare`, recorded once (record_reference) and replayed for every step graph: its
    logits after each token of its path (the parity tokens, then its own greedy continuation), which do not depend on
    the graph compared. Holds arrays only (no model, no torch), so it can be sent to another process."""

    def __init__(self, vocab_size: int, logits: dict[tuple, np.ndarray]):
        self.vocab_size, self.logits = vocab_size, logits

    def new_state(self) -> tuple:
        return ()

    def step(self, token: int, path: tuple):
        path = (*path, int(token))
        if path not in self.logits:
            raise RwkvExportError(f"the recorded reference has no step after {len(path) - 1} tokens on this path "
                                  "(record_reference records the parity tokens and the greedy continuation only)")
        return self.logits[path], path


def record_reference(ref, tokens: list[int] | None = None, n_greedy: int = N_GREEDY) -> RecordedReference:
    """Run the reference's side of `compare` (the same steps, in the same order) and keep its logits."""
    tokens = tokens if tokens is not None else parity_tokens(ref.vocab_size)
    logits, state, path = {}, ref.new_state(), ()
    for tok in [*tokens, *([None] * n_greedy)]:
        tok = int(tok) if tok is not None else int(logits[path].argmax())
        r_logits, state = ref.step(tok, state)
        path = (*path, tok)
        logits[path] = _f64(r_logits)
    return RecordedReference(ref.vocab_size, logits)


def _passes(report: dict, tol: Tolerance) -> bool:
    return ((tol.max_rel is None or report["max_rel"] <= tol.max_rel) and report["top1_agreement"] >= tol.min_top1
            and (report["greedy_identical"] or not tol.greedy_identical))


def gate(report: dict) -> None:
    """Raise the typed error for the first failed layer of the report."""
    tol = Tolerance(**report["tolerance"])
    where = f"{report['target']}/{report['variant']}"
    if tol.max_rel is not None and report.get("state_effect_rel", 0.0) > tol.max_rel:
        raise ParityToleranceError(
            f"{where}: the prompt graph's state moves the next {report['state_probe_tokens']} reference steps' logits "
            f"by {report['state_effect_rel']:.3g} of std, past {tol.max_rel:g} (the state itself differs by "
            f"{report['state_max_rel']:.3g} of its magnitude)"
        )
    if tol.max_rel is not None and report["max_rel"] > tol.max_rel:
        raise ParityToleranceError(
            f"{where}: max|Δ|/std(ref) = {report['max_rel']:.3g} exceeds {tol.max_rel:g} "
            f"(max|Δ| = {report['max_abs']:.3g}; a tolerance of {report['max_rel'] * 1.01:.3g} would have passed)"
        )
    if report["top1_agreement"] < tol.min_top1:
        raise ParityToleranceError(
            f"{where}: top-1 agreement {report['top1_agreement']:.3f} is below {tol.min_top1:g}"
        )
    if tol.greedy_identical and not report.get("greedy_identical", True):
        raise ParityGreedyError(
            f"{where}: greedy continuation diverges from the reference at token {report['greedy_match_len']} "
            f"of {report['greedy_tokens']}"
        )


def format_report(report: dict) -> str:
    status = "PASS" if report["passed"] else "FAIL"
    bound = report["tolerance"]["max_rel"]
    bound = f"≤{bound:g}" if bound is not None else "reported"
    head = f"parity {report['target']}/{report['variant']}"
    if report.get("kind") == "sequence":
        return (f"{head} prompt graph vs {report['reference']}: {status}  max|Δ|/std={report['max_rel']:.3g} ({bound})  "
                f"state: effect max|Δ|/std={report['state_effect_rel']:.3g} over {report['state_probe_tokens']} "
                f"steps, max|Δ|/max|ref|={report['state_max_rel']:.3g} (reported)  over {report['tokens']} tokens in "
                f"{report['calls']} calls")
    return (
        f"{head} vs {report['reference']}: {status}  "
        f"max|Δ|={report['max_abs']:.3g}  max|Δ|/std={report['max_rel']:.3g} ({bound})  "
        f"top1={report['top1_agreement']:.3f} over {report['tokens']} tokens  "
        f"greedy {report['greedy_match_len']}/{report['greedy_tokens']} identical"
    )


def state_effect(ref, got: dict, want: dict, tokens: list[int], got_logits=None) -> float:
    """max|Δlogits|/std(ref) over `tokens` run by the (fp64) reference from the state `got` (a graph's, as arrays)
    and from `want` (the reference's own): the effect of the state's error on what comes next, free of the step
    graph's own error. `got_logits`: the reference's logits over `tokens` from `got`, computed already (in GPT
    mode, e.g. with other graphs' states in one batch: check.SharedReference.logits_seq_many)."""
    import torch

    got = {k: torch.from_numpy(np.asarray(got[k], np.float64).reshape(tuple(v.shape))).to(v.dtype)
           for k, v in want.items()}
    if hasattr(ref, "logits_seq"):  # GPT mode: the same equations as the steps below, in one batch per side
        g_all = ref.logits_seq(tokens, got) if got_logits is None else got_logits
        w_all = ref.logits_seq(tokens, want)
        pairs = ((np.asarray(g, np.float64), np.asarray(w, np.float64)) for g, w in zip(g_all, w_all))
    else:
        pairs = []
        for tok in tokens:
            g_logits, got = ref.step(tok, got)
            w_logits, want = ref.step(tok, want)
            pairs.append((_f64(g_logits), _f64(w_logits)))
    return max((float(np.abs(g - w).max() / w.std()) for g, w in pairs), default=0.0)


def sequence_calls(tokens: list[int]) -> list[list[int]]:
    """The calls compare_sequence feeds the tokens in: two (3/5, 2/5), so a state handed between calls is judged."""
    split = max(1, (len(tokens) * 3) // 5)
    return [tokens[:split], tokens[split:]] if len(tokens) > 1 else [tokens]


def compare_sequence(runner, ref, *, target: str, variant: str, tokens: list[int] | None = None,
                     progress: Progress = QUIET) -> dict:
    """A sequence (prompt) graph against T reference steps: the tokens go in two calls (so the state handed from one
    call to the next is exercised), each call in the graph's own chunks. After each call the last token's logits are
    compared, and the state by its effect (state_effect: N_STATE_PROBE reference steps from each side's state), both
    gated by the step graph's tolerance for the same (target, variant); each state tensor's own max|Δ|/max|ref| is
    reported. In two halves (run_sequence, judge_sequence), so that a check can close the graph's session before it
    builds the reference."""
    tokens = tokens if tokens is not None else parity_tokens(ref.vocab_size)
    with progress.stage(f"parity {target}/{variant} prompt graph"):
        return judge_sequence(run_sequence(runner, tokens), ref, target=target, variant=variant)


def run_sequence(runner, tokens: list[int]) -> dict:
    """The graph's half of compare_sequence: its last logits and state after each call, and its RWKV version."""
    outputs, state = [], runner.new_state()
    for call in sequence_calls(tokens):
        logits, state = runner.forward(call, state)
        outputs.append((np.asarray(logits), {k: np.asarray(v) for k, v in state.items()}))
    return {"tokens": list(tokens), "outputs": outputs, "version": _version(runner)}


def state_probe(vocab_size: int) -> list[int]:
    """The N_STATE_PROBE tokens a prompt graph's state is judged by (state_effect)."""
    return parity_tokens(vocab_size, N_STATE_PROBE, TOKEN_SEED + 1)


def judge_sequence(run: dict, ref, *, target: str, variant: str, probe_logits=None) -> dict:
    """The reference's half of compare_sequence, and the report. `probe_logits`: per call, the reference's logits
    over state_probe() from the graph's state after it, where computed already (else None, or None for a call)."""
    import torch

    tol = tolerance_for(target, variant, run["version"])
    tokens = run["tokens"]
    probe = state_probe(ref.vocab_size)
    calls = sequence_calls(tokens)
    probe_logits = probe_logits or [None] * len(calls)
    r_state = ref.new_state()
    max_abs = max_rel = state_rel = effect = 0.0
    top1 = 0
    with torch.no_grad():
        for call, (m_logits, m_state), got_logits in zip(calls, run["outputs"], probe_logits):
            for tok in call:
                r_logits, r_state = ref.step(tok, r_state)
            r = _f64(r_logits)
            m = np.asarray(m_logits, np.float64).reshape(-1)
            if not (np.isfinite(m).all() and all(np.isfinite(v).all() for v in m_state.values())):
                raise ParityNonFiniteError(f"{target}/{variant} prompt graph produced NaN/Inf")
            if m.shape != r.shape:
                raise ParityShapeError(f"{target}/{variant} prompt graph: last-token logits have {m.size} values, "
                                       f"the reference {r.size}")
            d = float(np.abs(m - r).max())
            max_abs, max_rel = max(max_abs, d), max(max_rel, d / float(r.std()))
            top1 += int(m.argmax() == r.argmax())
            for name, want in r_state.items():
                want = want.double().numpy()
                got = np.asarray(m_state[name], np.float64)
                if got.size != want.size:
                    raise ParityShapeError(f"{target}/{variant} prompt graph: state '{name}' has {got.size} values, "
                                           f"the reference {want.size}")
                state_rel = max(state_rel, float(np.abs(got.reshape(want.shape) - want).max()
                                                 / max(np.abs(want).max(), 1e-30)))
            effect = max(effect, state_effect(ref, m_state, r_state, probe, got_logits))
    report = {
        "kind": "sequence", "target": target, "variant": variant, "reference": "runtime_ref fp64 steps",
        "tokens": len(tokens), "calls": len(calls), "max_abs": max_abs, "max_rel": max_rel,
        "state_max_rel": state_rel, "state_effect_rel": effect, "state_probe_tokens": len(probe),
        "top1_agreement": top1 / len(calls), "tolerance": asdict(tol),
    }
    report["passed"] = (tol.max_rel is None or max(max_rel, effect) <= tol.max_rel) and (
        report["top1_agreement"] >= tol.min_top1)
    return report
