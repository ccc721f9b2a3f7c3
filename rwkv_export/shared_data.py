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
    each distinct tensor stored once. Streams: a graph is loaded without its external data, and each tensor's bytes
    are read from wherever they are, hashed and written out one at a time, so memory holds one tensor, not a graph.
    Any external data files the graphs had before are removed. Returns the external-data file list of each graph
    ([data_file])."""
    import onnx

    root = Path(root)
    partial = root / (data_file + ".partial")
    stored: dict[tuple, tuple[int, int]] = {}  # (dtype, dims, sha256) -> (offset, length)
    old_data: set[str] = set()
    sources: dict[str, object] = {}  # external data file name -> open file
    try:
        with open(partial, "wb") as out:
            for f in files:
                path = root / f
                model = onnx.load(str(path), load_external_data=False)
                for t in model.graph.initializer:
                    raw = _tensor_bytes(t, root, sources, old_data)
                    if raw is None or len(raw) < SHARED_MIN_BYTES:
                        if raw is not None and t.data_location == onnx.TensorProto.EXTERNAL:  # small: back inside
                            t.data_location = onnx.TensorProto.DEFAULT
                            del t.external_data[:]
                            t.raw_data = raw
                        continue
                    key = (t.data_type, tuple(t.dims), hashlib.sha256(raw).digest())
                    if key not in stored:
                        out.write(b"\0" * (-out.tell() % ALIGN))
                        stored[key] = (out.tell(), len(raw))
                        out.write(raw)
                    offset, length = stored[key]
                    t.ClearField("raw_data")
                    del t.external_data[:]
                    for k, v in (("location", data_file), ("offset", offset), ("length", length)):
                        entry = t.external_data.add()
                        entry.key, entry.value = k, str(v)
                    t.data_location = onnx.TensorProto.EXTERNAL
                # the graph is now small: written to a temporary name, renamed once the data file is complete
                onnx.save_model(model, str(root / (f + ".partial")))
                del model
        for src in sources.values():
            src.close()
        os.replace(partial, root / data_file)
        for f in files:
            os.replace(root / (f + ".partial"), root / f)
    finally:
        for src in sources.values():
            src.close()
        for p in [partial, *(root / (f + ".partial") for f in files)]:
            p.unlink(missing_ok=True)
    for name in old_data - {data_file}:
        (root / name).unlink(missing_ok=True)
    return [data_file]


def _tensor_bytes(t, root: Path, sources: dict, old_data: set) -> bytes | None:
    """An initializer's raw bytes, read from its external data file if it has one (noted in old_data); None for a
    tensor stored in typed fields rather than raw_data (left as it is)."""
    import onnx

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t.raw_data if t.HasField("raw_data") else None
    ext = {e.key: e.value for e in t.external_data}
    old_data.add(ext["location"])
    if ext["location"] not in sources:
        sources[ext["location"]] = open(root / ext["location"], "rb")
    src = sources[ext["location"]]
    src.seek(int(ext.get("offset", 0)))
    return src.read(int(ext["length"])) if "length" in ext else src.read()
