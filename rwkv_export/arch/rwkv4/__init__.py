"""RWKV-4 ("Pile" and "Raven" releases): the architecture entry of the registry. Torch-free at import; the modules
(step.py, sequence.py), the reference (runtime_ref.rwkv4) and the fixtures (synthetic.py) load when used."""

from __future__ import annotations

from ..base import Architecture, Checkpoint, ModelDims, StateTensor
from . import mapping, spec


class RWKV4Arch(Architecture):
    version = "4"
    title = "RWKV-4"
    markers = ("att.time_first",)
    # none are known for RWKV-4 releases; adding one is a reviewed one-line change, never a silent skip
    ignored = ()
    lazy_step = True
    state_layout = spec.STATE_LAYOUT

    def matches(self, keys: set[str]) -> bool:
        # RWKV-5.0/5.1 kept `att.time_first` but added a GroupNorm (`att.ln_x`): not ours, refused by the registry
        return super().matches(keys) and not any(k.endswith(".att.ln_x.weight") for k in keys)

    @property
    def presets(self) -> dict:
        from .synthetic import PRESETS

        return PRESETS

    def dims(self, sd: dict) -> ModelDims:
        return mapping.dims(sd)

    def expected_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return mapping.expected_shapes(dims)

    def state(self, dims: ModelDims) -> list[StateTensor]:
        return spec.state(dims)

    def step_module(self, ckpt: Checkpoint, variant: str = "fp32", lazy: bool = False):
        from .step import RWKV4Step, StepOptions

        return RWKV4Step(ckpt, StepOptions.for_variant(variant), lazy=lazy)

    def sequence_module(self, step, *, all_logits: bool = False, max_chunk: int | None = None):
        from .sequence import DEFAULT_MAX_CHUNK, RWKV4Sequence

        # the scan reaches 2**m - 1 tokens: a call that must hold max_chunk tokens gets the smallest such reach
        if max_chunk is not None and max_chunk >= 1:
            max_chunk = (1 << max_chunk.bit_length()) - 1
        return RWKV4Sequence(step, all_logits=all_logits, max_chunk=max_chunk or DEFAULT_MAX_CHUNK)

    def reference(self, tensors: dict, dtype=None):
        import torch
        from runtime_ref.rwkv4 import RWKV4

        return RWKV4(tensors, dtype=dtype or torch.float32)

    def fake_state_dict(self, preset: str, seed: int = 0) -> dict:
        from .synthetic import PRESETS, make_state_dict

        return make_state_dict(PRESETS[preset], seed)

    def fp16_info(self) -> dict:
        from .step import FP16_RESCALE_EVERY

        return {"method": "fp16", "rescale_every": FP16_RESCALE_EVERY, "state_dtype": "float32"}
