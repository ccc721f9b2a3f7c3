"""Loading RWKV checkpoints: read the file safely, detect the version (arch.detect: one declared table), and map
every tensor strictly (the architecture's expected_shapes).

Every tensor in the file is either mapped (expected with a known shape) or explicitly ignored; a missing, unexpected
or mis-shaped tensor, a non-float tensor, or a NaN/Inf weight is an error that names it.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Callable

from .arch import base as _base
from .arch.base import Checkpoint, ModelDims  # noqa: F401  (re-exported)
from .errors import CheckpointError

FLOAT_DTYPES = _base.FLOAT_DTYPES


def read_state_dict(path: str | Path) -> dict:
    """Read a flat name->tensor dict from .pth/.pt (weights_only, mmap) or .safetensors, with one-line errors."""
    import torch

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory, expected a .pth or .safetensors file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"cannot read {path.name} as safetensors: {_first_line(e)}") from None
    elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
        if not zipfile.is_zipfile(path):
            # torch's legacy (pre-1.6) format is not a zip; torch.load handles it without mmap
            mmap = False
        else:
            mmap = True
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            msg = _first_line(e)
            if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
                raise CheckpointError(
                    f"refusing to load {path.name}: it holds Python objects, not only tensors "
                    "(loaded with weights_only=True, so no code runs)"
                ) from None
            raise CheckpointError(f"cannot read {path.name} as a PyTorch checkpoint (truncated or corrupt?): {msg}") from None
    else:
        raise CheckpointError(f"unknown checkpoint format '{path.suffix}': expected .pth or .safetensors")
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path.name} is not a flat state dict of named tensors")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"entry '{k}' of {path.name} is a {type(v).__name__}, not a tensor")
    return sd


def from_state_dict(sd: dict, path: Path | None = None, progress: Callable | None = None) -> Checkpoint:
    """Detect the version from the keys, map every tensor strictly, and return the validated checkpoint."""
    from . import arch

    architecture = arch.detect(sd.keys())
    dims = architecture.validate(sd, progress=progress)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    return Checkpoint(
        arch=architecture,
        dims=dims,
        tensors=sd,
        source_dtype=dtypes[0] if len(dtypes) == 1 else "mixed(" + ",".join(dtypes) + ")",
        path=path,
    )


def load_checkpoint(path: str | Path, progress: Callable | None = None) -> Checkpoint:
    path = Path(path)
    sd = read_state_dict(path)
    return from_state_dict(sd, path=path, progress=progress)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
