"""The RWKV-4 step and prompt graphs written node by node (onnx_build.py says why: no tracing).

`build_step` mirrors `RWKV4Step.forward` (step.py) and `build_sequence` mirrors `RWKV4Sequence.forward` and its
`wkv_scan` (sequence.py), one node per torch op. Every weight comes from the module's parameters, under the
parameters' names (the sequence module holds the step's very Parameter objects, so both graphs name, and share, the
same initializers): step.py is where the weights are prepared and where each layout choice is explained, and
sequence.py is where the scan is derived. The dtypes follow the module's: weights and activations in the compute
dtype of `att_key` (fp32, fp16 or fp64), the WKV accumulators in the dtype of `att_decay`; the graph's I/O (state,
logits, hidden) in the state's dtype.

Against the prompt graph torch.onnx traced from the same module (measured on the 2-core AMD EPYC, shared): written in
0.4 s instead of 49 s for tiny-pydoc, 5 s (mostly the 680 MB of weights) instead of 1023 s at 169M shapes; 1054 nodes
instead of 1131 (tiny-pydoc), 3046 instead of 3233 (169M); the same outputs bit for bit with onnxruntime's graph
optimizations off (with them on, onnxruntime fuses the traced graph's att_output MatMul + residual Add into a Gemm,
whose other rounding moves outputs by ~1e-6 of std); prompt CPU time in onnxruntime at 169M shapes (1 thread,
interleaved rounds) 0.96x / 0.98x the traced graph's at T = 64 / 255.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ...onnx_build import Graph
from .spec import STATE_NAMES

INT_MAX = np.iinfo(np.int64).max  # Slice's "to the end"


def _params(module):
    """name -> the weight as Graph.param takes it: a function that makes it (the module's `prepared`, step.py), called
    only when the weight is written, so that a lazy module's weights exist one at a time."""
    return {name: partial(module.prepared, name) for name, _ in module.named_parameters()}


def _dtypes(module) -> tuple[str, str, str]:
    """(compute dtype, WKV accumulator dtype, I/O dtype) of a step or sequence module, as the module docstring says."""
    cdt = str(module.layers[0].att_key.dtype)
    acc = str(module.layers[0].att_decay.dtype)
    return cdt, acc, acc  # state and logits: fp32 (fp64 in an fp64 build)


def _layer_norm(g: Graph, x: str, weight: str, bias: str) -> str:
    return g.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=1e-5)  # F.layer_norm's default eps


