"""The RWKV-5.2 step and prompt graphs written node by node (onnx_build.py says why: no tracing).

`build_step` mirrors `RWKV5Step.forward` (step.py) and `build_sequence` mirrors `RWKV5Sequence.forward` and
`wkv_chunk` (sequence.py), one node per torch op, every weight taken from the module's parameters under their names:
step.py and sequence.py are where the weights are prepared and where each layout choice is explained. `Block5` is
the graph side of step.py's BaseLayer + Layer5; RWKV-6 (rwkv6/onnx_graph.py) subclasses it with its own token shift
and decay, as Layer6 does, and reuses everything else here.

Dtypes follow the module's: weights and activations in the compute dtype of `att_key` (fp32, fp16 or fp64), the
WKV side (r, k, v, decay, state, GroupNorm) in the dtype of `att_u`; the graph's I/O (state, logits, hidden) in
the WKV side's dtype. A Cast is written only where the dtypes differ (as the modules' `_to`).
"""

from __future__ import annotations

import numpy as np

from ...onnx_build import Graph, onnx_dtype
from .sequence import EXP_FLOOR
from .step import GROUPNORM_EPS, MIX_ORDER

LN_EPS = 1e-5  # F.layer_norm's default, which every LN1 / LN2 / LN_out of the modules uses
INT64_MAX = np.iinfo(np.int64).max


def _dtype(t) -> str:
    return str(t.dtype).removeprefix("torch.")


