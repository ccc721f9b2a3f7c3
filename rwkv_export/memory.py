"""Memory of this process: giving freed heap back to the system, and its own peak (the figures progress lines and a
check's worker processes report)."""

from __future__ import annotations

from pathlib import Path


def give_back_freed_memory() -> None:
    """Return the heap memory freed so far to the system (glibc's malloc_trim; elsewhere nothing). A closed
    onnxruntime session's weights are freed into glibc's heap and stay in the process's RSS (measured at 169M
    shapes: 439 MB after the fp16 prompt graph's session closed, 13 MB once trimmed) under every later stage; so do a
    closed LiteRT interpreter's XNNPACK-packed weights."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def own_peak_rss() -> int:
    """This process's own peak resident memory: /proc's VmHWM, which starts afresh at exec, where ru_maxrss (what
    progress.peak_rss_bytes reads) carries the parent's peak into a worker process."""
    from .progress import peak_rss_bytes

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()
