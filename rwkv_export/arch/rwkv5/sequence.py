"""The RWKV-5.2 prompt ("sequence", GPT-mode) graph: T tokens + state -> logits + state, in one call. RWKV-6's
(rwkv6/sequence.py) is this module over RWKV-6 blocks: only the decay differs (per channel here, per channel and
token there), and wkv_chunk takes it per token either way.

Built from an existing step module: it holds the very same Parameter objects (embedding with LN0 folded in, the
layers, LN_out, head), so no weight is copied and initializer names match the step graph's. Every linear layer is a
matrix-matrix product over [T, C]; only the WKV couples the tokens.

The WKV, per head, with S indexed (key, value) and lw_t = log w_t <= 0 per key channel:

    S_t = diag(w_t) S_{t-1} + k_t^T v_t,        y_t = r_t S_{t-1} + (r_t . u . k_t) v_t

exact within the chunk, in a closed chunked form. Why not RWKV-7's strategy (one closed-form block of up to 64
tokens with the cumulative decay factored as e^{c_t - ref} e^{ref - c_s}): it needs a bounded decay (x070's log
decay is >= -0.61 per token), and v5/v6's is not (w = exp(-exp(d)): trained models have channels at lw = -20 and
beyond, data-dependent in v6), so those factors overflow fp32 within a few tokens. Here every exponent is a sum of
log decays over the tokens *between* two positions, so it is <= 0 and each weight is at most 1, and each such sum is
computed directly as a sum of those terms (a constant 0/1 matrix times lw: one MatMul), never as a difference of two
prefix sums: a weight's relative error is that of its own sum (~b eps), whatever decay came before. (A difference of
prefix sums loses eps * |prefix| in the exponent: 2e-5 in fp32 on the weight-1 nearest-token term after 16 tokens
at lw = -20.)

Two levels, so that the pairwise work is T * b / 2, not T^2 / 2:
- level 1: the chunk is cut into G = ceil(T / b) blocks of b = `block` tokens (the last padded with tokens whose
  k = 0 and lw = 0: they change nothing). Within a block, for the b(b-1)/2 pairs s < t only:
  A[t, s] = sum_i r_t,i k_s,i e^{D[t,s,i]}, D[t,s] = sum_{s<j<t} lw_j, then y = A V + (r . u . k) v;
- level 2: block g's own contribution to the state after it, U_g = (K e^{sum_{j>s} lw_j})^T V, and its decay
  a_g = e^{sum lw}; the state is carried block to block, S <- a_g S + U_g, in max_chunk / b unrolled steps (blocks
  past G are identities), and y += (r e^{sum_{j<t} lw_j}) S_before_g for the block's tokens.
More than max_chunk tokens would need more block steps than the graph has: such a call answers NaN logits (the chunk
guard), as the RWKV-4 and RWKV-7 prompt graphs do.

Measured (onnxruntime 1.32, 1 thread, the 2-core AMD EPYC box, loaded; the WKV of one layer at C = 768, min of 15):
T = 64: blocks of 8 3.8 ms, of 16 4.4 ms, of 32 9.1 ms; the literal recurrence unrolled in the graph (T static,
its best case) 11.5 ms. T = 16: 1.7 / 1.5 / 4.5 ms. A first form that summed the states before each block directly
(a [G+1, G] weight per channel, a bmm over the 768 channels) and gathered pair operands along the last axis ran
2-3x slower: onnxruntime's many tiny GEMMs and its strided Gather. In the whole 12 x 768 x 65536 prompt graph at
T = 64 the WKV is ~11% of the time, the linear layers ~85%.

exp is floored at EXP_FLOOR: onnxruntime's Exp takes a slow path for results below fp32's normal range (2x on this
CPU, 20x on a Xeon); a floored weight is below e^-60 of the weight-1 nearest-token term of its sum.

With all_logits=False (the default) only the last token's logits are computed, and the last layer runs its FFN on
the last row only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RwkvExportError
from ..base import cat_grouped, split_grouped
from .mapping import STATE_NAMES
from .step import RWKV5Step, _to

# Tokens per call. At 12 x 768 x 65536 a 256-token prompt ran at the same rate in calls of 64 and of 128 (115 / 113
# tok/s, 1 thread, loaded 2-core box; the step graph: 11.5 tok/s): 64 keeps the graph's unrolled block steps few.
DEFAULT_MAX_CHUNK = 64
# Tokens per level-1 block (module docstring: 8 was the fastest at T = 64); level 2 unrolls max_chunk / BLOCK steps
BLOCK = 8
# A bound on max_chunk: level 2 is max_chunk / BLOCK unrolled steps (128 at 1024 tokens)
MAX_CHUNK_LIMIT = 1024
EXP_FLOOR = -60.0


def _exp(x):
    """exp of a log weight (<= 0), floored at EXP_FLOOR."""
    return torch.exp(torch.clamp(x, min=EXP_FLOOR))


class BlockConstants(nn.Module):
    """The constant 0/1 matrices of a block of b tokens, made once (buffers: one initializer each in the graph,
    shared by the layers, nothing for the tracer to redo per layer):
    - tp, sp: the pairs (t, s), s < t, t-major (b(b-1)/2 of them);
    - pair_sums [pairs, b]: M @ lw gives each pair's D = sum_{s<j<t} lw_j;
    - rest_sums [2b + 1, b]: the sums before each token sum_{j<t}, after each token sum_{j>s}, and the block total;
    - scatter [b*b, pairs]: from the pairs back to a [b, b] matrix, zero where s >= t."""

    def __init__(self, b: int, dtype=torch.float32):
        super().__init__()
        pairs = [(t, s) for t in range(b) for s in range(t)]
        tp = torch.tensor([t for t, _ in pairs], dtype=torch.long)
        sp = torch.tensor([s for _, s in pairs], dtype=torch.long)
        j = torch.arange(b)
        pair = (sp.unsqueeze(1) < j) & (j < tp.unsqueeze(1))
        rest = torch.cat([j.unsqueeze(1) > j, j.unsqueeze(1) < j, torch.ones(1, b, dtype=torch.bool)])
        scatter = torch.arange(b * b).unsqueeze(1) == (tp * b + sp).unsqueeze(0)
        self.b = b
        for name, t in (("tp", tp), ("sp", sp), ("pair_sums", pair.to(dtype)), ("rest_sums", rest.to(dtype)),
                        ("scatter", scatter.to(dtype))):
            self.register_buffer(name, t, persistent=False)


def _left(M, x):
    """A constant matrix M [m, b] times every block x [G, b, C]: [G, m, C]. (bmm of the broadcast M: torch's matmul
    would fold the batch into a transposed operand and guard on G != 1; onnxruntime runs G GEMMs C wide.)"""
    return torch.bmm(M.expand(x.shape[0], -1, -1), x)


def wkv_chunk(r, k, v, lw, u, S0, consts: BlockConstants, n_blocks: int, per_token_decay: bool = True):
    """The v5/v6 WKV over a chunk of T <= consts.b * n_blocks tokens, in blocks of consts.b. r, k, v [T, C]; lw
    [T, C], or [1, C] with per_token_decay=False (v5: the same for every token); u [H, N, 1]; S0 [1, H, N, N]
    (key, value). Returns (y [T, H, 1, N], S [1, H, N, N] after the last token)."""
    H, N = u.shape[0], u.shape[1]
    T, C = k.shape
    b = consts.b
    G = (T + b - 1) // b
    P = G * b
    pos = torch.arange(P)
    idx = pos.clamp(max=T - 1)  # pad with copies of the last token (a Gather: no T-dependent Pad), then neutralise
    valid = (pos < T).to(k.dtype).unsqueeze(1)  # [P, 1]

    def heads(x):  # [G, b', C] -> [G, H, b', N]
        return x.reshape(G, -1, H, N).transpose(1, 2)

    # token-major blocks [G, b, C]; padded tokens get k = 0 and lw = 0 (w = 1): they change nothing
    lw = ((lw.index_select(0, idx) if per_token_decay else lw) * valid).reshape(G, b, C)
    r = r.index_select(0, idx).reshape(G, b, C)
    k = (k.index_select(0, idx) * valid).reshape(G, b, C)
    v = heads(v.index_select(0, idx).reshape(G, b, C))  # [G, H, b, N]
    before, after, total = _left(consts.rest_sums, lw).split([b, b, 1], dim=1)  # [G, b, C], [G, b, C], [G, 1, C]
    # level 1: the pairs s < t within a block (only those: b(b-1)/2 of the b^2), and the current token's bonus u
    bonus = (r * k * u.reshape(1, 1, C)).reshape(G, b, H, N).sum(-1)  # [G, b, H]
    y = bonus.transpose(1, 2).unsqueeze(-1) * v  # [G, H, b, N]
    if b > 1:
        E = _exp(_left(consts.pair_sums, lw))  # [G, pairs, C]
        A = (r.index_select(1, consts.tp) * k.index_select(1, consts.sp) * E).reshape(G, -1, H, N).sum(-1)
        # [G, pairs, H] -> [G, H, b(t), b(s)], zero where s >= t
        y = y + _left(consts.scatter, A).reshape(G, b, b, H).permute(0, 3, 1, 2) @ v
    # level 2: the state carried block to block, S <- a_g S + U_g (a_g the block's decay, U_g its own contribution),
    # in n_blocks unrolled steps; the blocks past G are identities (a = 1, U = 0)
    U = heads(k * _exp(after)).transpose(-1, -2) @ v  # [G, H, N(key), N(value)]
    a = _exp(total).reshape(G, H, N, 1)
    gi = torch.arange(n_blocks)
    gi = torch.where(gi < G, gi, G)  # row G: the identity appended below
    a = torch.cat([a, torch.ones_like(a[:1])]).index_select(0, gi)
    U = torch.cat([U, torch.zeros_like(U[:1])]).index_select(0, gi)
    S, states = S0, []
    for a_g, U_g in zip(split_grouped(a), split_grouped(U)):
        states.append(S)
        S = a_g * S + U_g
    S_before = cat_grouped(states).index_select(0, torch.arange(G).clamp(max=n_blocks - 1))  # [G, H, N, N]
    y = y + heads(r * _exp(before)) @ S_before  # [G, H, b, N]
    y = y.transpose(1, 2).reshape(P, H, 1, N).index_select(0, torch.arange(T))
    return y, S


def _token_shift(x, first):
    """Token shift over [T, C]: row t gets x[t-1], row 0 gets `first` [1, C]. (cat, then drop the last row: slicing
    x[:-1] first would make torch.export guard on T != 2 for the concatenation's contiguity check.)"""
    return torch.cat([first, x])[:-1]


class RWKV5Sequence(nn.Module):
    """forward(tokens [T] int64, att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C])
    -> (logits [1, V] of the last token, or [T, V] with all_logits=True; the states after the last token).

    1 <= T <= max_chunk (more: NaN logits). Shares every parameter with `step` (an RWKV5Step, or an RWKV6Step for
    RWKV6Sequence); same dtypes as `step`. `block`: the level-1 block size (tests vary it).
    """

    step_class = RWKV5Step

    def __init__(self, step, all_logits: bool = False, max_chunk: int = DEFAULT_MAX_CHUNK, block: int = BLOCK):
        super().__init__()
        if type(step) is not self.step_class:
            raise TypeError(f"{type(self).__name__} is built from an {self.step_class.__name__}, "
                            f"got {type(step).__name__}")
        if not 1 <= max_chunk <= MAX_CHUNK_LIMIT:
            raise RwkvExportError(f"max_chunk must be 1 .. {MAX_CHUNK_LIMIT}, got {max_chunk}")
        self.arch, self.dims, self.state_spec = step.arch, step.dims, step.state_spec
        self.options = step.options
        self.all_logits = all_logits
        self.embedding = step.embedding  # also output `hidden` (last token) and `hidden_sum` (the chunk's tokens)
        self.max_chunk = max_chunk
        self.block = min(block, max_chunk)
        self.n_blocks = -(-max_chunk // self.block)
        self.wkv_consts = BlockConstants(self.block, step.layers[0].acc)
        # the same Parameter / Module objects as the step graph, under the same names
        self.emb = step.emb
        self.layers = step.layers
        self.ln_out_w, self.ln_out_b = step.ln_out_w, step.ln_out_b
        self.head = step.head
        self._step_rescaled = step.rescaled
        self._new_state = step.new_state

    def forward(self, tokens, att_x, att_kv, ffn_x):
        last = len(self.layers) - 1
        x = F.embedding(tokens, self.emb)  # [T, C]
        att_x, att_kv, ffn_x = split_grouped(att_x), split_grouped(att_kv), split_grouped(ffn_x)
        new_x, new_kv, new_f = [], [], []
        for i, layer in enumerate(self.layers):
            cdt = layer.cdt
            xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b)
            prev = _token_shift(xx, _to(att_x[i], cdt))
            r, k, v, g, lw = layer.projections(xx, prev, one_token=False)
            y, S = wkv_chunk(r, k, v, lw, layer.att_u, att_kv[i], self.wkv_consts, self.n_blocks, layer.per_token_decay)
            x = x + layer.head_out(y, g)
            xx2 = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b)
            prev2 = _token_shift(xx2, _to(ffn_x[i], cdt))
            if i == last and not (self.all_logits or self.embedding):
                x, xx2, prev2 = x[-1:], xx2[-1:], prev2[-1:]
            x = self._step_rescaled(i, x + layer.ffn(xx2, prev2, one_token=False))
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
        # chunk guard: more than max_chunk tokens exceed the unrolled block steps; answer NaN, in the logits and the
        # state (a caller keeping only the state must not go on from a wrong one), rather than wrong numbers
        nan = torch.where((torch.arange(tokens.shape[0]) >= self.max_chunk).any(), float("nan"), 0.0)
        return tuple(t + nan.to(t.dtype)
                     for t in (logits, cat_grouped(new_x), cat_grouped(new_kv), cat_grouped(new_f), *hidden))

    def new_state(self) -> dict:
        return self._new_state()

    def example_inputs(self, n_tokens: int = 5) -> tuple:
        s = self.new_state()
        dt = self.layers[0].acc
        return (torch.zeros(n_tokens, dtype=torch.long), *(s[n].to(dt) for n in STATE_NAMES))
