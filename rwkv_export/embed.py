"""Sentence embeddings and classification features from an exported model (`rwkv-export embed`).

RWKV's "free sentence embedding" is the final hidden state: what the head would read. An export made with
`--embedding` has graph outputs for it, appended after the step and prompt graphs' usual outputs (logits, then the
states; without --embedding the graphs are unchanged):

- `hidden` [1, C] fp32 (role "hidden"): the last token's final hidden state after ln_out (step and prompt graph);
- `hidden_sum` [1, C] fp32 (role "hidden_sum", prompt graph only): the sum of the final hidden states of the chunk's
  tokens, so a runner feeding chunks gets the mean over the whole text as Σ hidden_sum / T.

Three poolings of a text (POOLS), each a vector a runner makes from the manifest alone:
- `last`: `hidden` after the text's last token [C];
- `mean`: the mean of `hidden` over the text's tokens [C] (step graph: the sum of every step's `hidden`);
- `state`: the RNN state after the last token, every state tensor flattened and concatenated in `state.tensors`
  order (the existing state outputs: no new output needed).

Parity: `compare_embedding` against runtime_ref's `hidden_seq` (fp64), gated by parity.py's tolerance for the
graph's (target, variant). This module is torch-free at import (onnx.io_names and the CLI use it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ManifestError, RwkvExportError

HIDDEN = "hidden"
HIDDEN_SUM = "hidden_sum"
# graph output name -> its manifest role
OUTPUT_ROLES = {HIDDEN: "hidden", HIDDEN_SUM: "hidden_sum"}
POOLS = ("last", "mean", "state")
GATED = ("last", "mean")  # the poolings of the embedding outputs (`state` is the state outputs, gated as parity)
DEFAULT_POOL = "mean"
REEXPORT = "re-export it with --embedding (e.g. `rwkv-export onnx SOURCE -o DIR --embedding`)"


def with_embedding(step):
    """Turn a step module (arch.step_module) into one whose graphs also output the embedding (and so the prompt
    graphs built from it: they read the flag). Returns the module."""
    step.embedding = True
    return step


def output_names(module) -> tuple[str, ...]:
    """The embedding outputs a step or sequence module appends after logits and states (none unless embedding)."""
    if not getattr(module, "embedding", False):
        return ()
    return (HIDDEN, HIDDEN_SUM) if hasattr(module, "max_chunk") else (HIDDEN,)


@dataclass
class Embedding:
    """One text's vectors, fp64: `last` and `mean` [C], `state` [sum of the state tensors' sizes]."""

    last: np.ndarray
    mean: np.ndarray
    state: np.ndarray
    tokens: int

    def pooled(self, pool: str) -> np.ndarray:
        if pool not in POOLS:
            raise RwkvExportError(f"unknown pooling '{pool}'; choose from {', '.join(POOLS)}")
        return getattr(self, pool)


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        raise RwkvExportError("cosine similarity of a zero vector is undefined")
    return float(a @ b / (na * nb))


def flat_state(state: dict, order: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(state[n], np.float64).reshape(-1) for n in order])


# -- the exported graphs ---------------------------------------------------------------------------------------------


def embedding_graph(manifest: dict, kind: str | None = None, variant: str = "fp32") -> dict:
    """The graph entry to embed with: `kind` "sequence" (the prompt graph) or "step"; None: the prompt graph if the
    folder has one of that variant, else the step graph. A graph without a `hidden` output is a one-line error."""
    kinds = [kind] if kind else ["sequence", "step"]
    graphs = [g for k in kinds for g in manifest["graphs"] if g["kind"] == k and g["variant"] == variant]
    if not graphs:
        have = ", ".join(sorted({f"{g['variant']} {g['kind']}" for g in manifest["graphs"]})) or "none"
        raise ManifestError(f"no {kind or 'step or prompt'} graph of variant '{variant}' (the folder has: {have})")
    return require_embedding(graphs[0])


def require_embedding(graph: dict) -> dict:
    """The graph entry, if it has the embedding outputs of its kind; else a one-line error."""
    if not has_embedding(graph):
        raise ManifestError(f"{graph['file']} has no embedding outputs: the folder was exported without "
                            f"--embedding; {REEXPORT}")
    if graph["kind"] == "sequence" and not any(o["role"] == OUTPUT_ROLES[HIDDEN_SUM] for o in graph["outputs"]):
        raise ManifestError(f"{graph['file']} (prompt graph) has no '{HIDDEN_SUM}' output; {REEXPORT}")
    return graph


def _by_role(graph: dict, role: str) -> str:
    return next(o["name"] for o in graph["outputs"] if o["role"] == role)


class Embedder:
    """Embeddings of texts (or token ids) from an export folder's step or prompt graph, driven by the manifest.
    Runs ONNX (step and prompt graphs), TFLite (step; prompt: whole chunks through `prefill`, the rest through
    `step`) and TF.js (step graph, in Node: TFJSStepRunner.step_hidden) with the runners of check.py's tables.
    `graph` and `runner` (both or neither): embed with that manifest entry and its open runner (check.py's), which
    close() then leaves open."""

    def __init__(self, folder: str | Path, *, kind: str | None = None, variant: str = "fp32",
                 graph: dict | None = None, runner=None, manifest: dict | None = None):
        from .check import make_runner
        from .manifest import read_manifest
        from .tokenizer import load_tokenizer, spec_from_manifest

        self.root = Path(folder)
        self.manifest = manifest if manifest is not None else read_manifest(self.root)
        self.graph = require_embedding(graph) if graph is not None else embedding_graph(self.manifest, kind, variant)
        if self.graph["format"] not in ("onnx", "ort", "tflite", "tfjs"):
            raise RwkvExportError(f"`embed` runs onnx, tflite and tfjs folders, not {self.graph['format']}")
        self.tokenizer = load_tokenizer(spec_from_manifest(self.root, self.manifest["tokenizer"]))
        self._owns_runner = runner is None
        self.runner = make_runner(self.root, self.manifest, self.graph) if runner is None else runner
        self.order = [t["name"] for t in self.manifest["state"]["tensors"]]
        self.vocab_size = int(self.manifest["model"]["vocab_size"])

    @property
    def kind(self) -> str:
        return self.graph["kind"]

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise RwkvExportError("an empty text has no embedding (it encodes to no tokens)")
        return ids

    def embed(self, text: str) -> Embedding:
        return self.embed_tokens(self.encode(text))

    def embed_tokens(self, ids) -> Embedding:
        from .seq_runner import check_tokens

        ids = [int(t) for t in check_tokens(ids, self.vocab_size, np.int64)]
        state = self.runner.new_state()
        if self.kind == "step":
            last, total, state = self._steps(self.runner, self.graph, ids, state)
        elif self.graph.get("fixed_chunk"):
            last, total, state = self._fixed_chunks(ids, state)
        else:
            last, total, state = self._chunks(ids, state)
        return Embedding(last=last, mean=total / len(ids), state=flat_state(state, self.order), tokens=len(ids))

    def _call(self, runner, graph: dict, feeds: dict) -> dict:
        """One graph call: every output by name (a copy: TFLite reuses its buffers)."""
        if hasattr(runner, "session"):  # onnxruntime
            names = [o["name"] for o in graph["outputs"]]
            return dict(zip(names, runner.session.run(names, feeds)))
        return {k: np.array(v) for k, v in runner.runner(**feeds).items()}  # a LiteRT signature runner

    def _states(self, runner, outs: dict) -> dict:
        return {s: outs[spec["name"]] for s, spec in runner.io["state_out"].items()}

    def _steps(self, runner, graph: dict, ids, state, total=0.0):
        from .runners import step_feeds

        hidden = _by_role(graph, OUTPUT_ROLES[HIDDEN])
        for t in ids:
            if hasattr(runner, "step_hidden"):  # TF.js: the Node step protocol returns `hidden` by name
                _, state, h = runner.step_hidden(t, state)
            else:
                outs = self._call(runner, graph, step_feeds(runner.io, t, state))
                h, state = outs[hidden], self._states(runner, outs)
            last = np.asarray(h, np.float64).reshape(-1)
            total = total + last
        return last, total, state

    def _chunk(self, runner, graph: dict, chunk, state, total):
        io = runner.io
        feeds = {io["tokens"]["name"]: np.asarray(chunk, dtype=np.dtype(io["tokens"]["dtype"]))}
        feeds.update({io["state_in"][s]["name"]: state[s] for s in io["state_in"]})
        outs = self._call(runner, graph, feeds)
        last = np.asarray(outs[_by_role(graph, OUTPUT_ROLES[HIDDEN])], np.float64).reshape(-1)
        total = total + np.asarray(outs[_by_role(graph, OUTPUT_ROLES[HIDDEN_SUM])], np.float64).reshape(-1)
        return last, total, self._states(runner, outs)

    def _chunks(self, ids, state):
        """The prompt graph in chunks of at most max_chunk (as OnnxSequenceRunner feeds it)."""
        from .seq_runner import chunk_sizes

        start, total = 0, 0.0
        for size in chunk_sizes(len(ids), self.runner.chunk):
            last, total, state = self._chunk(self.runner, self.graph, ids[start:start + size], state, total)
            start += size
        return last, total, state

    def _fixed_chunks(self, ids, state):
        """TFLite: whole chunks of exactly max_chunk through `prefill`, the tail through `step` (its graph entry: the
        same file's step signature, which has `hidden` too)."""
        n, whole, total, last = self.runner.chunk, len(ids) // self.runner.chunk * self.runner.chunk, 0.0, None
        for start in range(0, whole, n):
            last, total, state = self._chunk(self.runner, self.graph, ids[start:start + n], state, total)
        if whole < len(ids):
            step = self.runner.step_runner
            if not has_embedding(step.graph):
                raise ManifestError(f"{step.graph['file']} (step signature) has no '{HIDDEN}' output; {REEXPORT}")
            last, total, state = self._steps(step, step.graph, ids[whole:], state, total)
        return last, total, state

    def close(self) -> None:
        if self._owns_runner and hasattr(self.runner, "close"):
            self.runner.close()


# -- the reference and the parity gate --------------------------------------------------------------------------------


def reference_embedding(ref, ids, order: list[str]) -> Embedding:
    """The same three vectors from runtime_ref (`hidden_seq`, GPT mode) from a fresh state."""
    import torch

    with torch.no_grad():
        hidden, state = ref.hidden_seq(list(ids), ref.new_state())
    h = hidden.double().numpy()
    return Embedding(last=h[-1], mean=h.mean(0), state=flat_state({k: v.numpy() for k, v in state.items()}, order),
                     tokens=len(ids))


def compare_embedding(embedder: Embedder, ref, texts: list[str]) -> dict:
    """Each text's three vectors from the exported graph against runtime_ref's, with parity.py's tolerance for the
    graph's (target, variant, RWKV version): `last` and `mean` by max|Δ|/std(reference vector) (the logits metric),
    gated; `state` by max|Δ|/max|reference| per state tensor (compare_sequence's state metric), reported: those are
    the graph's state outputs, which its parity report already gates by their effect on the logits. Quantized
    variants (no max_rel in the table) are reported here and judged by the quality gate, as their logits are."""
    from .parity import tolerance_for

    graph = embedder.graph
    tol = tolerance_for(graph["format"], graph["variant"], embedder.manifest["model"].get("rwkv_version"))
    sizes = [int(np.prod(t["shape"])) for t in embedder.manifest["state"]["tensors"]]
    rel = {pool: 0.0 for pool in POOLS}
    for text in texts:
        ids = embedder.encode(text)
        got, want = embedder.embed_tokens(ids), reference_embedding(ref, ids, embedder.order)
        for pool in ("last", "mean"):
            d = np.abs(got.pooled(pool) - want.pooled(pool)).max() / want.pooled(pool).std()
            rel[pool] = max(rel[pool], float(d))
        for g, w in zip(np.split(got.state, np.cumsum(sizes)[:-1]), np.split(want.state, np.cumsum(sizes)[:-1])):
            rel["state"] = max(rel["state"], float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-30)))
    report = {"kind": "embedding", "target": embedder.graph["format"], "variant": embedder.graph["variant"],
              "graph": embedder.kind, "texts": len(texts), "reference": "runtime_ref fp64 hidden_seq",
              "max_rel": rel, "tolerance": tol.max_rel, "gated": list(GATED)}
    report["passed"] = tol.max_rel is None or max(rel[p] for p in GATED) <= tol.max_rel
    return report


