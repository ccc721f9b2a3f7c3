"""RWKV-7 ("Goose", x070): the architecture entry of the registry. Torch-free at import; the modules (step.py,
sequence.py), the reference (runtime_ref.rwkv7) and the fixtures (synthetic.py) load when used."""

from __future__ import annotations

from ..base import Architecture, Checkpoint, ModelDims, StateTensor
from . import mapping


class RWKV7Arch(Architecture):
    version = "7"
    title = "RWKV-7"
    markers = ("att.k_k", "att.r_k", "att.w0")
    # layer 0's value-residual LoRA: in released files, unused by the equations (mapping.py says why)
    ignored = mapping.IGNORED
    state_layout = mapping.STATE_LAYOUT
    world_vocab = True

    @property
    def presets(self) -> dict:
        from .synthetic import PRESETS

        return PRESETS

    def dims(self, sd: dict) -> ModelDims:
        return mapping.dims(sd)

    def expected_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return mapping.expected_shapes(dims)

    def state(self, dims: ModelDims) -> list[StateTensor]:
        return mapping.state(dims)

    def step_module(self, ckpt: Checkpoint, variant: str = "fp32"):
        from .step import RWKV7Step, StepOptions

        return RWKV7Step(ckpt, StepOptions.for_variant(variant))

    def sequence_module(self, step, *, all_logits: bool = False, max_chunk: int | None = None):
        from .sequence import DEFAULT_MAX_CHUNK, RWKV7Sequence

        return RWKV7Sequence(step, all_logits=all_logits, max_chunk=max_chunk or DEFAULT_MAX_CHUNK)

    def reference(self, tensors: dict, dtype=None):
        import torch
        from runtime_ref.rwkv7 import RWKV7

        return RWKV7(tensors, dtype=dtype or torch.float32)

    def fake_state_dict(self, preset: str, seed: int = 0) -> dict:
        from .synthetic import PRESETS, make_state_dict

        return make_state_dict(PRESETS[preset], seed)

    def fp16_info(self) -> dict:
        from .step import FP16_NOTE

        return {"method": "fp16", "rescale_every": 0, "state_dtype": "float32", "note": FP16_NOTE}