def build_step(module, g: Graph) -> None:
    """Add the step graph of `module` (an RWKV4Step) to `g`: inputs token [1] int64 and the five [L, C] states,
    outputs logits [1, V], the states `NAME_out` (and `hidden` [1, C] with the embedding flag)."""
    from ...embed import HIDDEN
    from ...targets.onnx import LOGITS_OUTPUT, TOKEN_INPUT, state_output_name

    P = _params(module)
    d = module.dims
    L, C, V = d.n_layer, d.n_embd, d.vocab_size
    every = module.options.rescale_every
    cdt, acc, io = _dtypes(module)

    def w(name):
        return g.param(name, P[name])

    def ln(x, prefix_w, prefix_b):
        return _layer_norm(g, x, w(prefix_w), w(prefix_b))

    token = g.input(TOKEN_INPUT, "int64", [1])
    states = {n: g.input(n, io, [L, C]) for n in STATE_NAMES}
    rows = {n: g.split_rows(states[n], L) for n in STATE_NAMES}
    x = g.op("Gather", w("emb"), token, axis=0)  # [1, C]
    new = {n: [] for n in STATE_NAMES}
    for i in range(L):
        p = f"layers.{i}."
        # time mix (_Layer.time_mix)
        sx = g.cast(rows["att_x"][i], io, cdt)
        xx = ln(x, p + "ln1_w", p + "ln1_b")
        mixed = g.op("Add", sx, g.op("Mul", g.op("Sub", xx, sx), w(p + "att_mix")))  # [3, C]
        xk, xv, xr = g.op("Split", mixed, g.ints(1, 1, 1), outputs=3, axis=0)
        r = g.op("Sigmoid", g.op("MatMul", xr, w(p + "att_receptance")))
        k = g.cast(g.op("MatMul", xk, w(p + "att_key")), cdt, acc)
        v = g.cast(g.op("MatMul", xv, w(p + "att_value")), cdt, acc)
        aa, bb, pp = rows["att_aa"][i], rows["att_bb"][i], rows["att_pp"][i]
        ww = g.op("Add", w(p + "att_first"), k)
        q = g.op("Max", pp, ww)
        e1 = g.op("Exp", g.op("Sub", pp, q))
        e2 = g.op("Exp", g.op("Sub", ww, q))
        wkv = g.op("Div", g.op("Add", g.op("Mul", e1, aa), g.op("Mul", e2, v)),
                   g.op("Add", g.op("Mul", e1, bb), e2))
        ww = g.op("Add", pp, w(p + "att_decay"))
        q = g.op("Max", ww, k)
        e1 = g.op("Exp", g.op("Sub", ww, q))
        e2 = g.op("Exp", g.op("Sub", k, q))
        new["att_aa"].append(g.op("Add", g.op("Mul", e1, aa), g.op("Mul", e2, v)))
        new["att_bb"].append(g.op("Add", g.op("Mul", e1, bb), e2))
        new["att_pp"].append(q)
        new["att_x"].append(g.cast(xx, cdt, io))
        x = g.op("Add", x, g.op("MatMul", g.op("Mul", r, g.cast(wkv, acc, cdt)), w(p + "att_output")))
        # channel mix (_Layer.channel_mix)
        fx = g.cast(rows["ffn_x"][i], io, cdt)
        xx = ln(x, p + "ln2_w", p + "ln2_b")
        mixed = g.op("Add", fx, g.op("Mul", g.op("Sub", xx, fx), w(p + "ffn_mix")))  # [2, C]
        xk, xr = g.op("Split", mixed, g.ints(1, 1), outputs=2, axis=0)
        r = g.op("Sigmoid", g.op("MatMul", xr, w(p + "ffn_receptance")))
        kk = g.op("Relu", g.op("MatMul", xk, w(p + "ffn_key")))
        x = g.op("Add", x, g.op("Mul", r, g.op("MatMul", g.op("Mul", kk, kk), w(p + "ffn_value"))))
        new["ffn_x"].append(g.cast(xx, cdt, io))
        if every and (i + 1) % every == 0:
            x = g.op("Div", x, g.const(2.0, cdt))
    x = ln(x, "ln_out_w", "ln_out_b")
    logits = g.cast(g.op("MatMul", x, w("head")), cdt, io)
    g.output(logits, LOGITS_OUTPUT, io, [1, V])
    for n in STATE_NAMES:
        g.output(g.concat_rows(new[n]), state_output_name(n), io, [L, C])
    if module.embedding:
        g.output(g.cast(x, cdt, io), HIDDEN, io, [1, C])


# -- the prompt graph ------------------------------------------------------------------------------------------------
# wkv_scan's tensors are held here in one layout, [1 or 2, B, G, C] (position in block, block, channel): exponents
# lead with 1, the stacked (a, b) with 2, so that every combine broadcasts one against the other and one index tensor
# gathers both from [T, C] (sequence.py stacks (a, b) the same way but keeps the exponents one rank lower).


@dataclass(frozen=True)
class _Chunk:
    """The values wkv_scan derives from T alone, built once per graph and shared by every layer."""

    n_tokens: str  # T, 0-d int64
    n_blocks: str  # G = ceil(T / B), 0-d int64
    fill: str  # [1, B, G] int64: the token at each (position, block), the last block filled up with token T - 1
    ones: str  # [1, B, G, C]: a token's own b
    none_p: str  # [1, 1, G, C] NEG_FILL: the exclusive prefix of position 0 ("nothing yet") ...
    none_ab: str  # ... and its (a, b), [2, 1, G, C] zeros
    none_row: tuple  # the same for level 2's identity row: [1, 1, 1, C] NEG_FILL, [2, 1, 1, C] zeros
    one_row: str  # [1, 1, C] ones: the last token's own b
    earlier: list  # per level-2 step s: [G + 2] int64, the row 2**s earlier (clamped at the identity row 0)
    flat: str  # [T] int64: token t's row in the flattened [B * G] layout
    last: str  # [1] int64: flat[-1:]


