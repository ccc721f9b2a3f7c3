"""Checkpoint factories for tests: synthetic RWKV-4 state dicts with the real key layout, and broken variants."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from rwkv_export.synthetic import save_checkpoint
from rwkv_export.arch.rwkv4.synthetic import PRESETS, make_state_dict


def state_dict(preset: str = "tiny", seed: int = 0, dtype: str | None = None) -> dict:
    sd = make_state_dict(PRESETS[preset], seed)
    if dtype is not None:
        sd = {k: v.to(getattr(torch, dtype)) for k, v in sd.items()}
    return sd


def write(path: Path, sd: dict) -> Path:
    return save_checkpoint(sd, path)


class _RunsCode:
    """Unpickling this would call os.system; weights_only loading must refuse it before that happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def malicious_pth(path: Path, marker: Path) -> Path:
    sd = state_dict("tiny")
    sd["payload"] = _RunsCode(marker)
    torch.save(sd, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    return path


def v5_style(sd: dict) -> dict:
    """Add the key that marks RWKV-5 (att.ln_x) to every layer."""
    out = dict(sd)
    C = sd["emb.weight"].shape[1]
    for k in list(sd):
        if k.endswith(".att.time_first"):
            out[k.replace("time_first", "ln_x.weight")] = torch.ones(C, dtype=sd[k].dtype)
    return out
