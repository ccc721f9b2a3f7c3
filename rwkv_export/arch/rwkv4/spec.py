"""RWKV-4's state contract, torch-free so that light modules (manifest, serve, CLI) can use it."""

from __future__ import annotations

from ..base import ModelDims, StateTensor

# Five tensors of [n_layer, n_embd], in graph I/O order. Everything downstream reads them from the manifest.
STATE_NAMES = ("att_x", "att_aa", "att_bb", "att_pp", "ffn_x")
STATE_DOCS = {
    "att_x": "time mix: LN1 output of the previous token (token shift)",
    "att_aa": "time mix: WKV numerator, sum of exp(k)*v with the decay applied, scaled by exp(-att_pp)",
    "att_bb": "time mix: WKV denominator, sum of exp(k) with the decay applied, scaled by exp(-att_pp)",
    "att_pp": "time mix: running max exponent that keeps att_aa/att_bb finite",
    "ffn_x": "channel mix: LN2 output of the previous token (token shift)",
}
# Fresh-state values. att_pp must be very negative (exp(att_pp - p) == 0 for any real exponent p) yet finite in every
# dtype a state may be held in (fp16's max is 65504); with att_aa = att_bb = 0 its exact value never matters.
STATE_INIT = {"att_x": 0.0, "att_aa": 0.0, "att_bb": 0.0, "att_pp": -1.0e4, "ffn_x": 0.0}
STATE_LAYOUT = "five tensors of [n_layer, n_embd]; row i belongs to layer i"


def state(dims: ModelDims) -> list[StateTensor]:
    shape = (dims.n_layer, dims.n_embd)
    return [StateTensor(n, shape, STATE_INIT[n], "float32", STATE_DOCS[n]) for n in STATE_NAMES]