class Block5:
    """The graph-side counterparts of step.py's BaseLayer / Layer5 methods, for one module: each method adds the
    nodes of its torch namesake. `p` is a layer's parameter prefix ("layers.3.")."""

    def __init__(self, module, g: Graph):
        self.g = g
        self.params = dict(module.named_parameters())
        d = module.dims
        self.H, self.N, self.C = d.n_head, d.head_size, d.n_embd
        layer = module.layers[0]
        self.cdt, self.acc = _dtype(layer.att_key), _dtype(layer.att_u)
        self.per_token_decay = layer.per_token_decay  # False for v5.2: its log decay is one [1, C] row
        self._filled: dict = {}  # filled(): one constant per graph

    def w(self, name: str) -> str:
        return self.g.param(name, self.params[name])

    def ln(self, x: str, p: str, which: str) -> str:
        """F.layer_norm over the last dim with the weights `{p}{which}_w` / `_b` (ln1, ln2, ln_out)."""
        return self.g.op("LayerNormalization", x, self.w(f"{p}{which}_w"), self.w(f"{p}{which}_b"), axis=-1,
                         epsilon=LN_EPS)

    def shifted(self, a: str, b: str, mix: str, n: int, one_token: bool) -> list[str]:
        """step.shifted: `a + (b - a) * m` for each of the n rows m of `mix` [n, C]. One token: one Sub/Mul/Add on
        [n, C] and a Split; T tokens: the difference once, then one Mul/Add per row of mix (split once)."""
        g = self.g
        if one_token:
            return list(g.op("Split", g.op("Add", a, g.op("Mul", g.op("Sub", b, a), mix)), g.ints(*[1] * n),
                             outputs=n, axis=0))
        diff = g.op("Sub", b, a)
        # the rows of the parameter, [1, C] each (broadcast as torch's [C]); onnxruntime folds this Split at load
        rows = g.op("Split", mix, g.ints(*[1] * n), outputs=n, axis=0)
        return [g.op("Add", a, g.op("Mul", diff, m)) for m in rows]

    def rkvg(self, p: str, xr: str, xk: str, xv: str, xg: str) -> tuple[str, str, str, str]:
        """BaseLayer.rkvg: r, k, v in the WKV dtype, the gate silu(x_g W_g) (x * sigmoid(x)) in the compute dtype."""
        g = self.g
        r, k, v = (g.cast(g.op("MatMul", x, self.w(p + name)), self.cdt, self.acc)
                   for x, name in ((xr, "att_receptance"), (xk, "att_key"), (xv, "att_value")))
        gate = g.op("MatMul", xg, self.w(p + "att_gate"))
        return r, k, v, g.op("Mul", gate, g.op("Sigmoid", gate))

    def projections(self, p: str, xx: str, prev: str, one_token: bool):
        """Layer5.projections: (r, k, v, gate, lw); lw None here, the static decay being the layer's parameters
        (step_decay / seq_log_decay take it, so a graph holds only the one it uses)."""
        xr, xk, xv, xg = self.shifted(prev, xx, self.w(p + "att_mix"), len(MIX_ORDER), one_token)
        return (*self.rkvg(p, xr, xk, xv, xg), None)

    def step_decay(self, p: str, lw) -> str:
        """Layer5.step_decay: the precomputed w [H, N, 1]."""
        return self.w(p + "att_w")

    def seq_log_decay(self, p: str, lw) -> str:
        """The log decay the prompt graph's WKV takes: Layer5's precomputed [1, C] row."""
        return self.w(p + "att_lw")

    def wkv_one(self, p: str, r: str, k: str, v: str, w: str, S: str) -> tuple[str, str]:
        """step.wkv_one: a = k (x) v; y = r @ (u*a + S) [1, H, 1, N]; S' = a + w*S [1, H, N, N]."""
        g, H, N = self.g, self.H, self.N
        a = g.op("Mul", g.op("Reshape", k, g.ints(H, N, 1)), g.op("Reshape", v, g.ints(H, 1, N)))
        y = g.op("MatMul", g.op("Reshape", r, g.ints(H, 1, N)), g.op("Add", g.op("Mul", self.w(p + "att_u"), a), S))
        return y, g.op("Add", a, g.op("Mul", w, S))

    def head_out(self, p: str, y: str, gate: str) -> str:
        """BaseLayer.head_out: GroupNorm(H) of y [T, H, 1, N] as a LayerNormalization over N (unit scale, no bias:
        torch's layer_norm without affine), ln_x's affine, back to [T, C], the gate and the output projection."""
        g = self.g
        y = g.op("LayerNormalization", y, g.const(np.ones(self.N), self.acc), axis=-1, epsilon=GROUPNORM_EPS)
        y = g.op("Add", g.op("Mul", y, self.w(p + "lnx_w")), self.w(p + "lnx_b"))
        y = g.cast(g.op("Reshape", y, g.ints(-1, self.C)), self.acc, self.cdt)
        return g.op("MatMul", g.op("Mul", y, gate), self.w(p + "att_output"))

    def exp(self, x: str) -> str:
        """sequence._exp: exp of a log weight, floored at EXP_FLOOR."""
        return self.g.op("Exp", self.g.op("Clip", x, self.g.const(EXP_FLOOR, self.acc)))

    def filled(self, value: float, *shape: int) -> str:
        """torch.ones_like / zeros_like of a constant shape, as ConstantOfShape: one node, and no initializer of
        its size (a large constant would go to a shared data file under a per-graph name)."""
        from onnx import helper

        key = (value, shape)
        if key not in self._filled:  # one per graph: every layer's is the same
            self._filled[key] = self.g.op("ConstantOfShape", self.g.ints(*shape),
                                          value=helper.make_tensor("value", onnx_dtype(self.acc), [1], [value]))
        return self._filled[key]

    def wkv_chunk(self, p: str, r: str, k: str, v: str, lw: str, S0: str, c: "ChunkIndex") -> tuple[str, str]:
        """sequence.wkv_chunk over T tokens in blocks of c.b: r, k, v [T, C], lw [T, C] (or [1, C] for v5.2),
        S0 [1, H, N, N]. Returns (y [T, H, 1, N], S after the last token). G = ceil(T / b) is dynamic: the
        block reshapes take it as -1."""
        g, H, N, C, b = self.g, self.H, self.N, self.C, c.b

        def blocks(x):  # [P, C] -> [G, b, C]
            return g.op("Reshape", x, g.ints(-1, b, C))

        def heads(x, perm=(0, 2, 1, 3)):  # [P or G*b, C] -> [G, H, b, N] (or its transpose with perm (0, 2, 3, 1))
            return g.op("Transpose", g.op("Reshape", x, g.ints(-1, b, H, N)), perm=list(perm))

        # token-major blocks; padded tokens get k = 0 and lw = 0 (w = 1): they change nothing
        lw = blocks(g.op("Mul", g.op("Gather", lw, c.idx, axis=0) if self.per_token_decay else lw, c.valid))
        r = blocks(g.op("Gather", r, c.idx, axis=0))
        k = blocks(g.op("Mul", g.op("Gather", k, c.idx, axis=0), c.valid))
        v = heads(g.op("Gather", v, c.idx, axis=0))  # [G, H, b, N]
        before, after, total = g.op("Split", g.op("MatMul", c.rest_sums, lw), g.ints(b, b, 1), outputs=3, axis=1)
        # level 1: the current token's bonus u, then the pairs s < t within a block
        u = g.op("Reshape", self.w(p + "att_u"), g.ints(1, 1, C))
        bonus = g.op("ReduceSum", g.op("Reshape", g.op("Mul", g.op("Mul", r, k), u), g.ints(-1, b, H, N)),
                     g.ints(-1), keepdims=0)  # [G, b, H]
        y = g.op("Mul", g.op("Unsqueeze", g.op("Transpose", bonus, perm=[0, 2, 1]), g.ints(-1)), v)
        if b > 1:
            E = self.exp(g.op("MatMul", c.pair_sums, lw))  # [G, pairs, C]
            rk = g.op("Mul", g.op("Gather", r, c.tp, axis=1), g.op("Gather", k, c.sp, axis=1))
            A = g.op("ReduceSum", g.op("Reshape", g.op("Mul", rk, E), g.ints(-1, c.pairs, H, N)), g.ints(-1),
                     keepdims=0)  # [G, pairs, H]
            A = g.op("Transpose", g.op("Reshape", g.op("MatMul", c.scatter, A), g.ints(-1, b, b, H)),
                     perm=[0, 3, 1, 2])  # [G, H, b(t), b(s)], zero where s >= t
            y = g.op("Add", y, g.op("MatMul", A, v))
        # level 2: the state carried block to block, S <- a_g S + U_g, in n_blocks unrolled steps (blocks past G
        # are identities: row G of a and U, appended)
        U = g.op("MatMul", heads(g.op("Mul", k, self.exp(after)), perm=(0, 2, 3, 1)), v)  # [G, H, N, N]
        a = g.op("Reshape", self.exp(total), g.ints(-1, H, N, 1))
        a = g.op("Gather", g.op("Concat", a, self.filled(1.0, 1, H, N, 1), axis=0), c.block_of_step, axis=0)
        U = g.op("Gather", g.op("Concat", U, self.filled(0.0, 1, H, N, N), axis=0), c.block_of_step, axis=0)
        S, states = S0, []
        for a_g, U_g in zip(g.split_rows(a, c.n_blocks), g.split_rows(U, c.n_blocks)):
            states.append(S)
            S = g.op("Add", g.op("Mul", a_g, S), U_g)
        S_before = g.op("Gather", g.concat_rows(states), c.step_of_block, axis=0)  # [G, H, N, N]
        y = g.op("Add", y, g.op("MatMul", heads(g.op("Mul", r, self.exp(before))), S_before))  # [G, H, b, N]
        y = g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.ints(-1, H, 1, N))
        return g.op("Slice", y, g.ints(0), c.T, g.ints(0)), S

    def ffn_ends(self, xx: str, prev: str) -> tuple[str, str]:
        """Layer5.ffn_ends: the channel mix's token shift is prev + (xx - prev) * mix."""
        return prev, xx

    def ffn(self, p: str, xx: str, prev: str, one_token: bool) -> str:
        """BaseLayer.ffn: sigmoid(x_r W_r) * (relu(x_k W_k)^2 W_v)."""
        g = self.g
        xk, xr = self.shifted(*self.ffn_ends(xx, prev), self.w(p + "ffn_mix"), 2, one_token)
        k = g.op("Relu", g.op("MatMul", xk, self.w(p + "ffn_key")))
        r = g.op("Sigmoid", g.op("MatMul", xr, self.w(p + "ffn_receptance")))
        return g.op("Mul", r, g.op("MatMul", g.op("Mul", k, k), self.w(p + "ffn_value")))


def rescaled(module, g: Graph, i: int, x: str, cdt: str) -> str:
    """RWKV5Step.rescaled: the residual halved after every `rescale_every`-th layer (fp16), else as it is."""
    every = module.options.rescale_every
    return g.op("Div", x, g.const(2.0, cdt)) if every and (i + 1) % every == 0 else x


def _states_in(module, g: Graph, io: str) -> dict[str, list[str]]:
    """The state inputs (module.state_spec: names and shapes; dtype the module's I/O dtype), each split into its
    per-layer rows."""
    L = module.dims.n_layer
    return {s.name: g.split_rows(g.input(s.name, io, list(s.shape)), L) for s in module.state_spec}


def _states_out(module, g: Graph, new: dict[str, list[str]], io: str, guard=None) -> None:
    from ...targets.onnx import state_output_name

    for s in module.state_spec:
        value = g.concat_rows(new[s.name])
        g.output(g.op("Add", value, guard) if guard else value, state_output_name(s.name), io, list(s.shape))


def build_step(module, g: Graph, block_class=Block5) -> None:
    """Add the step graph of `module` (an RWKV5Step; an RWKV6Step with rwkv6's block class) to `g`: inputs token
    [1] int64 and the states of module.state_spec, outputs logits [1, V], `<state>_out` (and `hidden` [1, C] with
    the embedding flag)."""
    from ...embed import HIDDEN
    from ...targets.onnx import LOGITS_OUTPUT, TOKEN_INPUT

    blk = block_class(module, g)
    cdt, io, C, V = blk.cdt, blk.acc, blk.C, module.dims.vocab_size
    token = g.input(TOKEN_INPUT, "int64", [1])
    rows = _states_in(module, g, io)
    x = g.op("Gather", blk.w("emb"), token, axis=0)  # [1, C]
    new = {n: [] for n in rows}
    for i in range(module.dims.n_layer):
        p = f"layers.{i}."
        xx = blk.ln(x, p, "ln1")
        r, k, v, gate, lw = blk.projections(p, xx, g.cast(rows["att_x"][i], io, cdt), one_token=True)
        y, S = blk.wkv_one(p, r, k, v, blk.step_decay(p, lw), rows["att_kv"][i])
        x = g.op("Add", x, blk.head_out(p, y, gate))
        xx2 = blk.ln(x, p, "ln2")
        x = rescaled(module, g, i, g.op("Add", x, blk.ffn(p, xx2, g.cast(rows["ffn_x"][i], io, cdt), one_token=True)),
                     cdt)
        new["att_x"].append(g.cast(xx, cdt, io))
        new["att_kv"].append(S)
        new["ffn_x"].append(g.cast(xx2, cdt, io))
    x = blk.ln(x, "", "ln_out")
    g.output(g.cast(g.op("MatMul", x, blk.w("head")), cdt, io), LOGITS_OUTPUT, io, [1, V])
    _states_out(module, g, new, io)
    if module.embedding:
        g.output(g.cast(x, cdt, io), HIDDEN, io, [1, C])


