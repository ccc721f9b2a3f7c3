"""`rwkv-export onnx`: checkpoint -> step graph -> ONNX files (fp32 and optional variants), tokenizer and manifest in a
folder, parity-checked.

Everything is written to a temporary folder beside the destination and moved into place only when the export and
its checks succeeded; a failure leaves nothing behind. `add_variants` adds variants to an existing folder.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import reread
from .errors import RwkvExportError
from .manifest import new_manifest, read_manifest, write_manifest
from .outdir import check_output_dir, staged_output_dir
from .progress import QUIET, Progress
from .quantize import DEFAULT_INT4_BLOCK_SIZE, web_backends
from .sources import Source, source_from_manifest
from .embed import has_embedding, step_module
from .tokenizer import resolve_tokenizer

STEP_FILE = "model.onnx"
# variant -> file name (transformers.js-style names)
VARIANT_FILES = {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8": "model_int8.onnx", "int4": "model_q4.onnx"}
# the prompt (sequence, GPT-mode) graph of each variant, exported beside its step graph unless prefill=False
PREFILL_FILES = {"fp32": "prefill.onnx", "fp16": "prefill_fp16.onnx", "int8": "prefill_int8.onnx",
                 "int4": "prefill_q4.onnx"}
QUANT_VARIANTS = ("fp16", "int8", "int4")
# target -> the variants --quant accepts (besides fp32, always written)
TARGET_VARIANTS = {"onnx": QUANT_VARIANTS, "tflite": ("fp16", "int8", "int4"), "tfjs": ("fp16", "uint8")}


@dataclass
class QuantOptions:
    int4_block_size: int = DEFAULT_INT4_BLOCK_SIZE
    int4_embedding: bool = False  # also quantize the embedding table (gather) to 4 bits
    extra: dict = field(default_factory=dict)


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    reports: list


def parse_quant(spec: str | None, target: str = "onnx") -> list[str]:
    """'fp16,int8' -> ['fp16', 'int8'], validated for the target; '' or None -> []."""
    if not spec:
        return []
    return validate_quant([s.strip() for s in spec.split(",") if s.strip()], target)


def validate_quant(names, target: str) -> list[str]:
    """The variant names, deduplicated; an unknown one for `target` is a one-line error."""
    allowed = TARGET_VARIANTS[target]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise RwkvExportError(f"unknown --quant variant '{bad[0]}' for {target}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def load_source(source: str, tokenizer: str | None, progress: Progress = QUIET):
    """(Source, its loaded checkpoint, the tokenizer spec that fits it)."""
    src = Source(str(source))
    ckpt = src.load(progress)
    return src, ckpt, resolve_tokenizer(ckpt.dims.vocab_size, tokenizer)


def _new_folder_manifest(root: Path, src: Source, ckpt, tok) -> dict:
    """Copy the tokenizer file (if the model uses one) into `root` and start the folder's manifest."""
    tok_file = tok.folder_file  # tokenizer.json, rwkv_vocab_v20230424.txt, or None (bytes)
    if tok_file:
        shutil.copyfile(tok.path, root / tok_file)
    return new_manifest(arch=ckpt.arch, dims=ckpt.dims, source=src.manifest_entry(ckpt),
                        tokenizer=tok.manifest_entry(tok_file))


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
    entry["backends"] = web_backends(variant, info)  # which web backends it suits (quantize.py); see _record_backends
    return entry


def _record_backends(manifest: dict) -> None:
    """The step graphs' "backends" again, now with the model's RWKV version (webgpu-native runs RWKV-4 only)."""
    version = manifest["model"].get("rwkv_version")
    for g in manifest["graphs"]:
        if g.get("kind") == "step" and g.get("format") == "onnx":
            g["backends"] = web_backends(g["variant"], g.get("quantization"), version)


