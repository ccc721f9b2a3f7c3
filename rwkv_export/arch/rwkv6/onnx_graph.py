"""The RWKV-6.0 step and prompt graphs written node by node: RWKV-5.2's (rwkv5/onnx_graph.py: the block skeleton,
WKV, GroupNorm + gate + output, channel mix, rescaling, the chunked WKV of the prompt graph) over `Block6`, the graph
side of rwkv6/step.py's Layer6 (its data-dependent token shift and decay), as RWKV6Step is RWKV5Step over Layer6."""

from __future__ import annotations

from ..rwkv5 import onnx_graph as v5
from .mapping import N_MIX


class Block6(v5.Block5):
    """Layer6's methods in graph form (the rest is Block5's)."""

    def projections(self, p: str, xx: str, prev: str, one_token: bool):
        """Layer6.projections: the 5-way mix LoRA makes the five token-shifted inputs, then r, k, v, gate and the
        log decay lw = -exp(decay + tanh(x_w W_d1) W_d2) [T, C]."""
        g = self.g
        maa_w2 = self.w(p + "maa_w2")
        Dm = self.params[p + "maa_w2"].shape[1]
        d = g.op("Sub", prev, xx)
        h = g.op("Tanh", g.op("MatMul", g.op("Add", xx, g.op("Mul", d, self.w(p + "maa_x"))), self.w(p + "maa_w1")))
        if one_token:
            m = g.op("MatMul", g.op("Reshape", h, g.ints(N_MIX, 1, Dm)), maa_w2)  # [5, 1, C]
            mixed = g.op("Add", xx, g.op("Mul", d, g.op("Add", self.w(p + "maa"), m)))
            xs = g.op("Split", g.op("Reshape", mixed, g.ints(N_MIX, -1)), g.ints(*[1] * N_MIX), outputs=N_MIX,
                      axis=0)
        else:  # [5, T, C]: slice f of h times w2[f], then the five [T, C] inputs
            h = g.op("Transpose", g.op("Reshape", h, g.ints(-1, N_MIX, Dm)), perm=[1, 0, 2])
            mixed = g.op("Add", xx, g.op("Mul", d, g.op("Add", self.w(p + "maa"), g.op("MatMul", h, maa_w2))))
            xs = [g.op("Squeeze", x, g.ints(0))
                  for x in g.op("Split", mixed, g.ints(*[1] * N_MIX), outputs=N_MIX, axis=0)]
        xw, xk, xv, xr, xg = xs
        r, k, v, gate = self.rkvg(p, xr, xk, xv, xg)
        lora = g.op("MatMul", g.op("Tanh", g.op("MatMul", xw, self.w(p + "decay_w1"))), self.w(p + "decay_w2"))
        z = g.op("Add", self.w(p + "decay"), g.cast(lora, self.cdt, self.acc))
        return r, k, v, gate, g.op("Neg", g.op("Exp", z))

    def step_decay(self, p: str, lw: str) -> str:
        """BaseLayer.step_decay: w = exp(lw) as [H, N, 1]."""
        return self.g.op("Reshape", self.g.op("Exp", lw), self.g.ints(self.H, self.N, 1))

    def seq_log_decay(self, p: str, lw: str) -> str:
        return lw

    def ffn_ends(self, xx: str, prev: str) -> tuple[str, str]:
        """Layer6.ffn_ends: xx + (prev - xx) * maa."""
        return xx, prev


def build_step(module, g) -> None:
    """The step graph of an RWKV6Step: rwkv5's build_step over Block6."""
    v5.build_step(module, g, Block6)


def build_sequence(module, g) -> None:
    """The prompt graph of an RWKV6Sequence: rwkv5's build_sequence over Block6."""
    v5.build_sequence(module, g, Block6)
