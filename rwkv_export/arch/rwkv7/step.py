"""The RWKV-7 (x070) graph we export: the RNN-mode step (token + state -> logits + state), state as explicit tensors.

Equations: ChatRWKV's `RWKV_x070_TMix_one` / `CMix_one` (shared/notes/rwkv5-7.md). Exporter-specific choices:
- linear weights stored transposed, [in, out], applied as `x @ W` (MatMul, not Gemm: MatMulNBits needs MatMul); the
  LoRA matrices are already [in, out] in the checkpoint and are used as they are;
- LN0 folded into the embedding; the six token-shift mixes stacked [6, C] so that one Sub/Mul/Add + Split makes
  every matmul input; the decay kept as its log, `lw = DECAY_SCALE * sigmoid(w0 + lora)` (the sequence graph
  needs log w; the step takes one Exp);
  `k * (1 + (a - 1) * k_a)` as `k * (k_c + a * k_a)` with `k_c = 1 - k_a` precomputed; r_k, ln_x and the LoRA
  biases reshaped at build time to the [H, N] / [1, C] layouts they are applied in;
- the rank-one part of the state update as a matrix-vector product and a broadcast outer product,
  `S @ (-kk (x) kk*a) = -(S @ kk) (x) (kk*a)` (O(N^2) per head instead of the O(N^3) of forming the [N, N] outer
  product and multiplying by it); batched over the heads, [H, N, N];
- GroupNorm(H) as LayerNormalization over the last dim of [H, N] (no affine), then the per-channel affine in [H, N]
  where the r_k bonus is added too. Exported alone at opset 18: this form 5 nodes (2 Reshape, LayerNormalization,
  Mul, Add); F.group_norm also 5 (InstanceNormalization in place of LayerNormalization); mean/var by hand 12.
  LayerNormalization is the op every ONNX consumer of the LN1/LN2 layers already needs;
- kk's per-head normalisation (F.normalize) as x / max(vector_norm(x), eps): ReduceL2 + Clip + Div (sum of squares
  + Sqrt by hand: 2 nodes more);
- the state is split into rows and concatenated back as RWKV4Step does (one node each, grouped past 13 layers).
  The ONNX graph (onnx_graph.py, written node by node; it stores w0, k_k, k_a, k_c, ln_x as [H, 1, N] and r_k as
  [H, N, 1]) has 854 nodes at the 0.1B shapes (12 layers; the dynamo trace had 914): 203 MatMul (17 per layer, 15 in
  layer 0, + head), 72 Reshape (144 traced), 191 Mul, 142 Add, 37 LayerNormalization, 12 each of ReduceL2 / Clip /
  Div / Exp / Tanh / Relu, no Gemm;
- an fp16 variant: weights and activations fp16, the decay (`w0` add, sigmoid, exp), the WKV state matrix, its
  update, `S @ r` and the GroupNorm in fp32; the graph's I/O (state, logits) fp32 in every variant. No rescaling:
  ChatRWKV runs x070 in fp16 without one, and the activations at the 0.1B shapes stay far inside fp16's range
  (FP16_NOTE).

Modules here also run as fp64 copies (`.double()`): every dtype is taken from a parameter, never hard-coded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Checkpoint, ModelDims, cat_grouped, split_grouped
from .mapping import STATE_NAMES, state

# w = exp(DECAY_SCALE * sigmoid(w0 + lora)) lies in (0.545, 1). RWKV-LM trains with exp(-0.5) exactly (and
# runtime_ref uses it); the pip package rounds it to 0.606531 (a 5.6e-7 relative change of log w).
DECAY_SCALE = -math.exp(-0.5)
GROUPNORM_EPS = 64e-5  # ln_x's eps in x070 (not GroupNorm's default 1e-5)
NORMALIZE_EPS = 1e-12  # F.normalize's eps for kk = k*k_k / max(|k*k_k|, eps), per head
MIX_ORDER = ("r", "w", "k", "v", "a", "g")
# Measured with synthetic.py's "0.1b" (12 x 768, seed 0, 64 tokens, fp32 run): the largest value of any op is 66 (a
# logit), of the residual stream 11, of the FFN's squared relu 22; fp16's max is 65504. The fp16 step stayed
# finite, at 1.5e-2 max|delta|/std of the fp32 logits, same top-1. (Synthetic weights: a trained checkpoint's
# activations are larger, and ChatRWKV's fp16 runs of released x070 models are the evidence for those.)
FP16_NOTE = "no rescaling (ChatRWKV runs x070 in fp16 without one); decay, WKV state and GroupNorm in fp32"


@dataclass(frozen=True)
class StepOptions:
    # weights/activations; "float16" keeps the decay and the WKV state math in fp32; "float64" (tests: an fp64 build
    # from an fp64 checkpoint, every build-time constant exact) makes everything fp64
    dtype: str = "float32"

    @classmethod
    def for_variant(cls, variant: str) -> "StepOptions":
        if variant == "fp16":
            return cls(dtype="float16")
        if variant != "fp32":
            raise ValueError(f"RWKV-7 step variants are fp32 and fp16, got {variant!r}")
        return cls()


def _to(t, dtype):
    """A cast that is no graph node when the dtype already matches (the fp32 variant has none)."""
    return t if t.dtype == dtype else t.to(dtype)


class _Layer(nn.Module):
    """One x070 block's weights in the layouts they are applied in. `layer` 0 has no value-residual LoRA."""

    def __init__(self, sd: dict, i: int, d: ModelDims, dtype: torch.dtype):
        super().__init__()
        p, a = f"blocks.{i}.", f"blocks.{i}.att."
        H, N = d.n_head, d.head_size
        self.layer, self.H, self.N = i, H, N

        # the WKV side's dtype: fp32, or fp64 in an fp64 build (tests)
        acc = torch.float64 if dtype == torch.float64 else torch.float32

        def t(key):  # build-time arithmetic in fp64, rounded once when stored
            return sd[key].double()

        def param(x, dt=dtype):
            return nn.Parameter(x.to(dt).contiguous(), requires_grad=False)

        def vec(key):  # [1, 1, C] -> [C]
            return t(key).reshape(-1)

        self.ln1_w, self.ln1_b = param(t(p + "ln1.weight")), param(t(p + "ln1.bias"))
        self.ln2_w, self.ln2_b = param(t(p + "ln2.weight")), param(t(p + "ln2.bias"))
        self.att_mix = param(torch.stack([vec(a + f"x_{m}") for m in MIX_ORDER]))  # [6, C]
        self.att_receptance = param(t(a + "receptance.weight").t())
        self.att_key = param(t(a + "key.weight").t())
        self.att_value = param(t(a + "value.weight").t())
        self.att_output = param(t(a + "output.weight").t())
        # decay LoRA; its bias and the scale stay fp32 (a decay near 1 needs fp32's resolution)
        self.w1, self.w2 = param(t(a + "w1")), param(t(a + "w2"))
        self.w0 = param(vec(a + "w0").reshape(1, -1), acc)
        self.a1, self.a2, self.a0 = param(t(a + "a1")), param(t(a + "a2")), param(vec(a + "a0").reshape(1, -1))
        self.g1, self.g2 = param(t(a + "g1")), param(t(a + "g2"))
        if i > 0:
            self.v1, self.v2 = param(t(a + "v1")), param(t(a + "v2"))
            self.v0 = param(vec(a + "v0").reshape(1, -1))
        # the WKV side stays fp32 in every variant: kk's normalisation (a sum of squares of k, which can pass fp16's
        # range), the key's scaling by a, r_k [H, N] and ln_x's affine [H, N]
        self.k_k = param(vec(a + "k_k").reshape(1, -1), acc)
        k_a = vec(a + "k_a").reshape(1, -1)
        self.k_a, self.k_c = param(k_a, acc), param(1.0 - k_a, acc)
        self.r_k = param(t(a + "r_k").reshape(H, N), acc)
        self.lnx_w = param(t(a + "ln_x.weight").reshape(H, N), acc)
        self.lnx_b = param(t(a + "ln_x.bias").reshape(H, N), acc)
        self.ffn_mix = param(vec(p + "ffn.x_k").reshape(1, -1))
        self.ffn_key = param(t(p + "ffn.key.weight").t())
        self.ffn_value = param(t(p + "ffn.value.weight").t())

    @property
    def cdt(self):  # compute dtype (fp16 in the fp16 variant, fp64 in a .double() copy)
        return self.att_key.dtype

    @property
    def acc(self):  # WKV / state dtype (fp32, or fp64 in a .double() copy)
        return self.w0.dtype

    def projections(self, xx, prev, v_first, one_row: bool = True):
        """The time mix up to the WKV, for rows xx [T, C] with their shifted rows prev [T, C] (T = 1 in the step).
        Returns r, lw (the log decay, log w in (DECAY_SCALE, 0)), k, v, kk (unit per head), a, g, each [T, C], all but
        g in `acc`; and v_first (layer 0's v, [T, C], acc). `one_row` (the step): the six mixes as one [6, C]
        Sub/Mul/Add + Split; over T rows (the sequence graph) one mix at a time, which skips the Split's copy."""
        acc = self.acc
        diff = prev - xx
        if one_row:
            xr, xw, xk, xv, xa, xg = (xx + diff * self.att_mix).split(1)
        else:
            xr, xw, xk, xv, xa, xg = (xx + diff * m for m in self.att_mix.unbind(0))
        r = _to(xr @ self.att_receptance, acc)
        k = _to(xk @ self.att_key, acc)
        v = _to(xv @ self.att_value, acc)
        a = _to(torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2), acc)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        lw = DECAY_SCALE * torch.sigmoid(self.w0 + _to(torch.tanh(xw @ self.w1) @ self.w2, acc))
        T = k.shape[0]
        kk = (k * self.k_k).reshape(T, self.H, self.N)
        kk = kk / torch.clamp(torch.linalg.vector_norm(kk, dim=-1, keepdim=True), min=NORMALIZE_EPS)  # ReduceL2
        k = k * (self.k_c + a * self.k_a)
        if self.layer == 0:
            v_first = v
        else:
            v = v + (v_first - v) * _to(torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2), acc)
        return r, lw, k, v, kk.reshape(T, -1), a, g, v_first

    def head_out(self, y, r, k, v, g):
        """GroupNorm(H) of the WKV output y [T, H, N] (acc), the r_k bonus, the gate and the output projection."""
        T = y.shape[0]
        y = F.layer_norm(y, (self.N,), eps=GROUPNORM_EPS) * self.lnx_w + self.lnx_b
        rk = (r * k).reshape(T, self.H, self.N) * self.r_k
        y = y + rk.sum(-1, keepdim=True) * v.reshape(T, self.H, self.N)
        return (_to(y.reshape(T, -1), self.cdt) * g) @ self.att_output

    def ffn(self, xx, prev):
        k = xx + (prev - xx) * self.ffn_mix
        k = torch.relu(k @ self.ffn_key)
        return (k * k) @ self.ffn_value