class ChunkIndex:
    """The index tensors of wkv_chunk that depend only on T and the block size, added once per graph (torch's
    wkv_chunk makes them in every layer; the same values), and the block constants (sequence.BlockConstants: the
    module's buffers, under their names)."""

    def __init__(self, module, g: Graph, tokens: str, acc: str):
        consts = module.wkv_consts
        b, n = consts.b, module.n_blocks
        self.b, self.n_blocks, self.pairs = b, n, b * (b - 1) // 2
        self.T = g.op("Shape", tokens)  # [1]
        t = g.op("Squeeze", self.T, g.ints(0))  # a scalar, for Range
        zero, one = g.const(0, "int64"), g.const(1, "int64")
        G = g.op("Div", g.op("Add", t, g.const(b - 1, "int64")), g.const(b, "int64"))  # ceil(T / b)
        pos = g.op("Range", zero, g.op("Mul", G, g.const(b, "int64")), one)  # [P]
        # padded positions read the last token (a Gather: no T-dependent Pad), then are neutralised by `valid`
        self.idx = g.op("Min", pos, g.op("Sub", t, one))
        self.valid = g.op("Unsqueeze", g.cast(g.op("Less", pos, t), "bool", acc), g.ints(1))  # [P, 1]
        # level 2: step j of the n unrolled ones takes block min(j, G) (row G: the identity); block g's tokens
        # read the state before step min(g, n - 1)
        self.block_of_step = g.op("Min", g.op("Range", zero, g.const(n, "int64"), one), G)
        self.step_of_block = g.op("Min", g.op("Range", zero, G, one), g.const(n - 1, "int64"))
        bufs = dict(module.named_buffers())
        self.rest_sums = g.param("wkv_consts.rest_sums", bufs["wkv_consts.rest_sums"])
        if b > 1:
            self.pair_sums = g.param("wkv_consts.pair_sums", bufs["wkv_consts.pair_sums"])
            self.scatter = g.param("wkv_consts.scatter", bufs["wkv_consts.scatter"])
            self.tp = g.param("wkv_consts.tp", bufs["wkv_consts.tp"])
            self.sp = g.param("wkv_consts.sp", bufs["wkv_consts.sp"])


