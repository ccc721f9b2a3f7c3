"""The RWKV-7 step and prompt graphs written node by node (onnx_build.py says why: no tracing).

`build_step` mirrors `RWKV7Step.forward` (step.py) and `build_sequence` mirrors `RWKV7Sequence.forward`
(sequence.py): the same equations in the same order and dtypes, the weights taken from the modules' parameters
under their names (step.py is where they are prepared). step.py's formulation choices are kept; what differs is
only where a value is reshaped, chosen so that the graph has fewer nodes (onnxruntime-web on WebGPU pays per node):

- the head layout. The vectors that meet the [H, N, N] state (r, the decay, k, v, a, and v's residual gate) leave
  their [1, C] matmuls (the step; [T, C] rows in the prompt graph) through one Concat + Reshape + Split into
  [1, H, T, N] rows (the prompt graph adds one Transpose: sequence.py's `heads`), and everything elementwise after
  that (the decay's sigmoid and exp, kk's normalisation, k's scaling by a, v's residual mix, GroupNorm's affine,
  the r_k bonus) runs in that layout, with the [C] vectors it uses stored as [H, 1, N] (w0, k_k, k_a, k_c, ln_x's
  weight and bias) and r_k as [H, N, 1]. The traced graph reshaped each value to [H, N], [H, N, 1] or [H, 1, N] where
  it was used: 12 Reshapes per layer; the step here has 6 (the stack's, kk, v and r as columns for the state
  products, y back to a row and flat). The fp16 variant casts the stack once (6 Casts before);
- the step's r_k bonus `sum_N(r k r_k)` as the MatMul k @ (r r_k) of the row k and the column r (already made for
  `S @ r`) times r_k [H, N, 1] (Mul + ReduceSum before). No MatMul has a constant operand but the [in, out] weight
  matrices, so quantize.py's rule "every MatMul with a constant weight" stays the model's linear layers;
- the prompt graph: the six token-shift mixes as one [6, T, C] Mul/Add + Split (sequence.py mixes one at a time:
  12 nodes), the token shift's Concat followed by one Split that also yields the last row (the state output),
  and the residual stream kept as [1, T, C] (so no per-layer reshape of the mixes).

Every layout change is a Reshape of contiguous data or a Split/Concat, so the numbers are the module's up to the
summation order of the matmuls (tests/test_onnx_graph_v7.py). The step graph uses only ops the TF.js writer
translates (targets/tfjs.py). Dtypes: the compute dtype is `att_key`'s, the WKV dtype `w0`'s (fp32; fp64 in a
`.double()` copy), the graph's I/O in the WKV dtype, as the modules.
"""

from __future__ import annotations

from ...onnx_build import Graph, onnx_dtype
from .step import DECAY_SCALE, GROUPNORM_EPS, NORMALIZE_EPS

# parameters applied in the head layout ([H, 1, N] rows; r_k as an [H, N, 1] column), by their leaf name
_ROWS = ("w0", "k_k", "k_a", "k_c", "lnx_w", "lnx_b")
_COLUMN = ("r_k",)
# the stack of [.., C] vectors that go to the head layout, in this order (v_gate: layers >= 1 only)
_STACK = ("r", "k", "v", "a", "w_lora", "v_gate")


class _Weights:
    """The module's parameters as initializers of `g`, each in the layout the graphs apply it in."""

    def __init__(self, module, g: Graph):
        self.g, self.P = g, dict(module.named_parameters())
        self.H, self.N = module.dims.n_head, module.dims.head_size

    def __call__(self, name: str) -> str:
        t = self.P[name]
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _ROWS:
            t = t.reshape(self.H, 1, self.N)
        elif leaf in _COLUMN:
            t = t.reshape(self.H, self.N, 1)
        return self.g.param(name, t)


def _dtypes(module):
    layer = module.layers[0]
    cdt, acc = str(layer.att_key.dtype), str(layer.w0.dtype)
    return cdt.removeprefix("torch."), acc.removeprefix("torch.")


def _ln(g, x, w, p, eps=1e-5):
    return g.op("LayerNormalization", x, w(p + "_w"), w(p + "_b"), axis=-1, epsilon=eps)


