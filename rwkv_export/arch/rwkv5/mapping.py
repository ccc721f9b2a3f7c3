"""RWKV-5.2 tensor mapping: the dimensions read from a checkpoint, the complete key set with shapes, and the state
spec (shared with RWKV-6, whose state is the same). Torch-free.

Shapes are those of BlinkDL's RWKV-LM x052 training code, which the released .pth files carry unchanged (and which
runtime_ref.rwkv5.expected_shapes lists independently): token-shift mixes [1, 1, C]; time_decay and time_faaaa
[H, N] (2-D is what makes 5.2: 5.0/5.1 store them 1-D); the linear layers [out, in]; ln_x (GroupNorm(H)) [C].
"""

from __future__ import annotations

from ...errors import UnsupportedVersionError
from ..base import CheckpointError, ModelDims, StateTensor, layer_count, shape_of

STATE_DOCS = {
    "att_x": "time mix: LN1 output of the previous token (token shift)",
    "att_kv": "time mix: the WKV state matrix per head, indexed (head, key, value) as ChatRWKV's v5/v6 "
              "(a = k (x) v; y = r @ (u*a + S); S' = a + w*S, w scaling the key rows); fp32 in every variant",
    "ffn_x": "channel mix: LN2 output of the previous token (token shift)",
}
STATE_NAMES = ("att_x", "att_kv", "ffn_x")
STATE_LAYOUT = ("att_x and ffn_x [n_layer, n_embd], att_kv [n_layer, n_head, head_size, head_size] indexed "
                "(layer, head, key, value); row i belongs to layer i; all start at 0")


def heads(sd: dict, C: int, key: str = "blocks.0.att.time_faaaa") -> tuple[int, int]:
    """(n_head, head_size) from the [H, N] bonus `time_faaaa`, with one-line errors naming it."""
    t = sd.get(key)
    if t is not None and t.dim() == 1:
        raise UnsupportedVersionError(f"tensor '{key}' is 1-D {list(t.shape)}: an RWKV-5.0/5.1 checkpoint; only "
                                      f"RWKV-5.2 of the v5 family (time_faaaa [n_head, head_size]) is supported")
    H, N = shape_of(sd, key, 2, "[n_head, head_size]")
    if N == 0 or C % N:
        raise CheckpointError(f"tensor '{key}' has shape {[H, N]}: head size {N} does not divide n_embd {C}")
    if H * N != C:
        raise CheckpointError(f"tensor '{key}' has shape {[H, N]}: n_head * head_size = {H * N}, expected n_embd {C}")
    return H, N


def base_dims(sd: dict) -> tuple[int, int, int, int, int, int]:
    """(L, C, F, V, H, N), the dimensions v5.2 and v6 read the same way."""
    V, C = shape_of(sd, "emb.weight", 2, "[vocab, n_embd]")
    L = layer_count(sd)
    F = shape_of(sd, "blocks.0.ffn.key.weight", 2, "[ffn_dim, n_embd]")[0]
    H, N = heads(sd, C)
    return L, C, F, V, H, N


def dims(sd: dict) -> ModelDims:
    L, C, F, V, H, N = base_dims(sd)
    key = "blocks.0.att.time_decay"
    t = sd.get(key)
    if t is not None and t.dim() == 1:  # (any other wrong shape is the strict mapping's error)
        raise UnsupportedVersionError(f"tensor '{key}' has shape {list(t.shape)}: a 1-D decay is RWKV-5.0/5.1, which "
                                      f"is not supported (RWKV-5.2 stores it [n_head, head_size])")
    return ModelDims(n_layer=L, n_embd=C, ffn_dim=F, vocab_size=V, n_head=H, head_size=N)


def common_shapes(d: ModelDims) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The keys v5.2 and v6 share: embedding, LN0, LN_out, head and per layer ln1/ln2, the five [C, C] time-mix
    projections, time_faaaa, ln_x and the FFN's weights. Returns (shapes, the layer prefixes "blocks.i.")."""
    C, F, V, H, N = d.n_embd, d.ffn_dim, d.vocab_size, d.n_head, d.head_size
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    prefixes = [f"blocks.{i}." for i in range(d.n_layer)]
    for p in prefixes:
        for name in ("ln1", "ln2", "att.ln_x"):
            shapes[p + name + ".weight"] = (C,)
            shapes[p + name + ".bias"] = (C,)
        for w in ("receptance", "key", "value", "gate", "output"):
            shapes[p + f"att.{w}.weight"] = (C, C)
        shapes[p + "att.time_faaaa"] = (H, N)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes, prefixes


def expected_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of an RWKV-5.2 checkpoint with its shape."""
    C, H, N = d.n_embd, d.n_head, d.head_size
    shapes, prefixes = common_shapes(d)
    for p in prefixes:
        for m in ("k", "v", "r", "g"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        shapes[p + "att.time_decay"] = (H, N)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
    return shapes


def state(d: ModelDims) -> list[StateTensor]:
    L, C, H, N = d.n_layer, d.n_embd, d.n_head, d.head_size
    shapes = {"att_x": (L, C), "att_kv": (L, H, N, N), "ffn_x": (L, C)}
    return [StateTensor(n, shapes[n], 0.0, "float32", STATE_DOCS[n]) for n in STATE_NAMES]