def _chunk(g: Graph, tokens: str, B: int, group_steps: int, C: int, acc: str) -> _Chunk:
    """The _Chunk of a graph with `tokens` [T] as input: shapes and indices from T by Shape-free arithmetic (Size)."""
    from .sequence import NEG_FILL

    def i64(v):
        return g.const(v, "int64")

    T = g.op("Size", tokens)
    G = g.op("Div", g.op("Add", T, i64(B - 1)), i64(B))
    block_start = g.op("Range", i64(0), g.op("Mul", G, i64(B)), i64(B))  # [G]
    fill = g.op("Min", g.op("Add", i64(np.arange(B).reshape(1, B, 1)), block_start), g.op("Sub", T, i64(1)))
    G1 = g.op("Unsqueeze", G, g.ints(0))

    def filled(value, *lead):
        return g.op("Expand", g.const(value, acc), g.op("Concat", g.ints(*lead), G1, g.ints(C), axis=0))

    def row(value, *shape):  # Expand of a scalar, not a [.., C] constant: the data file holds only the weights
        return g.op("Expand", g.const(value, acc), g.ints(*shape))

    rows = g.op("Range", i64(0), g.op("Add", G, i64(2)), i64(1))
    earlier = [g.op("Max", g.op("Sub", rows, i64(1 << s)), i64(0)) for s in range(group_steps)]
    t = g.op("Range", i64(0), T, i64(1))
    flat = g.op("Add", g.op("Mul", g.op("Mod", t, i64(B)), G), g.op("Div", t, i64(B)))
    last = g.op("Slice", flat, g.ints(-1), g.ints(INT_MAX), g.ints(0))
    return _Chunk(T, G, fill, filled(1.0, 1, B), filled(NEG_FILL, 1, 1), filled(0.0, 2, 1),
                  (row(NEG_FILL, 1, 1, 1, C), row(0.0, 2, 1, 1, C)), row(1.0, 1, 1, C), earlier, flat, last)


def _exp(g: Graph, x: str, acc: str) -> str:
    """sequence._exp: exp of an exponent difference, floored at EXP_FLOOR."""
    from .sequence import EXP_FLOOR

    return g.op("Exp", g.op("Clip", x, g.const(EXP_FLOOR, acc)))


def _combine(g: Graph, p_left: str, ab_left: str, p: str, ab: str, acc: str) -> tuple[str, str]:
    """sequence._combine: (e^p_left ab_left) + (e^p ab) as (p', ab') with p' the larger exponent."""
    p_new = g.op("Max", p_left, p)
    ab_new = g.op("Add", g.op("Mul", ab_left, _exp(g, g.op("Sub", p_left, p_new), acc)),
                  g.op("Mul", ab, _exp(g, g.op("Sub", p, p_new), acc)))
    return p_new, ab_new


def _wkv_scan(g: Graph, ch: _Chunk, w: str, u: str, k: str, v: str, ab0: str, p0: str, B: int, group_steps: int,
              C: int, acc: str) -> tuple[str, str, str]:
    """sequence.wkv_scan over k, v [T, C] from the carried state ab0 [2, 1, 1, C] (att_aa, att_bb stacked) and p0
    [1, 1, 1, C] (att_pp). Returns wkv [T, C] and the state after the last token: (a, b) [2, 1, C] and p [1, C]."""
    P = g.op("Gather", k, ch.fill, axis=0)  # [1, B, G, C]
    AB = g.op("Concat", g.op("Gather", v, ch.fill, axis=0), ch.ones, axis=0)  # [2, B, G, C]
    # level 1: the step recurrence along the B positions, keeping each position's exclusive prefix; the combine
    # after the last position is the block's total
    ps, abs_ = g.split_rows(P, B, axis=1), g.split_rows(AB, B, axis=1)
    xp, xab = [ch.none_p, ps[0]], [ch.none_ab, abs_[0]]
    for j in range(2, B + 1):
        p, ab = _combine(g, g.op("Add", xp[-1], w), xab[-1], ps[j - 1], abs_[j - 1], acc)
        xp.append(p)
        xab.append(ab)
    total_p, total_ab = xp.pop(), xab.pop()
    # level 2: Hillis-Steele over the rows [identity, carried state, block totals] (axis 2)
    pg = g.op("Concat", ch.none_row[0], p0, total_p, axis=2)  # [1, 1, G + 2, C]
    abg = g.op("Concat", ch.none_row[1], ab0, total_ab, axis=2)  # [2, 1, G + 2, C]
    for s in range(group_steps):
        decay = g.op("Mul", w, g.const((1 << s) * B, acc))
        pg, abg = _combine(g, g.op("Add", g.op("Gather", pg, ch.earlier[s], axis=2), decay),
                           g.op("Gather", abg, ch.earlier[s], axis=2), pg, abg, acc)
    rp = g.op("Slice", pg, g.ints(1), g.ints(-1), g.ints(2))  # the state before each block: [1, 1, G, C]
    rab = g.op("Slice", abg, g.ints(1), g.ints(-1), g.ints(2))
    # wkv at each (position, block) in one three-way combine
    Xp, Xab = g.concat_rows(xp, axis=1), g.concat_rows(xab, axis=1)
    pr = g.op("Add", rp, g.op("Mul", g.const(np.arange(B).reshape(1, B, 1, 1), acc), w))  # [1, B, G, C]
    pu = g.op("Add", P, u)
    m = g.op("Max", pr, Xp, pu)
    S = g.op("Add", g.op("Add", g.op("Mul", rab, _exp(g, g.op("Sub", pr, m), acc)),
                         g.op("Mul", Xab, _exp(g, g.op("Sub", Xp, m), acc))),
             g.op("Mul", AB, _exp(g, g.op("Sub", pu, m), acc)))
    sa, sb = g.op("Split", S, g.ints(1, 1), outputs=2, axis=0)
    wkv = g.op("Gather", g.op("Reshape", g.op("Div", sa, sb), g.ints(-1, C)), ch.flat, axis=0)  # token order

    # the state after the last token: the state before it, decayed one step, combined with the token itself
    def at_last(x):  # [1, B, G, C] -> the last token's row [1, C]
        return g.op("Gather", g.op("Reshape", x, g.ints(-1, C)), ch.last, axis=0)

    before_p, before_ab = _combine(g, at_last(pr), g.op("Gather", abg, ch.n_blocks, axis=2), at_last(Xp),
                                   g.op("Gather", g.op("Reshape", Xab, g.ints(2, -1, C)), ch.last, axis=1), acc)
    k_last, v_last = (g.op("Slice", x, g.ints(-1), g.ints(INT_MAX), g.ints(0)) for x in (k, v))
    ab_last = g.op("Concat", g.op("Unsqueeze", v_last, g.ints(0)), ch.one_row, axis=0)
    p, ab = _combine(g, g.op("Add", before_p, w), before_ab, k_last, ab_last, acc)
    return wkv, ab, p