def _projections(g, w, i, mixed, heads, v_first, acc):
    """`_Layer.projections` from the six mixed inputs (xr, xw, xk, xv, xa, xg): returns r, lw, k, v, kk, a in the
    head layout (acc) and g (cdt, in the mixes' layout), and v_first. `heads(values)` turns a list of [.., C] values
    (cdt) into the head layout (acc), one value each."""
    p = f"layers.{i}."
    xr, xw, xk, xv, xa, xg = mixed
    mm = lambda x, name: g.op("MatMul", x, w(p + name))  # noqa: E731
    vals = {
        "r": mm(xr, "att_receptance"),
        "k": mm(xk, "att_key"),
        "v": mm(xv, "att_value"),
        "a": g.op("Sigmoid", g.op("Add", w(p + "a0"), mm(mm(xa, "a1"), "a2"))),
        "w_lora": mm(g.op("Tanh", mm(xw, "w1")), "w2"),
    }
    gate = mm(g.op("Sigmoid", mm(xg, "g1")), "g2")
    if i > 0:
        vals["v_gate"] = g.op("Sigmoid", g.op("Add", w(p + "v0"), mm(mm(xv, "v1"), "v2")))
    names = [n for n in _STACK if n in vals]
    h = dict(zip(names, heads([vals[n] for n in names])))
    r, k, v, a = h["r"], h["k"], h["v"], h["a"]
    lw = g.op("Mul", g.op("Sigmoid", g.op("Add", w(p + "w0"), h["w_lora"])), g.const(DECAY_SCALE, acc))
    kk = g.op("Mul", k, w(p + "k_k"))
    norm = g.op("Clip", g.op("ReduceL2", kk, g.ints(-1), keepdims=1), g.const(NORMALIZE_EPS, acc))
    kk = g.op("Div", kk, norm)
    k = g.op("Mul", k, g.op("Add", w(p + "k_c"), g.op("Mul", a, w(p + "k_a"))))
    if i == 0:
        v_first = v
    else:
        v = g.op("Add", v, g.op("Mul", g.op("Sub", v_first, v), h["v_gate"]))
    return r, lw, k, v, kk, a, gate, v_first


def _head_out(g, w, i, y, rk, v, acc):
    """`_Layer.head_out` up to the output projection, in the head layout: GroupNorm(H) of y, ln_x's affine and the
    r_k bonus `rk v` (rk = sum_N(r k r_k) [.., H, T, 1], made by the caller). The affine stays two nodes:
    LayerNormalization's scale cannot carry it, as onnxruntime-web's WebGPU kernel requires a scale of exactly N
    elements."""
    p = f"layers.{i}."
    y = g.op("LayerNormalization", y, g.const([1.0] * w.N, acc), axis=-1, epsilon=GROUPNORM_EPS)
    y = g.op("Add", g.op("Mul", y, w(p + "lnx_w")), w(p + "lnx_b"))
    return g.op("Add", y, g.op("Mul", rk, v))


def _ffn(g, w, i, x, xx2, prev2):
    p = f"layers.{i}."
    kx = g.op("Add", xx2, g.op("Mul", g.op("Sub", prev2, xx2), w(p + "ffn_mix")))
    kx = g.op("Relu", g.op("MatMul", kx, w(p + "ffn_key")))
    return g.op("Add", x, g.op("MatMul", g.op("Mul", kx, kx), w(p + "ffn_value")))


