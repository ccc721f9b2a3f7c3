"""`rwkv-export onnx`: checkpoint -> step graph -> ONNX file, tokenizer and manifest in a folder, parity-checked.

Everything is written to a temporary folder beside the destination and moved into place only when the export and
its parity check succeeded; a failure leaves nothing behind.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from .manifest import new_manifest, write_manifest
from .outdir import check_output_dir, staged_output_dir
from .progress import QUIET, Progress
from .sources import Source
from .tokenizer import resolve_tokenizer

STEP_FILE = "model.onnx"


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    reports: list


def export_onnx(
    source: str,
    out: str | Path,
    *,
    force: bool = False,
    tokenizer: str | None = None,
    simplify: bool = False,
    check: bool = True,
    opset: int | None = None,
    external_data: bool | None = None,
    progress: Progress = QUIET,
) -> ExportResult:
    from .model import RWKV4Step
    from .targets import onnx as onnx_target

    out = Path(out)
    check_output_dir(out, force)  # fail before the slow part
    src = Source(str(source))
    ckpt = src.load(progress)
    tok = resolve_tokenizer(ckpt.dims.vocab_size, tokenizer)
    with staged_output_dir(out, force) as tmp:
        with progress.stage("building the step graph"):
            module = RWKV4Step(ckpt)
        with progress.stage(f"exporting {STEP_FILE} (torch.onnx dynamo, opset {opset or onnx_target.DEFAULT_OPSET})"):
            files = onnx_target.export_step(module, tmp / STEP_FILE, opset or onnx_target.DEFAULT_OPSET, external_data)
        del module
        if simplify:
            with progress.stage("simplifying with onnxslim"):
                onnx_target.simplify(tmp / STEP_FILE)
        tok_file = None
        if tok.kind == "hf-tokenizers":
            tok_file = "tokenizer.json"
            shutil.copyfile(tok.path, tmp / tok_file)
        manifest = new_manifest(
            dims=ckpt.dims.as_dict(),
            source=src.manifest_entry(ckpt),
            tokenizer=tok.manifest_entry(tok_file),
        )
        inputs, outputs, graph_opset = onnx_target.io_spec(tmp / STEP_FILE)
        manifest["graphs"].append({
            "name": "step", "kind": "step", "format": "onnx", "variant": "fp32",
            "file": STEP_FILE, "data_files": files[1:], "opset": graph_opset,
            "inputs": inputs, "outputs": outputs, "parity": None,
        })
        write_manifest(tmp, manifest)
        reports = []
        if check:
            from .check import check_graphs

            reports = check_graphs(tmp, manifest, ckpt, progress=progress, raise_on_fail=True)
            write_manifest(tmp, manifest)
    return ExportResult(out=out, manifest=manifest, reports=reports)
