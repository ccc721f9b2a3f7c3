"""Runners for exported graphs: one interface (new_state / step) over each runtime, driven by the manifest alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ManifestError

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


def io_by_role(graph: dict) -> dict:
    """Split a manifest graph entry's I/O into token input, logits output, and state name -> (input, output)."""
    token = [i for i in graph["inputs"] if i["role"] == "token"]
    logits = [o for o in graph["outputs"] if o["role"] == "logits"]
    if len(token) != 1 or len(logits) != 1:
        raise ManifestError(f"graph {graph['file']}: expected one token input and one logits output")
    state_in = {i["state"]: i for i in graph["inputs"] if i["role"] == "state"}
    state_out = {o["state"]: o for o in graph["outputs"] if o["role"] == "state"}
    if set(state_in) != set(state_out):
        raise ManifestError(f"graph {graph['file']}: state inputs and outputs differ")
    return {"token": token[0], "logits": logits[0], "state_in": state_in, "state_out": state_out}


def read_graph_bytes(root: Path, graph: dict) -> bytes:
    """A graph file split into parts (bundles for download limits): join them, checking each part and the whole."""
    import hashlib

    data = b"".join((Path(root) / p["file"]).read_bytes() for p in graph["parts"])
    if len(data) != graph["size"] or hashlib.sha256(data).hexdigest() != graph["sha256"]:
        raise ManifestError(f"the parts of {graph['file']} do not join to the file the manifest describes")
    return data


def step_feeds(io: dict, token: int, state: dict) -> dict:
    """The inputs of one step, keyed by the graph's own names: the token as [1] of its dtype, each state tensor in its
    input's dtype (a no-op when it already is)."""
    feeds = {io["token"]["name"]: np.array([token], dtype=NP_DTYPES[io["token"]["dtype"]])}
    for s, spec in io["state_in"].items():
        feeds[spec["name"]] = np.asarray(state[s], dtype=NP_DTYPES[spec["dtype"]])
    return feeds


def new_state_from_manifest(manifest: dict, graph: dict) -> dict:
    io = io_by_role(graph)
    state = {}
    for t in manifest["state"]["tensors"]:
        spec = io["state_in"][t["name"]]
        state[t["name"]] = np.full(spec["shape"], t["init"], dtype=NP_DTYPES[spec["dtype"]])
    return state


class OnnxStepRunner:
    def __init__(self, root: Path, manifest: dict, graph: dict, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.manifest, self.graph = manifest, graph
        self.io = io_by_role(graph)
        model = read_graph_bytes(root, graph) if "parts" in graph else str(Path(root) / graph["file"])
        self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self._out_names = [self.io["logits"]["name"]] + [self.io["state_out"][s]["name"] for s in self.io["state_in"]]

    def new_state(self) -> dict:
        return new_state_from_manifest(self.manifest, self.graph)

    def step(self, token: int, state: dict):
        outs = self.session.run(self._out_names, step_feeds(self.io, token, state))
        return outs[0], dict(zip(self.io["state_in"], outs[1:]))


class ReferenceRunner:
    """runtime_ref behind the runner interface (for `generate` on a checkpoint)."""

    def __init__(self, ckpt, dtype: str = "float32"):
        import torch

        self.model = ckpt.arch.reference(ckpt.tensors, getattr(torch, dtype))

    def new_state(self) -> dict:
        return self.model.new_state()

    def step(self, token: int, state: dict):
        import torch

        with torch.no_grad():
            logits, state = self.model.step(int(token), state)
        return logits.float().numpy(), state
