"""`rwkv-export check DIR`: re-run the parity gate of every graph in an export folder against runtime_ref."""

from __future__ import annotations

from pathlib import Path

from .manifest import read_manifest, write_manifest
from .parity import compare, gate
from .progress import QUIET, Progress
from .sources import source_from_manifest

# graph format -> runner class (loaded lazily: each runtime is an optional dependency)
RUNNERS = {
    "onnx": "rwkv_export.runners:OnnxStepRunner",
    "ort": "rwkv_export.runners:OnnxStepRunner",  # ONNX Runtime's own format loads in the same session type
}


def make_runner(root: Path, manifest: dict, graph: dict):
    import importlib

    spec = RUNNERS.get(graph["format"])
    if spec is None:
        from .errors import ManifestError

        raise ManifestError(f"graph {graph['file']} has format '{graph['format']}', which no runner handles")
    mod, cls = spec.split(":")
    return getattr(importlib.import_module(mod), cls)(root, manifest, graph)


def check_graphs(root: Path, manifest: dict, ckpt, *, progress: Progress = QUIET, raise_on_fail: bool = True,
                 variants: list[str] | None = None) -> list[dict]:
    """Check each step graph against the reference built from `ckpt`; store each report in the manifest entry."""
    import torch
    from runtime_ref import RWKV4

    ref = RWKV4(ckpt.tensors, dtype=torch.float64)
    reports = []
    for graph in manifest["graphs"]:
        if graph["kind"] != "step" or (variants and graph["variant"] not in variants):
            continue
        runner = make_runner(root, manifest, graph)
        report = compare(runner, ref, target=graph["format"], variant=graph["variant"], progress=progress)
        graph["parity"] = report
        reports.append(report)
    if raise_on_fail:
        for r in reports:
            gate(r)
    return reports


def check_folder(root: str | Path, checkpoint: str | None = None, *, progress: Progress = QUIET,
                 update_manifest: bool = False) -> list[dict]:
    root = Path(root)
    manifest = read_manifest(root)
    src = source_from_manifest(manifest["model"]["source"], checkpoint)
    ckpt = src.load(progress)
    exported = {k: manifest["model"][k] for k in ("n_layer", "n_embd", "ffn_dim", "vocab_size")}
    if ckpt.dims.as_dict() != exported:
        from .errors import ParityShapeError

        raise ParityShapeError(f"checkpoint dims {ckpt.dims.as_dict()} differ from the exported model's {exported}")
    reports = check_graphs(root, manifest, ckpt, progress=progress, raise_on_fail=False)
    if update_manifest:
        write_manifest(root, manifest)
    for r in reports:
        gate(r)
    return reports
