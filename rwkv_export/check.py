"""`rwkv-export check DIR`: re-run the gates of every graph in an export folder against runtime_ref.

- every step graph: the parity gate (parity.compare: shapes, finiteness, logits and greedy continuation vs the
  reference over N_TOKENS tokens, tolerance per (target, variant));
- every variant other than fp32 also gets the quality gate (quality.evaluate_variant on the eval text, against the
  reference in fp32: perplexity delta gated per variant kind, KL, top-1 and greedy agreement reported);
- every sequence (prompt) graph: parity.compare_sequence (its logits and states vs T reference steps).
"""

from __future__ import annotations

from pathlib import Path

from .manifest import read_manifest, write_manifest
from .parity import compare, compare_sequence, format_report, gate
from .progress import QUIET, Progress
from .sources import source_from_manifest

# graph format -> step runner class (loaded lazily: each runtime is an optional dependency)
RUNNERS = {
    "onnx": "rwkv_export.runners:OnnxStepRunner",
    "ort": "rwkv_export.runners:OnnxStepRunner",  # ONNX Runtime's own format loads in the same session type
    "tflite": "rwkv_export.tf_runners:TFLiteStepRunner",
    "tfjs": "rwkv_export.tf_runners:TFJSStepRunner",
}
SEQUENCE_RUNNERS = {
    "onnx": "rwkv_export.seq_runner:OnnxSequenceRunner",
    "ort": "rwkv_export.seq_runner:OnnxSequenceRunner",
    "tflite": "rwkv_export.tf_runners:TFLiteSequenceRunner",
}
# variant name -> the quality gate it is judged by (quality.PPL_GATES); TF.js's uint8 is an 8-bit weight format
QUALITY_KIND = {"fp16": "fp16", "int8": "int8", "uint8": "int8", "int4": "int4"}


def make_runner(root: Path, manifest: dict, graph: dict):
    import importlib

    table = SEQUENCE_RUNNERS if graph["kind"] == "sequence" else RUNNERS
    spec = table.get(graph["format"])
    if spec is None:
        from .errors import ManifestError

        raise ManifestError(f"graph {graph['file']} ({graph['kind']}) has format '{graph['format']}', "
                            f"which no runner handles")
    mod, cls = spec.split(":")
    return getattr(importlib.import_module(mod), cls)(root, manifest, graph)


def _close(runner) -> None:
    if hasattr(runner, "close"):
        runner.close()


def eval_token_ids(root: Path, manifest: dict, max_tokens: int | None = None) -> list[int]:
    """The quality eval text, encoded with the folder's own tokenizer."""
    from .quality import DEFAULT_EVAL_TOKENS, eval_tokens
    from .tokenizer import load_tokenizer, spec_from_manifest

    spec = spec_from_manifest(root, manifest["tokenizer"])
    return eval_tokens(load_tokenizer(spec).encode, max_tokens or DEFAULT_EVAL_TOKENS)


def check_graphs(root: Path, manifest: dict, ckpt, *, progress: Progress = QUIET, raise_on_fail: bool = True,
                 variants: list[str] | None = None, eval_tokens: int | None = None) -> list[dict]:
    """Check each graph against the reference built from `ckpt`; store each report in its manifest entry ("parity",
    and "quality" for variants other than fp32). Returns the reports (parity, then quality, per graph)."""
    import torch

    from .quality import evaluate_variant, judge_quality
    from .runners import ReferenceRunner

    ref = ckpt.arch.reference(ckpt.tensors, torch.float64)
    baseline = None  # the fp32 reference the quality gate measures variants against (built when first needed)
    ids = None
    reports = []
    for graph in manifest["graphs"]:
        if variants and graph["variant"] not in variants:
            continue
        runner = make_runner(root, manifest, graph)
        try:
            if graph["kind"] == "sequence":
                graph["parity"] = compare_sequence(runner, ref, target=graph["format"], variant=graph["variant"],
                                                   progress=progress)
                reports.append(graph["parity"])
                continue
            graph["parity"] = compare(runner, ref, target=graph["format"], variant=graph["variant"],
                                      progress=progress)
            reports.append(graph["parity"])
            if graph["variant"] == "fp32":
                continue
            if baseline is None:
                baseline = ReferenceRunner(ckpt, "float32")
                ids = eval_token_ids(root, manifest, eval_tokens)
            kind = QUALITY_KIND.get(graph["variant"], graph["variant"])
            with progress.stage(f"quality {graph['format']}/{graph['variant']} vs fp32 on {len(ids)} tokens of "
                                f"eval text"):
                rep = judge_quality(evaluate_variant(runner, baseline, ids), kind)  # raised below, with the others
            graph["quality"] = {"kind": "quality", "target": graph["format"], **rep, "variant": graph["variant"],
                                "gate": kind, "eval_text": "tiny-pydoc-eval.txt", "baseline": "runtime_ref fp32"}
            reports.append(graph["quality"])
        finally:
            _close(runner)
    if raise_on_fail:
        gate_all(reports)
    return reports


def gate_all(reports: list[dict]) -> None:
    """Raise the typed error of the first failing report."""
    from .quality import raise_if_failed

    for r in reports:
        if r.get("kind") == "quality":
            raise_if_failed(r, f"{r['target']}/{r['variant']}")
        else:
            gate(r)


def format_any(report: dict) -> str:
    if report.get("kind") == "quality":
        from .quality import format_quality

        return format_quality(report).replace("quality ", f"quality {report['target']}/", 1)
    return format_report(report)


def check_folder(root: str | Path, checkpoint: str | None = None, *, progress: Progress = QUIET,
                 update_manifest: bool = False, raise_on_fail: bool = True) -> list[dict]:
    root = Path(root)
    manifest = read_manifest(root)
    src = source_from_manifest(manifest["model"]["source"], checkpoint)
    ckpt = src.load(progress)
    dims = ckpt.dims.as_dict()
    exported = {k: manifest["model"].get(k) for k in dims}
    if str(manifest["model"].get("rwkv_version")) != ckpt.arch.version or dims != exported:
        from .errors import ParityShapeError

        raise ParityShapeError(f"the checkpoint ({ckpt.arch.title}, {dims}) is not the exported model "
                               f"(RWKV-{manifest['model'].get('rwkv_version')}, {exported})")
    reports = check_graphs(root, manifest, ckpt, progress=progress, raise_on_fail=False)
    if update_manifest:
        write_manifest(root, manifest)
    if raise_on_fail:
        gate_all(reports)
    return reports
