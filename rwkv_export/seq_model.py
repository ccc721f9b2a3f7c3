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

Two levels keep the scan cheap. The n = T + 1 elements are laid out as [G, 8, C] blocks (the last block filled up
with copies of the last element, which no real prefix sees). Level 1 runs the step recurrence along the 8 positions
of every block at once: 7 combines on [G, C] slices. Level 2 is a Hillis-Steele scan over the G block totals (steps
d = 1, 2, 4, ..., decay 8w per block), and one last combine brings each element what precedes its block. The graph
takes any T up to `max_chunk` (a dynamic dimension); runners feed longer prompts in chunks. More tokens than the scan
covers would give wrong numbers, so the graph answers such a call with NaN logits (the chunk guard).

What the scan costs is mostly onnxruntime's per-node overhead and passes over memory, not arithmetic; measured with
12 layers' scans alone at C = 768 on a 2-core Intel Xeon (interleaved runs, T = 64 / 255): the earlier form (Hillis-
Steele steps inside flat blocks, shifts as Pad + Slice, a and b apart, exp unfloored) 44 / 139 ms; flooring exp
(EXP_FLOOR) 33 / 106 ms; shifts as one Gather each and a, b stacked 26 / 69 ms; the sequential level 1 here 20-25 /
63-78 ms. Tried and not kept: computing level 1's exponents first and then every weight at once (fewer nodes, yet
29 vs 27 ms), blocks of 4 (slower at both T), blocks of 16 (same at T = 64, faster at 255, but twice the fp32
error), the group level as one pairwise [G, G, C] step (T = 64 5 % faster, T = 255 37 % slower).

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
# Blocks of 2**BLOCK_STEPS elements (level 1 runs along them); the block totals are scanned in a second level.
BLOCK_STEPS = 3
MAX_SCAN_STEPS = 12  # 4096 tokens per call: past that the [T, F] activations alone pass 50 MB per layer
# "Minus infinity" for positions before the chunk: finite in fp32 (so p - max never meets -inf - -inf), and so
# negative that exp of it, shifted by any real exponent or decay, is exactly 0.
NEG_FILL = -1.0e30
# Every exponent difference goes through exp floored at -60 (e^-60 = 8.7e-27). In every combine one side has weight
# exactly 1 (its exponent is the max), so the floor changes a result by at most e^-60 of it: nothing at fp32 (or
# fp64) resolution. Without the floor, onnxruntime's Exp takes a slow path for inputs below about -88, where its
# result is subnormal: 20x slower per element on an Intel Xeon (380 vs 18 us for 65 x 768 inputs), and the scan
# meets such inputs everywhere (masked positions, fast-decaying channels over many tokens). -60 rather than -87:
# the products of e^-60 with the scan's (a, b) values stay normal numbers too.
EXP_FLOOR = -60.0


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


def _exp(x):
    """exp of an exponent difference (always <= 0 here), floored at EXP_FLOOR: see EXP_FLOOR."""
    return torch.exp(torch.clamp(x, min=EXP_FLOOR))


def _combine(p_left, ab_left, p, ab):
    """(e^p_left ab_left) + (e^p ab) in the stable form: the new exponent is the larger one. ab: (a, b) stacked on
    the first dimension, so one op serves both."""
    p_new = torch.maximum(p_left, p)
    return p_new, ab_left * _exp(p_left - p_new) + ab * _exp(p - p_new)


def wkv_scan(w, u, k, v, aa, bb, pp, block_steps: int, group_steps: int):
    """WKV over a chunk. w, u, aa, bb, pp: [C]; k, v: [T, C] with T < 2**(block_steps + group_steps).

    Returns (wkv [T, C], (aa, bb, pp) after the last token), equal to T applications of the step recurrence.
    """
    B, C = 1 << block_steps, k.shape[1]
    n = k.shape[0] + 1  # the carried state + T tokens
    G = (n + B - 1) // B  # blocks
    # The carried state is element 0 and token t element t+1: A_0 = e^w A_{-1} + e^{k_0} v_0 is the same combine as
    # between any two tokens. a and b travel stacked, [2, ...].
    tok = torch.stack([v, torch.ones_like(v)])  # [2, T, C]: each token's own (a, b), at exponent k
    p = torch.cat([pp.unsqueeze(0), k])  # [n, C]
    ab = torch.cat([torch.stack([aa, bb]).unsqueeze(1), tok], 1)  # [2, n, C]
    # blocks of B elements, [G, B, C]: the last block is filled up by repeating the last element (a Gather, as
    # torch.export cannot pad by an amount that depends on T). Fill elements come after every real one, so no real
    # prefix sees them.
    fill = torch.arange(G * B).clamp(max=n - 1)
    P, AB = p.index_select(0, fill).reshape(G, B, C), ab.index_select(1, fill).reshape(2, G, B, C)
    # level 1: the step recurrence along each block, all G blocks at once (B - 1 combines on [G, C] slices)
    ps, abs_ = list(P.split(1, 1)), list(AB.split(1, 2))
    for j in range(1, B):
        ps[j], abs_[j] = _combine(ps[j - 1] + w, abs_[j - 1], ps[j], abs_[j])
    # level 2: Hillis-Steele over the block totals (decay B*w per block). Step d combines the total d blocks
    # earlier; for the first d blocks there is none: a Gather of block 0 whose exponent a mask sets to NEG_FILL.
    pg, abg = ps[-1].squeeze(1), abs_[-1].squeeze(2)
    blocks = torch.arange(G)
    for s in range(group_steps):
        d = 1 << s
        earlier = (blocks - d).clamp(min=0)
        mask = torch.where(blocks.unsqueeze(-1) >= d, 0.0, NEG_FILL)
        pg, abg = _combine(pg.index_select(0, earlier) + (mask + w * (d * B)), abg.index_select(1, earlier), pg, abg)
    # what precedes each block (block 0: the identity, p = NEG_FILL, a = b = 0), decayed over the j+1 positions to
    # each element j of the block, combined into the element's in-block prefix
    pg = torch.cat([p.new_full((1, C), NEG_FILL), pg]).index_select(0, blocks)
    abg = torch.cat([ab.new_zeros((2, 1, C)), abg], 1).index_select(1, blocks)
    decay = torch.arange(1, B + 1).to(w.dtype).unsqueeze(-1) * w  # [B, C]
    P, AB = _combine(pg.unsqueeze(1) + decay, abg.unsqueeze(2), torch.cat(ps, 1), torch.cat(abs_, 2))
    # back to [n, C], without the fill (a Gather of the first n rows: a slice would make torch.export guard on
    # n <= G * B, which it cannot prove)
    real = torch.arange(n)
    P, AB = P.reshape(G * B, C).index_select(0, real), AB.reshape(2, G * B, C).index_select(1, real)
    # wkv_t reads the state after token t-1, i.e. element t (element 0 = the carried state)
    p_prev = P[:-1]
    ww = u + k
    q = torch.maximum(p_prev, ww)
    num_den = AB[:, :-1] * _exp(p_prev - q) + tok * _exp(ww - q)
    return num_den[0] / num_den[1], (AB[0, -1], AB[1, -1], P[-1])


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
