"""`rwkv-export onnx`: checkpoint -> step graph -> ONNX files (fp32 and optional variants), tokenizer and manifest in a
folder, parity-checked.

Everything is written to a temporary folder beside the destination and moved into place only when the export and
its checks succeeded; a failure leaves nothing behind. `add_variants` adds variants to an existing folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RwkvExportError
from .manifest import MANIFEST_NAME, new_manifest, read_manifest, write_manifest
from .outdir import check_output_dir, staged_output_dir
from .progress import QUIET, Progress
from .sources import Source, source_from_manifest
from .tokenizer import resolve_tokenizer

STEP_FILE = "model.onnx"
# variant -> file name (transformers.js-style names)
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx", "int4": "model_q4.onnx"}
QUANT_VARIANTS = ("fp16", "int8", "int4")


@dataclass
class QuantOptions:
    int4_block_size: int = 32
    int4_embedding: bool = False  # also quantize the embedding table (gather) to 4 bits
    extra: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    reports: list


def parse_quant(spec: str | None) -> list[str]:
    """'fp16,int8' -> ['fp16', 'int8'], validated; '' or None -> []."""
    if not spec:
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in QUANT_VARIANTS]
    if bad:
        raise RwkvExportError(f"unknown --quant variant '{bad[0]}'; choose from {', '.join(QUANT_VARIANTS)}")
    return list(dict.fromkeys(names))


def _graph_entry(root: Path, file: str, variant: str, files: list[str], info: dict | None = None) -> dict:
    from .targets import onnx as onnx_target

    inputs, outputs, opset = onnx_target.io_spec(root / file)
    entry = {
        "name": "step", "kind": "step", "format": "onnx", "variant": variant,
        "file": file, "data_files": files[1:], "opset": opset,
        "inputs": inputs, "outputs": outputs, "parity": None,
    }
    if info:
        entry["quantization"] = info
    return entry


def _make_variant(variant: str, root: Path, ckpt, options: QuantOptions, opset: int, progress: Progress) -> dict:
    """Write one variant's file into `root` (fp32 must already be there for int8/int4); return its graph entry."""
    from .targets import onnx as onnx_target

    file = VARIANT_FILES[variant]
    if variant == "fp16":
        from .model import RWKV4Step, StepOptions

        opts = StepOptions.for_variant("fp16")
        with progress.stage(f"exporting {file} (fp16 weights and activations, fp32 state, rescale every "
                            f"{opts.rescale_every} layers)"):
            files = onnx_target.export_step(RWKV4Step(ckpt, opts), root / file, opset)
        return _graph_entry(root, file, variant, files, {"method": "fp16", "rescale_every": opts.rescale_every,
                                                         "state_dtype": "float32"})
    from . import quantize

    src = root / VARIANT_FILES["fp32"]
    with progress.stage(f"quantizing {file} ({variant})"):
        if variant == "int8":
            info = quantize.quantize_int8(src, root / file, **options.extra.get("int8", {}))
        else:
            info = quantize.quantize_int4(src, root / file, block_size=options.int4_block_size,
                                          include_embedding=options.int4_embedding)
    return _graph_entry(root, file, variant, [file], info)


def export_onnx(
    source: str,
    out: str | Path,
    *,
    force: bool = False,
    tokenizer: str | None = None,
    quant: list[str] = (),
    quant_options: QuantOptions = QuantOptions(),
    simplify: bool = False,
    check: bool = True,
    opset: int | None = None,
    external_data: bool | None = None,
    progress: Progress = QUIET,
) -> ExportResult:
    from .model import RWKV4Step
    from .targets import onnx as onnx_target

    out = Path(out)
    opset = opset or onnx_target.DEFAULT_OPSET
    check_output_dir(out, force)  # fail before the slow part
    src = Source(str(source))
    ckpt = src.load(progress)
    tok = resolve_tokenizer(ckpt.dims.vocab_size, tokenizer)
    with staged_output_dir(out, force) as tmp:
        with progress.stage("building the step graph"):
            module = RWKV4Step(ckpt)
        with progress.stage(f"exporting {STEP_FILE} (torch.onnx dynamo, opset {opset})"):
            files = onnx_target.export_step(module, tmp / STEP_FILE, opset, external_data)
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
        manifest["graphs"].append(_graph_entry(tmp, STEP_FILE, "fp32", files))
        for variant in quant:
            manifest["graphs"].append(_make_variant(variant, tmp, ckpt, quant_options, opset, progress))
        reports = []
        if check:
            from .check import check_graphs

            reports = check_graphs(tmp, manifest, ckpt, progress=progress, raise_on_fail=True)
        write_manifest(tmp, manifest)
    return ExportResult(out=out, manifest=manifest, reports=reports)


def add_variants(folder: str | Path, quant: list[str], *, checkpoint: str | None = None, force: bool = False,
                 quant_options: QuantOptions = QuantOptions(), check: bool = True,
                 progress: Progress = QUIET) -> ExportResult:
    """Add variants to an existing export folder. They are made and checked in a hidden staging folder, then renamed
    into place and the manifest replaced atomically; on any failure the folder is left as it was."""
    import copy
    import os
    import tempfile

    folder = Path(folder)
    manifest = read_manifest(folder)
    have = {g["variant"] for g in manifest["graphs"] if g["kind"] == "step"}
    if "fp32" not in have:
        raise RwkvExportError(f"{folder} has no fp32 step graph to make variants from")
    clash = [v for v in quant if v in have]
    if clash and not force:
        raise RwkvExportError(f"{folder} already has variant '{clash[0]}' (use --force to replace it)")
    recorded = manifest["model"]["source"]
    if checkpoint is not None and "sha256" in recorded:
        from .tokenizer import sha256_file

        if not Path(checkpoint).is_file() or sha256_file(Path(checkpoint)) != recorded["sha256"]:
            raise RwkvExportError(f"{checkpoint} is not the checkpoint {folder} was exported from "
                                  f"({recorded['file']}, sha256 {recorded['sha256'][:12]}…)")
    ckpt = source_from_manifest(recorded, checkpoint).load(progress)
    stage = Path(tempfile.mkdtemp(prefix=".variants.partial-", dir=folder))
    try:
        fp32 = next(g for g in manifest["graphs"] if g["kind"] == "step" and g["variant"] == "fp32")
        for f in [fp32["file"], *fp32["data_files"]]:
            os.symlink(folder.resolve() / f, stage / f)
        new = [_make_variant(v, stage, ckpt, quant_options, fp32.get("opset") or 18, progress) for v in quant]
        reports = []
        if check:
            from .check import check_graphs

            staged = copy.deepcopy(manifest)
            staged["graphs"] = [fp32, *new]
            reports = check_graphs(stage, staged, ckpt, progress=progress, raise_on_fail=True, variants=list(quant))
            new = [g for g in staged["graphs"] if g["variant"] in quant]  # now with their parity reports
        for g in new:
            for f in [g["file"], *g["data_files"]]:
                os.replace(stage / f, folder / f)
        manifest["graphs"] = [g for g in manifest["graphs"] if g["variant"] not in quant] + new
        write_manifest(folder, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return ExportResult(out=folder, manifest=manifest, reports=reports)