def build_step(module, g: Graph) -> None:
    """Add the step graph of `module` (an RWKV7Step) to `g`: token [1] int64 and the states att_x [L, C],
    att_kv [L, H, N, N], ffn_x [L, C] in; logits [1, V], the states `NAME_out` (and `hidden` [1, C]) out."""
    from ...embed import HIDDEN
    from ...targets.onnx import LOGITS_OUTPUT, TOKEN_INPUT, state_output_name

    d = module.dims
    L, C, V, H, N = d.n_layer, d.n_embd, d.vocab_size, d.n_head, d.head_size
    cdt, acc = _dtypes(module)
    io = acc
    w = _Weights(module, g)

    token = g.input(TOKEN_INPUT, "int64", [1])
    spec = {s.name: s.shape for s in module.state_spec}
    rows = {n: g.split_rows(g.input(n, io, shape), L) for n, shape in spec.items()}
    x = g.op("Gather", w("emb"), token, axis=0)  # [1, C]

    def heads(values):  # m x [1, C] (cdt) -> m x [1, H, 1, N] (acc)
        m = len(values)
        stack = g.cast(g.op("Concat", *values, axis=0), cdt, acc)
        return g.op("Split", g.op("Reshape", stack, g.ints(m, H, 1, N)), g.ints(*[1] * m), outputs=m, axis=0)

    new = {n: [] for n in spec}
    v_first = None
    for i in range(L):
        p = f"layers.{i}."
        xx = _ln(g, x, w, p + "ln1")
        sx = g.cast(rows["att_x"][i], io, cdt)
        mixed = g.op("Add", xx, g.op("Mul", g.op("Sub", sx, xx), w(p + "att_mix")))  # [6, C]
        mixed = g.op("Split", mixed, g.ints(1, 1, 1, 1, 1, 1), outputs=6, axis=0)
        r, lw, k, v, kk, a, gate, v_first = _projections(g, w, i, mixed, heads, v_first, acc)
        S = rows["att_kv"][i]  # [1, H, N, N] (value, key)
        # S = S*w + S @ (-kk (x) kk*a) + v (x) k, with S @ (-kk (x) kk*a) = -(S @ kk) (x) (kk*a)
        sa = g.op("MatMul", S, g.op("Reshape", kk, g.ints(H, N, 1)))  # [1, H, N, 1]
        S = g.op("Sub", g.op("Mul", S, g.op("Exp", lw)), g.op("Mul", sa, g.op("Mul", kk, a)))
        S = g.op("Add", S, g.op("Mul", g.op("Reshape", v, g.ints(H, N, 1)), k))
        r_col = g.op("Reshape", r, g.ints(H, N, 1))
        y = g.op("MatMul", S, r_col)  # [1, H, N, 1]
        rk = g.op("MatMul", k, g.op("Mul", r_col, w(p + "r_k")))  # sum_N(k (r r_k)): [1, H, 1, 1]
        y = _head_out(g, w, i, g.op("Reshape", y, g.ints(1, H, 1, N)), rk, v, acc)
        y = g.cast(g.op("Reshape", y, g.ints(1, C)), acc, cdt)
        x = g.op("Add", x, g.op("MatMul", g.op("Mul", y, gate), w(p + "att_output")))
        xx2 = _ln(g, x, w, p + "ln2")
        x = _ffn(g, w, i, x, xx2, g.cast(rows["ffn_x"][i], io, cdt))
        new["att_x"].append(g.cast(xx, cdt, io))
        new["att_kv"].append(S)
        new["ffn_x"].append(g.cast(xx2, cdt, io))
    x = _ln(g, x, w, "ln_out")
    logits = g.cast(g.op("MatMul", x, w("head")), cdt, io)
    g.output(logits, LOGITS_OUTPUT, io, [1, V])
    for n, shape in spec.items():
        g.output(g.concat_rows(new[n]), state_output_name(n), io, list(shape))
    if module.embedding:
        g.output(g.cast(x, cdt, io), HIDDEN, io, [1, C])


# -- the prompt graph ------------------------------------------------------------------------------------------------

_INT64_MAX = (1 << 63) - 1


class _Chunk:
    """The per-call values every layer's WKV shares (sequence.py's chunk_masks, computed once): T as [1] and as the
    split sizes [T, T] and [T, 1]; masks [2T, 2T]; the identity [T, T]; the block masks, `steps` x [1, T, T]."""

    def __init__(self, g: Graph, tokens: str, steps: int, acc: str):
        self.Tn = g.op("Shape", tokens)  # [1] int64
        self.TT = g.op("Concat", self.Tn, self.Tn, axis=0)
        self.T1 = g.op("Concat", self.Tn, g.ints(1), axis=0)
        i = g.op("Range", g.const(0, "int64"), g.op("Squeeze", self.Tn), g.const(1, "int64"))  # [T]
        t = g.op("Unsqueeze", i, g.ints(1))  # [T, 1]
        # rows 0..T-1 keep s < t, rows T..2T-1 keep s <= t (s < t + 1), in both column halves (s = column mod T)
        cols = g.op("Concat", i, i, axis=0)
        thr = g.op("Unsqueeze", g.op("Concat", i, g.op("Add", i, g.const(1, "int64")), axis=0), g.ints(1))
        self.masks = g.op("Cast", g.op("Less", cols, thr), to=onnx_dtype(acc))
        self.eye = g.op("Cast", g.op("Equal", t, i), to=onnx_dtype(acc))
        # block mask m (m = 1, 2, .., 2**(steps-1)): t // 2m == s // 2m, t // m != s // m, t > s; with q = i // m that
        # is q_t - q_s == 1 and q_t odd (the lower-left m x m block of every 2m block)
        q = g.op("Div", i, g.const([[1 << j] for j in range(steps)], "int64"))  # [steps, T]
        qt, qs = g.op("Unsqueeze", q, g.ints(2)), g.op("Unsqueeze", q, g.ints(1))
        one = g.const(1, "int64")
        odd = g.op("Equal", g.op("Mod", qt, g.const(2, "int64")), one)
        bm = g.op("And", g.op("Equal", g.op("Sub", qt, qs), one), odd)
        bm = g.op("Cast", bm, to=onnx_dtype(acc))  # [steps, T, T]
        self.block_masks = [bm] if steps == 1 else list(g.op("Split", bm, g.ints(*[1] * steps), outputs=steps, axis=0))


