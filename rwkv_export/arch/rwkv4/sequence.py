"""The RWKV-4 prompt ("sequence", GPT-mode) graph: T tokens + state -> logits + state, in one call.

Built from an existing `RWKV4Step`: it holds the very same Parameter objects (embedding with LN0 folded in, the
`_Layer`s, LN_out, head), so no weight is copied and initializer names match the step graph's.

Every linear layer is a matrix-matrix product over [T, C] (`x @ W`, exported as MatMul). Only the WKV recurrence
couples the tokens; it runs inside the graph as a parallel prefix scan over the chunk:

    A_t = e^w A_{t-1} + e^{k_t} v_t,   B_t = e^w B_{t-1} + e^{k_t},   (A_{-1}, B_{-1}) = the carried state
    wkv_t = (A_{t-1} + e^{u+k_t} v_t) / (B_{t-1} + e^{u+k_t})

Each scan element is held as (p, a, b) meaning (e^p a, e^p b) -- the state's own (att_pp, att_aa, att_bb) form;
token t is the element (k_t, v_t, 1). Combining the segment that ends d tokens earlier (which decays by e^{d w} on
the way) into element t is

    p' = max(p_{t-d} + d w, p_t),   (a, b)' = (a, b)_{t-d} e^{p_{t-d} + d w - p'} + (a, b)_t e^{p_t - p'}

Every exponent is <= 0 and the max is always finite (a k, or the carried pp), so no exp overflows whatever the decay,
and "nothing yet" is a finite identity (p = NEG_FILL, a = b = 0), so no -inf - -inf appears. Results are in the
max-normalised form the step graph keeps (its pp is the max over the same exponents), so the final (att_aa, att_bb,
att_pp) compare tensor by tensor with T steps of the step graph.

Two levels keep the scan cheap. The T tokens are laid out as [8, G, C] (position in block, block, channel; the last
block filled up with copies of the last token, which no real prefix sees). Level 1 runs the step recurrence along
the 8 positions of every block at once: 7 combines on [G, C] slices, keeping each position's exclusive prefix. Level
2 is a Hillis-Steele scan (steps d = 1, 2, 4, ..., decay 8w per block) over rows [carried state, block totals],
which gives the state before every block. wkv is then one three-way combine per token (the state before its block
decayed to its position, its exclusive in-block prefix, itself with the bonus u): the full [T, C] tensors are
touched by about 30 elementwise passes per layer, the [G, C] slices by ~150 small nodes. The graph takes any T up to
`max_chunk` (a dynamic dimension); runners feed longer prompts in chunks. More tokens than the scan covers would give
wrong numbers, so the graph answers such a call with NaN logits (the chunk guard).

What the scan costs is onnxruntime's passes over memory and per-node overhead, not arithmetic (on the 2-core Xeon an
Add over [64, 768] takes ~17 us and is not split across threads; one over [9, 768] ~3 us). Measured with 12 layers'
scans alone at C = 768 on a 2-core Intel Xeon (interleaved runs, T = 64 / 255): the first form (Hillis-Steele steps
inside flat blocks, shifts as Pad + Slice, a and b apart, exp unfloored) 44 / 139 ms; flooring exp (EXP_FLOOR) 33 /
106 ms; shifts as one Gather each and a, b stacked 26 / 69 ms; a sequential level 1 with the carried state as
element 0 and inclusive prefixes combined with the block's predecessor, then wkv from them, 20-25 / 63-78 ms; the
form here (state as a level-2 row, exclusive prefixes, wkv as one three-way combine: ~20 fewer [T, C] passes per
layer) 16 / 49-52 ms. Tried and not kept: computing level 1's exponents first and then every weight at once (fewer
nodes, more [T, C] passes: no faster), blocks of 4 (slower at both T), blocks of 16 (same at T = 64, faster at 255,
but twice the fp32 error), the group level as one pairwise [G, G, C] step (T = 64 5 % faster, T = 255 37 % slower).

Why not the pairwise [T, T, C] form (all i < t weights at once, max-subtracted): exact too, but ~8 passes over
T*T*C numbers per layer; at C = 768, T = 64 onnxruntime took 33 ms per layer for it against ~5 ms for a one-level
scan (measured on the 2-core box, one thread).

With all_logits=False (the default) only the last token's logits are computed: the head is one row instead of T, and
the last layer runs its FFN on the last row only (~6% fewer FLOPs at 169M shapes). With `embedding` (the step
module's flag, rwkv_export/embed.py) every row goes through it and ln_out: the graph also outputs the last token's
final hidden state (`hidden`) and the sum over the chunk's tokens (`hidden_sum`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RwkvExportError
from ..base import cat_grouped
from .step import STATE_NAMES, RWKV4Step, _Layer

# Tokens per call: 2**m - 1 (the scan would now take 2**m; 2**m - 1 was its reach when the carried state was one of
# its elements, and manifests and clients know it). At 169M shapes a 512-token prompt ran at 417 / 730 tok/s (1 / 2
# threads) in chunks of <= 255 against 383 / 595 in chunks of 64 (GEMMs reuse each weight over more rows;
# benchmarks/bench_prefill.py --explore), and the two-level scan makes a large max_chunk cost nothing at small T.
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
    (the step graph's `prev + (xx - prev) * mix`, one row of `mix` per matmul input). One mix at a time rather than
    the step graph's stacked [M, T, C] + Split: over T rows that is M fewer passes over memory (the split's copy)."""
    diff = xx - prev
    return tuple(prev + diff * m for m in mix.unbind(0))


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
    """WKV over a chunk. w, u, aa, bb, pp: [C]; k, v: [T, C] with T <= 2**(block_steps + group_steps).

    Returns (wkv [T, C], (aa, bb, pp) after the last token, each [1, C]), equal to T applications of the step
    recurrence.
    """
    B, C, T = 1 << block_steps, k.shape[1], k.shape[0]
    G = (T + B - 1) // B  # blocks
    # Tokens in position-major blocks [B, G, C]: token g*B + j sits at [j, g], so each position's slice across the
    # blocks is contiguous. The last block is filled up by repeating the last token (a Gather, as torch.export
    # cannot pad by an amount that depends on T); fill elements come after every real token, so no real prefix and
    # no block total that is used sees them. a and b travel stacked, [2, ...]: a token's own is (v, 1) at exponent k.
    fill = (torch.arange(B).unsqueeze(1) + torch.arange(G).unsqueeze(0) * B).reshape(-1).clamp(max=T - 1)
    P = k.index_select(0, fill).reshape(B, G, C)
    V = v.index_select(0, fill).reshape(1, B, G, C)
    AB = torch.cat([V, torch.ones_like(V)])  # [2, B, G, C]
    # level 1: the step recurrence along the B positions of every block at once, on [1, G, C] slices, keeping each
    # position's exclusive prefix (position 0: the identity, p = NEG_FILL, a = b = 0)
    ps, abs_ = P.split(1, 0), AB.split(1, 1)
    xp = [P.new_full((1, 1, C), NEG_FILL).expand(1, G, C)]
    xab = [AB.new_zeros((2, 1, 1, C)).expand(2, 1, G, C)]
    for j in range(1, B):
        cur = _combine(xp[-1] + w, xab[-1], ps[j - 1], abs_[j - 1]) if j > 1 else (ps[0], abs_[0])
        xp.append(cur[0])
        xab.append(cur[1])
    total = _combine(xp[-1] + w, xab[-1], ps[-1], abs_[-1]) if B > 1 else (ps[0], abs_[0])
    # level 2: Hillis-Steele over rows [identity, carried state, block totals]: row g + 1 is the state before block g
    # (after token g*B - 1), and a row decays by B*w per block. Step d combines the row d earlier; the rows before
    # the first real one gather the identity (row 0), which stays the identity.
    pg = torch.cat([pp.new_full((1, C), NEG_FILL), pp.unsqueeze(0), total[0].squeeze(0)])  # [G + 2, C]
    abg = torch.cat([AB.new_zeros((2, 1, C)), torch.stack([aa, bb]).unsqueeze(1), total[1].squeeze(1)], 1)
    rows = torch.arange(G + 2)
    for s in range(group_steps):
        d = 1 << s
        earlier = (rows - d).clamp(min=0)
        pg, abg = _combine(pg.index_select(0, earlier) + w * (d * B), abg.index_select(1, earlier), pg, abg)
    before = torch.arange(1, G + 1)
    rp, rab = pg.index_select(0, before), abg.index_select(1, before)  # the state before each block: [G, C]
    # wkv at [j, g] in one three-way combine: the state before the block decayed over j positions, the exclusive
    # in-block prefix, and the token's own with the bonus u
    Xp, Xab = torch.cat(xp), torch.cat(xab, 1)
    pr = rp + torch.arange(B).to(w.dtype).reshape(B, 1, 1) * w  # [B, G, C]
    pu = P + u
    m = torch.maximum(torch.maximum(pr, Xp), pu)
    S = rab.unsqueeze(1) * _exp(pr - m) + Xab * _exp(Xp - m) + AB * _exp(pu - m)
    # back to token order (token g*B + j at flat j*G + g; a Gather of the first T: a slice would make torch.export
    # guard on T <= G * B, which it cannot prove)
    order = (torch.arange(G).unsqueeze(1) + torch.arange(B).unsqueeze(0) * G).reshape(-1)
    flat = order.index_select(0, torch.arange(T))  # token t's flat index in [B, G]
    wkv = (S[0] / S[1]).reshape(B * G, C).index_select(0, flat)
    # the state after the last token: the state before it (in the last block), decayed one step, combined with the
    # token itself. [1, C] rows throughout, so that the layers' states concatenate without Unsqueeze nodes.
    last = flat[-1:]
    before_p, before_ab = _combine(pr.reshape(B * G, C).index_select(0, last), rab[:, -1:],
                                   Xp.reshape(B * G, C).index_select(0, last), Xab.reshape(2, B * G, C)[:, last])
    v_last = v[-1:]
    p, ab = _combine(before_p + w, before_ab, k[-1:], torch.stack([v_last, torch.ones_like(v_last)]))
    return wkv, (ab[0], ab[1], p)


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
        self.arch, self.dims, self.state_spec = step.arch, step.dims, step.state_spec
        self.options = step.options
        self.all_logits = all_logits
        self.embedding = step.embedding  # also output `hidden` (last token) and `hidden_sum` (the chunk's tokens)
        self.max_chunk = max_chunk
        self.block_steps = min(BLOCK_STEPS, steps)
        self.group_steps = steps - self.block_steps
        # the same Parameter / Module objects as the step graph, under the same names
        self.emb = step.emb
        self.layers = step.layers
        self.ln_out_w, self.ln_out_b = step.ln_out_w, step.ln_out_b
        self.head = step.head
        self.prepared = step.prepared  # a lazy step's weights (step.py): the prompt graph reads the same ones
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
            if i == last_layer and not (self.all_logits or self.embedding):
                # only the last token's logits are wanted: the last layer's FFN (~70% of its FLOPs) runs on that row
                x, xx2, prev2 = x[-1:], xx2[-1:], prev2[-1:]
            x = x + _ffn(layer, xx2, prev2)
            if every and (i + 1) % every == 0:
                x = x / 2
            for name, value in zip(STATE_NAMES, (_to(xx[-1:], acc), aa, bb, pp, _to(xx2[-1:], acc))):
                new[name].append(value)  # [1, C] rows
        if not (self.all_logits or self.embedding):
            x = x[-1:]
        x = F.layer_norm(x, x.shape[-1:], self.ln_out_w, self.ln_out_b)
        if self.embedding:  # the final hidden states of every token: the last one's, and their sum (for a mean)
            hidden, hidden_sum = _to(x[-1:], att_pp.dtype), _to(x, att_pp.dtype).sum(0, keepdim=True)
            x = x if self.all_logits else x[-1:]
        logits = _to(x @ self.head, att_pp.dtype)
        # chunk guard: more than max_chunk tokens exceed the scan's reach; answer NaN rather than wrong numbers
        too_long = (torch.arange(tokens.shape[0]) >= self.max_chunk).any()
        nan = torch.where(too_long, float("nan"), 0.0).to(logits.dtype)
        logits = logits + nan
        out = (logits, *(cat_grouped(new[name]) for name in STATE_NAMES))
        return (*out, hidden + nan, hidden_sum + nan) if self.embedding else out

    def new_state(self) -> dict:
        return self._new_state()

    def example_inputs(self, n_tokens: int = 5) -> tuple:
        s = self.new_state()
        acc = self.layers[0].att_decay.dtype  # the state's dtype: fp32 in every variant (fp64 if made so for tests)
        return (torch.zeros(n_tokens, dtype=torch.long), *(s[n].to(acc) for n in STATE_NAMES))
