"""Loading RWKV checkpoints: version detection from one declared table, and strict tensor mapping.

Every tensor in the file is either mapped (expected with a known shape) or explicitly ignored; a missing, unexpected
or mis-shaped tensor, a non-float tensor, or a NaN/Inf weight is an error that names it.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import CheckpointError, UnsupportedVersionError

# Version detection: the first row whose marker key (a suffix of some key) is present wins, so the table is ordered
# newest first. Only v4 is exported; the others are recognised so the user gets a clear refusal, not a key error.
VERSION_MARKERS: list[tuple[str, str, bool]] = [
    # (version, marker key suffix, supported)
    ("7", ".att.k_k", False),
    ("6", ".att.time_maa_x", False),
    ("5.2", ".att.gate.weight", False),
    ("5", ".att.ln_x.weight", False),
    ("4", ".att.time_first", True),
]

# Tensors that may appear in a v4 checkpoint and are deliberately not used (none are known for RWKV-4 releases; the
# table is here so that adding one is a reviewed, one-line change rather than a silent skip).
IGNORED_KEYS_V4: tuple[str, ...] = ()

FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class ModelDims:
    n_layer: int
    n_embd: int
    ffn_dim: int
    vocab_size: int

    def as_dict(self) -> dict:
        return {"n_layer": self.n_layer, "n_embd": self.n_embd, "ffn_dim": self.ffn_dim, "vocab_size": self.vocab_size}


@dataclass
class Checkpoint:
    version: str
    dims: ModelDims
    tensors: dict  # name -> torch.Tensor in the file's dtype
    source_dtype: str
    path: Path | None = None
    extra: dict = field(default_factory=dict)


def v4_expected_shapes(d: ModelDims) -> dict[str, tuple[int, ...]]:
    """The complete RWKV-4 key set with shapes (rwkv4.md's table)."""
    C, F, V = d.n_embd, d.ffn_dim, d.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "emb.weight": (V, C),
        "blocks.0.ln0.weight": (C,),
        "blocks.0.ln0.bias": (C,),
        "ln_out.weight": (C,),
        "ln_out.bias": (C,),
        "head.weight": (V, C),
    }
    for i in range(d.n_layer):
        p = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[p + ln + ".weight"] = (C,)
            shapes[p + ln + ".bias"] = (C,)
        shapes[p + "att.time_decay"] = (C,)
        shapes[p + "att.time_first"] = (C,)
        for m in ("k", "v", "r"):
            shapes[p + f"att.time_mix_{m}"] = (1, 1, C)
        for w in ("key", "value", "receptance", "output"):
            shapes[p + f"att.{w}.weight"] = (C, C)
        shapes[p + "ffn.time_mix_k"] = (1, 1, C)
        shapes[p + "ffn.time_mix_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (F, C)
        shapes[p + "ffn.receptance.weight"] = (C, C)
        shapes[p + "ffn.value.weight"] = (C, F)
    return shapes


def detect_version(keys) -> tuple[str, bool]:
    keys = list(keys)
    for version, marker, supported in VERSION_MARKERS:
        if any(k.endswith(marker) for k in keys):
            return version, supported
    raise CheckpointError(
        "not an RWKV checkpoint: no key identifies an RWKV version (expected e.g. 'blocks.0.att.time_first' for RWKV-4)"
    )


def _require(sd: dict, key: str):
    if key not in sd:
        raise CheckpointError(f"missing tensor '{key}'")
    return sd[key]


def infer_dims(sd: dict) -> ModelDims:
    emb = _require(sd, "emb.weight")
    if emb.dim() != 2:
        raise CheckpointError(f"tensor 'emb.weight' has shape {tuple(emb.shape)}, expected [vocab, n_embd]")
    V, C = emb.shape
    layer_ids = set()
    for k in sd:
        m = re.match(r"blocks\.(\d+)\.", k)
        if m:
            layer_ids.add(int(m.group(1)))
    if not layer_ids:
        raise CheckpointError("no 'blocks.N.*' tensors: not an RWKV checkpoint")
    L = max(layer_ids) + 1
    missing_layers = sorted(set(range(L)) - layer_ids)
    if missing_layers:
        raise CheckpointError(f"missing all tensors of layer {missing_layers[0]} ('blocks.{missing_layers[0]}.*')")
    fk = _require(sd, "blocks.0.ffn.key.weight")
    if fk.dim() != 2:
        raise CheckpointError(f"tensor 'blocks.0.ffn.key.weight' has shape {tuple(fk.shape)}, expected [ffn_dim, n_embd]")
    return ModelDims(n_layer=L, n_embd=int(C), ffn_dim=int(fk.shape[0]), vocab_size=int(V))


def validate_v4(sd: dict, check_finite: bool = True, progress: Callable | None = None) -> ModelDims:
    """Strict mapping: every tensor expected or ignored, every shape right, float dtypes only, finite values."""
    dims = infer_dims(sd)
    expected = v4_expected_shapes(dims)
    for key in expected:
        if key not in sd:
            raise CheckpointError(f"missing tensor '{key}' (RWKV-4, {dims.n_layer} layers)")
    for key in sd:
        if key not in expected and key not in IGNORED_KEYS_V4:
            raise CheckpointError(f"unexpected tensor '{key}': not part of RWKV-4's layout (cannot map it)")
    items = list(expected.items())
    for key, shape in (progress(items, desc="checking tensors") if progress else items):
        t = sd[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor '{key}' has shape {list(t.shape)}, expected {list(shape)}")
        dt = str(t.dtype).removeprefix("torch.")
        if dt not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor '{key}' has dtype {dt}, expected one of {', '.join(FLOAT_DTYPES)}")
        if check_finite:
            import torch

            if not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"tensor '{key}' contains NaN or Inf")
    return dims


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
    version, supported = detect_version(sd.keys())
    if not supported:
        raise UnsupportedVersionError(f"this is an RWKV-{version} checkpoint; only RWKV-4 is supported for export")
    dims = validate_v4(sd, progress=progress)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()})
    return Checkpoint(
        version="4",
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
