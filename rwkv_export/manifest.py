"""manifest.json: the contract every consumer (check, generate, web demo, bundles, apps) reads instead of
hard-coding graph I/O. Its format is documented in docs/manifest.md; FORMAT_VERSION changes on any incompatible edit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import __version__
from .errors import ManifestError
from .tokenizer import sha256_file

MANIFEST_NAME = "manifest.json"
FORMAT = "rwkv-export-manifest"
FORMAT_VERSION = 1

# Sampling defaults written for clients (ChatRWKV's usual values; min-p is the seed's 0.02 * p_max^2 rule).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_p": 0.85, "min_p_ratio": 0.02, "min_p_power": 2.0}


def state_section(arch, dims) -> dict:
    """The manifest's state section: the architecture's typed state spec (arch.base.StateTensor), in graph order."""
    return {"layout": arch.state_layout, "tensors": [t.manifest_entry() for t in arch.state(dims)]}


_NUMBER_LIST = re.compile(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]")


def dumps(obj) -> str:
    """JSON with two-space indent, but lists of numbers (shapes) on one line."""
    text = json.dumps(obj, indent=2)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def file_entry(root: Path, rel: str) -> dict:
    p = Path(root) / rel
    return {"file": rel, "size": p.stat().st_size, "sha256": sha256_file(p)}


def new_manifest(*, arch, dims, source: dict, tokenizer: dict, generation: dict | None = None) -> dict:
    """A folder's manifest before its graphs are added. arch: the checkpoint's Architecture; dims: its ModelDims."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {"name": "rwkv-export", "version": __version__},
        "model": {"architecture": "rwkv", "rwkv_version": arch.version, **dims.as_dict(), "source": source},
        "state": state_section(arch, dims),
        "tokenizer": tokenizer,
        "generation": {**SAMPLING_DEFAULTS, **(generation or {})},
        "graphs": [],
        "files": [],
    }


def write_manifest(root: Path, manifest: dict) -> Path:
    """Write manifest.json (atomically), listing every other file in the folder with its size and sha256.
    Hidden entries (staging folders, dotfiles) are not part of an export and are not listed."""
    from .outdir import staged_file

    root = Path(root)
    rels = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    files = sorted(r for r in rels if not any(part.startswith(".") for part in r.split("/")))
    manifest["files"] = [file_entry(root, f) for f in files]
    path = root / MANIFEST_NAME
    with staged_file(path) as tmp:
        tmp.write_text(dumps(manifest))
    return path


def read_manifest(root: Path, verify_files: bool = True) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"not an export folder: {root} does not exist or is not a folder")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{root} has no {MANIFEST_NAME}: not an rwkv-export folder")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestError(f"{path} is not an rwkv-export manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path} has manifest format version {m.get('format_version')}; this rwkv-export reads {FORMAT_VERSION}"
        )
    if verify_files:
        for f in m.get("files", []):
            p = root / f["file"]
            if not p.is_file():
                raise ManifestError(f"{f['file']} is listed in the manifest but missing from {root}")
            if p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
                raise ManifestError(f"{f['file']} does not match the manifest (size or sha256 differs): damaged or edited")
    return m


def find_graph(manifest: dict, variant: str | None = None, kind: str = "step") -> dict:
    graphs = [g for g in manifest["graphs"] if g["kind"] == kind]
    if variant is not None:
        graphs = [g for g in graphs if g["variant"] == variant]
    if not graphs:
        have = ", ".join(sorted({g["variant"] for g in manifest["graphs"]})) or "none"
        raise ManifestError(f"no {kind} graph of variant '{variant}' in this folder (variants: {have})")
    return graphs[0]
