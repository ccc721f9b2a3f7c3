"""Runner for the sequence (prompt / prefill) graph: a whole prompt in a few calls instead of one call per token.

Driven by the manifest alone: I/O names come from the graph entry's roles ("tokens", "logits", "state"), the chunk
limit from its "max_chunk" (with "fixed_chunk": true, as in TFLite, every call takes exactly max_chunk tokens; see
tf_runners.TFLiteSequenceRunner). State is the same dict (state name -> np.ndarray) as OnnxStepRunner's, so a prompt
fed here continues token by token in the step graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ManifestError, RwkvExportError
from .runners import NP_DTYPES

TOKENS_ROLE = "tokens"


def sequence_io(graph: dict) -> dict:
    """Split a sequence graph entry's I/O by role: tokens input, logits output, state name -> (input, output)."""
    where = f"graph {graph.get('file', graph.get('name', '?'))}"
    tokens = [i for i in graph["inputs"] if i["role"] == TOKENS_ROLE]
    logits = [o for o in graph["outputs"] if o["role"] == "logits"]
    if len(tokens) != 1 or len(logits) != 1:
        raise ManifestError(f"{where}: expected one '{TOKENS_ROLE}' input and one 'logits' output")
    state_in = {i["state"]: i for i in graph["inputs"] if i["role"] == "state"}
    state_out = {o["state"]: o for o in graph["outputs"] if o["role"] == "state"}
    if not state_in or set(state_in) != set(state_out):
        raise ManifestError(f"{where}: state inputs and outputs differ")
    max_chunk = graph.get("max_chunk")
    if not isinstance(max_chunk, int) or isinstance(max_chunk, bool) or max_chunk < 1:
        raise ManifestError(f"{where}: 'max_chunk' must be a positive integer, got {max_chunk!r}")
    fixed = graph.get("fixed_chunk", False)
    if not isinstance(fixed, bool):
        raise ManifestError(f"{where}: 'fixed_chunk' must be true or false, got {fixed!r}")
    return {"tokens": tokens[0], "logits": logits[0], "state_in": state_in, "state_out": state_out,
            "max_chunk": max_chunk, "fixed_chunk": fixed}


def check_tokens(tokens, vocab_size: int, dtype) -> np.ndarray:
    """A prompt's ids as a 1-D array of `dtype`, or a one-line error (empty, not integers, outside the vocabulary)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or arr.size == 0:
        raise RwkvExportError(f"tokens must be a non-empty 1-D list of token ids, got shape {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise RwkvExportError(f"tokens must be integers, got {arr.dtype}")
    if arr.min() < 0 or arr.max() >= vocab_size:  # (no T-sized temporaries on the good path: memory flat in T)
        bad = arr[(arr < 0) | (arr >= vocab_size)]
        raise RwkvExportError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")
    return arr.astype(dtype, copy=False)


def chunk_sizes(n: int, max_chunk: int) -> list[int]:
    """Split n tokens into the fewest chunks of at most max_chunk, as equal as possible (no short tail chunk: a
    chunk of a few tokens reads all the weights for little work)."""
    count = -(-n // max_chunk)
    base, extra = divmod(n, count)
    return [base + 1] * extra + [base] * (count - extra)


class OnnxSequenceRunner:
    """new_state() / forward(tokens, state) -> (logits [1, V] of the last token, state) over an ONNX sequence graph."""

    def __init__(self, root: Path, manifest: dict, graph: dict, threads: int | None = None,
                 chunk: int | None = None):
        from .runners import OrtSession

        self.manifest, self.graph = manifest, graph
        self.io = sequence_io(graph)
        if self.io["fixed_chunk"]:
            raise ManifestError(f"graph {graph.get('file')} takes exactly max_chunk tokens per call (fixed_chunk); "
                                "OnnxSequenceRunner feeds chunks of any size up to max_chunk")
        if chunk is not None and not 1 <= chunk <= self.io["max_chunk"]:
            raise RwkvExportError(f"chunk must lie in [1, {self.io['max_chunk']}] (the graph's max_chunk), got {chunk}")
        self.chunk = chunk or self.io["max_chunk"]
        self.vocab_size = int(manifest["model"]["vocab_size"])
        self.session = OrtSession(root, graph, threads)
        self._states = list(self.io["state_in"])
        self._out_names = [self.io["logits"]["name"]] + [self.io["state_out"][s]["name"] for s in self._states]
        self._tokens_dtype = NP_DTYPES[self.io["tokens"]["dtype"]]

    def new_state(self) -> dict:
        state = {}
        for t in self.manifest["state"]["tensors"]:
            spec = self.io["state_in"].get(t["name"])
            if spec is None:
                raise ManifestError(f"graph {self.graph['file']} has no input for state '{t['name']}'")
            state[t["name"]] = np.full(spec["shape"], t["init"], dtype=NP_DTYPES[spec["dtype"]])
        return state

    def forward(self, tokens, state: dict):
        """Feed the tokens (in chunks of at most `chunk`) from `state`; return the last token's logits [1, V] and
        the state after it. `state` is not modified."""
        arr = check_tokens(tokens, self.vocab_size, self._tokens_dtype)
        missing = [s for s in self._states if s not in state]
        if missing:
            raise RwkvExportError(f"state is missing {missing}")
        start, logits = 0, None
        for size in chunk_sizes(len(arr), self.chunk):
            feeds = {self.io["tokens"]["name"]: arr[start:start + size]}
            for s in self._states:
                feeds[self.io["state_in"][s]["name"]] = state[s]
            outs = self.session.run(self._out_names, feeds)
            logits, state = outs[0][-1:], dict(zip(self._states, outs[1:]))  # [-1:]: all_logits graphs too
            start += size
        return logits, state