class RWKV7Step(nn.Module):
    """forward(token [1] int64, att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C])
    -> (logits [1, V], att_x, att_kv, ffn_x). State and logits fp32 (fp64 in a .double() copy)."""

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
        emb = F.layer_norm(sd["emb.weight"].double(), (d.n_embd,), sd["blocks.0.ln0.weight"].double(),
                           sd["blocks.0.ln0.bias"].double())
        self.emb = nn.Parameter(emb.to(dt).contiguous(), requires_grad=False)
        self.layers = nn.ModuleList(_Layer(sd, i, d, dt) for i in range(d.n_layer))
        self.ln_out_w = nn.Parameter(sd["ln_out.weight"].double().to(dt), requires_grad=False)
        self.ln_out_b = nn.Parameter(sd["ln_out.bias"].double().to(dt), requires_grad=False)
        self.head = nn.Parameter(sd["head.weight"].double().t().to(dt).contiguous(), requires_grad=False)

    def forward(self, token, att_x, att_kv, ffn_x):
        H, N = self.dims.n_head, self.dims.head_size
        x = F.embedding(token, self.emb)  # [1, C]
        att_x, att_kv, ffn_x = split_grouped(att_x), split_grouped(att_kv), split_grouped(ffn_x)
        new_x, new_kv, new_f = [], [], []
        v_first = None
        for i, layer in enumerate(self.layers):
            cdt = layer.cdt
            xx = F.layer_norm(x, x.shape[-1:], layer.ln1_w, layer.ln1_b)
            r, lw, k, v, kk, a, g, v_first = layer.projections(xx, _to(att_x[i], cdt), v_first)
            S = att_kv[i]  # [1, H, N, N] (value, key)
            # S = S*w + S @ (-kk (x) kk*a) + v (x) k, with S @ (-kk (x) kk*a) = -(S @ kk) (x) (kk*a)
            sa = S @ kk.reshape(H, N, 1)
            S = (S * torch.exp(lw).reshape(H, 1, N) - sa * (kk * a).reshape(H, 1, N)
                 + v.reshape(H, N, 1) * k.reshape(H, 1, N))
            y = (S @ r.reshape(H, N, 1)).reshape(1, H, N)
            x = x + layer.head_out(y, r, k, v, g)
            xx2 = F.layer_norm(x, x.shape[-1:], layer.ln2_w, layer.ln2_b)
            x = x + layer.ffn(xx2, _to(ffn_x[i], cdt))
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
        return (torch.zeros(1, dtype=torch.long), *(s[n] for n in STATE_NAMES))
