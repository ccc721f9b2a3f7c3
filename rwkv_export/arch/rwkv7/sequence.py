"""The RWKV-7 prompt ("sequence", GPT-mode) graph: T tokens + state -> logits + state, in one call.

Built from an existing `RWKV7Step`: it holds the very same Parameter objects (embedding with LN0 folded in, the
`_Layer`s, LN_out, head), so no weight is copied and initializer names match the step graph's. Every linear layer
is a matrix-matrix product over [T, C]; only the WKV couples the tokens.

The WKV is the delta-rule recurrence, per head, with S indexed (value, key):

    S_t = S_{t-1} diag(w_t) - (S_{t-1} kk_t) (kk_t a_t)^T + v_t k_t^T,   y_t = S_t r_t

Within a chunk it is computed exactly in the WY/UT form. With c_t = sum_{s<=t} log w_s (per channel, cumulative)
and X_t = S_t diag(e^{-c_t}), the update is X_t = X_{t-1} - z_t b~_t^T + v_t k~_t^T, where z_t = S_{t-1} kk_t,
b~ = kk a e^{-c}, k~ = k e^{-c}. So, rows t of [T, N] matrices (a~ = kk e^{c_{t-1}}, r~ = r e^{c_t}):

    z_t = S_0 (kk_t e^{c_{t-1}}) - sum_{s<t} z_s (b~_s . a~_t) + sum_{s<t} v_s (k~_s . a~_t)
    =>  (I + L_b) Z = A_0 S_0^T + L_k V,       L_b = strictly_lower(A~ B~^T), L_k = strictly_lower(A~ K~^T)
    Y = R_0 S_0^T - M_b Z + M_k V,             M_b = lower(R~ B~^T),          M_k = lower(R~ K~^T)
    S_T = S_0 diag(e^{c_T}) - Z^T (B e^{c_T - c}) + V^T (K e^{c_T - c})

The unit lower-triangular solve is exact and stable by doubling exactly inverted diagonal blocks
(unit_lower_inverse): log2(max_chunk) levels of two [H, n, n] matmuls. (The Neumann-product form
(I - L)(I + L^2)(I + L^4)..., same cost, is exact in exact arithmetic but lost everything in fp32 -- max|delta|/std
1.5 in the logits at n = 64, 6.5e-4 even at n = 16 -- for w ~ 1, a ~ 1 and a repeated token: its partial products
grow like binomial coefficients and cancel. The doubling form gave 9e-6 .. 3.6e-5 there, against 4e-6 .. 1.1e-5
for the fp32 step: when every update is nearly the same projection the right-hand side sums ~n near-parallel
terms that the solve then differences, so its fp32 error grows ~linearly with n.)

Range: the decay is bounded, log w >= DECAY_SCALE = -0.6065 per token, so within a chunk of n tokens
|c| <= 0.61 n. The pairwise factors only need ratios e^{c_t - c_s}; they are taken relative to the mid-point
ref = c_n / 2, so every exponent is within +-0.61 n / 2 (+-19.4 at n = 64: e^19.4 = 2.7e8, far inside fp32), and
the masked-out upper triangle (s > t), computed and then zeroed, stays below e^{0.61 n} |x||y| (7e16 |x||y| at
n = 64: finite). SUB_MAX bounds max_chunk for that reason.

The chunk is one block with T a dynamic dimension (1 <= T <= max_chunk; masks from arange(T)), so a short chunk
costs in proportion to its length: no padding. Runners feed longer prompts in chunks of max_chunk; more tokens in
one call would exceed the solve's reach, so such a call answers NaN logits and state (the chunk guard).

Cost and max_chunk (0.1B shapes, onnxruntime 1.32, 2 threads, a 2-core AMD EPYC shared with other jobs, load
5-8, so absolute numbers are pessimistic): a 64-token call took ~1.5 s, of which the [T, C] linear layers ~70%
and the WKV ~30% (its matmuls, ~145 MFLOP per layer against ~940 MFLOP of linear layers, run less efficiently).
max_chunk 32 and 64 were within noise (41-45 tok/s both, interleaved runs, T = 64 and 512); a bare [M, 768] x
[768, 3072] x [3072, 768] MatMul pair ran 0.53-0.65 ms/row at M = 64 against 0.88-0.91 at M = 32 and 0.53-0.60 at
M = 256-512, so 64 takes the GEMMs' gain and fits the fp32 range bound; beyond 64 would need a second level.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RwkvExportError
from ..base import cat_grouped, split_grouped
from .mapping import STATE_NAMES
from .step import RWKV7Step, _to

# Tokens per call (the module docstring says how it was chosen)
DEFAULT_MAX_CHUNK = 64
# The most tokens one call may hold: the pairwise decay factors reach e^{0.61 n} in the masked triangle
SUB_MAX = 64


def _token_shift(x, first):
    """Token shift over [T, C]: row t gets x[t-1], row 0 gets `first` [1, C]."""
    return torch.cat([first, x])[:-1]


def chunk_masks(n, steps: int, dtype):
    """The masks of a chunk of n <= 2**steps tokens (computed once per call, shared by the layers).

    masks [2n, 2n]: rows 0..n-1 (the a~ rows) keep s < t, rows n..2n-1 (the r~ rows) keep s <= t, in both column
    halves. block_masks: for m = 1, 2, 4, .., 2**(steps-1), the [n, n] mask of the lower-left m x m block inside
    each diagonal block of size 2m (t // 2m == s // 2m, t // m != s // m, t > s)."""
    i = torch.arange(n)
    t, s = i.unsqueeze(1), i.unsqueeze(0)
    strict, incl = t > s, t >= s
    masks = torch.cat([torch.cat([strict, strict], 1), torch.cat([incl, incl], 1)]).to(dtype)
    block_masks = [((t // (2 * m) == s // (2 * m)) & (t // m != s // m) & strict).to(dtype)
                   for m in (1 << j for j in range(steps))]
    return masks, block_masks


def unit_lower_inverse(L, block_masks):
    """(I + L)^{-1} for L [B, n, n] strictly lower triangular, exactly and stably.

    D_m, the inverse of the block-diagonal part of I + L with blocks of size m, doubles as
    D_2m = D_m - D_m C_m D_m, where C_m = L * block_masks[m] holds the lower-left m x m block of every 2m block
    ((D_m C_m)^2 = 0, so (I + D_m C_m)^{-1} = I - D_m C_m). D_1 = I, so the first level is a subtraction. Every
    factor is an exact inverse of a sub-block (bounded wherever the recurrence is: it is the recurrence's transfer
    over that block) times entries of L, so nothing cancels (unlike the Neumann product: module docstring)."""
    n = L.shape[-1]
    bmm = torch.bmm
    eye = (torch.arange(n).unsqueeze(1) == torch.arange(n).unsqueeze(0)).to(L.dtype)
    D = eye - L * block_masks[0]
    for bm in block_masks[1:]:
        D = D - bmm(bmm(D, L * bm), D)
    return D


def wkv_chunk(r, lw, k, v, kk, a, S0, masks, block_masks):
    """The WKV over one chunk of n tokens, exactly (the UT form of the module docstring).

    r, lw, k, v, kk, a: [H, n, N] (lw = log w); S0: [H, N, N] indexed (value, key); n <= SUB_MAX; `masks` and
    `block_masks` from chunk_masks(n). Returns y [H, n, N] and the state after the chunk, [H, N, N].
    Products are torch.bmm (exported as MatMul): `@` on 3-D operands goes through torch.export's matmul
    decomposition, which reshapes a strided operand (a slice, a transpose) and then guards on n != 1, which a
    dynamic T cannot have."""
    n = r.shape[-2]
    bmm = torch.bmm
    c = torch.cumsum(lw, -2)  # c_t = sum_{s<=t} log w_s
    ref = 0.5 * c[..., -1:, :]  # [H, 1, N]: half the chunk's total decay
    Einv = torch.exp(ref - c)
    AR = torch.cat([kk * torch.exp(c - lw - ref), r * torch.exp(c - ref)], -2)  # [a~; r~]: [H, 2n, N]
    BK = torch.cat([kk * a * Einv, k * Einv], -2)  # [b~; k~]: [H, 2n, N]
    er = torch.exp(ref)  # the decay from the chunk's start to its mid-point
    S0e = S0 * er  # S0 diag(e^{ref}): what a~ and r~ (relative to ref) see of the carried state
    Gm = bmm(AR, BK.transpose(1, 2)) * masks  # [[L_b, L_k], [M_b, M_k]]: [H, 2n, 2n]
    AS = bmm(AR, S0e.transpose(1, 2))  # [A_0 S_0^T; R_0 S_0^T]: [H, 2n, N]
    # Z = (I + L_b)^{-1} (A_0 S_0^T + L_k V); the inverse by doubling the size of exactly inverted diagonal blocks
    Z = bmm(unit_lower_inverse(Gm[:, :n, :n], block_masks), AS[:, :n] + bmm(Gm[:, :n, n:], v))
    ZV = torch.cat([-Z, v], -2)  # [H, 2n, N]
    y = AS[:, n:] + bmm(Gm[:, n:], ZV)
    S = (S0e + bmm(ZV.transpose(1, 2), BK)) * er  # S_0 diag(e^{c_n}) - Z^T B e^{c_n - c} + V^T K e^{c_n - c}
    return y, S


class RWKV7Sequence(nn.Module):
    """forward(tokens [T] int64, att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C])
    -> (logits [1, V] of the last token, or [T, V] with all_logits=True; the states after the last token).

    1 <= T <= max_chunk. Shares every parameter with `step` (an RWKV7Step); same dtypes as `step`.
    """

    def __init__(self, step: RWKV7Step, all_logits: bool = False, max_chunk: int = DEFAULT_MAX_CHUNK):
        super().__init__()
        if not isinstance(step, RWKV7Step):
            raise TypeError(f"RWKV7Sequence is built from an RWKV7Step, got {type(step).__name__}")
        if not 1 <= max_chunk <= SUB_MAX:
            raise RwkvExportError(f"max_chunk must be 1 .. {SUB_MAX}, got {max_chunk}")
        self.arch, self.dims, self.state_spec = step.arch, step.dims, step.state_spec
        self.options = step.options
        self.all_logits = all_logits
        self.embedding = step.embedding  # also output `hidden` (last token) and `hidden_sum` (the chunk's tokens)
        self.max_chunk = max_chunk
        self.steps = max(1, (max_chunk - 1).bit_length())  # 2**steps >= max_chunk: the inverse's levels
        self.emb = step.emb
        self.layers = step.layers
        self.ln_out_w, self.ln_out_b = step.ln_out_w, step.ln_out_b
        self.head = step.head
        self._new_state = step.new_state

    def forward(self, tokens, att_x, att_kv, ffn_x):
        H, N = self.dims.n_head, self.dims.head_size
        T = tokens.shape[0]
        last = len(self.layers) - 1
        x = F.embedding(tokens, self.emb)  # [T, C]
        att_x, ffn_x = split_grouped(att_x), split_grouped(ffn_x)
        att_kv = [s.squeeze(0) for s in split_grouped(att_kv)]  # L x [H, N, N]
        new_x, new_kv, new_f = [], [], []
        v_first = None

        masks, block_masks = chunk_masks(T, self.steps, self.layers[0].acc)

        def heads(*ts):  # each [T, C] -> [H, T, N]: one Concat + Reshape + Transpose + Split for the six
            return torch.stack(ts).reshape(len(ts), T, H, N).transpose(1, 2).unbind(0)

        for i, layer in enumerate(self.layers):
            cdt = layer.cdt
            xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b)
            prev = _token_shift(xx, _to(att_x[i], cdt))
            r, lw, k, v, kk, a, g, v_first = layer.projections(xx, prev, v_first, one_row=False)
            y, S = wkv_chunk(*heads(r, lw, k, v, kk, a), att_kv[i], masks, block_masks)
            y = y.transpose(0, 1)  # [T, H, N]
            x = x + layer.head_out(y, r, k, v, g)
            xx2 = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b)
            prev2 = _token_shift(xx2, _to(ffn_x[i], cdt))
            if i == last and not (self.all_logits or self.embedding):
                x, xx2, prev2 = x[-1:], xx2[-1:], prev2[-1:]
            x = x + layer.ffn(xx2, prev2)
            new_x.append(_to(xx[-1:], att_x[i].dtype))
            new_kv.append(S)
            new_f.append(_to(xx2[-1:], ffn_x[i].dtype))
        if not (self.all_logits or self.embedding):
            x = x[-1:]
        x = F.layer_norm(x, x.shape[-1:], self.ln_out_w, self.ln_out_b)
        acc = att_kv[0].dtype
        # the final hidden states of every token (embedding): the last one's, and their sum (for a mean)
        hidden = (_to(x[-1:], acc), _to(x, acc).sum(0, keepdim=True)) if self.embedding else ()
        if self.embedding and not self.all_logits:
            x = x[-1:]
        logits = _to(x @ self.head, acc)
        # chunk guard: more than max_chunk tokens exceed the exact solve's reach; answer NaN (logits and state, so
        # that a caller keeping only the state cannot go on from a wrong one) rather than wrong numbers
        too_long = (torch.arange(T) >= self.max_chunk).any()
        nan = torch.where(too_long, float("nan"), 0.0)
        rest = (cat_grouped(new_x), cat_grouped([s.unsqueeze(0) for s in new_kv]), cat_grouped(new_f), *hidden)  # the states, then any hidden
        return (logits + nan.to(logits.dtype), *(t + nan.to(t.dtype) for t in rest))

    def new_state(self) -> dict:
        return self._new_state()

    def example_inputs(self, n_tokens: int = 5) -> tuple:
        s = self.new_state()
        dt = self.layers[0].acc
        return (torch.zeros(n_tokens, dtype=torch.long), *(s[n].to(dt) for n in STATE_NAMES))
