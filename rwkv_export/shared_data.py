"""One external-data file for a variant's step graph and prompt graph.

The prompt graph is built from the step graph's very parameters (the architecture's sequence module), and quantization is
deterministic, so the two .onnx files of a variant hold the same weight tensors, byte for byte. Stored inside each
file, a full 169M export carried every weight twice (2.8 GB), and the web demo downloaded both copies (int8: 343 MB
instead of 171). `share_weights` moves every initializer of at least SHARED_MIN_BYTES into one data file, each
distinct tensor once (matched by dtype, shape and content, not by name), and points both graphs at it through ONNX's
external-data fields (location, offset, length), which onnxruntime and onnxruntime-web resolve relative to the
.onnx file. Small tensors stay inside the graphs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SHARED_MIN_BYTES = 1024  # smaller initializers (norm weights of tiny models, shape constants) stay in the graph
ALIGN = 64  # every tensor starts at a multiple of 64 bytes in the data file


def onnx_bytes(path: Path) -> int:
    """Bytes of one ONNX graph on disk: the .onnx file and the external data its initializers point to. A data file
    shared with another graph counts only with the ranges this graph uses (each once); a tensor whose external
    data names no length counts its whole file."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    ranges, whole = set(), set()
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            ranges.add((ext["location"], int(ext.get("offset", 0)), int(ext["length"])))
        else:
            whole.add(ext["location"])
    return (path.stat().st_size + sum(length for loc, _, length in ranges if loc not in whole)
            + sum((path.parent / loc).stat().st_size for loc in whole))


def data_file_name(step_file: str) -> str:
    """The shared data file of a variant: named after its step graph (model_int8.onnx -> model_int8.onnx.data)."""
    return step_file + ".data"


def share_weights(root: Path, files: list[str], data_file: str) -> list[str]:
    """Rewrite the ONNX files `files` (in `root`) so that their large initializers live in `root / data_file`,
    each distinct tensor stored once. Loads one graph at a time. Any external data files the graphs had before are
    removed. Returns the external-data file list of each graph ([data_file])."""
    import onnx
    from onnx import external_data_helper

    root = Path(root)
    partial = root / (data_file + ".partial")
    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, dims, sha256) -> (offset, length)
    old_data: set[str] = set()
    try:
        with open(partial, "wb") as out:
            for f in files:
                path = root / f
                model = onnx.load(str(path))  # external data (if any) read into memory
                for t in model.graph.initializer:
                    if t.data_location == onnx.TensorProto.EXTERNAL:
                        old_data.update(e.value for e in t.external_data if e.key == "location")
                    if not t.HasField("raw_data") or len(t.raw_data) < SHARED_MIN_BYTES:
                        continue
                    raw = t.raw_data
                    key = (t.data_type, tuple(t.dims), hashlib.sha256(raw).digest())
                    if key not in stored:
                        out.write(b"\0" * (-out.tell() % ALIGN))
                        stored[key] = (out.tell(), len(raw))
                        out.write(raw)
                    offset, length = stored[key]
                    external_data_helper.set_external_data(t, location=data_file, offset=offset, length=length)
                    t.data_location = onnx.TensorProto.EXTERNAL
                    t.ClearField("raw_data")
                # the graph is now small: written to a temporary name, renamed once the data file is complete
                onnx.save_model(model, str(root / (f + ".partial")))
                del model
        os.replace(partial, root / data_file)
        for f in files:
            os.replace(root / (f + ".partial"), root / f)
    finally:
        for p in [partial, *(root / (f + ".partial") for f in files)]:
            p.unlink(missing_ok=True)
    for name in old_data - {data_file}:
        (root / name).unlink(missing_ok=True)
    return [data_file]
