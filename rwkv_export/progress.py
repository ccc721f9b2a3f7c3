"""Progress on stderr for long work: bars for loops, timed stage lines for single long calls."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def iter(self, items, desc: str, total: int | None = None):
        if not self.enabled:
            return items
        from tqdm import tqdm

        return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)

    __call__ = iter  # so a Progress can be passed where a `progress(items, desc=...)` callable is expected

    @contextlib.contextmanager
    def stage(self, desc: str):
        t0 = time.perf_counter()
        if self.enabled:
            print(f"{desc} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f"{desc}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def note(self, msg: str):
        if self.enabled:
            print(msg, file=sys.stderr, flush=True)


QUIET = Progress(enabled=False)
