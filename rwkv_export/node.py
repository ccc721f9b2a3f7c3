"""Node and the npm packages our JavaScript needs: the TF.js check's driver (rwkv_export/js/) and the web demo's
onnxruntime-web (web_demo/). Both ship as package.json + package-lock.json; their node_modules are found, in order:

1. beside the package.json (a source checkout after `npm ci --prefix rwkv_export/js` / `--prefix web_demo`);
2. in the user cache, ~/.cache/rwkv-export/<name>-<hash of the two files> ($RWKV_EXPORT_CACHE or $XDG_CACHE_HOME
   move it), installed there on first use with `npm ci --offline` (npm's own cache), else `npm ci` (the registry).

So an installed wheel, which holds no node_modules, runs the TF.js check and the demo after one install.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import RwkvExportError
from .outdir import staging_beside

NODE_MIN_MAJOR = 20
JS_DIR = Path(__file__).resolve().parent / "js"  # the TF.js driver (tfjs_step.mjs) and its package.json + lock
LOCK_FILES = ("package.json", "package-lock.json")


def node_major(node: str) -> int:
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
        return int(out.stdout.strip().lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def require_node(what: str) -> str:
    """The `node` executable (>= NODE_MIN_MAJOR), or a one-line error saying what needs it."""
    node = shutil.which("node")
    if node is None or node_major(node) < NODE_MIN_MAJOR:
        found = "not found" if node is None else f"found v{node_major(node)}"
        raise RwkvExportError(f"{what} needs Node >= {NODE_MIN_MAJOR} with npm ({found}): install it (Debian 12's "
                              "nodejs is 18; NodeSource or nvm have 20+), then re-run")
    return node


def cache_dir() -> Path:
    if os.environ.get("RWKV_EXPORT_CACHE"):
        return Path(os.environ["RWKV_EXPORT_CACHE"]).absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).absolute() / "rwkv-export"


def _key(src: Path) -> str:
    h = hashlib.sha256()
    for name in LOCK_FILES:
        h.update((src / name).read_bytes())
    return h.hexdigest()[:16]


def npm_packages(src: Path, probe: str, what: str) -> Path:
    """A folder whose node_modules holds `probe` (a path under node_modules, e.g. "@tensorflow/tfjs-converter")
    for the package.json + package-lock.json in `src`: src itself if installed there, else the user cache,
    installing it there on first use."""
    src = Path(src)
    if (src / "node_modules" / probe).exists():
        return src
    if not all((src / n).is_file() for n in LOCK_FILES):
        raise RwkvExportError(f"{what} needs its npm packages: run `npm ci --prefix {src}` (or reinstall rwkv-export "
                              "if its package.json or package-lock.json is missing there)")
    dest = cache_dir() / f"{src.name}-{_key(src)}"
    if (dest / "node_modules" / probe).exists():
        return dest
    require_node(what)
    npm = shutil.which("npm")
    if npm is None:
        raise RwkvExportError(f"{what} needs npm to install its packages on first use: install npm (it comes with "
                              f"NodeSource's nodejs), or run `npm ci --prefix {src}`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"rwkv-export: installing the npm packages for {what} into {dest} (first use)", file=sys.stderr, flush=True)
    # staged beside dest, locked, removed however this ends (signals too); stale ones of dead processes go first
    with staging_beside(dest) as stage:
        if (dest / "node_modules" / probe).exists():  # another process installed it since the check above
            return dest
        for name in LOCK_FILES:
            shutil.copyfile(src / name, stage / name)
        base = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
        for cmd in (base + ["--offline"], base):  # npm's cache first: no network where it was filled before
            res = subprocess.run(cmd, cwd=stage, capture_output=True, text=True, timeout=900)
            if res.returncode == 0 and (stage / "node_modules" / probe).exists():
                break
        else:
            last = ((res.stderr or res.stdout).strip().splitlines() or ["(no output)"])[-1]
            raise RwkvExportError(f"{what}: `npm ci` in {stage} failed: {last}")
        shutil.rmtree(dest, ignore_errors=True)  # an incomplete one (no probe): replaced
        os.rename(stage, dest)
    return dest
