"""Loading RWKV checkpoints: read the file safely, detect the version (arch.detect: one declared table), and map
every tensor strictly (the architecture's expected_shapes).

Every tensor in the file is either mapped (expected with a known shape) or explicitly ignored; a missing, unexpected
or mis-shaped tensor, a non-float tensor, or a NaN/Inf weight is an error that names it.
"""

from __future__ import annotations

import pickle
import stat
from pathlib import Path
from typing import Callable

from .arch import base as _base
from .arch.base import Checkpoint, ModelDims  # noqa: F401  (re-exported)
from .errors import CheckpointError

FLOAT_DTYPES = _base.FLOAT_DTYPES


# what a file begins with, by format (read before anything else, so a file that is none of them is never parsed)
ZIP_MAGIC = b"PK\x03\x04"  # torch.save since 1.6: a zip archive
PICKLE_MAGIC = b"\x80"  # torch's legacy format: a pickle (protocol 2 or later), opcode PROTO first
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit on its JSON header


def read_state_dict(path: str | Path) -> dict:
    """Read a flat name->tensor dict from .pth/.pt (weights_only, mmap) or .safetensors, with one-line errors. Only
    regular files are opened, and only after their first bytes and size say which format they are."""
    import torch

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin", ".ckpt"):
        _regular_size(path)
        raise CheckpointError(f"unknown checkpoint format '{path.suffix}': expected .pth or .safetensors")
    kind = sniff_format(path)
    if kind == "safetensors":
        try:
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"cannot read {path.name} as safetensors: {_first_line(e)}") from None
    else:
        try:  # torch's legacy (pre-1.6) format is not a zip; torch.load handles it without mmap
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "zip")
        except Exception as e:
            # inside a torch zip the pickle is torch's own: a weights_only refusal means objects, not damage
            if "Unsupported global" in str(e) or (kind == "zip" and isinstance(e, pickle.UnpicklingError)):
                raise CheckpointError(
                    f"refusing to load {path.name}: it holds Python objects, not only tensors "
                    "(loaded with weights_only=True, so no code runs)"
                ) from None
            raise CheckpointError(f"cannot read {path.name} as a PyTorch checkpoint (truncated or corrupt?): "
                                  f"{_first_line(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{path.name} is not a flat state dict of named tensors")
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"entry '{k}' of {path.name} is a {type(v).__name__}, not a tensor")
    return sd


def _regular_size(path: Path) -> int:
    """The size of `path`, refused unless it is a regular file (a device such as /dev/zero, or a FIFO, would be
    read without end)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"checkpoint is a directory, expected a .pth or .safetensors file: {path}")
    if not stat.S_ISREG(st.st_mode):
        what = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO (pipe)",
                stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise CheckpointError(f"checkpoint {path} is {what}, not a regular file: refusing to read it")
    return st.st_size


def sniff_format(path: Path) -> str:
    """'zip' | 'pickle' | 'safetensors', from the file's first bytes and its size; anything else is refused here,
    before a parser sees it."""
    size = _regular_size(path)
    if size == 0:
        raise CheckpointError(f"{path.name} is empty (0 bytes): not a checkpoint")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head[:1] == PICKLE_MAGIC and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 little-endian header length, then a JSON object
        n = int.from_bytes(head[:8], "little")
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise CheckpointError(f"cannot read {path.name} as safetensors: its header claims {n} bytes, the file has "
                                  f"{size} (truncated or corrupt)")
        return "safetensors"
    raise CheckpointError(f"{path.name} is not a PyTorch or safetensors checkpoint (its first bytes are neither a zip "
                          "archive, a pickle nor a safetensors header)")


# wrappers whose state dicts prefix every key
WRAPPER_PREFIXES = {"module.": "DistributedDataParallel", "_orig_mod.": "torch.compile"}


def strip_wrapper_prefix(sd: dict, progress: Callable | None = None) -> dict:
    """Keys that all start with a wrapper's prefix lose it, with a notice; anything else is returned unchanged."""
    for prefix, wrapper in WRAPPER_PREFIXES.items():
        if sd and all(k.startswith(prefix) for k in sd):
            if hasattr(progress, "note"):
                progress.note(f"note: every key starts with '{prefix}' (a {wrapper} checkpoint): read without it")
            return strip_wrapper_prefix({k[len(prefix):]: v for k, v in sd.items()}, progress)
    return sd


def from_state_dict(sd: dict, path: Path | None = None, progress: Callable | None = None) -> Checkpoint:
    """Detect the version from the keys, map every tensor strictly, and return the validated checkpoint."""
    from . import arch

    sd = strip_wrapper_prefix(sd, progress)
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


def reread(ckpt: Checkpoint, keep=()) -> bool:
    """Give back the memory a checkpoint's tensors hold once read, between the stages of an export (issue 19): a
    .pth (zip) or .safetensors file is memory-mapped, and every page a stage read (building a module reads them all)
    stays resident, 340 MB at 169M shapes and 0.86 GB at 430M, while the next stage holds a module of its own. The
    tensors are swapped for a fresh mapping of the same file: the same bytes, nothing resident until read again
    (from the page cache, ~0.3 s at 169M). The old pages go once nothing else holds those tensors. A checkpoint
    read into memory (a built-in model, torch's legacy format) is left as it is, and so is one whose tensors a module
    in `keep` still holds (an fp32 checkpoint's vectors become an fp32 module's parameters as they are): that module
    would keep the old mapping, and the next stage would fill a second one. Returns whether it was re-read."""
    path = ckpt.path
    if path is None or sniff_format(Path(path)) not in ("zip", "safetensors"):
        return False
    mine = {t.untyped_storage().data_ptr() for t in ckpt.tensors.values()}
    if any(t.untyped_storage().data_ptr() in mine for m in keep for t in [*m.parameters(), *m.buffers()]):
        return False
    sd = strip_wrapper_prefix(read_state_dict(path))
    if sd.keys() != ckpt.tensors.keys() or any(sd[k].shape != t.shape or sd[k].dtype != t.dtype
                                                for k, t in ckpt.tensors.items()):
        raise CheckpointError(f"{Path(path).name} changed while it was being exported")
    ckpt.tensors = sd
    return True


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__
