"""The RWKV-4 graph we export: the RNN-mode step (token + state -> logits + state), state as explicit tensors.

One readable module (nanoGPT style). Exporter-specific choices, each for a reason:
- linear weights are stored transposed, [in, out], and applied as `x @ W`: this exports as MatMul (not Gemm), which
  4-bit quantization (MatMulNBits) needs;
- LN0 is folded into the embedding table at build time (one row gather per token instead of a LayerNorm);
- `-exp(time_decay)` is computed once at build time, and a layer's token-shift mixes are stacked ([3, C] for time mix,
  [2, C] for channel mix) so one Sub/Mul/Add + Split produces every matmul input: `prev + (xx - prev) * mix`;
- the state is split into rows and concatenated back in one node each up to 13 layers, in groups of 8 past that
  (arch.base.MAX_NODE_IO), never per row with Gather/Unsqueeze/stack: 809 -> 589 nodes at
  12 layers; one interleaved onnxruntime run at 169M shapes, 2 threads: fp32 +5%, int8 +4%, int4 +18% tok/s;
- an fp16 variant (`StepOptions(dtype="float16")`): weights and activations in fp16 with ChatRWKV's rescaling
  (`rescale_every`) keeping activations inside fp16's range, while the WKV accumulators (aa, bb, pp) are computed in
  fp32; the graph's I/O (state and logits) stays fp32 for every variant, so clients never change with the variant.

A lazy module (`RWKV4Step(ckpt, options, lazy=True)`, what the ONNX export builds from) holds every parameter on the
meta device (names, shapes and dtypes only) and makes each one's values when `prepared(name)` asks, from the
checkpoint's tensors, by the same code (a layer at a time): the graph builder writes each weight to the data file and
lets it go, so the export never holds an fp32 copy of the model (680 MB at 169M shapes) beside the checkpoint.
TFLite and TF.js convert a whole module (the default), whose parameters hold their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base import Checkpoint, ModelDims, cat_grouped, split_grouped
from .spec import STATE_DOCS, STATE_INIT, STATE_NAMES, state  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class StepOptions:
    rescale_every: int = 0  # 0: off. 6 for fp16 (rwkv4.md)
    dtype: str = "float32"  # weights/activations; "float16" keeps WKV state math in fp32

    @classmethod
    def for_variant(cls, variant: str) -> "StepOptions":
        if variant == "fp16":
            return cls(rescale_every=FP16_RESCALE_EVERY, dtype="float16")
        return cls()


# ChatRWKV's fp16 rescale period for RWKV-4: halve the residual every 6 layers, weights of later layers scaled to match
FP16_RESCALE_EVERY = 6


class _Layer(nn.Module):
    def __init__(self, sd: dict, i: int, scale: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        p = f"blocks.{i}."
        self.dtype = dtype

        def t(key):
            return sd[p + key].float()

        def param(x, dt=dtype):
            return nn.Parameter(x.to(dt).contiguous(), requires_grad=False)

        self.ln1_w, self.ln1_b = param(t("ln1.weight")), param(t("ln1.bias"))
        self.ln2_w, self.ln2_b = param(t("ln2.weight")), param(t("ln2.bias"))
        # token-shift mixes stacked, one row per matmul input: [3, C] (k, v, r) and [2, C] (k, r), so that a layer mixes
        # all three (two) inputs in three elementwise nodes: prev + (xx - prev) * mix
        self.att_mix = param(torch.stack([t(f"att.time_mix_{n}").reshape(-1) for n in ("k", "v", "r")]))
        self.att_decay = param(-torch.exp(t("att.time_decay")), torch.float32)  # WKV math stays fp32
        self.att_first = param(t("att.time_first"), torch.float32)
        self.att_key = param(t("att.key.weight").t())
        self.att_value = param(t("att.value.weight").t())
        self.att_receptance = param(t("att.receptance.weight").t())
        self.att_output = param(t("att.output.weight").t() / scale)
        self.ffn_mix = param(torch.stack([t(f"ffn.time_mix_{n}").reshape(-1) for n in ("k", "r")]))
        self.ffn_key = param(t("ffn.key.weight").t())
        self.ffn_receptance = param(t("ffn.receptance.weight").t())
        self.ffn_value = param(t("ffn.value.weight").t() / scale)

    def _c(self, t):
        """To the compute dtype (a no-op, and no graph node, in the fp32 variant)."""
        return t if t.dtype == self.dtype else t.to(self.dtype)

    @staticmethod
    def _f32(t):
        return t if t.dtype == torch.float32 else t.float()

    def time_mix(self, x, sx, aa, bb, pp):
        """x: [1, C]; sx/aa/bb/pp: [1, C] fp32. Returns the residual update and the new (sx, aa, bb, pp), fp32."""
        sx = self._c(sx)
        xx = F.layer_norm(x, x.shape[-1:], self.ln1_w, self.ln1_b)
        xk, xv, xr = (sx + (xx - sx) * self.att_mix).split(1)  # [3, C] -> three [1, C] rows: one Split node
        r = torch.sigmoid(xr @ self.att_receptance)
        k = self._f32(xk @ self.att_key)
        v = self._f32(xv @ self.att_value)
        ww = self.att_first + k
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)
        ww = pp + self.att_decay
        p = torch.maximum(ww, k)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(k - p)
        new_aa = e1 * aa + e2 * v
        new_bb = e1 * bb + e2
        return (r * self._c(wkv)) @ self.att_output, (self._f32(xx), new_aa, new_bb, p)

    def channel_mix(self, x, fx):
        fx = self._c(fx)
        xx = F.layer_norm(x, x.shape[-1:], self.ln2_w, self.ln2_b)
        xk, xr = (fx + (xx - fx) * self.ffn_mix).split(1)
        r = torch.sigmoid(xr @ self.ffn_receptance)
        k = torch.relu(xk @ self.ffn_key)
        k = k * k
        return r * (k @ self.ffn_value), self._f32(xx)


def _top_weight(sd: dict, name: str, d: ModelDims, dt: torch.dtype) -> torch.Tensor:
    """One of the step's weights outside the layers, from the checkpoint's tensors `sd`."""
    if name == "emb":  # LN0 folded in
        emb = sd["emb.weight"].float()
        emb = F.layer_norm(emb, (d.n_embd,), sd["blocks.0.ln0.weight"].float(), sd["blocks.0.ln0.bias"].float())
        return emb.to(dt).contiguous()
    if name == "head":  # transposed in the file's dtype first: the largest transient is then a bf16 copy, not fp32
        return sd["head.weight"].t().contiguous().float().to(dt)
    return sd[{"ln_out_w": "ln_out.weight", "ln_out_b": "ln_out.bias"}[name]].to(dt)


class RWKV4Step(nn.Module):
    """forward(token[1] int64, att_x, att_aa, att_bb, att_pp, ffn_x each [L, C] fp32)
    -> (logits [1, V], att_x, att_aa, att_bb, att_pp, ffn_x)"""

    # True (embed.with_embedding): the graph also outputs `hidden`, the final hidden state after ln_out [1, C] fp32
    embedding = False

    def __init__(self, ckpt: Checkpoint, options: StepOptions = StepOptions(), lazy: bool = False):
        super().__init__()
        d = ckpt.dims
        self.arch = ckpt.arch
        self.dims: ModelDims = d
        self.state_spec = state(d)
        self.options = options
        self._dt = getattr(torch, options.dtype)
        self._ckpt, self._last = (ckpt if lazy else None), None
        if lazy:  # shapes and dtypes only (the module docstring); `_meta_params` says how they are known
            self._meta_params(ckpt.tensors)
            return
        sd = ckpt.tensors

        def param(name):
            return nn.Parameter(_top_weight(sd, name, d, self._dt), requires_grad=False)

        self.emb = param("emb")
        self.layers = nn.ModuleList(self._layer(sd, i) for i in range(d.n_layer))
        self.ln_out_w, self.ln_out_b = param("ln_out_w"), param("ln_out_b")
        self.head = param("head")

    def _meta_params(self, sd: dict) -> None:
        """A lazy module's parameters, on the meta device, registered as a whole module registers them: every layer
        shaped as layer 0 (made once, for real, and moved to meta), the rest as `_top_weight` makes them. Not the
        preparation run on meta tensors: its ops' meta kernels import torch._dynamo (10-40 s on the 2-core box)."""
        import copy

        d, dt = self.dims, self._dt

        def meta(*shape):
            return nn.Parameter(torch.empty(shape, dtype=dt, device="meta"), requires_grad=False)

        self.emb = meta(d.vocab_size, d.n_embd)
        layer = self._layer(sd, 0).to("meta")
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(d.n_layer))
        self.ln_out_w, self.ln_out_b = meta(d.n_embd), meta(d.n_embd)
        self.head = meta(d.n_embd, d.vocab_size)

    def _layer(self, sd: dict, i: int) -> _Layer:
        every = self.options.rescale_every
        return _Layer(sd, i, float(2 ** (i // every)) if every else 1.0, self._dt)

    def prepared(self, name: str) -> torch.Tensor:
        """The parameter `name` with its values: a whole module's own; a lazy module's made now from the checkpoint's
        tensors (read now: `checkpoint.reread` may have given them a fresh mapping), a layer at a time, the last layer
        kept (the graph builders read a layer's weights together)."""
        p = self.get_parameter(name)
        if not p.is_meta:
            return p
        sd = self._ckpt.tensors
        if not name.startswith("layers."):
            return _top_weight(sd, name, self.dims, self._dt)
        _, i, key = name.split(".", 2)
        if self._last is None or self._last[0] != int(i):
            self._last = None  # the previous layer goes first
            self._last = (int(i), self._layer(sd, int(i)))  # a tuple: not registered as a submodule
        return getattr(self._last[1], key)

    def forward(self, token, att_x, att_aa, att_bb, att_pp, ffn_x):
        every = self.options.rescale_every
        x = F.embedding(token, self.emb)  # [1, C]: a Gather of one row
        # each [L, C] state in as L rows of [1, C] (one Split node per state), out as one Concat: the graph never
        # indexes or re-stacks single rows (that was 180 Gather/Unsqueeze nodes at 12 layers)
        att_x, att_aa, att_bb, att_pp, ffn_x = (split_grouped(s) for s in (att_x, att_aa, att_bb, att_pp, ffn_x))
        new = {name: [] for name in STATE_NAMES}
        for i, layer in enumerate(self.layers):
            dx, (sx, aa, bb, pp) = layer.time_mix(x, att_x[i], att_aa[i], att_bb[i], att_pp[i])
            x = x + dx
            dx, fx = layer.channel_mix(x, ffn_x[i])
            x = x + dx
            if every and (i + 1) % every == 0:
                x = x / 2
            for name, value in zip(STATE_NAMES, (sx, aa, bb, pp, fx)):
                new[name].append(value)
        x = F.layer_norm(x, x.shape[-1:], self.ln_out_w, self.ln_out_b)
        logits = x @ self.head
        if logits.dtype != torch.float32:
            logits = logits.float()
        out = (logits, *(cat_grouped(new[name]) for name in STATE_NAMES))
        return (*out, x.float()) if self.embedding else out

    def new_state(self) -> dict:
        L, C = self.dims.n_layer, self.dims.n_embd
        return {name: torch.full((L, C), STATE_INIT[name], dtype=torch.float32) for name in STATE_NAMES}

    def example_inputs(self) -> tuple:
        s = self.new_state()
        return (torch.zeros(1, dtype=torch.long), *(s[n] for n in STATE_NAMES))