def _unit_lower_inverse(g, L, ch: _Chunk):
    """sequence.unit_lower_inverse: D_1 = I - L * bm_0, then D = D - (D @ (L * bm)) @ D per level."""
    D = g.op("Sub", ch.eye, g.op("Mul", L, ch.block_masks[0]))
    for bm in ch.block_masks[1:]:
        D = g.op("Sub", D, g.op("MatMul", g.op("MatMul", D, g.op("Mul", L, bm)), D))
    return D


def _wkv_chunk(g, r, lw, k, v, kk, a, S0, ch: _Chunk, acc):
    """sequence.wkv_chunk over [1, H, T, N] operands and S0 [1, H, N, N]: y [1, H, T, N] and the state after."""
    tr = [0, 1, 3, 2]
    c = g.op("CumSum", lw, g.const(2, "int64"))
    ref = g.op("Mul", g.op("Slice", c, g.ints(-1), g.ints(_INT64_MAX), g.ints(2)), g.const(0.5, acc))
    Einv = g.op("Exp", g.op("Sub", ref, c))
    AR = g.op("Concat", g.op("Mul", kk, g.op("Exp", g.op("Sub", g.op("Sub", c, lw), ref))),
              g.op("Mul", r, g.op("Exp", g.op("Sub", c, ref))), axis=2)  # [a~; r~]: [1, H, 2T, N]
    BK = g.op("Concat", g.op("Mul", g.op("Mul", kk, a), Einv), g.op("Mul", k, Einv), axis=2)  # [b~; k~]
    er = g.op("Exp", ref)
    S0e = g.op("Mul", S0, er)
    Gm = g.op("Mul", g.op("MatMul", AR, g.op("Transpose", BK, perm=tr)), ch.masks)  # [[L_b, L_k], [M_b, M_k]]
    AS = g.op("MatMul", AR, g.op("Transpose", S0e, perm=tr))  # [A_0 S_0^T; R_0 S_0^T]
    Gt, Gb = g.op("Split", Gm, ch.TT, outputs=2, axis=2)
    Lb, Lk = g.op("Split", Gt, ch.TT, outputs=2, axis=3)
    AS0, AS1 = g.op("Split", AS, ch.TT, outputs=2, axis=2)
    Z = g.op("MatMul", _unit_lower_inverse(g, Lb, ch), g.op("Add", AS0, g.op("MatMul", Lk, v)))
    ZV = g.op("Concat", g.op("Neg", Z), v, axis=2)
    y = g.op("Add", AS1, g.op("MatMul", Gb, ZV))
    S = g.op("Mul", g.op("Add", S0e, g.op("MatMul", g.op("Transpose", ZV, perm=tr), BK)), er)
    return y, S


