"""Outputs are written to a temporary folder beside the destination and moved into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import OutputExistsError, OutputPathError


def check_output_dir(out: Path, force: bool) -> None:
    """Fail early (before any heavy work) if `out` cannot be created or would be overwritten without --force."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output path exists and is not a folder: {out}")
    if out.exists() and not force and any(out.iterdir()):
        raise OutputExistsError(f"output folder exists and is not empty: {out} (use --force to replace it)")
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise OutputPathError(f"cannot create output folder {out}: {parent} is not a folder")
    try:  # a real probe: permission bits say nothing to root, and some filesystems refuse writes regardless
        os.rmdir(tempfile.mkdtemp(prefix=".rwkv-export-probe-", dir=parent))
    except OSError as e:
        raise OutputPathError(f"cannot write to {parent}: {e.strerror}") from None


def _existing_parent(p: Path) -> Path:
    p = p.absolute().parent
    while not p.exists():
        p = p.parent
    return p


@contextlib.contextmanager
def staged_output_dir(out: Path, force: bool):
    """Yield a fresh temporary folder; on success replace `out` with it atomically (rename), else delete it."""
    out = Path(out)
    check_output_dir(out, force)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputPathError(f"cannot create output folder {out}: {e.strerror}") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    os.chmod(out, 0o755)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path`; rename it over `path` on success, delete it on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an export folder is for sharing
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
