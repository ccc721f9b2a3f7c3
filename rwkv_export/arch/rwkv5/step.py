"""The RWKV-5.2 graph we export: the RNN-mode step (token + state -> logits + state), state as explicit tensors. Also
the parts RWKV-6 shares (rwkv6/step.py subclasses them): the block skeleton, the WKV update, GroupNorm + gate +
output, the channel mix, rescaling and the step's forward.

Equations: the `rwkv` pip package's `att_one_v5_1` (used for 5.2) / `ffn_one`, as runtime_ref.rwkv5 writes them:
    x_? = x*mix_? + x_prev*(1 - mix_?) for r, k, v, g;  r, k, v = x_? W_?;  g = silu(x_g W_g)
    a = k (x) v [H, key, value];  y = r @ (u*a + S);  S' = a + w*S, w = exp(-exp(time_decay)) and u = time_faaaa
    scaling the key rows;  out = (GroupNorm_H(y, eps 64e-5) * g) W_o.
GroupNorm's eps is the package's 64e-5 (= the training code's 1e-5 applied to y / head_size_divisor, divisor 8).
FFN as RWKV-4: sigmoid(x_r W_r) * (relu(x_k W_k)^2 W_v).

Exporter-specific choices (as the RWKV-7 package's, rwkv7/step.py):
- linear weights stored transposed, [in, out], applied as `x @ W` (MatMul, not Gemm: MatMulNBits needs MatMul);
- LN0 folded into the embedding (in fp64 at build time, rounded once); a layer's token-shift mixes stacked ([4, C]
  time mix, [2, C] channel mix) so that one Sub/Mul/Add + Split makes every matmul input. v5 keeps the checkpoint's
  form `prev + (xx - prev) * mix` (mix used exactly as stored); v6 the form of its own maa, `xx + (prev - xx) * maa`;
- v5's decay w = exp(-exp(time_decay)) and its log -exp(time_decay) (the prompt graph's) precomputed in fp64, [H, N,
  1] / [1, C] in fp32; u as [H, N, 1] (it scales the key rows of a);
- GroupNorm(H) as LayerNormalization over the last dim of the WKV output [1, H, 1, N] (no affine), then ln_x's
  affine stored [H, 1, N] (the layout the output already has: no Reshape before it);
- the state split into rows and concatenated back in one node each (grouped past 13 layers, arch.base.MAX_NODE_IO);
- an fp16 variant: weights and activations fp16, r, k, v cast to fp32 for the WKV, the decay, the WKV state, its
  update and the GroupNorm in fp32 (as the pip package: `matmul(..., output_dtype=torch.float32)`, ln_x in fp32);
  graph I/O (state, logits) fp32 in every variant. With ChatRWKV's rescaling (FP16_RESCALE_EVERY), which never
  changes the state: att_x / ffn_x are LayerNorm outputs, k and v are computed from them, and LayerNorm does not see
  a power-of-two scale of its input (up to its eps 1e-5 against the residual's variance).
  Measured with synthetic weights at 12 x 768 x 65536 over 32 tokens: max |residual| 6.6 (v5.2) / 6.3 (v6), max
  relu(k)^2 24 / 18, far inside fp16's 65504; the fp16 step is finite without rescaling (1.0e-2 / 1.3e-2 of std
  from the fp64 reference) and with it (0.97e-2 / 1.05e-2). Synthetic weights do not grow the residual with depth
  as trained ones do, which is why ChatRWKV rescales v4, v5 and v6 in fp16; it costs one Div per 6 layers and leaves
  the state exact, so the fp16 variant keeps it.

Modules here also run as fp64 copies (`.double()`): every dtype is taken from a parameter, never hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Checkpoint, ModelDims, cat_grouped, split_grouped
from .mapping import STATE_NAMES, state

GROUPNORM_EPS = 64e-5  # ln_x's eps (rwkv 0.8.32's att_one_v5_1 / att_one_v6_0; 1e-5 * head_size_divisor**2)
MIX_ORDER = ("r", "k", "v", "g")  # the time mix's stacked token-shift mixes, in matmul order
# ChatRWKV's fp16 rescaling, which the pip package applies to v4, v5 and v6 alike (RESCALE_LAYER = 6 for fp16):
# att.output and ffn.value of layer i divided by 2**(i // 6), the residual halved after every 6th layer.
FP16_RESCALE_EVERY = 6
FP16_NOTE = ("ChatRWKV's rescaling: the residual halved every 6 layers, att.output / ffn.value of layer i scaled by "
             "2**-(i // 6); the decay, the WKV state and its update, the GroupNorm in fp32")


@dataclass(frozen=True)
class StepOptions:
    # weights/activations; "float16" keeps the decay and the WKV state math in fp32; "float64" (tests: an fp64 build
    # from an fp64 checkpoint, every build-time constant exact) makes everything fp64
    dtype: str = "float32"
    rescale_every: int = 0  # 0: off; FP16_RESCALE_EVERY in the fp16 variant

    @classmethod
    def for_variant(cls, variant: str) -> "StepOptions":
        if variant == "fp16":
            return cls(dtype="float16", rescale_every=FP16_RESCALE_EVERY)
        if variant != "fp32":
            raise ValueError(f"RWKV-5.2 / RWKV-6 step variants are fp32 and fp16, got {variant!r}")
        return cls()


def _to(t, dtype):
    """A cast that is no graph node when the dtype already matches (the fp32 variant has none)."""
    return t if t.dtype == dtype else t.to(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The WKV side's dtype for a build in `dtype`: fp32, or fp64 in an fp64 build (tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _t(sd: dict, key: str):
    """A checkpoint tensor in fp64: build-time arithmetic is done in fp64 and rounded once, when stored."""
    return sd[key].double()


def _param(x, dtype):
    return nn.Parameter(x.to(dtype).contiguous(), requires_grad=False)


def shifted(a, b, mix, one_token: bool):
    """Token-shift mixes `a + (b - a) * m` for every row m of `mix` [M, C]; a, b [T, C]. One token: one Sub/Mul/Add
    on [M, C] and a Split into M rows [1, C]; T tokens: one mix at a time (M [T, C] passes fewer than a stacked
    [M, T, C] and its split)."""
    if one_token:
        return (a + (b - a) * mix).split(1)
    diff = b - a
    return tuple(a + diff * m for m in mix.unbind(0))


def wkv_one(r, k, v, w, u, S):
    """One token of the v5/v6 WKV: r, k, v [1, C]; w, u [H, N, 1] (scaling key rows); S [1, H, N, N] (key, value).
    Returns (y [1, H, 1, N], S')."""
    H, N = u.shape[0], u.shape[1]
    a = k.reshape(H, N, 1) * v.reshape(H, 1, N)  # k (x) v
    return r.reshape(H, 1, N) @ (u * a + S), a + w * S


class BaseLayer(nn.Module):
    """One block's weights that v5.2 and v6 share, in the layouts they are applied in: LN1/LN2, the r/k/v/g/output
    projections, u, ln_x, the channel mix. Subclasses add the token shift and the decay (`projections`)."""

    def __init__(self, sd: dict, i: int, d: ModelDims, dtype: torch.dtype, scale: float):
        super().__init__()
        p, a = f"blocks.{i}.", f"blocks.{i}.att."
        H, N = d.n_head, d.head_size
        self.layer, self.H, self.N = i, H, N
        acc = acc_dtype(dtype)

        def w(key, scale=1.0):  # a linear layer's weight, [out, in] -> [in, out]
            return _param(_t(sd, key).t() / scale, dtype)

        def heads(key):  # [C] -> [H, 1, N] (the layout of the step's WKV output [1, H, 1, N]), in acc
            return _param(_t(sd, key).reshape(H, 1, N), acc)

        self.ln1_w, self.ln1_b = _param(_t(sd, p + "ln1.weight"), dtype), _param(_t(sd, p + "ln1.bias"), dtype)
        self.ln2_w, self.ln2_b = _param(_t(sd, p + "ln2.weight"), dtype), _param(_t(sd, p + "ln2.bias"), dtype)
        self.att_receptance = w(a + "receptance.weight")
        self.att_key = w(a + "key.weight")
        self.att_value = w(a + "value.weight")
        self.att_gate = w(a + "gate.weight")
        self.att_output = w(a + "output.weight", scale=scale)  # scale: the fp16 rescaling (1 otherwise)
        self.att_u = _param(_t(sd, a + "time_faaaa").reshape(H, N, 1), acc)  # scales key rows, as w does
        self.lnx_w, self.lnx_b = heads(a + "ln_x.weight"), heads(a + "ln_x.bias")
        self.ffn_key = w(p + "ffn.key.weight")
        self.ffn_receptance = w(p + "ffn.receptance.weight")
        self.ffn_value = w(p + "ffn.value.weight", scale=scale)

    @property
    def cdt(self):  # compute dtype (fp16 in the fp16 variant, fp64 in a .double() copy)
        return self.att_key.dtype

    @property
    def acc(self):  # WKV / state dtype (fp32, or fp64 in a .double() copy)
        return self.att_u.dtype

    def rkvg(self, xr, xk, xv, xg):
        """r, k, v (in `acc`) and the gate silu(g) (in `cdt`) from their token-shifted inputs, each [T, C]."""
        acc = self.acc
        r = _to(xr @ self.att_receptance, acc)
        k = _to(xk @ self.att_key, acc)
        v = _to(xv @ self.att_value, acc)
        return r, k, v, F.silu(xg @ self.att_gate)

    per_token_decay = True

    def projections(self, xx, prev, one_token: bool):
        """The time mix up to the WKV for rows xx [T, C] and their shifted rows prev: (r, k, v, g, lw), lw the log
        decay, [T, C] or [1, C] (per channel, the same for every token)."""
        raise NotImplementedError

    def step_decay(self, lw):
        """The decay w [H, N, 1] of one token from its log decay lw [1, C]."""
        return torch.exp(lw).reshape(self.H, self.N, 1)

    def head_out(self, y, g):
        """GroupNorm(H) of the WKV output y [T, H, 1, N] (acc), ln_x's affine, the gate g [T, C] and the output
        projection."""
        T = y.shape[0]
        y = F.layer_norm(y, (self.N,), eps=GROUPNORM_EPS) * self.lnx_w + self.lnx_b
        return (_to(y.reshape(T, -1), self.cdt) * g) @ self.att_output

    def ffn_ends(self, xx, prev):
        """(a, b) of the channel mix's token shift a + (b - a) * mix: v5 (prev, xx), v6 (xx, prev)."""
        raise NotImplementedError

    def ffn(self, xx, prev, one_token: bool):
        xk, xr = shifted(*self.ffn_ends(xx, prev), self.ffn_mix, one_token)
        k = torch.relu(xk @ self.ffn_key)
        return torch.sigmoid(xr @ self.ffn_receptance) * ((k * k) @ self.ffn_value)


class Layer5(BaseLayer):
    """An RWKV-5.2 block: static token-shift mixes and a static decay per channel."""

    per_token_decay = False  # projections' lw is [1, C], the same for every token

    def __init__(self, sd: dict, i: int, d: ModelDims, dtype: torch.dtype, scale: float):
        super().__init__(sd, i, d, dtype, scale)
        p, a, acc = f"blocks.{i}.", f"blocks.{i}.att.", acc_dtype(dtype)
        self.att_mix = _param(torch.stack([_t(sd, a + f"time_mix_{m}").reshape(-1) for m in MIX_ORDER]), dtype)
        self.ffn_mix = _param(torch.stack([_t(sd, p + f"ffn.time_mix_{m}").reshape(-1) for m in ("k", "r")]), dtype)
        lw = -torch.exp(_t(sd, a + "time_decay"))  # [H, N]: log w, per key channel
        self.att_w = _param(torch.exp(lw).reshape(self.H, self.N, 1), acc)
        self.att_lw = _param(lw.reshape(1, -1), acc)

    def projections(self, xx, prev, one_token: bool):
        r, k, v, g = self.rkvg(*shifted(prev, xx, self.att_mix, one_token))
        return r, k, v, g, self.att_lw

    def step_decay(self, lw):
        return self.att_w

    def ffn_ends(self, xx, prev):
        return prev, xx


class RWKV5Step(nn.Module):
    """forward(token [1] int64, att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C])
    -> (logits [1, V], att_x, att_kv, ffn_x). State and logits fp32 (fp64 in an fp64 build or a .double() copy)."""

    layer_class = Layer5
    # True (embed.with_embedding): the graph also outputs `hidden`, the final hidden state after ln_out [1, C] fp32
    embedding = False

    def __init__(self, ckpt: Checkpoint, options: StepOptions = StepOptions()):
        super().__init__()
        sd, d = ckpt.tensors, ckpt.dims
        self.arch = ckpt.arch
        self.dims: ModelDims = d
        self.state_spec = state(d)
        self.options = options
        dt = getattr(torch, options.dtype)
        every = options.rescale_every
        emb = F.layer_norm(sd["emb.weight"].double(), (d.n_embd,), sd["blocks.0.ln0.weight"].double(),
                           sd["blocks.0.ln0.bias"].double())
        self.emb = nn.Parameter(emb.to(dt).contiguous(), requires_grad=False)
        self.layers = nn.ModuleList(self.layer_class(sd, i, d, dt, float(2 ** (i // every)) if every else 1.0)
                                    for i in range(d.n_layer))
        self.ln_out_w = nn.Parameter(sd["ln_out.weight"].double().to(dt), requires_grad=False)
        self.ln_out_b = nn.Parameter(sd["ln_out.bias"].double().to(dt), requires_grad=False)
        self.head = nn.Parameter(sd["head.weight"].double().t().to(dt).contiguous(), requires_grad=False)

    def rescaled(self, i: int, x):
        """The residual after layer i: halved after every `rescale_every`-th layer (fp16), else as it is."""
        every = self.options.rescale_every
        return x / 2 if every and (i + 1) % every == 0 else x

    def forward(self, token, att_x, att_kv, ffn_x):
        x = F.embedding(token, self.emb)  # [1, C]
        att_x, att_kv, ffn_x = split_grouped(att_x), split_grouped(att_kv), split_grouped(ffn_x)
        new_x, new_kv, new_f = [], [], []
        for i, layer in enumerate(self.layers):
            cdt = layer.cdt
            xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b)
            r, k, v, g, lw = layer.projections(xx, _to(att_x[i], cdt), one_token=True)
            y, S = wkv_one(r, k, v, layer.step_decay(lw), layer.att_u, att_kv[i])
            x = x + layer.head_out(y, g)
            xx2 = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b)
            x = self.rescaled(i, x + layer.ffn(xx2, _to(ffn_x[i], cdt), one_token=True))
            new_x.append(_to(xx, att_x[i].dtype))
            new_kv.append(S)
            new_f.append(_to(xx2, ffn_x[i].dtype))
        x = F.layer_norm(x, x.shape[-1:], self.ln_out_w, self.ln_out_b)
        logits = _to(x @ self.head, att_kv[0].dtype)
        out = (logits, cat_grouped(new_x), cat_grouped(new_kv), cat_grouped(new_f))
        return (*out, _to(x, logits.dtype)) if self.embedding else out

    def new_state(self) -> dict:
        return {s.name: torch.full(s.shape, s.init, dtype=torch.float32) for s in self.state_spec}

    def example_inputs(self) -> tuple:
        s = self.new_state()
        dt = self.layers[0].acc
        return (torch.zeros(1, dtype=torch.long), *(s[n].to(dt) for n in STATE_NAMES))