def _make_variant(variant: str, root: Path, ckpt, options: QuantOptions, opset: int, progress: Progress,
                  prefill: bool = False, embedding: bool = False) -> list[dict]:
    """Write one variant's step graph (and, with prefill, its prompt graph) into `root`; fp32 must already be there
    for int8/int4. Returns the graph entries."""
    from .targets import onnx as onnx_target

    file = VARIANT_FILES[variant]
    if variant == "fp16":
        from .targets import onnx_seq

        info = ckpt.arch.fp16_info()
        module = _graph_module(ckpt, "fp16", embedding)
        rescale = f", rescale every {info['rescale_every']} layers" if info.get("rescale_every") else ""
        seq = PREFILL_FILES[variant] if prefill else None
        step_label = f"writing {file} (fp16 weights and activations, fp32 state{rescale})"
        files, seq_files = _write_graphs(module, root, file, seq, opset, None, progress, step_label,
                                         f"writing {seq} (fp16 prompt graph)")
        del module
        reread(ckpt)  # writing read every page of the checkpoint: not held through the next stages
        if seq_files is None:
            return [_graph_entry(root, file, variant, files, info)]
        if len(files) > 1 and seq_files[1:] == files[1:]:  # written into one data file from the start
            return [_graph_entry(root, file, variant, files, info),
                    onnx_seq.graph_entry(root / seq, files=seq_files, variant=variant) | {"quantization": info}]
        return _shared_pair(root, variant, file, seq, info, info, progress)
    from . import quantize
    from .targets import onnx_seq

    opts = (options.extra.get("int8", {}) if variant == "int8"
            else {"block_size": options.int4_block_size, "include_embedding": options.int4_embedding})
    graphs = [(root / VARIANT_FILES["fp32"], root / file)]
    seq = PREFILL_FILES[variant]
    if prefill and (root / PREFILL_FILES["fp32"]).exists():
        graphs.append((root / PREFILL_FILES["fp32"], root / seq))  # into one data file, each weight once
    with progress.stage(f"quantizing {' and '.join(dst.name for _, dst in graphs)} ({variant})"):
        infos = quantize.quantize_graphs(variant, graphs, **opts)
    entries = [_graph_entry(root, file, variant, [file, *infos[0]["data_files"]], infos[0])]
    if len(graphs) > 1:
        entries.append({**onnx_seq.graph_entry(root / seq, files=[seq, *infos[1]["data_files"]], variant=variant),
                        "quantization": infos[1]})
    return entries


def _graph_module(ckpt, variant: str, embedding: bool):
    """The step module the ONNX graphs are written from: lazy where the architecture has it (each weight made when
    it is written, arch/rwkv4/step.py), else whole and the checkpoint re-read (its pages are then in the module)."""
    from .embed import with_embedding

    if ckpt.arch.lazy_step:
        module = ckpt.arch.step_module(ckpt, variant, lazy=True)
    else:
        module = ckpt.arch.step_module(ckpt, variant)
        reread(ckpt, keep=[module])
    return with_embedding(module) if embedding else module


def _share(root: Path, step_file: str, seq_file: str, progress: Progress) -> list[str]:
    """Put the step and prompt graphs' weights into one data file (shared_data.py says why)."""
    from .shared_data import data_file_name, share_weights

    name = data_file_name(step_file)
    with progress.stage(f"sharing one weights file between {step_file} and {seq_file} ({name})"):
        return share_weights(root, [step_file, seq_file], name)


def _shared_pair(root: Path, variant: str, file: str, seq: str, info: dict, seq_info: dict,
                 progress: Progress) -> list[dict]:
    """A variant's step and prompt graph entries, their weights moved into one shared data file first."""
    from .targets import onnx_seq

    data = _share(root, file, seq, progress)
    return [_graph_entry(root, file, variant, [file, *data], info),
            {**onnx_seq.graph_entry(root / seq, files=[seq, *data], variant=variant), "quantization": seq_info}]


