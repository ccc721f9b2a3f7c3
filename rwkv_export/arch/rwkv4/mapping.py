"""RWKV-4's tensor mapping: the dimensions read from a checkpoint and the complete key set with shapes
(shared/notes/rwkv4.md's table). Torch-free."""

from __future__ import annotations

from ..base import ModelDims, layer_count, shape_of


def dims(sd: dict) -> ModelDims:
    V, C = shape_of(sd, "emb.weight", 2, "[vocab, n_embd]")
    L = layer_count(sd)
    F = shape_of(sd, "blocks.0.ffn.key.weight", 2, "[ffn_dim, n_embd]")[0]
    return ModelDims(n_layer=L, n_embd=C, ffn_dim=F, vocab_size=V)


def expected_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    C, F, V = d.n_embd, d.ffn_dim, d.vocab_size
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
        shapes[p + "att.time_decay"] = (C,)
        shapes[p + "att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for w in ("key", "value", "receptance", "output"):
            shapes[p + f"att.{w}.weight"] = (C, C)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes
