"""manifest.json: the contract every consumer (check, generate, web demo, bundles, apps) reads instead of
hard-coding graph I/O. Its format is documented in docs/manifest.md; FORMAT_VERSION changes on any incompatible edit.
"""

from __future__ import annotations

import json
import os
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
    """Read and validate an export folder's manifest: its structure (check_structure), every file it names inside the
    folder (confined_path), and with verify_files each listed file's size and sha256. Every command that opens a
    folder reads it through here."""
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
    check_structure(m, path)
    for where, rel in named_files(m):
        confined_path(root, rel, where)
    if verify_files:
        for f in m["files"]:
            p = root / f["file"]
            if not p.is_file():
                raise ManifestError(f"{f['file']} is listed in the manifest but missing from {root}")
            if p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
                raise ManifestError(f"{f['file']} does not match the manifest (size or sha256 differs): damaged or edited")
    return m


# What every consumer may rely on: (section, key, accepted types). More keys are allowed; these must be there.
_STR, _INT, _LIST, _DICT = (str,), (int,), (list,), (dict,)
_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}
REQUIRED = {
    "manifest": [("model", _DICT), ("state", _DICT), ("tokenizer", _DICT), ("graphs", _LIST), ("files", _LIST)],
    "model": [("rwkv_version", (str, int, float)), ("n_layer", _INT), ("n_embd", _INT), ("vocab_size", _INT),
              ("source", _DICT)],
    "state": [("tensors", _LIST)],
    "state tensor": [("name", _STR), ("shape", _LIST), ("dtype", _STR)],
    "tokenizer": [("kind", _STR)],
    "graph": [("kind", _STR), ("variant", _STR), ("format", _STR), ("file", _STR), ("data_files", _LIST),
              ("inputs", _LIST), ("outputs", _LIST)],
    "graph input/output": [("name", _STR), ("role", _STR)],
    "file": [("file", _STR), ("size", _INT), ("sha256", _STR)],
}


def _require(obj, section: str, where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise ManifestError(f"{path}: {where} is not an object: not a complete rwkv-export manifest")
    for key, types in REQUIRED[section]:
        if not isinstance(obj.get(key), types) or (types is _INT and isinstance(obj.get(key), bool)):
            what = "is missing" if key not in obj else f"is not {_TYPE_NAMES[types[0]]}"
            raise ManifestError(f"{path}: {where}['{key}'] {what}: not a complete rwkv-export manifest")


def check_structure(m: dict, path: Path) -> None:
    """One-line ManifestError naming the first missing or mistyped key a consumer would read (REQUIRED)."""
    _require(m, "manifest", "manifest", path)
    for section in ("model", "state", "tokenizer"):
        _require(m[section], section, section, path)
    for i, t in enumerate(m["state"]["tensors"]):
        _require(t, "state tensor", f"state['tensors'][{i}]", path)
    for i, g in enumerate(m["graphs"]):
        _require(g, "graph", f"graphs[{i}]", path)
        for side in ("inputs", "outputs"):
            for j, io in enumerate(g[side]):
                _require(io, "graph input/output", f"graphs[{i}]['{side}'][{j}]", path)
        for j, p in enumerate(g.get("parts", [])):
            _require(p, "file", f"graphs[{i}]['parts'][{j}]", path)
    for i, f in enumerate(m["files"]):
        _require(f, "file", f"files[{i}]", path)


def named_files(m: dict):
    """(where, relative path) of every file a (structurally valid) manifest names."""
    for i, f in enumerate(m["files"]):
        yield f"files[{i}]", f["file"]
    for i, g in enumerate(m["graphs"]):
        yield f"graphs[{i}]['file']", g["file"]
        for j, d in enumerate(g["data_files"]):
            yield f"graphs[{i}]['data_files'][{j}]", d
        for j, p in enumerate(g.get("parts", [])):
            yield f"graphs[{i}]['parts'][{j}]", p["file"]
    if "file" in m["tokenizer"] and m["tokenizer"]["file"] is not None:
        yield "tokenizer['file']", m["tokenizer"]["file"]


# A manifest path: relative, '/'-separated, each part a plain name that does not start with a dot (no '..', no
# hidden files, nothing a URL would read as a scheme, host, query or escape). The web demo applies the same rule.
SAFE_PATH = re.compile(r"[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*(/[A-Za-z0-9_+\-][A-Za-z0-9_.+\-]*)*")


def confined_path(root: Path, rel, where: str = "a file") -> Path:
    """`root / rel`, refused (ManifestError) unless `rel` is a SAFE_PATH that resolves inside `root` (no symbolic
    link out of the folder) to a regular file or to nothing."""
    if not isinstance(rel, str) or not SAFE_PATH.fullmatch(rel):
        raise ManifestError(f"the manifest's {where} {rel!r} is not a plain relative path inside the folder "
                            "(absolute, '..', hidden or odd characters): refused")
    p = Path(root) / rel
    try:
        real = p.resolve()
    except (OSError, RuntimeError) as e:  # a symbolic link loop
        raise ManifestError(f"the manifest's {where} {rel!r} cannot be resolved: {e}") from None
    if not real.is_relative_to(Path(root).resolve()):
        raise ManifestError(f"the manifest's {where} {rel!r} leads out of the folder (a symbolic link to {real}): "
                            "refused")
    if os.path.lexists(p) and not real.is_file():
        raise ManifestError(f"the manifest's {where} {rel!r} is not a regular file: refused")
    return p


def find_graph(manifest: dict, variant: str | None = None, kind: str = "step") -> dict:
    graphs = [g for g in manifest["graphs"] if g["kind"] == kind]
    if variant is not None:
        graphs = [g for g in graphs if g["variant"] == variant]
    if not graphs:
        have = ", ".join(sorted({g["variant"] for g in manifest["graphs"]})) or "none"
        raise ManifestError(f"no {kind} graph of variant '{variant}' in this folder (variants: {have})")
    return graphs[0]
