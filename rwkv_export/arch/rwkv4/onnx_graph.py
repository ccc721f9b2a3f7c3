"""The RWKV-4 step graph written node by node (onnx_build.py says why: no tracing).

It mirrors `RWKV4Step.forward` (step.py) one node per torch op and takes every weight from the module's parameters,
under the parameters' names: step.py is where the weights are prepared and where each layout choice is explained.
The dtypes follow the module's: weights and activations in the compute dtype of `att_key` (fp32, fp16 or fp64), the
WKV accumulators in the dtype of `att_decay`; the graph's I/O (state, logits, hidden) in the state's dtype.
"""

from __future__ import annotations

from ...onnx_build import Graph
from .spec import STATE_NAMES


def _params(module):
    return dict(module.named_parameters())


def build_step(module, g: Graph) -> None:
    """Add the step graph of `module` (an RWKV4Step) to `g`: inputs token [1] int64 and the five [L, C] states,
    outputs logits [1, V], the states `NAME_out` (and `hidden` [1, C] with the embedding flag)."""
    from ...embed import HIDDEN
    from ...targets.onnx import LOGITS_OUTPUT, TOKEN_INPUT, state_output_name

    P = _params(module)
    d = module.dims
    L, C, V = d.n_layer, d.n_embd, d.vocab_size
    every = module.options.rescale_every
    cdt = str(module.layers[0].att_key.dtype)
    acc = str(module.layers[0].att_decay.dtype)
    io = acc  # state and logits: fp32 (fp64 in an fp64 build)

    def w(name):
        return g.param(name, P[name])

    def ln(x, prefix_w, prefix_b):
        return g.op("LayerNormalization", x, w(prefix_w), w(prefix_b), axis=-1, epsilon=1e-5)

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