def _write_graphs(module, root: Path, file: str, seq: str | None, opset: int, external, progress: Progress,
                  step_label: str, seq_label: str) -> tuple[list[str], list[str] | None]:
    """Write a variant's step graph (and with `seq`, its prompt graph) from `module`. Their weights go into one data
    file (shared_data.data_file_name) as they are written: the step graph's, which the prompt graph reuses by name
    (not with external=False: each graph is then written alone and shared afterwards). Returns (step files, prompt
    files or None)."""
    from .onnx_build import WeightStore
    from .shared_data import data_file_name
    from .targets import onnx as onnx_target
    from .targets import onnx_seq

    if seq is None or external is False:
        with progress.stage(step_label):
            files = onnx_target.export_step(module, root / file, opset, True if seq else external)
        if seq is None:
            return files, None
        with progress.stage(seq_label):
            seq_files = onnx_seq.export_sequence(module, root / seq, opset, external_data=True)
        return files, seq_files
    with WeightStore(root / data_file_name(file)) as store:
        with progress.stage(step_label):
            files = onnx_target.export_step(module, root / file, opset, store=store)
        with progress.stage(seq_label):
            seq_files = onnx_seq.export_sequence(module, root / seq, opset, store=store)
    return files, seq_files


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
    prefill: bool = True,
    opset: int | None = None,
    external_data: bool | None = None,
    progress: Progress = QUIET,
    embedding: bool = False,
    check_jobs: int | None = None,
) -> ExportResult:
    """`rwkv-export onnx`. `check_jobs`: the worker processes that check the step graphs side by side
    (check.check_graphs' `processes`; default one per core, at most 2); 1 checks one graph after another in this
    process (not less memory: at 169M shapes 1.63 GB in one process against 1.18 GB for the largest of the default's,
    1.69 against 1.61 GB for all of them together)."""
    from .targets import onnx as onnx_target

    out = Path(out)
    opset = opset or onnx_target.DEFAULT_OPSET
    check_output_dir(out, force, inputs=(source, tokenizer))  # fail before the slow part
    src, ckpt, tok = load_source(source, tokenizer, progress)
    with staged_output_dir(out, force, inputs=(source, tokenizer)) as tmp:
        with progress.stage(f"building the {ckpt.arch.title} step graph"):
            module = _graph_module(ckpt, "fp32", embedding)
        # with the prompt graph, both graphs' weights end in one shared data file: written there as external data
        # from the start (streamed tensor by tensor), not serialized into a >600 MB proto in memory first
        external = True if prefill and external_data is None else external_data
        seq = PREFILL_FILES["fp32"] if prefill else None
        files, seq_files = _write_graphs(module, tmp, STEP_FILE, seq, opset, external, progress,
                                         f"writing {STEP_FILE} (step graph, opset {opset})",
                                         f"writing {seq} (prompt graph: T tokens per call, GPT mode)")
        del module
        reread(ckpt)  # writing read every page of the checkpoint: not held through the next stages
        if simplify:
            with progress.stage("simplifying with onnxslim"):
                onnx_target.simplify(tmp / STEP_FILE)
        seq_entry = None
        if seq_files:
            from .targets import onnx_seq

            if simplify or not (len(files) > 1 and seq_files[1:] == files[1:]):
                files = [STEP_FILE, *_share(tmp, STEP_FILE, seq, progress)]
            seq_entry = onnx_seq.graph_entry(tmp / seq, files=[seq, *files[1:]])
        manifest = _new_folder_manifest(tmp, src, ckpt, tok)
        manifest["graphs"].append(_graph_entry(tmp, STEP_FILE, "fp32", files))
        if seq_entry:
            manifest["graphs"].append(seq_entry)
        early = None
        if check and quant and seq_entry:
            from .check import start_baseline

            # the quality gates' fp32 side needs only the fp32 graphs: read on the second core from now, while the
            # variants are written on the first
            early = start_baseline(tmp, manifest, progress=progress, processes=check_jobs)
        try:
            for variant in quant:
                manifest["graphs"] += _make_variant(variant, tmp, ckpt, quant_options, opset, progress, prefill,
                                                    embedding)
            _record_backends(manifest)
            reports = []
            if check:
                from .check import check_graphs

                reports = check_graphs(tmp, manifest, ckpt, progress=progress, raise_on_fail=True, baseline=early,
                                       processes=check_jobs)
        finally:
            if early is not None:
                early.close()
        write_manifest(tmp, manifest)
    progress.summary(f"exported {out}")
    return ExportResult(out=out, manifest=manifest, reports=reports)


