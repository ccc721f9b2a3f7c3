"""`rwkv-export check DIR`: re-run the gates of every graph in an export folder against runtime_ref.

- every step graph: the parity gate (parity.compare: shapes, finiteness, logits and greedy continuation vs the
  reference over N_TOKENS tokens, tolerance per (target, variant));
- every variant other than fp32 also gets the quality gate (quality.evaluate_variant on the eval text, against the
  reference in fp32: perplexity delta gated per variant kind, KL, top-1 and greedy agreement reported);
- every sequence (prompt) graph: parity.compare_sequence (its logits and states vs T reference steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from .embed import check_embedding, format_embedding, gate_embedding, has_embedding
from .manifest import read_manifest, write_manifest
from .parity import compare, compare_sequence, format_report, gate
from .progress import QUIET, Progress
from .sources import source_from_manifest

# graph format -> step runner class (loaded lazily: each runtime is an optional dependency)
RUNNERS = {
    "onnx": "rwkv_export.runners:OnnxStepRunner",
    "ort": "rwkv_export.runners:OnnxStepRunner",  # ONNX Runtime's own format loads in the same session type
    "tflite": "rwkv_export.tf_runners:TFLiteStepRunner",
    "tfjs": "rwkv_export.tf_runners:TFJSStepRunner",
}
SEQUENCE_RUNNERS = {
    "onnx": "rwkv_export.seq_runner:OnnxSequenceRunner",
    "ort": "rwkv_export.seq_runner:OnnxSequenceRunner",
    "tflite": "rwkv_export.tf_runners:TFLiteSequenceRunner",
}
# Threads of torch (the references) and of each graph's runtime during a check. The work is thousands of one-token
# steps of small ops, which a second thread slows down rather than speeds up on two cores: tiny-pydoc's int8 step
# in onnxruntime 2.8 vs 4.2-5.4 ms with 2 threads, the fp32 reference 14x slower with 2 (2-core EPYC, loaded).
CHECK_THREADS = 1
# variant name -> the quality gate it is judged by (quality.PPL_GATES); TF.js's uint8 is an 8-bit weight format
QUALITY_KIND = {"fp16": "fp16", "int8": "int8", "uint8": "int8", "int4": "int4"}


def make_runner(root: Path, manifest: dict, graph: dict, threads: int | None = None):
    """The runner of one graph of the folder; `threads` (the runtime's intra-op threads) where the runner takes it."""
    import importlib
    import inspect

    table = SEQUENCE_RUNNERS if graph["kind"] == "sequence" else RUNNERS
    spec = table.get(graph["format"])
    if spec is None:
        from .errors import ManifestError

        raise ManifestError(f"graph {graph['file']} ({graph['kind']}) has format '{graph['format']}', "
                            f"which no runner handles")
    mod, cls = spec.split(":")
    runner_cls = getattr(importlib.import_module(mod), cls)
    if threads is not None and "threads" in inspect.signature(runner_cls).parameters:
        return runner_cls(root, manifest, graph, threads=threads)
    return runner_cls(root, manifest, graph)


def _close(runner) -> None:
    if hasattr(runner, "close"):
        runner.close()


def eval_token_ids(root: Path, manifest: dict, max_tokens: int | None = None) -> list[int]:
    """The quality eval text, encoded with the folder's own tokenizer."""
    from .quality import DEFAULT_EVAL_TOKENS, eval_tokens
    from .tokenizer import load_tokenizer, spec_from_manifest

    spec = spec_from_manifest(root, manifest["tokenizer"])
    return eval_tokens(load_tokenizer(spec).encode, max_tokens or DEFAULT_EVAL_TOKENS)


class SharedReference:
    """The reference model behind the interface parity.compare and compare_sequence use (new_state, step,
    vocab_size), each distinct token path computed once. Every graph of a folder is compared on the same tokens,
    and the reference's side of a comparison (its logits, its greedy continuation, its states) does not depend on
    the graph, so its fp64 steps are shared by all the graphs instead of repeated for each. The states handed out
    are views of a path; a state's tensors are kept (within KEEP_BYTES) or recomputed from the longest kept prefix."""

    KEEP_BYTES = 256 * 1024**2

    def __init__(self, model):
        self.model, self.vocab_size = model, model.vocab_size
        self._logits: dict[tuple, object] = {}
        self._states: dict[tuple, dict] = {(): model.new_state()}
        self._kept = 0
        self._last: tuple = ((), self._states[()])

    def new_state(self) -> "_PathState":
        return _PathState(self, ())

    def step(self, token: int, state):
        if not isinstance(state, _PathState):  # a state from elsewhere (parity.state_effect's, from a graph)
            import torch

            with torch.no_grad():
                return self.model.step(int(token), state)
        path = (*state.path, int(token))
        if path not in self._logits:
            import torch

            with torch.no_grad():
                self._logits[path], new = self.model.step(int(token), self.state_of(state.path))
            size = sum(t.numel() * t.element_size() for t in new.values())
            if self._kept + size <= self.KEEP_BYTES:
                self._states[path], self._kept = new, self._kept + size
            self._last = (path, new)
        return self._logits[path], _PathState(self, path)

    def state_of(self, path: tuple) -> dict:
        if path in self._states:
            return self._states[path]
        if self._last[0] == path:
            return self._last[1]
        import torch

        n = max(i for i in range(len(path) + 1) if path[:i] in self._states)
        state = self._states[path[:n]]
        with torch.no_grad():
            for tok in path[n:]:
                _, state = self.model.step(tok, state)
        self._states[path] = state  # read once, likely read again (the next graph's comparison)
        return state


class _PathState(Mapping):
    """The reference state after a token path (SharedReference), read as a mapping of tensors."""

    def __init__(self, ref: SharedReference, path: tuple):
        self.ref, self.path = ref, path

    def __getitem__(self, name):
        return self.ref.state_of(self.path)[name]

    def __iter__(self):
        return iter(self.ref.state_of(self.path))

    def __len__(self):
        return len(self.ref.state_of(self.path))


@contextlib.contextmanager
def _torch_threads(n: int):
    """The references run many small ops per token, which two torch threads run slower than one (RWKV-7 at 0.1B
    shapes on the 2-core box: 14x slower with 2 under load, issue 15); restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_graphs(root: Path, manifest: dict, ckpt, *, progress: Progress = QUIET, raise_on_fail: bool = True,
                 variants: list[str] | None = None, eval_tokens: int | None = None) -> list[dict]:
    """Check each graph against the reference built from `ckpt`; store each report in its manifest entry ("parity",
    and "quality" for variants other than fp32). Returns the reports (parity, then quality, per graph). The fp64
    reference steps are shared by every graph (SharedReference), and the quality gate reads the eval text once on
    the fp32 side for all variants (quality.evaluate_variants)."""
    with _torch_threads(CHECK_THREADS):
        reports = _check_graphs(root, manifest, ckpt, progress, variants, eval_tokens)
    if raise_on_fail:
        gate_all(reports)
    return reports


def _check_graphs(root: Path, manifest: dict, ckpt, progress: Progress, variants, eval_tokens) -> list[dict]:
    import torch

    ref = SharedReference(ckpt.arch.reference(ckpt.tensors, torch.float64))
    reports, pending = [], []  # pending: (graph, its step runner, its report's slot) awaiting the quality gate
    try:
        for graph in manifest["graphs"]:
            if variants and graph["variant"] not in variants:
                continue
            runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
            kept = False
            try:
                cmp = compare_sequence if graph["kind"] == "sequence" else compare
                graph["parity"] = cmp(runner, ref, target=graph["format"], variant=graph["variant"], progress=progress)
                reports.append(graph["parity"])
                if graph["kind"] != "sequence" and graph["variant"] != "fp32":
                    graph["quality"] = {}  # filled below; its place in `reports` is right after the parity report
                    reports.append(graph["quality"])
                    pending.append((graph, runner))
                    kept = True
                if has_embedding(graph):  # --embedding: its vectors vs runtime_ref's hidden_seq (embed.py's gate)
                    graph["embedding"] = check_embedding(root, manifest, graph, runner, ref.model)
                    reports.append(graph["embedding"])
            finally:
                if not kept:
                    _close(runner)
        if pending:
            _quality(root, manifest, ckpt, pending, progress, eval_tokens)
    finally:
        for _, runner in pending:
            _close(runner)
    return reports


def _quality(root: Path, manifest: dict, ckpt, pending: list, progress: Progress, eval_tokens) -> None:
    """The quality gate of every pending variant, against one fp32 reference run over the eval text (the
    reference's GPT mode, chunked: runners.ReferenceRunner.logits_seq)."""
    from .quality import evaluate_variants, judge_quality
    from .runners import ReferenceRunner

    ids = eval_token_ids(root, manifest, eval_tokens)
    names = ", ".join(f"{g['format']}/{g['variant']}" for g, _ in pending)
    with progress.stage(f"quality {names} vs fp32 on {len(ids)} tokens of eval text"):
        reps = evaluate_variants([r for _, r in pending], ReferenceRunner(ckpt, "float32"), ids)
    for (graph, _), rep in zip(pending, reps):
        kind = QUALITY_KIND.get(graph["variant"], graph["variant"])
        graph["quality"].update({"kind": "quality", "target": graph["format"], **judge_quality(rep, kind),
                                 "variant": graph["variant"], "gate": kind, "eval_text": "tiny-pydoc-eval.txt",
                                 "baseline": "runtime_ref fp32"})


def gate_all(reports: list[dict]) -> None:
    """Raise the typed error of the first failing report."""
    from .quality import raise_if_failed

    for r in reports:
        if r.get("kind") == "quality":
            raise_if_failed(r, f"{r['target']}/{r['variant']}")
        elif r.get("kind") == "embedding":
            gate_embedding(r)
        else:
            gate(r)


def format_any(report: dict) -> str:
    if report.get("kind") == "quality":
        from .quality import format_quality

        return format_quality(report).replace("quality ", f"quality {report['target']}/", 1)
    if report.get("kind") == "embedding":
        return format_embedding(report)
    return format_report(report)


def check_folder(root: str | Path, checkpoint: str | None = None, *, progress: Progress = QUIET,
                 update_manifest: bool = False, raise_on_fail: bool = True) -> list[dict]:
    root = Path(root)
    manifest = read_manifest(root)
    src = source_from_manifest(manifest["model"]["source"], checkpoint)
    ckpt = src.load(progress)
    dims = ckpt.dims.as_dict()
    exported = {k: manifest["model"].get(k) for k in dims}
    if str(manifest["model"].get("rwkv_version")) != ckpt.arch.version or dims != exported:
        from .errors import CheckpointError

        raise CheckpointError(f"the checkpoint ({ckpt.arch.title}, {dims}) is not the exported model "
                              f"(RWKV-{manifest['model'].get('rwkv_version')}, {exported})")
    reports = check_graphs(root, manifest, ckpt, progress=progress, raise_on_fail=False)
    if update_manifest:
        write_manifest(root, manifest)
    if raise_on_fail:
        gate_all(reports)
    return reports
