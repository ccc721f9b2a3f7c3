"""Progress on stderr for long work: bars for loops, timed stage lines for single long calls, and a summary line
(total time, peak memory)."""

from __future__ import annotations

import contextlib
import sys
import time


def peak_rss_bytes() -> int:
    """Peak resident memory so far of this process, and of its waited-for children if larger (ru_maxrss is KiB on
    Linux). Not a sum: a child's peak is its own, and children here run one at a time."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return max(own, kids) * scale


STAGE_CPU_ENV = "RWKV_EXPORT_STAGE_CPU"  # set (to 1): each stage line also gives the CPU seconds of its process


def cpu_note(seconds: float) -> str:
    """', CPU N s' for a stage line where STAGE_CPU_ENV is set (benchmarks/bench_export.py), else nothing: the CPU
    time of the process that ran the stage, all its threads (a stage run beside another in a thread counts both)."""
    import os

    return f", CPU {seconds:.1f} s" if os.environ.get(STAGE_CPU_ENV) else ""


def format_bytes(n: int) -> str:
    return f"{n / 1024**3:.2f} GB" if n >= 1024**3 else f"{n / 1024**2:.0f} MB"


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.stages: list[tuple[str, float, int]] = []  # (desc, seconds, peak RSS after it) when enabled

    def iter(self, items, desc: str, total: int | None = None):
        if not self.enabled:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

    __call__ = iter  # so a Progress can be passed where a `progress(items, desc=...)` callable is expected

    @contextlib.contextmanager
    def stage(self, desc: str):
        t0, c0 = time.perf_counter(), time.process_time()
        if self.enabled:
            print(f"{desc} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            dt, peak = time.perf_counter() - t0, peak_rss_bytes()
            self.stages.append((desc, dt, peak))
            print(f"{desc}: done in {dt:.1f} s (peak RSS {format_bytes(peak)}{cpu_note(time.process_time() - c0)})",
                  file=sys.stderr, flush=True)

    def note(self, msg: str):
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def summary(self, what: str) -> str:
        """'WHAT in 41.2 s, peak RSS 1.21 GB' (time since this Progress was made), printed as a note and returned."""
        line = f"{what} in {time.perf_counter() - self.t0:.1f} s, peak RSS {format_bytes(peak_rss_bytes())}"
        self.note(line)
        return line


QUIET = Progress(enabled=False)