def build_sequence(module, g: Graph) -> None:
    """Add the prompt graph of `module` (an RWKV4Sequence) to `g`: inputs tokens [T] int64 (T dynamic, named
    onnx_seq.SEQ_DIM) and the five [L, C] states; outputs logits ([1, V], [T, V] with all_logits), the states
    `NAME_out`, and with the embedding flag `hidden` and `hidden_sum` [1, C]. More than max_chunk tokens give NaN
    logits (and hidden outputs): the chunk guard."""
    from ...embed import HIDDEN, HIDDEN_SUM
    from ...eval_graph import last_row_for_logits
    from ...targets.onnx import LOGITS_OUTPUT, state_output_name
    from ...targets.onnx_seq import SEQ_DIM, TOKENS_INPUT

    P = _params(module)
    d = module.dims
    L, C, V = d.n_layer, d.n_embd, d.vocab_size
    every = module.options.rescale_every
    cdt, acc, io = _dtypes(module)
    B, group_steps = 1 << module.block_steps, module.group_steps
    every_row = module.all_logits or module.embedding  # else the last layer's FFN and the head see the last row only

    def w(name):
        return g.param(name, P[name])

    def ln(x, prefix_w, prefix_b):
        return _layer_norm(g, x, w(prefix_w), w(prefix_b))

    def last_row(x):
        return g.op("Slice", x, g.ints(-1), g.ints(INT_MAX), g.ints(0))

    def mix(xx, prev, name, n):  # sequence._mix: prev + (xx - prev) * mix, one row of the [n, C] mix per input
        diff = g.op("Sub", xx, prev)
        return [g.op("Add", prev, g.op("Mul", diff, m))
                for m in g.op("Split", w(name), g.ints(*[1] * n), outputs=n, axis=0)]

    tokens = g.input(TOKENS_INPUT, "int64", [SEQ_DIM])
    states = {n: g.input(n, io, [L, C]) for n in STATE_NAMES}
    ch = _chunk(g, tokens, B, group_steps, C, acc)
    shift_rows = {n: g.split_rows(states[n], L) for n in ("att_x", "ffn_x")}  # [1, C] each
    pp_rows = g.split_rows(g.op("Unsqueeze", states["att_pp"], g.ints(0, 1)), L, axis=2)  # [1, 1, 1, C] each
    ab_rows = g.split_rows(g.op("Concat", *(g.op("Unsqueeze", states[n], g.ints(0, 1)) for n in ("att_aa", "att_bb")),
                                axis=0), L, axis=2)  # [2, 1, 1, C] each
    x = g.op("Gather", w("emb"), tokens, axis=0)  # [T, C]
    new = {n: [] for n in ("att_x", "att_ab", "att_pp", "ffn_x")}
    for i in range(L):
        p = f"layers.{i}."
        # time mix
        xx = ln(x, p + "ln1_w", p + "ln1_b")
        shifted = g.op("Concat", g.cast(shift_rows["att_x"][i], io, cdt), xx, axis=0)  # _token_shift: [T + 1, C]
        xk, xv, xr = mix(xx, g.op("Slice", shifted, g.ints(0), g.ints(-1), g.ints(0)), p + "att_mix", 3)
        r = g.op("Sigmoid", g.op("MatMul", xr, w(p + "att_receptance")))
        k = g.cast(g.op("MatMul", xk, w(p + "att_key")), cdt, acc)
        v = g.cast(g.op("MatMul", xv, w(p + "att_value")), cdt, acc)
        wkv, ab, pp = _wkv_scan(g, ch, w(p + "att_decay"), w(p + "att_first"), k, v, ab_rows[i], pp_rows[i], B,
                                group_steps, C, acc)
        x = g.op("Add", x, g.op("MatMul", g.op("Mul", r, g.cast(wkv, acc, cdt)), w(p + "att_output")))
        # channel mix
        xx2 = ln(x, p + "ln2_w", p + "ln2_b")
        shifted = g.op("Concat", g.cast(shift_rows["ffn_x"][i], io, cdt), xx2, axis=0)
        prev2 = g.op("Slice", shifted, g.ints(0), g.ints(-1), g.ints(0))
        xx2_last = last_row(xx2)  # the state's row (its own node: the eval graph keeps it)
        if i == L - 1 and not every_row:  # only the last row goes on (eval_graph.py finds these nodes by name)
            x, xx2, prev2 = (last_row_for_logits(g, t) for t in (x, xx2, prev2))
        xk, xr = mix(xx2, prev2, p + "ffn_mix", 2)
        kk = g.op("Relu", g.op("MatMul", xk, w(p + "ffn_key")))
        x = g.op("Add", x, g.op("Mul", g.op("Sigmoid", g.op("MatMul", xr, w(p + "ffn_receptance"))),
                                g.op("MatMul", g.op("Mul", kk, kk), w(p + "ffn_value"))))
        if every and (i + 1) % every == 0:
            x = g.op("Div", x, g.const(2.0, cdt))
        new["att_x"].append(g.cast(last_row(xx), cdt, acc))
        new["att_ab"].append(ab)
        new["att_pp"].append(pp)
        new["ffn_x"].append(g.cast(xx2_last, cdt, acc))
    x = ln(x, "ln_out_w", "ln_out_b")  # [1, C] unless every_row ([T, C])
    if module.embedding:
        x_last = last_row(x)
        hidden = g.cast(x_last, cdt, io)
        hidden_sum = g.op("ReduceSum", g.cast(x, cdt, io), g.ints(0), keepdims=1)
        if not module.all_logits:
            x = last_row_for_logits(g, x)
    logits = g.cast(g.op("MatMul", x, w("head")), cdt, io)
    # chunk guard: more than max_chunk tokens exceed the scan's reach; NaN rather than wrong numbers
    too_long = g.op("Greater", ch.n_tokens, g.const(module.max_chunk, "int64"))
    nan = g.op("Where", too_long, g.const(float("nan"), io), g.const(0.0, io))
    g.output(g.op("Add", logits, nan), LOGITS_OUTPUT, io, [SEQ_DIM if module.all_logits else 1, V])
    aa, bb = g.op("Split", g.concat_rows(new["att_ab"], axis=1), g.ints(1, 1), outputs=2, axis=0)  # [1, L, C] each
    outs = {"att_x": g.concat_rows(new["att_x"]), "att_aa": g.op("Squeeze", aa, g.ints(0)),
            "att_bb": g.op("Squeeze", bb, g.ints(0)), "att_pp": g.concat_rows(new["att_pp"]),
            "ffn_x": g.concat_rows(new["ffn_x"])}
    for n in STATE_NAMES:
        g.output(outs[n], state_output_name(n), io, [L, C])
    if module.embedding:
        g.output(g.op("Add", hidden, nan), HIDDEN, io, [1, C])
        g.output(g.op("Add", hidden_sum, nan), HIDDEN_SUM, io, [1, C])
