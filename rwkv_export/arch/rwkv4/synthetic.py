"""Synthetic RWKV-4 checkpoints with the real key layout, for tests, the built-in demo and the benchmark.

The values imitate a trained model's ranges (BlinkDL's init recipe for time_decay / time_first / time_mix, weights
scaled by fan-in) so that logits have a real spread and greedy decoding is not decided by rounding. They are seeded
and made on the CPU, so the same preset and seed give the same tensors on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticConfig:
    n_layer: int
    n_embd: int
    ffn_dim: int
    vocab_size: int
    dtype: str = "bfloat16"  # released checkpoints store bf16


PRESETS: dict[str, SyntheticConfig] = {
    # byte-level, the smallest that still has two layers and a real FFN
    "tiny": SyntheticConfig(n_layer=2, n_embd=64, ffn_dim=256, vocab_size=256),
    # F != 4*C: the ffn width must be read from the tensors, never assumed
    "tiny-ffn": SyntheticConfig(n_layer=3, n_embd=48, ffn_dim=160, vocab_size=300),
    # tiny, but with the Pile models' vocab, so the GPT-NeoX tokenizer path is exercised
    "tiny-neox": SyntheticConfig(n_layer=2, n_embd=32, ffn_dim=128, vocab_size=50277),
    # the exact shapes of RWKV-4-Pile-169M
    "169m": SyntheticConfig(n_layer=12, n_embd=768, ffn_dim=3072, vocab_size=50277),
}


def make_state_dict(cfg: SyntheticConfig, seed: int = 0) -> dict:
    """Return a flat state dict with BlinkDL's RWKV-4 key layout and plausible values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    L, C, F, V = cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    dtype = getattr(torch, cfg.dtype)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(out_f, in_f, gain=1.0):
        return randn(out_f, in_f, scale=gain / math.sqrt(in_f))

    sd: dict = {}
    sd["emb.weight"] = randn(V, C, scale=0.5)
    sd["blocks.0.ln0.weight"] = 1.0 + randn(C, scale=0.05)
    sd["blocks.0.ln0.bias"] = randn(C, scale=0.05)
    h = torch.arange(C, dtype=torch.float32)
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)  # 0 at the first layer, 1 at the last
        r1a0 = 1.0 - i / L
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1.0 + randn(C, scale=0.1)
            sd[p + ln + ".bias"] = randn(C, scale=0.1)
        # BlinkDL's RWKV-4 init: per-channel decay from fast to slow, a zigzag bonus, ramped token-shift mixes
        decay = -5.0 + 8.0 * (h / max(C - 1, 1)) ** (0.7 + 1.3 * r01)
        sd[p + "att.time_decay"] = decay + randn(C, scale=0.1)
        zigzag = ((torch.arange(C) + 1) % 3 - 1).float() * 0.5
        sd[p + "att.time_first"] = math.log(0.3) + zigzag + randn(C, scale=0.1)
        ramp = (h / C).reshape(1, 1, C)
        sd[p + "att.time_mix_k"] = ramp**r1a0
        sd[p + "att.time_mix_v"] = ramp**r1a0 + 0.3 * r01
        sd[p + "att.time_mix_r"] = ramp ** (0.5 * r1a0)
        sd[p + "att.key.weight"] = linear(C, C)
        sd[p + "att.value.weight"] = linear(C, C)
        sd[p + "att.receptance.weight"] = linear(C, C)
        sd[p + "att.output.weight"] = linear(C, C, gain=0.5)
        sd[p + "ffn.time_mix_k"] = ramp**r1a0
        sd[p + "ffn.time_mix_r"] = ramp**r1a0
        sd[p + "ffn.key.weight"] = linear(F, C)
        sd[p + "ffn.receptance.weight"] = linear(C, C)
        sd[p + "ffn.value.weight"] = linear(C, F, gain=0.5)
    sd["ln_out.weight"] = 1.0 + randn(C, scale=0.1)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = linear(V, C, gain=3.0)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
