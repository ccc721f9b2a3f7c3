"""Synthetic RWKV-6.0 ("Finch", World v2.1 / v3) checkpoints with the real key layout, for tests, demos, benchmarks.

Keys and shapes are those BlinkDL's training code (RWKV-LM `RWKV_Tmix_x060`, `RWKV_CMix_x060`, also in
`RWKV-v5/rwkv_v6_demo.py`) saves and the `rwkv` pip package 0.8.32 loads (detected there as v6.0 by `time_maa`):

    emb.weight [V, C]; blocks.0.ln0.{weight,bias} [C]; per block: ln1/ln2.{weight,bias} [C],
    att.time_maa_{x,w,k,v,r,g} [1, 1, C], att.time_maa_w1 [C, 5 * Dm], att.time_maa_w2 [5, Dm, C],
    att.time_decay [1, 1, C], att.time_decay_w1 [C, Dd], att.time_decay_w2 [Dd, C], att.time_faaaa [H, N],
    att.{receptance,key,value,gate,output}.weight [C, C], att.ln_x.{weight,bias} [C],
    ffn.time_maa_{k,r} [1, 1, C], ffn.key.weight [F, C], ffn.receptance.weight [C, C], ffn.value.weight [C, F];
    ln_out.{weight,bias} [C], head.weight [V, C].

Dm = 32 and Dd = 64 in BlinkDL's code, doubled to 64 / 128 when C = 4096 (the 7B): readers take them from the
tensors. The 5 LoRA slices of time_maa_w1 / w2 are, in order, w, k, v, r, g.

Values imitate a trained model's ranges, not its init (which zeroes the LoRA down-projections and the output layers):
LoRA weights large enough that the data-dependent token shift moves each mix by ~0.1-0.3 and the data-dependent decay
exponent by ~0.5, base decays ramped from slow to fast across channels (w = e^-e^d from ~0.998 to ~0.07), a zigzag
bonus u, the key projection at BlinkDL's gain 0.1 (pre-GroupNorm variance near 1, so ln_x's eps 64e-5 matters).
Seeded and made on the CPU; torch is imported inside the functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

N_MIX = 5  # the LoRA's five outputs: w, k, v, r, g


def default_ffn_dim(n_embd: int) -> int:
    """BlinkDL's v6 FFN width: int(3.5 * C) rounded down to a multiple of 32."""
    return int(n_embd * 3.5) // 32 * 32


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig6:
    n_layer: int
    n_embd: int  # C
    head_size: int = 64  # N; 64 in every released model, H = C / N heads
    ffn_dim: int  # F
    vocab_size: int  # V
    mix_lora: int = 32  # Dm, the time_maa LoRA width (64 in the 7B)
    decay_lora: int = 64  # Dd, the time_decay LoRA width (128 in the 7B)
    dtype: str = "bfloat16"  # released checkpoints store bf16

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size


PRESETS: dict[str, SyntheticConfig6] = {
    # byte-level, two heads, default widths (F = 448, LoRA 32 / 64)
    "tiny": SyntheticConfig6(n_layer=2, n_embd=128, ffn_dim=default_ffn_dim(128), vocab_size=256),
    # three heads, F = 512 (not the default 672) and the 7B's LoRA widths: all must be read from the tensors
    "tiny-ffn": SyntheticConfig6(n_layer=3, n_embd=192, ffn_dim=512, vocab_size=300, mix_lora=64, decay_lora=128),
    # the exact shapes of RWKV-6-World-1.6B (Finch 1B6, v2.1 / v3), the smallest v6 release: 24 x 2048, 32 heads,
    # F = 7168. Only a config here; make_state_dict for it builds ~1.6e9 parameters (~3.2 GB in bf16, a minute).
    "1.6b": SyntheticConfig6(n_layer=24, n_embd=2048, ffn_dim=default_ffn_dim(2048), vocab_size=65536),
}


def make_state_dict(cfg: SyntheticConfig6, seed: int = 0) -> dict:
    """A flat state dict with BlinkDL's RWKV-6.0 keys (in the training code's order) and plausible values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    L, C, V, N, Fd = cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.head_size, cfg.ffn_dim
    H, Dm, Dd = C // N, cfg.mix_lora, cfg.decay_lora
    dtype = getattr(torch, cfg.dtype)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(out_f, in_f, gain=1.0):
        return randn(out_f, in_f, scale=gain / math.sqrt(in_f))

    sd: dict = {}

    def put(key, value):  # convert as we go, so a big preset never holds its fp32 copy
        sd[key] = value.to(dtype).contiguous()

    put("emb.weight", randn(V, C, scale=0.5))
    n = torch.arange(C, dtype=torch.float32)
    ramp = (n / C).reshape(1, 1, C)  # BlinkDL's `ddd`
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

        def maa(power, shift=0.0):  # v6 stores 1 - (v5's time_mix): x + (x_prev - x) * maa
            return (1.0 - (ramp**power + shift) + randn(1, 1, C, scale=0.02)).clamp(-0.2, 1.0)

        put(p + "att.time_maa_x", maa(r1a0))
        put(p + "att.time_maa_w", maa(r1a0))
        put(p + "att.time_maa_k", maa(r1a0))
        put(p + "att.time_maa_v", maa(r1a0, 0.3 * r01))
        put(p + "att.time_maa_r", maa(0.5 * r1a0))
        put(p + "att.time_maa_g", maa(0.5 * r1a0))
        # tanh(x [C] @ w1 [C, 5 Dm]) has O(1) entries; each of the 5 [Dm] slices @ w2 then moves a mix by ~0.2
        put(p + "att.time_maa_w1", randn(C, N_MIX * Dm, scale=1.0 / math.sqrt(C)))
        put(p + "att.time_maa_w2", randn(N_MIX, Dm, C, scale=0.2 / math.sqrt(Dm)))
        decay = -6.0 + 7.0 * (n / (C - 1)) ** (0.7 + 1.3 * r01)
        put(p + "att.time_decay", (decay + randn(C, scale=0.2)).reshape(1, 1, C))
        put(p + "att.time_decay_w1", randn(C, Dd, scale=1.0 / math.sqrt(C)))
        put(p + "att.time_decay_w2", randn(Dd, C, scale=0.8 / math.sqrt(Dd)))
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
        put(p + "ffn.time_maa_k", maa(r1a0))
        put(p + "ffn.time_maa_r", maa(r1a0))
        put(p + "ffn.key.weight", linear(Fd, C))
        put(p + "ffn.receptance.weight", linear(C, C))
        put(p + "ffn.value.weight", linear(C, Fd, gain=0.5))
    put("ln_out.weight", 1.0 + randn(C, scale=0.1))
    put("ln_out.bias", randn(C, scale=0.1))
    put("head.weight", linear(V, C, gain=3.0))
    return sd


def make_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a synthetic RWKV-6.0 checkpoint (.pth or .safetensors) from a preset; overrides replace its fields."""
    from dataclasses import replace

    from ...synthetic import save_checkpoint

    cfg = replace(PRESETS[preset], **overrides)
    return save_checkpoint(make_state_dict(cfg, seed), path)
