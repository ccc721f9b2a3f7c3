"""Synthetic RWKV-7 ("x070") checkpoints with BlinkDL's real key layout, for tests, demos and benchmarks.

Keys and shapes are those of RWKV-LM's `RWKV-v7/train_temp` model as the `rwkv` pip package's `RWKV_x070` loader
reads them (C = n_embd, H = C / N heads of N = head_size, F = ffn_dim, V = vocab_size, D* = the LoRA ranks):

    emb.weight [V, C]; blocks.0.ln0.{weight,bias} [C]
    blocks.i.ln1/ln2.{weight,bias} [C]
    blocks.i.att.x_r/x_w/x_k/x_v/x_a/x_g [1, 1, C]
    blocks.i.att.w0 [1, 1, C], w1 [C, Dw], w2 [Dw, C]          decay LoRA
    blocks.i.att.a0 [1, 1, C], a1 [C, Da], a2 [Da, C]          in-context learning rate LoRA
    blocks.i.att.v0 [1, 1, C], v1 [C, Dv], v2 [Dv, C]          value-residual LoRA, layers >= 1 (see below)
    blocks.i.att.g1 [C, Dg], g2 [Dg, C]                        gate LoRA (no bias)
    blocks.i.att.k_k, k_a [1, 1, C]; r_k [H, N]
    blocks.i.att.receptance/key/value/output.weight [C, C]; att.ln_x.{weight,bias} [C]
    blocks.i.ffn.x_k [1, 1, C]; ffn.key.weight [F, C]; ffn.value.weight [C, F]
    ln_out.{weight,bias} [C]; head.weight [V, C]

Layer 0 takes v_first = v and never uses v0/v1/v2. RWKV-LM's trainer creates them in every layer, so some released
files carry unused `blocks.0.att.v0/v1/v2` and others (converted or pruned) do not; the pip loader overwrites them
with empty tensors either way. `layer0_v_lora=True` writes them, to test that a loader accepts and ignores them.

Values follow RWKV-LM's x070 init recipe (token-shift ramps, w0 spreading the decays from fast to slow with a
per-head zigzag, a0 / v0 / k_k / k_a / r_k around their init values), with the zero-initialised matrices (LoRA
down-projections, output, ffn.value) given trained-like nonzero scales, so logits have a real spread and greedy
decoding is not decided by rounding. Seeded, on the CPU: the same preset and seed give the same tensors anywhere.
Write files with `rwkv_export.synthetic.save_checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SyntheticConfig7:
    n_layer: int
    n_embd: int
    head_size: int = 64
    ffn_dim: int = 0  # 0: 4 * n_embd, as RWKV-LM's x070 trainer sizes it
    vocab_size: int = 65536
    d_decay: int = 64  # w1 / w2 rank
    d_aaa: int = 64  # a1 / a2 rank
    d_mv: int = 32  # v1 / v2 rank
    d_gate: int = 128  # g1 / g2 rank
    dtype: str = "bfloat16"  # released checkpoints store bf16
    layer0_v_lora: bool = False  # also write the unused blocks.0.att.v0/v1/v2 (as RWKV-LM's trainer saves them)

    def __post_init__(self):
        if self.n_embd % self.head_size:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_size {self.head_size}")

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @property
    def ffn(self) -> int:
        return self.ffn_dim or 4 * self.n_embd


PRESETS: dict[str, SyntheticConfig7] = {
    # the smallest with two heads of the released head size, two layers (so v_first crosses a layer) and a real FFN
    "tiny": SyntheticConfig7(n_layer=2, n_embd=128, head_size=64, ffn_dim=512, vocab_size=256,
                             d_decay=16, d_aaa=16, d_mv=8, d_gate=32),
    # F != 4*C, an odd head count and other ranks: every width must be read from the tensors, never assumed
    "tiny-ffn": SyntheticConfig7(n_layer=3, n_embd=192, head_size=64, ffn_dim=448, vocab_size=300,
                                 d_decay=24, d_aaa=20, d_mv=12, d_gate=40),
    # the exact shapes of RWKV-7 G1 0.1B (L12-D768): ranks as RWKV-LM sizes them for C = 768
    # (max(32, round(k * sqrt(C) / 32) * 32): decay 64, aaa 64, mv 32, gate 128), ffn 4*C, World vocab
    "0.1b": SyntheticConfig7(n_layer=12, n_embd=768, head_size=64, ffn_dim=3072, vocab_size=65536,
                             d_decay=64, d_aaa=64, d_mv=32, d_gate=128),
}


def make_state_dict(cfg: SyntheticConfig7, seed: int = 0) -> dict:
    """Return a flat state dict with BlinkDL's RWKV-7 key layout and plausible values, stored in cfg.dtype."""
    import torch

    g = torch.Generator().manual_seed(seed)
    L, C, N, H, F, V = cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head, cfg.ffn, cfg.vocab_size
    dtype = getattr(torch, cfg.dtype)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def linear(out_f, in_f, gain=1.0):  # a [out, in] matrix scaled by fan-in
        return randn(out_f, in_f, scale=gain / math.sqrt(in_f))

    def vec(t):
        return t.reshape(1, 1, C)

    n = torch.arange(C, dtype=torch.float32)
    ddd = n / C  # 0 .. (C-1)/C
    linear_ramp = n / (C - 1) - 0.5  # -0.5 .. 0.5
    zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)  # -1 .. 1 within each head
    zigzag = zz * zz.abs()

    sd: dict = {}
    sd["emb.weight"] = randn(V, C, scale=0.5)
    sd["blocks.0.ln0.weight"] = 1.0 + randn(C, scale=0.05)
    sd["blocks.0.ln0.bias"] = randn(C, scale=0.05)
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)  # 0 at the first layer, 1 at the last
        r1a0 = 1.0 - i / L  # 1 at the first layer, ~0 at the last
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = 1.0 + randn(C, scale=0.1)
            sd[p + ln + ".bias"] = randn(C, scale=0.1)

        a = p + "att."
        for name, power in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            sd[a + name] = vec((1.0 - ddd ** (power * r1a0)) + randn(C, scale=0.05))
        # decay: w = exp(-e^-0.5 * sigmoid(w0 + lora)), w0 from about -8 (w ~ 1, slow) to 3 (w ~ 0.57, fast)
        www = -6.0 + 6.0 * (n / (C - 1)) ** (1.0 + r01**0.3)
        sd[a + "w0"] = vec(www + 0.5 + zigzag * 2.5 + randn(C, scale=0.1))
        sd[a + "w1"] = randn(C, cfg.d_decay, scale=1 / math.sqrt(C))
        sd[a + "w2"] = randn(cfg.d_decay, C, scale=0.5 / math.sqrt(cfg.d_decay))
        sd[a + "a0"] = vec(-0.19 + zigzag * 0.3 + linear_ramp * 0.4 + randn(C, scale=0.1))
        sd[a + "a1"] = randn(C, cfg.d_aaa, scale=1 / math.sqrt(C))
        sd[a + "a2"] = randn(cfg.d_aaa, C, scale=1.0 / math.sqrt(cfg.d_aaa))
        if i > 0 or cfg.layer0_v_lora:
            sd[a + "v0"] = vec(0.73 - linear_ramp * 0.4 + randn(C, scale=0.1))
            sd[a + "v1"] = randn(C, cfg.d_mv, scale=1 / math.sqrt(C))
            sd[a + "v2"] = randn(cfg.d_mv, C, scale=1.0 / math.sqrt(cfg.d_mv))
        sd[a + "g1"] = randn(C, cfg.d_gate, scale=1 / math.sqrt(C))
        sd[a + "g2"] = randn(cfg.d_gate, C, scale=2.0 / math.sqrt(cfg.d_gate))
        sd[a + "k_k"] = vec(0.85 - linear_ramp * 0.1 + randn(C, scale=0.05))
        sd[a + "k_a"] = vec(1.0 + randn(C, scale=0.05))
        sd[a + "r_k"] = -0.04 + randn(H, N, scale=0.1)
        sd[a + "receptance.weight"] = linear(C, C)
        sd[a + "key.weight"] = linear(C, C)
        sd[a + "value.weight"] = linear(C, C)
        sd[a + "output.weight"] = linear(C, C, gain=0.5)
        sd[a + "ln_x.weight"] = 0.5 + randn(C, scale=0.1)
        sd[a + "ln_x.bias"] = randn(C, scale=0.05)

        f = p + "ffn."
        sd[f + "x_k"] = vec((1.0 - ddd ** (r1a0**4)) + randn(C, scale=0.05))
        sd[f + "key.weight"] = linear(F, C)
        sd[f + "value.weight"] = linear(C, F, gain=0.5)
    sd["ln_out.weight"] = 1.0 + randn(C, scale=0.1)
    sd["ln_out.bias"] = randn(C, scale=0.1)
    sd["head.weight"] = linear(V, C, gain=3.0)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}
