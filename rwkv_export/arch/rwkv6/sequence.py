"""The RWKV-6.0 prompt ("sequence", GPT-mode) graph: RWKV-5.2's (rwkv5/sequence.py: the same parameters as the step
graph, matrix-matrix linear layers, the two-level chunked WKV) over RWKV-6 blocks, whose decay is per token."""

from __future__ import annotations

from ..rwkv5.sequence import BLOCK, DEFAULT_MAX_CHUNK, RWKV5Sequence  # noqa: F401  (re-exported)
from .step import RWKV6Step


class RWKV6Sequence(RWKV5Sequence):
    """forward(tokens [T] int64, att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C]) -> (logits, att_x, att_kv,
    ffn_x): RWKV5Sequence built from an RWKV6Step."""

    step_class = RWKV6Step
