"""Reference runners for RWKV in plain PyTorch (rwkv4.py; one file per version): the parity oracle every export is checked against.

Independent of `rwkv_export` on purpose (an oracle must not share code with what it checks). Needs only torch
(safetensors only to read `.safetensors` checkpoints).
"""

from .rwkv4 import PP_INIT, STATE_KEYS, RWKV4, RWKV4Config, check_state_dict, expected_shapes
from .sampling import sample_logits, sampling_probs

__all__ = [
    "RWKV4",
    "RWKV4Config",
    "STATE_KEYS",
    "PP_INIT",
    "check_state_dict",
    "expected_shapes",
    "sample_logits",
    "sampling_probs",
]
