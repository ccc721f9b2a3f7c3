"""Outputs are written to a hidden staging folder beside the destination and moved into place only when complete.

The promises, and where each is kept:
- never overwrite without --force: checked before the slow work (check_output_dir) and again at the move, which is
  an atomic no-replace rename (a folder that appeared at -o meanwhile is refused unless --force);
- never delete inputs: an -o that is or holds the checkpoint or tokenizer (or the current folder) is refused;
- one writer per destination: a lock file `.NAME.lock` beside it, held from staging to the move;
- nothing half-written, whatever the end: the staging folder `.NAME.partial-PID-XXXX` is removed on any exception,
  SIGINT, SIGTERM or SIGHUP; one left by a process that was killed outright (SIGKILL, power loss) is removed by the
  next rwkv-export that writes the same destination, once its owner (the PID in its name) is dead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import OutputExistsError, OutputLockedError, OutputPathError

STAGE_TAG = ".partial-"  # staging folders and files are named `.NAME.partial-...` (hidden: never listed or served)
_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))


def check_output_dir(out: Path, force: bool, inputs=()) -> None:
    """Fail early (before any heavy work) if `out` cannot be created, would be overwritten without --force, or is
    (or holds) one of `inputs` (paths the export reads; other strings, such as builtin:NAME, are ignored)."""
    out = Path(out)
    if out.is_symlink():
        what = "a dangling symbolic link" if not out.exists() else f"a symbolic link to {os.path.realpath(out)}"
        raise OutputPathError(f"output path {out} is {what}: give the real folder's path instead")
    if out.name in ("", ".", ".."):
        raise OutputPathError(f"output path '{out}' names no folder of its own: give a new folder's name")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputPathError(f"output folder {out} is the current folder or holds it: give a new folder's name")
    for spec in inputs:
        if spec and os.path.exists(str(spec)):
            src = Path(spec).resolve()
            if src == real or real in src.parents:
                raise OutputPathError(f"output folder {out} holds the input {spec}; writing there would replace it: "
                                      "give another -o")
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
def staged_output_dir(out: Path, force: bool, inputs=()):
    """Yield a fresh staging folder beside `out`; on success move it to `out` atomically, else delete it."""
    check_output_dir(out, force, inputs)
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"cannot create output folder {out}: {e.strerror}") from None
    with staging_beside(out) as tmp:
        yield tmp
        _move_into_place(tmp, out, force)


@contextlib.contextmanager
def staging_beside(dest: Path):
    """A fresh hidden folder beside `dest` (same filesystem, so the final renames are atomic), owned by this process:
    `dest` is locked against other rwkv-export processes meanwhile; the folder is removed however the block ends
    (exception, SIGINT, SIGTERM, SIGHUP); stale ones of dead processes are removed first."""
    dest = Path(os.path.abspath(dest))
    with _locked(dest), _signals_raise():
        remove_stale(dest)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{STAGE_TAG}{os.getpid()}-", dir=dest.parent))
        except OSError as e:
            raise OutputPathError(f"cannot write beside {dest}: {e.strerror}") from None
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`. What is at `out` now is checked again: a folder that appeared (or filled) since the
    start is replaced only with --force; the rename itself never replaces anything (RENAME_NOREPLACE)."""
    os.chmod(tmp, 0o755)
    with signals_blocked():  # a signal between the two renames would leave neither the old nor the new folder
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise OutputPathError(f"{out} appeared during the export and is not a folder; nothing was written")
        old = None
        if out.exists():
            if not any(out.iterdir()):
                _rmdir_empty(out)
            elif not force:
                raise OutputExistsError(f"output folder {out} appeared or filled during the export; nothing was "
                                        "written (use --force to replace it)")
            else:
                old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.rename(out, old)
        try:
            rename_noreplace(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _rmdir_empty(path: Path) -> None:
    try:
        os.rmdir(path)
    except OSError:  # filled since the check a moment ago
        raise OutputExistsError(f"output folder {path} filled during the export; nothing was written") from None


def rename_noreplace(src: Path, dst: Path) -> None:
    """os.rename that fails (OutputExistsError) if `dst` exists, atomically where the kernel can (Linux
    renameat2(RENAME_NOREPLACE)), else by a check just before the rename."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if fn is not None:
        at_fdcwd, rename_noreplace_flag = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace_flag) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise OutputExistsError(_APPEARED.format(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the filesystem has no RENAME_NOREPLACE
            raise OutputPathError(f"cannot move the output into place at {dst}: {os.strerror(err)}")
    if os.path.lexists(dst):
        raise OutputExistsError(_APPEARED.format(dst))
    os.rename(src, dst)


_APPEARED = "{} appeared during the export; nothing was written (use --force to replace it)"


def clone_or_copy(src: Path, dst: Path) -> None:
    """A copy of `src` that shares its blocks where the filesystem can (a reflink: btrfs, XFS, APFS-like), else a
    plain copy. Never a link: onnx refuses external data behind a symbolic link, and behind a hard link too ("a
    potential hardlink attack"), and a link would tie the staging folder to the original."""
    import fcntl

    ficlone = 0x40049409  # linux/fs.h FICLONE
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), ficlone, fi.fileno())
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


# ---- the lock, stale staging folders, signals --------------------------------------------------------------------


@contextlib.contextmanager
def _locked(dest: Path):
    """An exclusive, non-blocking flock on `.NAME.lock` beside `dest`; removed when released."""
    import fcntl

    lock = dest.parent / f".{dest.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputPathError(f"cannot write beside {dest}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(f"another rwkv-export is writing {dest} (it holds {lock.name}); wait for it to "
                                    "finish or give another path") from None
        try:  # the holder before us may have removed the file after we opened it: then lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def remove_stale(dest: Path) -> list[Path]:
    """Remove staging folders of `dest` whose owner process (the PID in the name) is dead, and restore or remove a
    replaced folder (`.NAME.old-PID-*`) that a killed process left between its two renames. Returns what it removed."""
    dest = Path(dest)
    removed = []
    for kind in (STAGE_TAG, ".old-"):
        for p in dest.parent.glob(f".{glob.escape(dest.name)}{kind}*"):
            m = re.fullmatch(rf"\.{re.escape(dest.name)}{re.escape(kind)}(\d+)-.*", p.name)
            if m is None or _alive(int(m.group(1))):
                continue
            if kind == ".old-" and not os.path.lexists(dest):
                os.rename(p, dest)  # the export died after moving the old folder aside: put it back
                continue
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived: raised in the main thread so that cleanup runs; exits 128 + the signal number."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def _signals_raise():
    """While writing, SIGTERM and SIGHUP end the process as SIGINT does (by an exception, so every `finally` cleans
    up). Signals someone chose to ignore (nohup ignores SIGHUP) stay ignored; only the main thread can do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for s in _SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, _raise_terminated)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def signals_blocked():
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, *_SIGNALS})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def staged_file(path: Path):
    """Yield a temporary path beside `path`; rename it over `path` on success, delete it on failure."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{STAGE_TAG}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an export folder is for sharing
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