# check.py's embedding gate: a sentence and ~100 bytes of code, longer than a TFLite prompt chunk (16) and RWKV-7's
# prompt graph (64), so `mean` and the state cross calls; the folder's own tokenizer encodes them
CHECK_TEXTS = ("The state is all the model remembers.",
               "def f(x):\n    return x ** 2  # squares\n\nclass Point:\n    def __init__(self, x, y):\n"
               "        self.x, self.y = x, y\n")


def check_embedding(root: Path, manifest: dict, graph: dict, runner, model) -> dict:
    """The embedding report of one graph with the embedding outputs (check.check_graphs), through its open runner,
    against `model` (a runtime_ref model in fp64: its hidden_seq)."""
    emb = Embedder(root, graph=graph, runner=runner, manifest=manifest)
    return compare_embedding(emb, model, list(CHECK_TEXTS))


def gate_embedding(report: dict) -> None:
    """Raise ParityToleranceError if an embedding report failed."""
    from .errors import ParityToleranceError

    if not report["passed"]:
        worst = max(report["gated"], key=report["max_rel"].get)
        raise ParityToleranceError(
            f"{report['target']}/{report['variant']} {report['graph']} graph: the `{worst}` embedding's "
            f"max|Δ|/std(ref) = {report['max_rel'][worst]:.3g} exceeds {report['tolerance']:g}")


