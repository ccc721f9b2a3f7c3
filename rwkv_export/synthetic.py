"""Synthetic checkpoints with each version's real key layout, for tests, the built-in models and the benchmarks.

Each architecture makes its own (arch/<version>/synthetic.py: presets and values imitating a trained model's ranges,
seeded on the CPU, so the same preset and seed give the same tensors everywhere); this module writes them to files.
"""

from __future__ import annotations

from pathlib import Path


def save_checkpoint(state_dict: dict, path: str | Path) -> Path:
    """Write a state dict as `.pth` (torch.save) or `.safetensors`, chosen by the suffix."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(path))
    else:
        torch.save(state_dict, str(path))
    return path


def make_state_dict(version: str, preset: str, seed: int = 0, **overrides) -> dict:
    """A synthetic state dict of RWKV `version` from one of its presets; overrides replace preset fields."""
    from dataclasses import replace

    from . import arch
    from .errors import RwkvExportError

    a = arch.get(version)
    if preset not in a.presets:
        raise RwkvExportError(f"unknown {a.title} preset '{preset}'; choose from {', '.join(a.presets)}")
    cfg = replace(a.presets[preset], **overrides)
    import importlib

    return importlib.import_module(f"{type(a).__module__}.synthetic").make_state_dict(cfg, seed)


def make_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, version: str = "4", **overrides) -> Path:
    """Make a synthetic checkpoint file of RWKV `version` from a preset (see that version's PRESETS)."""
    return save_checkpoint(make_state_dict(version, preset, seed, **overrides), path)