def add_variants(folder: str | Path, quant: list[str], *, checkpoint: str | None = None, force: bool = False,
                 quant_options: QuantOptions = QuantOptions(), check: bool = True,
                 progress: Progress = QUIET, check_jobs: int | None = None) -> ExportResult:
    """Add variants to an existing export folder. They are made and checked in a hidden staging folder, then renamed
    into place and the manifest replaced atomically; on any failure the folder is left as it was."""
    import copy
    import os

    from .outdir import clone_or_copy, signals_blocked, staging_beside

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
    # staged beside the folder (never inside it, where `serve` could serve it), locked against other writers
    with staging_beside(folder.resolve()) as stage:
        fp32 = next(g for g in manifest["graphs"] if g["kind"] == "step" and g["variant"] == "fp32")
        seq32 = [g for g in manifest["graphs"] if g["kind"] == "sequence" and g["variant"] == "fp32"]
        tok_file = [manifest["tokenizer"]["file"]] if manifest["tokenizer"].get("file") else []
        from_fp32 = [g for g in [fp32, *seq32] if any(v in ("int8", "int4") for v in quant)]  # fp16 needs none
        for f in dict.fromkeys([*(f for g in from_fp32 for f in [g["file"], *g["data_files"]]), *tok_file]):
            clone_or_copy(folder / f, stage / f)  # onnx refuses external data behind a symbolic or hard link
        new = [e for v in quant
               for e in _make_variant(v, stage, ckpt, quant_options, fp32.get("opset") or 18, progress, bool(seq32),
                                      has_embedding(fp32))]
        reports = []
        if check:
            from .check import check_graphs

            staged = copy.deepcopy(manifest)
            staged["graphs"] = new
            reports = check_graphs(stage, staged, ckpt, progress=progress, raise_on_fail=True, variants=list(quant),
                                   processes=check_jobs)
            new = staged["graphs"]  # now with their parity and quality reports
        manifest["graphs"] = [g for g in manifest["graphs"] if g["variant"] not in quant] + new
        _record_backends(manifest)
        with signals_blocked():  # the files and the manifest that lists them land together
            for f in dict.fromkeys(f for g in new for f in [g["file"], *g["data_files"]]):  # a shared data file once
                os.replace(stage / f, folder / f)
            write_manifest(folder, manifest)
    return ExportResult(out=folder, manifest=manifest, reports=reports)


