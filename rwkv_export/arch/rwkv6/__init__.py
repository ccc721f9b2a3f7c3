"""RWKV-6.0 ("Finch"): the architecture entry of the registry. Torch-free at import; the modules (step.py,
sequence.py), the reference (runtime_ref.rwkv6) and the fixtures (synthetic.py) load when used.

Built on RWKV-5.2's package (arch/rwkv5): the same state, block skeleton, WKV, GroupNorm, channel mix and prompt-graph
WKV; what differs is the data-dependent token shift and decay (the two LoRAs) and the key set."""

from __future__ import annotations

from ..base import ModelDims
from ..rwkv5 import RWKV5Arch
from . import mapping


class RWKV6Arch(RWKV5Arch):
    version = "6"
    title = "RWKV-6"
    markers = ("att.time_maa_x", "att.time_decay_w1")
    # none: the registry tries newer versions first (a v6 file, which has all of v5.2's markers, is taken for v6), and
    # a stray key of a later version in a file of this one is then named by the strict mapping ("mixes versions")
    later_markers = ()
    state_layout = mapping.STATE_LAYOUT
    _pkg = "rwkv6"
    _step_class, _sequence_class = "RWKV6Step", "RWKV6Sequence"
    _reference = ("runtime_ref.rwkv6", "RWKV6")

    def dims(self, sd: dict) -> ModelDims:
        return mapping.dims(sd)

    def expected_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        return mapping.expected_shapes(dims)
