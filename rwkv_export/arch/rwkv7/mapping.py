"""RWKV-7 (x070) tensor mapping: the dimensions read from a checkpoint, the complete key set with shapes, and the
state spec. Torch-free.

Shapes are those of BlinkDL's RWKV-LM x070 training code, which the released .pth files carry unchanged: the
per-channel vectors (token-shift mixes x_*, the LoRA biases w0/a0/v0, k_k, k_a) are [1, 1, C]; the LoRA matrices
are [C, D] (down) and [D, C] (up), used as `x @ w1` (no transpose); r_k is [H, N]; ln_x (GroupNorm(H)) is [C].
The LoRA widths differ with model size (0.1B: decay 64, a 64, v 32, gate 128) and are read from the tensors.

The value-residual LoRA (v0/v1/v2) is used by layers >= 1 only (layer 0's v *is* v_first). The training code
creates it in every layer, so files saved by the trainer carry an untrained blocks.0.att.v0/v1/v2 (converted or
pruned ones may not); ChatRWKV's loader replaces them by empty tensors ("actually ignored"). They are listed in
IGNORED: accepted when present, never read, never required.
"""

from __future__ import annotations

from ...errors import CheckpointError
from ..base import ModelDims, StateTensor, layer_count, shape_of

# Layer 0's value-residual LoRA: in trainer-saved checkpoints, unused by the x070 equations.
IGNORED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

# (lora name in ModelDims, down-projection key suffix read for its width, the layer it is read from)
_LORA = (("a", "att.a1", 0), ("g", "att.g1", 0), ("v", "att.v1", 1), ("w", "att.w1", 0))

STATE_DOCS = {
    "att_x": "time mix: LN1 output of the previous token (token shift)",
    "att_kv": "time mix: the WKV state matrix per head, indexed (head, value, key) as ChatRWKV's x070 "
              "(S = S*w + S @ (-kk (x) kk*a) + v (x) k; y = S @ r); fp32 in every variant",
    "ffn_x": "channel mix: LN2 output of the previous token (token shift)",
}
STATE_NAMES = ("att_x", "att_kv", "ffn_x")
STATE_LAYOUT = ("att_x and ffn_x [n_layer, n_embd], att_kv [n_layer, n_head, head_size, head_size] indexed "
                "(layer, head, value, key); row i belongs to layer i; all start at 0")


def dims(sd: dict) -> ModelDims:
    V, C = shape_of(sd, "emb.weight", 2, "[vocab, n_embd]")
    L = layer_count(sd)
    F = shape_of(sd, "blocks.0.ffn.key.weight", 2, "[ffn_dim, n_embd]")[0]
    H, N = shape_of(sd, "blocks.0.att.r_k", 2, "[n_head, head_size]")
    if C % N:
        raise CheckpointError(f"tensor 'blocks.0.att.r_k' has shape {[H, N]}: head size {N} does not divide "
                              f"n_embd {C}")
    if H * N != C:
        raise CheckpointError(f"tensor 'blocks.0.att.r_k' has shape {[H, N]}: n_head * head_size = {H * N}, "
                              f"expected n_embd {C}")
    lora = []
    for name, suffix, layer in _LORA:
        if layer >= L:  # a 1-layer model has no value residual
            continue
        key = f"blocks.{layer}.{suffix}"
        c_in, width = shape_of(sd, key, 2, f"[n_embd, {name} lora width]")
        if c_in != C:
            raise CheckpointError(f"tensor '{key}' has shape {[c_in, width]}, expected [{C}, {name} lora width]")
        lora.append((name, width))
    return ModelDims(n_layer=L, n_embd=C, ffn_dim=F, vocab_size=V, n_head=H, head_size=N, lora=tuple(lora))


def expected_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of an x070 checkpoint with its shape (layer-0 v0/v1/v2 are in IGNORED, not here)."""
    C, F, V, H, N = d.n_embd, d.ffn_dim, d.vocab_size, d.n_head, d.head_size
    lora = dict(d.lora)
    vec = (1, 1, C)
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(d.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        a = p + "att."
        for m in ("r", "w", "k", "v", "a", "g"):
            shapes[a + f"x_{m}"] = vec
        for name, key in (("w", "w"), ("a", "a")) + ((("v", "v"),) if i > 0 else ()):
            shapes[a + f"{key}0"] = vec
            shapes[a + f"{key}1"] = (C, lora[name])
            shapes[a + f"{key}2"] = (lora[name], C)
        shapes[a + "g1"] = (C, lora["g"])
        shapes[a + "g2"] = (lora["g"], C)
        shapes[a + "k_k"] = vec
        shapes[a + "k_a"] = vec
        shapes[a + "r_k"] = (H, N)
        for w in ("receptance", "key", "value", "output"):
            shapes[a + f"{w}.weight"] = (C, C)
        shapes[a + "ln_x.weight"] = (C,)
        shapes[a + "ln_x.bias"] = (C,)
        shapes[p + "ffn.x_k"] = vec
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


def state(d: ModelDims) -> list[StateTensor]:
    L, C, H, N = d.n_layer, d.n_embd, d.n_head, d.head_size
    shapes = {"att_x": (L, C), "att_kv": (L, H, N, N), "ffn_x": (L, C)}
    return [StateTensor(n, shapes[n], 0.0, "float32", STATE_DOCS[n]) for n in STATE_NAMES]
