"""The RWKV-4 prompt ("sequence", GPT-mode) graph: T tokens + state -> logits + state, in one call.

Built from an existing `RWKV4Step`: it holds the very same Parameter objects (embedding with LN0 folded in, the
`_Layer`s, LN_out, head), so no weight is copied and initializer names match the step graph's.

Every linear layer is a matrix-matrix product over [T, C] (`x @ W`, exported as MatMul). Only the WKV recurrence
couples the tokens; it runs inside the graph as a parallel prefix scan over the chunk:

    A_t = e^w A_{t-1} + e^{k_t} v_t,   B_t = e^w B_{t-1} + e^{k_t},   (A_{-1}, B_{-1}) = the carried state
    wkv_t = (A_{t-1} + e^{u+k_t} v_t) / (B_{t-1} + e^{u+k_t})

Each scan element is held as (p, a, b) meaning (e^p a, e^p b) -- the state's own (att_pp, att_aa, att_bb) form; the
carried state is element 0 and token t element t+1. Combining the segment that ends d elements earlier (which decays
by e^{d w} on the way) into element t is

    p' = max(p_{t-d} + d w, p_t),   (a, b)' = (a, b)_{t-d} e^{p_{t-d} + d w - p'} + (a, b)_t e^{p_t - p'}

Every exponent is <= 0 and the max is always finite (a k, or the carried pp), so no exp overflows whatever the decay,
and positions before the chunk are a finite identity (p = NEG_FILL, a = b = 0), so no -inf - -inf appears. The
result at element t is the max-normalised form the step graph keeps (its pp is the max over the same exponents), so
the final (att_aa, att_bb, att_pp) compare tensor by tensor with T steps of the step graph.

Two levels keep the scan cheap: Hillis-Steele steps d = 1, 2, 4 inside blocks of 8 elements, then the same over the
block totals (decay 8w per block), then one combine that brings each element what precedes its block. That is 4 to 5
combines per element for any chunk up to 255 tokens instead of log2(T) (8 at 255). The graph takes any T up to
`max_chunk` (a dynamic dimension); runners feed longer prompts in chunks. More tokens than the scan covers would give
wrong numbers, so the graph answers such a call with NaN logits (the chunk guard).

Why not the pairwise [T, T, C] form (all i < t weights at once, max-subtracted): exact too, but ~8 passes over
T*T*C numbers per layer; at C = 768, T = 64 onnxruntime took 33 ms per layer for it against ~5 ms for a one-level
scan (measured on the 2-core box, one thread).

With all_logits=False (the default) only the last token's logits are computed: the head is one row instead of T, and
the last layer runs its FFN on the last row only (~6% fewer FLOPs at 169M shapes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RwkvExportError
from .model import STATE_NAMES, RWKV4Step, _Layer

# Tokens per call: 2**m - 1 (the scan covers 2**m elements, the carried state being one). At 169M shapes a 512-token
# prompt ran at 417 / 730 tok/s (1 / 2 threads) in chunks of <= 255 against 383 / 595 in chunks of 64 (GEMMs reuse
# each weight over more rows; benchmarks/bench_prefill.py --explore), and the two-level scan makes a large max_chunk
# cost nothing at small T.
DEFAULT_MAX_CHUNK = 255
# Hillis-Steele steps inside blocks of 2**BLOCK_STEPS elements; the block totals are scanned in a second level.
# 8-element blocks: 3 steps + 1 combine per element, plus (group steps) / 8 -- the fewest passes over [T, C] for
# chunks of 64 to 255.
BLOCK_STEPS = 3
MAX_SCAN_STEPS = 12  # 4096 tokens per call: past that the [T, F] activations alone pass 50 MB per layer
# "Minus infinity" for positions before the chunk: finite in fp32 (so p - max never meets -inf - -inf), and so
# negative that exp of it, shifted by any real exponent or decay, is exactly 0.
NEG_FILL = -1.0e30


def _to(t, dtype):
    """A cast that is no graph node when the dtype already matches (the fp32 variant has none)."""
    return t if t.dtype == dtype else t.to(dtype)


def _mix(xx, prev, mix):
    """The token-shift mixes of rows xx [T, C] with their shifted rows prev: mix [M, C] -> M tensors [T, C]
    (the step graph's `prev + (xx - prev) * mix`, one row of `mix` per matmul input)."""
    return (prev + (xx - prev) * mix.unsqueeze(1)).unbind(0)


def _token_shift(x, first):
    """Token shift over [T, C]: row t gets x[t-1], row 0 gets `first` [C]. (cat, then drop the last row: slicing
    x[:-1] first would make torch.export guard on T != 2 for the concatenation's contiguity check.)"""
    return torch.cat([first.unsqueeze(0), x])[:-1]


def _ffn(layer: _Layer, xx, prev):
    """Channel mix for rows xx [N, C] with their shifted rows prev [N, C] (_Layer.channel_mix's equations)."""
    xk, xr = _mix(xx, prev, layer.ffn_mix)
    k = torch.relu(xk @ layer.ffn_key)
    return torch.sigmoid(xr @ layer.ffn_receptance) * ((k * k) @ layer.ffn_value)


def _combine(p_left, a_left, b_left, p, a, b):
    """(e^p_left (a_left, b_left)) + (e^p (a, b)) in the stable form: the new exponent is the larger one."""
    p_new = torch.maximum(p_left, p)
    e_left, e_right = torch.exp(p_left - p_new), torch.exp(p - p_new)
    return p_new, a_left * e_left + a * e_right, b_left * e_left + b * e_right


def _shift(x, d: int, dim: int, fill: float):
    """x shifted by d along dim (toward higher indices), the first d entries `fill`, same shape."""
    pads = [0, 0] * (x.dim() - 1 - dim) + [d, 0]
    return F.pad(x, pads, value=fill).narrow(dim, 0, x.shape[dim])


def _scan(p, a, b, w_unit, steps: int, dim: int):
    """Inclusive prefix scan (Hillis-Steele) of (p, a, b) along `dim`, each position decaying by w_unit [C]:
    correct for up to 2**steps positions."""
    for s in range(steps):
        d = 1 << s
        p, a, b = _combine(_shift(p, d, dim, NEG_FILL) + w_unit * d, _shift(a, d, dim, 0.0), _shift(b, d, dim, 0.0),
                           p, a, b)
    return p, a, b


def wkv_scan(w, u, k, v, aa, bb, pp, block_steps: int, group_steps: int):
    """WKV over a chunk. w, u, aa, bb, pp: [C]; k, v: [T, C] with T < 2**(block_steps + group_steps).

    Returns (wkv [T, C], (aa, bb, pp) after the last token), equal to T applications of the step recurrence.
    """
    # The carried state is element 0 and token t element t+1: A_0 = e^w A_{-1} + e^{k_0} v_0 is the same combine as
    # between any two tokens.
    p = torch.cat([pp.unsqueeze(0), k])  # [n, C], n = T + 1
    a = torch.cat([aa.unsqueeze(0), v])
    b = torch.cat([bb.unsqueeze(0), torch.ones_like(v)])
    B = 1 << block_steps
    pos = torch.arange(p.shape[0])
    j = (pos % B).unsqueeze(-1)  # [n, 1]: position inside its block of B elements
    # level 1: prefixes inside each block (the layout stays flat [n, C]: a reshape to [n / B, B, C] would need n
    # padded to a multiple of B, which torch.export cannot prove for a dynamic n; a mask drops the elements that a
    # shift brings over from the block before)
    for s in range(block_steps):
        d = 1 << s
        p_left = _shift(p, d, 0, NEG_FILL) + w * d
        if group_steps:
            p_left = torch.where(j >= d, p_left, NEG_FILL)
        p, a, b = _combine(p_left, _shift(a, d, 0, 0.0), _shift(b, d, 0, 0.0), p, a, b)
    if group_steps:
        # level 2: prefixes over the totals of the whole blocks (their last elements), B*w of decay per block
        ends = torch.arange(p.shape[0] // B) * B + (B - 1)
        pg, ag, bg = _scan(p[ends], a[ends], b[ends], w * B, group_steps, dim=0)
        # each element: the blocks before its own (identity for block 0), decayed over its j+1 positions in the
        # block, then its own in-block prefix
        g = pos // B
        none = p.new_full((1, p.shape[1]), NEG_FILL)  # the identity, for block 0
        zero = p.new_zeros((1, p.shape[1]))
        pg = torch.cat([none, pg])[g] + (j + 1).to(w.dtype) * w
        ag, bg = torch.cat([zero, ag])[g], torch.cat([zero, bg])[g]
        p, a, b = _combine(pg, ag, bg, p, a, b)
    # wkv_t reads the state after token t-1, i.e. element t (element 0 = the carried state)
    p_prev, a_prev, b_prev = p[:-1], a[:-1], b[:-1]
    ww = u + k
    q = torch.maximum(p_prev, ww)
    e_state, e_tok = torch.exp(p_prev - q), torch.exp(ww - q)
    wkv = (e_state * a_prev + e_tok * v) / (e_state * b_prev + e_tok)
    return wkv, (a[-1], b[-1], p[-1])


class RWKV4Sequence(nn.Module):
    """forward(tokens [T] int64, att_x, att_aa, att_bb, att_pp, ffn_x each [L, C])
    -> (logits [1, V] of the last token, or [T, V] with all_logits=True; the five states after the last token).

    1 <= T <= max_chunk. Shares every parameter with `step` (an RWKV4Step); same dtype as `step`.
    """

    def __init__(self, step: RWKV4Step, all_logits: bool = False, max_chunk: int = DEFAULT_MAX_CHUNK):
        super().__init__()
        if not isinstance(step, RWKV4Step):
            raise TypeError(f"RWKV4Sequence is built from an RWKV4Step, got {type(step).__name__}")
        steps = (max_chunk + 1).bit_length() - 1
        if max_chunk < 1 or (1 << steps) != max_chunk + 1 or steps > MAX_SCAN_STEPS:
            raise RwkvExportError(f"max_chunk must be 2**m - 1 for 1 <= m <= {MAX_SCAN_STEPS}, got {max_chunk}")
        self.dims = step.dims
        self.options = step.options
        self.all_logits = all_logits
        self.max_chunk = max_chunk
        self.block_steps = min(BLOCK_STEPS, steps)
        self.group_steps = steps - self.block_steps
        # the same Parameter / Module objects as the step graph, under the same names
        self.emb = step.emb
        self.layers = step.layers
        self.ln_out_w, self.ln_out_b = step.ln_out_w, step.ln_out_b
        self.head = step.head
        self._new_state = step.new_state

    def forward(self, tokens, att_x, att_aa, att_bb, att_pp, ffn_x):
        every = self.options.rescale_every
        last_layer = len(self.layers) - 1
        x = F.embedding(tokens, self.emb)  # [T, C]
        new = {name: [] for name in STATE_NAMES}
        for i, layer in enumerate(self.layers):
            # dtypes as in the step graph: weights and activations in `cdt`; WKV, state and logits in `acc`
            # (fp32 and fp32, or fp16 and fp32 in the fp16 variant)
            cdt, acc = layer.att_key.dtype, layer.att_decay.dtype
            xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b)
            prev = _token_shift(xx, _to(att_x[i], cdt))
            xk, xv, xr = _mix(xx, prev, layer.att_mix)
            r = torch.sigmoid(xr @ layer.att_receptance)
            k = _to(xk @ layer.att_key, acc)
            v = _to(xv @ layer.att_value, acc)
            wkv, (aa, bb, pp) = wkv_scan(layer.att_decay, layer.att_first, k, v, att_aa[i], att_bb[i], att_pp[i],
                                         self.block_steps, self.group_steps)
            x = x + (r * _to(wkv, cdt)) @ layer.att_output
            xx2 = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b)
            prev2 = _token_shift(xx2, _to(ffn_x[i], cdt))
            if i == last_layer and not self.all_logits:
                # only the last token's logits are wanted: the last layer's FFN (~70% of its FLOPs) runs on that row
                x, xx2, prev2 = x[-1:], xx2[-1:], prev2[-1:]
            x = x + _ffn(layer, xx2, prev2)
            if every and (i + 1) % every == 0:
                x = x / 2
            for name, value in zip(STATE_NAMES, (_to(xx[-1], acc), aa, bb, pp, _to(xx2[-1], acc))):
                new[name].append(value)
        if not self.all_logits:
            x = x[-1:]
        x = F.layer_norm(x, x.shape[-1:], self.ln_out_w, self.ln_out_b)
        logits = _to(x @ self.head, att_pp.dtype)
        # chunk guard: more than max_chunk tokens exceed the scan's reach; answer NaN rather than wrong numbers
        too_long = (torch.arange(tokens.shape[0]) >= self.max_chunk).any()
        logits = logits + torch.where(too_long, float("nan"), 0.0).to(logits.dtype)
        return (logits, *(torch.stack(new[name]) for name in STATE_NAMES))

    def new_state(self) -> dict:
        return self._new_state()

    def example_inputs(self, n_tokens: int = 5) -> tuple:
        s = self.new_state()
        acc = self.layers[0].att_decay.dtype  # the state's dtype: fp32 in every variant (fp64 if made so for tests)
        return (torch.zeros(n_tokens, dtype=torch.long), *(s[n].to(acc) for n in STATE_NAMES))
