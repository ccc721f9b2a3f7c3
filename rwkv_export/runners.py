"""Runners for exported graphs: one interface (new_state / step) over each runtime, driven by the manifest alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GraphFileError, ManifestError

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


def _ort_failure(e: Exception, graph: dict, doing: str) -> GraphFileError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return GraphFileError(f"{graph.get('file', '?')} does not {doing} in onnxruntime (damaged, or not the graph the "
                          f"manifest describes): {msg[:300]}")


class OrtSession:
    """An onnxruntime session over a manifest graph entry whose failures (a damaged file, inputs the graph does not
    take) are one-line GraphFileErrors, not onnxruntime's own exceptions."""

    def __init__(self, root: Path, graph: dict, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.graph = graph
        model = read_graph_bytes(root, graph) if "parts" in graph else str(Path(root) / graph["file"])
        try:
            self.session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile, ... share no base class but Exception
            raise _ort_failure(e, graph, "load") from None

    def run(self, names: list[str], feeds: dict) -> list:
        try:
            return self.session.run(names, feeds)
        except Exception as e:
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise _ort_failure(e, self.graph, "run") from None


class OnnxStepRunner:
    def __init__(self, root: Path, manifest: dict, graph: dict, threads: int | None = None):
        self.manifest, self.graph = manifest, graph
        self.io = io_by_role(graph)
        self.session = OrtSession(root, graph, threads)
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

    def logits_seq(self, tokens, state: dict):
        """GPT mode: the logits after each of `tokens` ([T, V], fp32) and the state after the last; the same
        equations as T calls of `step` (runtime_ref's forward_seq), rounded in a different order."""
        import torch

        with torch.no_grad():
            logits, state = self.model.forward_seq(list(tokens), state, all_logits=True)
        return logits.float().numpy(), state