def _last(g: Graph, x: str) -> str:
    """x[-1:] along the token axis."""
    return g.op("Slice", x, g.ints(-1), g.ints(INT64_MAX), g.ints(0))


def _token_shift(g: Graph, x: str, first: str) -> str:
    """sequence._token_shift: row t gets x[t-1], row 0 gets `first` (a Concat, then all but the last row)."""
    return g.op("Slice", g.op("Concat", first, x, axis=0), g.ints(0), g.ints(-1), g.ints(0))


def build_sequence(module, g: Graph, block_class=Block5) -> None:
    """Add the prompt graph of `module` (an RWKV5Sequence; an RWKV6Sequence with rwkv6's block class) to `g`:
    inputs tokens [T] int64 (T dynamic) and the states, outputs logits [1, V] ([T, V] with all_logits),
    `<state>_out` (and `hidden` [1, C], `hidden_sum` [1, C] with the embedding flag); NaN in every output past
    max_chunk tokens (the chunk guard)."""
    from ...embed import HIDDEN, HIDDEN_SUM
    from ...eval_graph import last_row_for_logits
    from ...targets.onnx import LOGITS_OUTPUT
    from ...targets.onnx_seq import SEQ_DIM, TOKENS_INPUT

    blk = block_class(module, g)
    cdt, io, C, V = blk.cdt, blk.acc, blk.C, module.dims.vocab_size
    L = module.dims.n_layer
    every_row = module.all_logits or module.embedding  # else the last layer's FFN and the head see the last row only
    tokens = g.input(TOKENS_INPUT, "int64", [SEQ_DIM])
    rows = _states_in(module, g, io)
    chunk = ChunkIndex(module, g, tokens, io)
    x = g.op("Gather", blk.w("emb"), tokens, axis=0)  # [T, C]
    new = {n: [] for n in rows}
    for i in range(L):
        p = f"layers.{i}."
        xx = blk.ln(x, p, "ln1")
        prev = _token_shift(g, xx, g.cast(rows["att_x"][i], io, cdt))
        r, k, v, gate, lw = blk.projections(p, xx, prev, one_token=False)
        y, S = blk.wkv_chunk(p, r, k, v, blk.seq_log_decay(p, lw), rows["att_kv"][i], chunk)
        x = g.op("Add", x, blk.head_out(p, y, gate))
        xx2 = blk.ln(x, p, "ln2")
        prev2 = _token_shift(g, xx2, g.cast(rows["ffn_x"][i], io, cdt))
        new["ffn_x"].append(g.cast(_last(g, xx2), cdt, io))  # the state's row (its own node: the eval graph keeps it)
        if i == L - 1 and not every_row:  # only the last row goes on (eval_graph.py finds these nodes by name)
            x, xx2, prev2 = (last_row_for_logits(g, t) for t in (x, xx2, prev2))
        x = rescaled(module, g, i, g.op("Add", x, blk.ffn(p, xx2, prev2, one_token=False)), cdt)
        new["att_x"].append(g.cast(_last(g, xx), cdt, io))
        new["att_kv"].append(S)
    x = blk.ln(x, "", "ln_out")
    hidden = ()
    if module.embedding:  # the last token's final hidden state, and the sum over the chunk's tokens
        last = _last(g, x)
        hidden = (g.cast(last, cdt, io), g.op("ReduceSum", g.cast(x, cdt, io), g.ints(0), keepdims=1))
        if not module.all_logits:
            x = last_row_for_logits(g, x)
    logits = g.cast(g.op("MatMul", x, blk.w("head")), cdt, io)
    # chunk guard: more than max_chunk tokens exceed the unrolled block steps: NaN in the logits and the state
    guard = g.op("Where", g.op("Greater", chunk.T, g.ints(module.max_chunk)), g.const(float("nan"), io),
                 g.const(0.0, io))
    g.output(g.op("Add", logits, guard), LOGITS_OUTPUT, io, [SEQ_DIM if module.all_logits else 1, V])
    _states_out(module, g, new, io, guard)
    for value, name in zip(hidden, (HIDDEN, HIDDEN_SUM)):
        g.output(g.op("Add", value, guard), name, io, [1, C])
