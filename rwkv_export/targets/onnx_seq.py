"""ONNX target, sequence graph: the architecture's sequence module (a prompt chunk of T tokens + state -> logits + state) with T dynamic.

Mirrors targets/onnx.py's export_step: written node by node at opset >= 18, the same state input/output names,
"tokens" [T] int64 instead of "token" [1]. The token input's manifest role is "tokens"; a graph entry also carries
"max_chunk" (the most tokens one call may take; runners feed longer prompts in chunks).
"""

from __future__ import annotations

from pathlib import Path

from . import onnx as onnx_target

TOKENS_INPUT = "tokens"
TOKENS_ROLE = "tokens"
LOGITS_OUTPUT = onnx_target.LOGITS_OUTPUT
SEQ_DIM = "T"  # the name of the dynamic token dimension in the graph


# ONNX metadata_props keys written by export_sequence
META_MAX_CHUNK = "rwkv_export.max_chunk"
META_ALL_LOGITS = "rwkv_export.all_logits"
def export_sequence(step_module, path: Path, opset: int = onnx_target.DEFAULT_OPSET, all_logits: bool = False,
                    external_data: bool | None = None, max_chunk: int | None = None, store=None) -> list[str]:
    """Write the sequence graph of a step module (its architecture's sequence_module over the same parameters) to
    `path`, node by node (the architecture's onnx_graph.build_sequence). Returns the files written (the .onnx and,
    if used, its external data). The graph takes 1 <= T <= max_chunk tokens per call (default: the
    architecture's). `store`: a WeightStore shared with the step graph (targets/onnx.export_step)."""
    if opset < onnx_target.MIN_OPSET:
        raise ValueError(f"opset {opset} is below the minimum {onnx_target.MIN_OPSET}")
    path = Path(path)
    module = step_module.arch.sequence_module(step_module, all_logits=all_logits, max_chunk=max_chunk).eval()
    builder = step_module.arch.onnx_graph()
    if builder is None:
        raise NotImplementedError(f"{module.arch.title} has no onnx_graph.py (arch/base.Architecture.onnx_graph)")
    # the graph's contract beyond its I/O, in the file itself (graph_entry reads it back for the manifest)
    meta = {META_MAX_CHUNK: str(module.max_chunk), META_ALL_LOGITS: str(int(all_logits))}
    return onnx_target.write_graph(lambda g: builder.build_sequence(module, g), module, path, opset, external_data,
                                   store, name=f"rwkv{module.arch.version.replace('.', '_')}_sequence",
                                   metadata=meta)


def io_spec(path: Path) -> tuple[list[dict], list[dict], int | None]:
    """targets.onnx.io_spec with the sequence graph's token input given its role, "tokens"."""
    inputs, outputs, opset = onnx_target.io_spec(path)
    for entry in inputs:
        if entry["name"] == TOKENS_INPUT:
            entry["role"] = TOKENS_ROLE
    return inputs, outputs, opset


def graph_meta(path: Path) -> dict:
    """max_chunk and all_logits as export_sequence recorded them in the file's metadata."""
    import onnx

    from ..errors import ManifestError

    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if META_MAX_CHUNK not in props:
        raise ManifestError(f"{Path(path).name} is not a sequence graph made by export_sequence (no {META_MAX_CHUNK})")
    return {"max_chunk": int(props[META_MAX_CHUNK]), "all_logits": props.get(META_ALL_LOGITS) == "1"}


def graph_entry(path: Path, *, name: str = "prefill", files: list[str] | None = None, variant: str = "fp32") -> dict:
    """The manifest "graphs" entry for an exported sequence graph: the step graph's fields plus max_chunk and
    all_logits (read from the file)."""
    path = Path(path)
    inputs, outputs, opset = io_spec(path)
    return {
        "name": name, "kind": "sequence", "format": "onnx", "variant": variant,
        "file": path.name, "data_files": list((files or [path.name])[1:]), "opset": opset,
        **graph_meta(path),
        "inputs": inputs, "outputs": outputs, "parity": None,
    }
