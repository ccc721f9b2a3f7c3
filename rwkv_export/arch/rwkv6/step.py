"""The RWKV-6.0 graph we export: the RNN-mode step, RWKV-5.2's (rwkv5/step.py: the block skeleton, WKV update,
GroupNorm + gate + output, channel mix, fp16 variant and rescaling, forward) with v6's time-mix inputs.

Equations: the `rwkv` pip package's `att_one_v6_0`, as runtime_ref.rwkv6 writes them:
    d = x_prev - x;  m_w, m_k, m_v, m_r, m_g = tanh((x + d*maa_x) @ maa_w1) @ maa_w2   (w1 [C, 5 Dm], w2 [5, Dm, C])
    x_? = x + d*(maa_? + m_?) for w, k, v, r, g;  r, k, v = x_? W_?;  g = silu(x_g W_g)
    w = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2))   per key channel and per token
then the WKV, GroupNorm and gate of v5.2. FFN: x + d*maa_{k,r} token shift, otherwise v5.2's.

Exporter-specific choices beyond v5.2's: the five maa_? stacked [5, 1, C], so that one Add/Mul/Add makes the five
matmul inputs from the LoRA's [5, 1, C] output (one MatMul: [5, 1, Dm] @ [5, Dm, C]) and one Reshape + Split hands
them out; the LoRAs' weights in the compute dtype, the base decay and everything after its Add in fp32 (the decay
exp(-exp(.)) sits near 1 for slow channels, where fp16 has no resolution).
"""

from __future__ import annotations

import torch

from ..base import ModelDims
from ..rwkv5.step import FP16_NOTE, BaseLayer, RWKV5Step, StepOptions, _param, _t, _to, acc_dtype  # noqa: F401
from .mapping import MIX_ORDER, N_MIX


class Layer6(BaseLayer):
    """An RWKV-6.0 block: data-dependent token shift (5-way LoRA) and data-dependent decay (decay LoRA)."""

    def __init__(self, sd: dict, i: int, d: ModelDims, dtype: torch.dtype, scale: float):
        super().__init__(sd, i, d, dtype, scale)
        p, a, C = f"blocks.{i}.", f"blocks.{i}.att.", d.n_embd

        def vec(key):  # [1, 1, C] -> [C]
            return _t(sd, key).reshape(-1)

        self.maa_x = _param(vec(a + "time_maa_x").reshape(1, C), dtype)
        self.maa = _param(torch.stack([vec(a + f"time_maa_{m}") for m in MIX_ORDER]).reshape(N_MIX, 1, C), dtype)
        self.maa_w1 = _param(_t(sd, a + "time_maa_w1"), dtype)  # [C, 5 Dm]
        self.maa_w2 = _param(_t(sd, a + "time_maa_w2"), dtype)  # [5, Dm, C]
        self.decay_w1 = _param(_t(sd, a + "time_decay_w1"), dtype)  # [C, Dd]
        self.decay_w2 = _param(_t(sd, a + "time_decay_w2"), dtype)  # [Dd, C]
        self.decay = _param(vec(a + "time_decay").reshape(1, C), acc_dtype(dtype))
        self.ffn_mix = _param(torch.stack([vec(p + f"ffn.time_maa_{m}") for m in ("k", "r")]), dtype)

    def projections(self, xx, prev, one_token: bool):
        d = prev - xx
        h = torch.tanh((xx + d * self.maa_x) @ self.maa_w1)  # [T, 5 Dm]
        Dm = self.maa_w2.shape[1]
        if one_token:
            m = h.reshape(N_MIX, 1, Dm) @ self.maa_w2  # [5, 1, C]
            xs = (xx + d * (self.maa + m)).reshape(N_MIX, -1).split(1)
        else:
            # [5, T, C]: slice f of h times w2[f] (bmm: matmul's decomposition would guard on T != 1)
            m = torch.bmm(h.reshape(-1, N_MIX, Dm).transpose(0, 1), self.maa_w2)
            xs = (xx + d * (self.maa + m)).unbind(0)
        xw, xk, xv, xr, xg = xs
        r, k, v, g = self.rkvg(xr, xk, xv, xg)
        z = self.decay + _to(torch.tanh(xw @ self.decay_w1) @ self.decay_w2, self.acc)
        return r, k, v, g, -torch.exp(z)

    def ffn_ends(self, xx, prev):
        return xx, prev


class RWKV6Step(RWKV5Step):
    """forward(token [1] int64, att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C])
    -> (logits [1, V], att_x, att_kv, ffn_x): RWKV5Step's forward over RWKV-6 blocks."""

    layer_class = Layer6