def format_embedding(report: dict) -> str:
    rel, bound = report["max_rel"], report["tolerance"]
    bound = f"≤{bound:g}" if bound is not None else "reported"
    return (f"embedding {report['target']}/{report['variant']} {report['graph']} graph vs {report['reference']}: "
            f"{'PASS' if report['passed'] else 'FAIL'}  max|Δ|/std last={rel['last']:.3g} mean={rel['mean']:.3g} "
            f"({bound})  state max|Δ|/max|ref|={rel['state']:.3g} (reported)  over {report['texts']} texts")


# -- `rwkv-export embed` ----------------------------------------------------------------------------------------------


def embed_texts(folder, texts: list[str], *, pool: str = DEFAULT_POOL, kind: str | None = None,
                variant: str = "fp32") -> np.ndarray:
    """[len(texts), dim] float32: one pooled vector per text."""
    if pool not in POOLS:
        raise RwkvExportError(f"unknown pooling '{pool}'; choose from {', '.join(POOLS)}")
    if not texts:
        raise RwkvExportError("give at least one text to embed")
    emb = Embedder(folder, kind=kind, variant=variant)
    try:
        return np.stack([emb.embed(t).pooled(pool) for t in texts]).astype(np.float32)
    finally:
        emb.close()


def save_npy(path: str | Path, vectors: np.ndarray, force: bool = False) -> Path:
    """Write `vectors` to a .npy file, staged (nothing half-written) and never over an existing file without force."""
    from .errors import OutputExistsError
    from .outdir import staged_file

    path = Path(path)
    if path.suffix != ".npy":
        raise RwkvExportError(f"--out must name a .npy file, got {path.name}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists (use --force to replace it)")
    if not path.parent.is_dir():
        raise RwkvExportError(f"the folder of {path} does not exist")
    with staged_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    return path


def format_vector(v) -> str:
    return " ".join(f"{x:.7g}" for x in np.asarray(v).reshape(-1))


def step_module(ckpt, variant: str = "fp32", embedding: bool = False):
    """The architecture's step module (arch.step_module), with the embedding outputs when `embedding`."""
    module = ckpt.arch.step_module(ckpt, variant)
    return with_embedding(module) if embedding else module


def has_embedding(graph: dict) -> bool:
    """Whether a manifest graph entry has the embedding outputs (an export made with --embedding)."""
    return any(o.get("role") == OUTPUT_ROLES[HIDDEN] for o in graph["outputs"])
