"""RWKV-5.2 ("Eagle"): the architecture entry of the registry. Torch-free at import; the modules (step.py,
sequence.py), the reference (runtime_ref.rwkv5) and the fixtures (synthetic.py) load when used.

RWKV-6 (arch/rwkv6) builds on this package: it shares the mapping's common keys and state, the step's block skeleton,
WKV update, GroupNorm and channel mix, and the prompt graph's chunked WKV."""

from __future__ import annotations

from ..base import Architecture, Checkpoint, ModelDims, StateTensor
from . import mapping


class RWKV5Arch(Architecture):
    version = "5.2"
    title = "RWKV-5.2"
    markers = ("att.ln_x.weight", "att.time_faaaa", "att.gate.weight")
    # none: the registry tries newer versions first (a v6 file, which has all of v5.2's markers, is taken for v6), and
    # a stray key of a later version in a file of this one is then named by the strict mapping ("mixes versions")
    later_markers = ()
    ignored = ()
    state_layout = mapping.STATE_LAYOUT
    world_vocab = True
    # the modules and the fixtures of this version (RWKV6Arch overrides them)
    _pkg = "rwkv5"
    _step_class, _sequence_class = "RWKV5Step", "RWKV5Sequence"
    _reference = ("runtime_ref.rwkv5", "RWKV5")

    def matches(self, keys: set[str]) -> bool:
        return super().matches(keys) and not any(k.endswith("." + m) for k in keys for m in self.later_markers)

    def _module(self, name: str):
        import importlib

        return importlib.import_module(f"rwkv_export.arch.{self._pkg}.{name}")

    @property
    def presets(self) -> dict:
        return self._module("synthetic").PRESETS

    def dims(self, sd: dict) -> ModelDims:
        return mapping.dims(sd)

    def expected_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return mapping.expected_shapes(dims)

    def state(self, dims: ModelDims) -> list[StateTensor]:
        return mapping.state(dims)

    def step_module(self, ckpt: Checkpoint, variant: str = "fp32"):
        from .step import StepOptions

        return getattr(self._module("step"), self._step_class)(ckpt, StepOptions.for_variant(variant))

    def sequence_module(self, step, *, all_logits: bool = False, max_chunk: int | None = None):
        from .sequence import DEFAULT_MAX_CHUNK

        cls = getattr(self._module("sequence"), self._sequence_class)
        return cls(step, all_logits=all_logits, max_chunk=max_chunk or DEFAULT_MAX_CHUNK)

    def reference(self, tensors: dict, dtype=None):
        import importlib

        import torch

        mod, cls = self._reference
        return getattr(importlib.import_module(mod), cls)(tensors, dtype=dtype or torch.float32)

    def fake_state_dict(self, preset: str, seed: int = 0) -> dict:
        syn = self._module("synthetic")
        return syn.make_state_dict(syn.PRESETS[preset], seed)

    def fp16_info(self) -> dict:
        from .step import FP16_NOTE, FP16_RESCALE_EVERY

        return {"method": "fp16", "rescale_every": FP16_RESCALE_EVERY, "state_dtype": "float32", "note": FP16_NOTE}
