"""Synthetic RWKV-5.2 ("Eagle", World v2) checkpoints with the real key layout, for tests, demos and benchmarks.

Keys and shapes are those BlinkDL's training code (RWKV-LM `RWKV_Tmix_x052`, `RWKV_ChannelMix`) saves and the `rwkv`
pip package 0.8.32 loads (detected there as v5.2 by `att.gate.weight` plus a 2-D `att.time_decay` [H, N]):

    emb.weight [V, C]; blocks.0.ln0.{weight,bias} [C]; per block: ln1/ln2.{weight,bias} [C],
    att.time_mix_{k,v,r,g} [1, 1, C], att.time_decay [H, N], att.time_faaaa [H, N],
    att.{receptance,key,value,gate,output}.weight [C, C], att.ln_x.{weight,bias} [C],
    ffn.time_mix_{k,r} [1, 1, C], ffn.key.weight [F, C], ffn.receptance.weight [C, C], ffn.value.weight [C, F];
    ln_out.{weight,bias} [C], head.weight [V, C].

The values imitate a trained model's ranges rather than its init (BlinkDL's init zeroes the output projections,
which would make every logit equal): per-channel decays ramped from slow to fast inside each head (w = e^-e^decay
from ~0.998 down to ~0.07), a zigzag bonus u, ramped token-shift mixes, weights scaled by fan-in, and the key
projection at BlinkDL's gain 0.1, so that the pre-GroupNorm WKV output has a variance near 1 and ln_x's eps (64e-5)
shows in the result instead of vanishing under it. Seeded and made on the CPU: the same preset and seed give the same
tensors on every machine. torch is imported inside the functions (importing this module is cheap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


def default_ffn_dim(n_embd: int) -> int:
    """BlinkDL's default FFN width for v5.2 / v6: 3.5 * C rounded down to a multiple of 32."""
    return int(n_embd * 3.5) // 32 * 32


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig5:
    n_layer: int
    n_embd: int  # C
    head_size: int = 64  # N; 64 in every released model, H = C / N heads
    ffn_dim: int  # F; BlinkDL's default is default_ffn_dim(C), but it is read from the tensors, never assumed
    vocab_size: int  # V
    dtype: str = "bfloat16"  # released checkpoints store bf16

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


PRESETS: dict[str, SyntheticConfig5] = {
    # byte-level, two heads: the smallest that still has two layers, two heads and a real FFN (F = 448, the default)
    "tiny": SyntheticConfig5(n_layer=2, n_embd=128, ffn_dim=default_ffn_dim(128), vocab_size=256),
    # three heads and F = 512, not the default 672: the ffn width and the head count must be read from the tensors
    "tiny-ffn": SyntheticConfig5(n_layer=3, n_embd=192, ffn_dim=512, vocab_size=300),
    # the exact shapes of RWKV-5-World-0.4B-v2, the smallest v5.2 World release: 24 x 1024, 16 heads, F = 3584
    # (about 0.46e9 parameters: make_state_dict takes ~1 GB in bf16 and a few seconds)
    "0.4b": SyntheticConfig5(n_layer=24, n_embd=1024, ffn_dim=3584, vocab_size=65536),
}


def make_state_dict(cfg: SyntheticConfig5, seed: int = 0) -> dict:
    """A flat state dict with BlinkDL's RWKV-5.2 keys (in the training code's order) and plausible values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    L, C, V, N, Fd = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.ffn_dim
    H = C // N
    dtype = getattr(torch, cfg.dtype)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(out_f, in_f, gain=1.0):
        return randn(out_f, in_f, scale=gain / math.sqrt(in_f))

    sd: dict = {}

    def put(key, value):  # convert as we go: the 0.4b preset never holds more than one fp32 tensor extra
        sd[key] = value.to(dtype).contiguous()

    put("emb.weight", randn(V, C, scale=0.5))
    n = torch.arange(C, dtype=torch.float32)
    ramp = (n / C).reshape(1, 1, C)  # 0 .. (C-1)/C, BlinkDL's `ddd`
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)  # 0 at the first layer, 1 at the last
        r1a0 = 1.0 - i / L  # 1 at the first layer, ~0 at the last
        for ln in ("ln1", "ln2"):
            put(p + ln + ".weight", 1.0 + randn(C, scale=0.1))
            put(p + ln + ".bias", randn(C, scale=0.1))
        if i == 0:
            put(p + "ln0.weight", 1.0 + randn(C, scale=0.05))
            put(p + "ln0.bias", randn(C, scale=0.05))

        def mix(power, shift=0.0):
            return (ramp**power + shift + randn(1, 1, C, scale=0.02)).clamp(0.0, 1.2)

        put(p + "att.time_mix_k", mix(r1a0))
        put(p + "att.time_mix_v", mix(r1a0, 0.3 * r01))
        put(p + "att.time_mix_r", mix(0.5 * r1a0))
        put(p + "att.time_mix_g", mix(0.5 * r1a0))
        # decay exponent ramped across all C channels, then cut into heads: w = exp(-exp(d)) from ~0.998 (d = -6,
        # slow, long memory) to ~0.07 (d = +1, fast), wider than the init's -6..-1 as trained models are
        decay = -6.0 + 7.0 * (n / (C - 1)) ** (0.7 + 1.3 * r01)
        put(p + "att.time_decay", (decay + randn(C, scale=0.2)).reshape(H, N))
        zigzag = ((torch.arange(C) + 1) % 3 - 1).float() * 0.3
        bonus = 0.5 + r01 * (1.0 - n / (C - 1)) + zigzag + randn(C, scale=0.2)
        put(p + "att.time_faaaa", bonus.reshape(H, N))
        put(p + "att.receptance.weight", linear(C, C))
        put(p + "att.key.weight", linear(C, C, gain=0.1))
        put(p + "att.value.weight", linear(C, C))
        put(p + "att.output.weight", linear(C, C, gain=0.5))
        put(p + "att.gate.weight", linear(C, C))
        put(p + "att.ln_x.weight", ((1 + i) / L) ** 0.7 + randn(C, scale=0.1))
        put(p + "att.ln_x.bias", randn(C, scale=0.05))
        put(p + "ffn.time_mix_k", mix(r1a0))
        put(p + "ffn.time_mix_r", mix(r1a0))
        put(p + "ffn.key.weight", linear(Fd, C))
        put(p + "ffn.receptance.weight", linear(C, C))
        put(p + "ffn.value.weight", linear(C, Fd, gain=0.5))
    put("ln_out.weight", 1.0 + randn(C, scale=0.1))
    put("ln_out.bias", randn(C, scale=0.1))
    put("head.weight", linear(V, C, gain=3.0))
    return sd


def make_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a synthetic RWKV-5.2 checkpoint (.pth or .safetensors) from a preset; overrides replace its fields."""
    from dataclasses import replace

    from ...synthetic import save_checkpoint

    cfg = replace(PRESETS[preset], **overrides)
    return save_checkpoint(make_state_dict(cfg, seed), path)