def build_target(target: str, root: Path, src: Source, ckpt, tok, *, quant: list[str] = (), check: bool = True,
                 prefill: bool = True, progress: Progress = QUIET, embedding: bool = False,
                 check_jobs: int | None = None) -> tuple[dict, list]:
    """Write the TFLite or TF.js files of `ckpt` (fp32 plus `quant` variants), the tokenizer and their checks into
    the existing folder `root`; return (manifest, reports). The manifest is not written (the caller does). prefill:
    TFLite files also get the prompt graph (`prefill` signature, fixed chunks); TF.js's model.json holds it beside the step
    graph (any chunk up to max_chunk)."""
    variants = ["fp32", *[v for v in quant if v != "fp32"]]
    with progress.stage(f"building the {ckpt.arch.title} step graph"):
        # TFLite's files are written from our ONNX graphs, whose weights stream from a lazy module (each made from
        # the memory-mapped checkpoint as it is written: 0.7 GB less at 169M); TF.js holds the weights to encode
        # each variant from them
        if target == "tflite":
            module = _graph_module(ckpt, "fp32", embedding)  # re-reads the checkpoint where it is not lazy
        else:
            module = step_module(ckpt, "fp32", embedding)
            reread(ckpt, keep=[module])
    if target == "tflite":
        from .targets import tflite

        tflite.check_variants(variants, ckpt.dims)
        chunk = tflite.PREFILL_CHUNK if prefill else None
        tflite.check_quantizer(variants)  # fail before the fp32 files are written
        with progress.stage(f"writing the fp32 TFLite files (step{' and prompt graphs' if prefill else ' graph'}, "
                            "from our ONNX graphs)"):
            fp32 = tflite.write_fp32(module, root, chunk)
        states = [t.name for t in module.state_spec]
        module = None  # not needed to quantize: its memory goes before the variants are derived
        with progress.stage(f"deriving the TFLite variants ({', '.join(variants)})"):
            graphs = tflite.derive_variants(root, fp32, variants, states, chunk)
    elif target == "tfjs":
        from .targets import tfjs

        tfjs.check_variants(variants)
        with progress.stage(f"writing TF.js graph models ({', '.join(variants)}"
                            f"{', step and prompt graphs' if prefill else ''})"):
            # the embedder runs a TF.js folder through the step protocol only: no prompt graph with --embedding
            graphs = tfjs.export_tfjs(module, root, variants, prefill=prefill and not embedding)
    else:
        raise RwkvExportError(f"unknown target '{target}'; choose from onnx, tflite, tfjs")
    del module
    manifest = _new_folder_manifest(root, src, ckpt, tok)
    manifest["graphs"] = graphs
    reports = []
    if check:
        from .check import check_graphs

        reports = check_graphs(root, manifest, ckpt, progress=progress, raise_on_fail=True, processes=check_jobs)
    return manifest, reports


def export_target(target: str, source: str, out: str | Path, *, force: bool = False, tokenizer: str | None = None,
                  quant: list[str] = (), check: bool = True, prefill: bool = True,
                  progress: Progress = QUIET, embedding: bool = False, check_jobs: int | None = None) -> ExportResult:
    """`rwkv-export tflite|tfjs`: like export_onnx, for the edge targets (staged, checked, then moved into place)."""
    if target not in ("tflite", "tfjs"):
        raise RwkvExportError(f"unknown target '{target}'; choose from tflite, tfjs")
    quant = validate_quant(quant, target)
    _check_target_installed(target, check)
    out = Path(out)
    check_output_dir(out, force, inputs=(source, tokenizer))
    src, ckpt, tok = load_source(source, tokenizer, progress)
    with staged_output_dir(out, force, inputs=(source, tokenizer)) as tmp:
        manifest, reports = build_target(target, tmp, src, ckpt, tok, quant=quant, check=check, prefill=prefill,
                                         progress=progress, embedding=embedding, check_jobs=check_jobs)
        write_manifest(tmp, manifest)
    progress.summary(f"exported {out}")
    return ExportResult(out=out, manifest=manifest, reports=reports)


def _check_target_installed(target: str, check: bool = True) -> None:
    """Fail before any slow work when a target's extra is missing (one line naming the install step)."""
    from .errors import MissingExtraError

    if target == "tflite":
        import importlib.util

        # the variants are our own (targets/tflite_quant.py): ai-edge-quantizer is the tests' oracle, not needed here
        for mod, pkg in (("ai_edge_litert", "ai-edge-litert"), ("flatbuffers", "flatbuffers")):
            if importlib.util.find_spec(mod) is None:
                raise MissingExtraError(pkg, "tflite")
    if target == "tfjs" and check:
        from .tf_runners import require_node

        require_node()
