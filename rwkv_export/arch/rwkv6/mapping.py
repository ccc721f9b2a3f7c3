"""RWKV-6.0 tensor mapping: the dimensions (with the two LoRA widths) read from a checkpoint and the complete key set
with shapes. Torch-free. The state is RWKV-5.2's (rwkv5.mapping.state): same tensors, same (head, key, value) order.

Shapes are those of BlinkDL's RWKV-LM x060 training code (runtime_ref.rwkv6.expected_shapes lists them
independently): the token-shift mixes time_maa_{x,w,k,v,r,g} and the base decay time_decay [1, 1, C]; the 5-way mix
LoRA time_maa_w1 [C, 5 * Dm] (slices w, k, v, r, g) and time_maa_w2 [5, Dm, C]; the decay LoRA time_decay_w1
[C, Dd] and time_decay_w2 [Dd, C], all used as `x @ w` (no transpose); time_faaaa [H, N]; FFN mixes
ffn.time_maa_{k,r} [1, 1, C]. Dm = 32 and Dd = 64 in BlinkDL's code (64 / 128 at C = 4096): read from the tensors.
"""

from __future__ import annotations

from ..base import CheckpointError, ModelDims, shape_of
from ..rwkv5.mapping import STATE_LAYOUT, base_dims, common_shapes, state  # noqa: F401  (re-exported)

N_MIX = 5  # the mix LoRA's outputs, in this order: w, k, v, r, g
MIX_ORDER = ("w", "k", "v", "r", "g")


def _lora_width(sd: dict, key: str, C: int, what: str, per: int = 1) -> int:
    c_in, width = shape_of(sd, key, 2, f"[n_embd, {what}]")
    if c_in != C or width == 0 or width % per:
        raise CheckpointError(f"tensor '{key}' has shape {[c_in, width]}, expected [{C}, {what}]")
    return width // per


def dims(sd: dict) -> ModelDims:
    L, C, F, V, H, N = base_dims(sd)
    Dm = _lora_width(sd, "blocks.0.att.time_maa_w1", C, f"{N_MIX} * mix lora width", N_MIX)
    Dd = _lora_width(sd, "blocks.0.att.time_decay_w1", C, "decay lora width")
    return ModelDims(n_layer=L, n_embd=C, ffn_dim=F, vocab_size=V, n_head=H, head_size=N,
                     lora=(("decay", Dd), ("maa", Dm)))


def expected_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of an RWKV-6.0 checkpoint with its shape."""
    C = d.n_embd
    lora = dict(d.lora)
    Dm, Dd = lora["maa"], lora["decay"]
    vec = (1, 1, C)
    shapes, prefixes = common_shapes(d)
    for p in prefixes:
        a = p + "att."
        for m in ("x",) + MIX_ORDER:
            shapes[a + f"time_maa_{m}"] = vec
        shapes[a + "time_maa_w1"] = (C, N_MIX * Dm)
        shapes[a + "time_maa_w2"] = (N_MIX, Dm, C)
        shapes[a + "time_decay"] = vec
        shapes[a + "time_decay_w1"] = (C, Dd)
        shapes[a + "time_decay_w2"] = (Dd, C)
        shapes[p + "ffn.time_maa_k"] = vec
        shapes[p + "ffn.time_maa_r"] = vec
    return shapes