def build_sequence(module, g: Graph) -> None:
    """Add the prompt graph of `module` (an RWKV7Sequence) to `g`: tokens [T] int64 (T dynamic, named SEQ_DIM) and
    the states in; logits [1, V] ([T, V] with all_logits), the states `NAME_out` (and `hidden`, `hidden_sum`) out.
    The residual stream is [1, T, C] (the [6, T, C] mixes split into [1, T, C] rows without a reshape)."""
    from ...embed import HIDDEN, HIDDEN_SUM
    from ...eval_graph import last_row_for_logits
    from ...targets.onnx import LOGITS_OUTPUT, state_output_name
    from ...targets.onnx_seq import SEQ_DIM, TOKENS_INPUT

    d = module.dims
    L, C, V, H, N = d.n_layer, d.n_embd, d.vocab_size, d.n_head, d.head_size
    cdt, acc = _dtypes(module)
    io = acc
    w = _Weights(module, g)
    many = module.all_logits or module.embedding
    last = L - 1

    tokens = g.input(TOKENS_INPUT, "int64", [SEQ_DIM])
    spec = {s.name: s.shape for s in module.state_spec}
    att_x = g.split_rows(g.op("Reshape", g.input("att_x", io, spec["att_x"]), g.ints(L, 1, C)), L)  # [1, 1, C]
    ffn_x = g.split_rows(g.op("Reshape", g.input("ffn_x", io, spec["ffn_x"]), g.ints(L, 1, C)), L)
    att_kv = g.split_rows(g.input("att_kv", io, spec["att_kv"]), L)  # [1, H, N, N]
    ch = _Chunk(g, tokens, module.steps, acc)
    x = g.op("Gather", w("emb"), g.op("Unsqueeze", tokens, g.ints(0)), axis=0)  # [1, T, C]

    def shift(xx, first):  # token shift over [1, T, C]: (rows t-1, with `first` at 0; the last row [1, 1, C])
        return g.op("Split", g.op("Concat", first, xx, axis=1), ch.T1, outputs=2, axis=1)

    def heads(values):  # m x [1, T, C] (cdt) -> m x [1, H, T, N] (acc), as sequence.py's heads
        m = len(values)
        stack = g.cast(g.op("Concat", *values, axis=0), cdt, acc)
        stack = g.op("Transpose", g.op("Reshape", stack, g.ints(m, -1, H, N)), perm=[0, 2, 1, 3])
        return g.op("Split", stack, g.ints(*[1] * m), outputs=m, axis=0)

    new = {n: [] for n in spec}
    v_first = None
    for i in range(L):
        p = f"layers.{i}."
        xx = _ln(g, x, w, p + "ln1")
        prev, xx_last = shift(xx, g.cast(att_x[i], io, cdt))
        mix = g.op("Reshape", w(p + "att_mix"), g.ints(6, 1, C))
        mixed = g.op("Add", xx, g.op("Mul", g.op("Sub", prev, xx), mix))  # [6, T, C]
        mixed = g.op("Split", mixed, g.ints(1, 1, 1, 1, 1, 1), outputs=6, axis=0)
        r, lw, k, v, kk, a, gate, v_first = _projections(g, w, i, mixed, heads, v_first, acc)
        y, S = _wkv_chunk(g, r, lw, k, v, kk, a, att_kv[i], ch, acc)
        r_k = g.op("Reshape", w(p + "r_k"), g.ints(H, 1, N))  # the step's column as a row (folded at load)
        rk = g.op("ReduceSum", g.op("Mul", g.op("Mul", r, k), r_k), g.ints(-1), keepdims=1)  # [1, H, T, 1]
        y = _head_out(g, w, i, y, rk, v, acc)  # [1, H, T, N]
        y = g.op("Reshape", g.op("Transpose", y, perm=[0, 2, 1, 3]), g.ints(1, -1, C))
        x = g.op("Add", x, g.op("MatMul", g.op("Mul", g.cast(y, acc, cdt), gate), w(p + "att_output")))
        xx2 = _ln(g, x, w, p + "ln2")
        prev2, xx2_last = shift(xx2, g.cast(ffn_x[i], io, cdt))
        if i == last and not many:  # only the last row goes on (eval_graph.py finds these nodes by name)
            x, xx2, prev2 = (last_row_for_logits(g, t, axis=1) for t in (x, xx2, prev2))
        x = _ffn(g, w, i, x, xx2, prev2)
        new["att_x"].append(g.cast(xx_last, cdt, io))
        new["att_kv"].append(S)
        new["ffn_x"].append(g.cast(xx2_last, cdt, io))
    x = _ln(g, x, w, "ln_out")  # [1, T, C] (or [1, 1, C]: only the last token's)
    hidden = ()
    if module.embedding:
        xa = g.cast(x, cdt, io)
        x_last = g.op("Slice", x, g.ints(-1), g.ints(_INT64_MAX), g.ints(1))
        hidden = (g.op("Reshape", g.cast(x_last, cdt, io), g.ints(1, C)), g.op("ReduceSum", xa, g.ints(1), keepdims=0))
        if not module.all_logits:
            x = last_row_for_logits(g, x, axis=1)
    logits = g.op("Reshape", g.cast(g.op("MatMul", x, w("head")), cdt, io), g.ints(-1, V))
    # the chunk guard: more than max_chunk tokens answer NaN logits and state (sequence.py says why)
    nan = g.op("Where", g.op("Greater", ch.Tn, g.ints(module.max_chunk)), g.const([float("nan")], io),
               g.const([0.0], io))
    g.output(g.op("Add", logits, nan), LOGITS_OUTPUT, io, [SEQ_DIM if module.all_logits else 1, V])
    outs = {n: g.concat_rows(new[n]) for n in spec}
    for n in ("att_x", "ffn_x"):
        outs[n] = g.op("Reshape", outs[n], g.ints(L, C))
    for n, shape in spec.items():
        g.output(g.op("Add", outs[n], nan), state_output_name(n), io, list(shape))
    for name, h in zip((HIDDEN, HIDDEN_SUM), hidden):
        g.output(g.op("Add", h, nan), name, io, [1, C])
