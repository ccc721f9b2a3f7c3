"""`rwkv-export check DIR`: re-run the gates of every graph in an export folder against runtime_ref.

- every step graph: the parity gate (parity.compare: shapes, finiteness, logits and greedy continuation vs the
  reference over N_TOKENS tokens, tolerance per (target, variant));
- every variant other than fp32 also gets the quality gate (quality.evaluate_against on the eval text, against the
  fp32 side: perplexity delta gated per variant kind, KL, top-1 and greedy agreement reported), read through the
  variant's eval graph (eval_graph.py) in chunks where it has an ONNX prompt graph, else through its step graph;
- every sequence (prompt) graph: parity.compare_sequence's gate (its logits and states vs T reference steps).

What does not depend on the graph is computed once: the fp64 reference's side of the parity gate, in this process
(its logits over the parity tokens in GPT mode, its greedy continuation: parity.record_reference, verified in one
GPT-mode run from the fp32 prompt graph's guess where there is one: verify_greedy), and the fp32 baseline's side of
the quality gate (quality.Baseline over the eval text: the fp32 eval graph, in a worker process started before the
reference, or by an export as soon as its fp32 graphs are written: start_baseline; runtime_ref fp32 in GPT mode here
where there is no eval graph). Then each step graph, with its parity and quality gates (one session open at a
time: step graph, then eval graph, then step graph for the link guard and greedy run), is checked in a pool of worker
processes (one graph per worker at a time), which needs neither reference model in memory, while this process
judges the prompt graphs against the reference in a thread beside them. With processes=1 everything runs here, one
thing after another; the reports are the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .embed import check_embedding, format_embedding, gate_embedding, has_embedding
from .manifest import read_manifest, write_manifest
from .memory import give_back_freed_memory, own_peak_rss
from .parity import (N_GREEDY, compare, format_report, gate, judge_sequence, parity_tokens, record_reference,
                     run_sequence, sequence_calls)
from .progress import QUIET, Progress, cpu_note, format_bytes
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
    "tfjs": "rwkv_export.targets.tfjs:TFJSSequenceRunner",  # the prompt graph in the step graph's model.json
}
# Threads of torch (the references) and of each graph's runtime during a check. The work is thousands of one-token
# steps of small ops, which a second thread slows down rather than speeds up on two cores: tiny-pydoc's int8 step
# in onnxruntime 2.8 vs 4.2-5.4 ms with 2 threads, the fp32 reference 14x slower with 2 (2-core EPYC, loaded).
CHECK_THREADS = 1
# Worker processes that check step graphs side by side (parity and quality, one session each): each worker runs one
# graph on one thread, so two use both cores of a 2-core box; more would each hold another graph's weights in memory
# (a 169M fp32 session is ~0.7 GB) for cores most machines running a check do not have free.
MAX_CHECK_PROCESSES = 2
# variant name -> the quality gate it is judged by (quality.PPL_GATES); TF.js's uint8 is an 8-bit weight format
QUALITY_KIND = {"fp16": "fp16", "int8": "int8", "uint8": "int8", "int4": "int4"}


def make_runner(root: Path, manifest: dict, graph: dict, threads: int | None = None, **options):
    """The runner of one graph of the folder; `threads` (the runtime's intra-op threads) and `options` (keyword
    arguments such as TFLiteSequenceRunner's one_interpreter) where the runner takes them."""
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
    takes = inspect.signature(runner_cls).parameters
    kw = {k: v for k, v in {"threads": threads, **options}.items() if v is not None and k in takes}
    return runner_cls(root, manifest, graph, **kw)


def _close(runner) -> None:
    if hasattr(runner, "close"):
        runner.close()
    give_back_freed_memory()


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
    the graph, so its fp64 steps are shared by all the graphs instead of repeated for each. `prefill` computes a
    path in GPT mode (the reference's forward_seq: the same equations as its steps, in one batch, rounded in a
    different order: ~1e-16 of the logits in fp64, against tolerances of 1e-5 and up), so that the steps along it
    are then read, not run. The states handed out are views of a path; a state's tensors are kept (within
    KEEP_BYTES) or recomputed from the longest kept prefix."""

    KEEP_BYTES = 256 * 1024**2

    def __init__(self, model):
        self.model, self.vocab_size = model, model.vocab_size
        self._logits: dict[tuple, object] = {}
        self._states: dict[tuple, dict] = {(): model.new_state()}
        self._kept = 0
        self._last: tuple = ((), self._states[()])

    def new_state(self) -> "_PathState":
        return _PathState(self, ())

    def _keep(self, path: tuple, state: dict) -> None:
        size = sum(t.numel() * t.element_size() for t in state.values())
        if self._kept + size <= self.KEEP_BYTES:
            self._states[path], self._kept = state, self._kept + size
        self._last = (path, state)

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
            self._keep(path, new)
        return self._logits[path], _PathState(self, path)

    def prefill(self, path) -> None:
        """The logits after every prefix of `path` and the state after it, in one GPT-mode run from its longest
        kept prefix."""
        import torch

        path = tuple(int(t) for t in path)
        n = max(i for i in range(len(path) + 1) if path[:i] in self._states)
        if n == len(path):
            return
        with torch.no_grad():
            logits, new = self.model.forward_seq(list(path[n:]), self.state_of(path[:n]), all_logits=True)
        for j in range(n, len(path)):
            self._logits.setdefault(path[:j + 1], logits[j - n])
        self._keep(path, new)

    def logits_seq(self, tokens, state) -> list:
        """The logits after each of `tokens` from `state` (a path's, or a state from elsewhere), in GPT mode."""
        if isinstance(state, _PathState):
            path = (*state.path, *(int(t) for t in tokens))
            self.prefill(path)
            return [self._logits[path[:i]] for i in range(len(state.path) + 1, len(path) + 1)]
        import torch

        with torch.no_grad():
            return list(self.model.forward_seq(list(tokens), dict(state), all_logits=True)[0])

    def logits_seq_many(self, tokens, states: list[dict]) -> list | None:
        """logits_seq(tokens, state) from each of `states` (states from elsewhere, as tensors shaped like the
        reference's own), in one batched GPT-mode run (torch.func.vmap over the reference's forward_seq: each matrix
        cast once for all, not once a state; measured at 169M shapes: 5 states 2.1 -> 0.5 s of CPU, the same bits for
        RWKV-4; batched products may round in another order, ~1e-16 as GPT mode against steps); None where the
        reference cannot be run batched (logits_seq one state at a time then)."""
        import torch

        if not states:
            return []
        stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        run = torch.func.vmap(lambda state: self.model.forward_seq(list(tokens), state, all_logits=True)[0])
        try:
            with torch.no_grad():
                logits = run(stacked)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):  # an op vmap has no rule for
            return None
        return [list(row) for row in logits]

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
                 variants: list[str] | None = None, eval_tokens: int | None = None,
                 processes: int | None = None, baseline: "_Later | None" = None) -> list[dict]:
    """Check each graph against the reference built from `ckpt`; store each report in its manifest entry ("parity",
    and "quality" for variants other than fp32). Returns the reports (per graph in manifest order: parity, quality,
    embedding). `processes`: worker processes for the step graphs (default: up to MAX_CHECK_PROCESSES, one per
    core; 1 checks them here, one after another); the reports are the same either way. `baseline`: the fp32
    baseline started earlier (start_baseline; closed here), else it is started here."""
    if processes is None:
        processes = _default_processes()
    try:
        with _torch_threads(CHECK_THREADS):
            reports = _check_graphs(Path(root), manifest, ckpt, progress, variants, eval_tokens, processes, baseline)
    finally:
        if baseline is not None:
            baseline.close()
    if raise_on_fail:
        gate_all(reports)
    return reports


def _default_processes() -> int:
    import os

    return min(MAX_CHECK_PROCESSES, os.cpu_count() or 1)


def start_baseline(root: Path, manifest: dict, *, progress: Progress = QUIET, sequential: bool = True,
                   processes: int | None = None) -> "_Later | None":
    """The fp32 side of the quality gates (quality.Baseline, by the fp32 eval graph) started now in a worker
    process, for check_graphs(baseline=...) to take up: an export starts it once its fp32 graphs are written, so
    that it is read on the second core while the variants are written on the first. None where it would not run
    in a worker (one core, or no fp32 ONNX prompt graph in `manifest`). `sequential`: as check_graphs will read it
    (every variant with an eval graph); where it is not, check_graphs reads the rest. Close it (check_graphs does)."""
    if (processes or _default_processes()) < 2 or _fp32_entries(manifest)[1] is None:
        return None
    return _Later.start(Path(root), manifest, None, sequential, progress)


def _check_graphs(root: Path, manifest: dict, ckpt, progress: Progress, variants, eval_tokens,
                  processes: int, early: "_Later | None" = None) -> list[dict]:
    graphs = [g for g in manifest["graphs"] if not variants or g["variant"] in variants]
    steps = [g for g in graphs if g["kind"] != "sequence"]
    here = [g for g in steps if has_embedding(g)]  # their embedding gate runs the fp64 model: checked in this process
    kept: dict[str, object] = {}  # file -> the open runner of a graph in `here`, for its quality gate
    variants = [g for g in steps if g["variant"] != "fp32"]
    # the sequential gate reads fp32 only as far as a variant needs; a variant read token by token (no eval graph)
    # needs all of it
    stepwise = any(eval_graph_entry(manifest, g) is None for g in variants)
    if early is not None and (not variants or early.eval_tokens != eval_tokens or processes < 2):
        early.close()  # not the baseline this check reads (or none is read)
        early = None
    if early is None and variants and processes > 1 and _fp32_entries(manifest)[1] is not None:
        # the fp32 eval graph's baseline needs no reference: read in a worker process now, beside the reference
        # (torch in this process, onnxruntime there: each on one core of two)
        early = _Later.start(root, manifest, eval_tokens, not stepwise, progress)
    from .checkpoint import reread

    if any(graph["kind"] == "sequence" for graph in graphs):
        # the checkpoint's pages, read by the export or the finiteness check (340 MB at 169M shapes), are not held
        # under the prompt graphs' runtimes; the reference reads them again from the page cache
        reread(ckpt)
    with contextlib.ExitStack() as stack:
        if early is not None:
            stack.callback(early.close)
            if early.sequential and stepwise:  # started for eval graphs, but a variant is read token by token
                early.extend_to_end = True
        path = None if early is not None else Path(stack.enter_context(_tempdir())) / "fp32_logits.bin"
        stand_ins, before_reference = None, None
        if early is None and variants and processes > 1 and _prompts_out_of_process(graphs):
            # TF.js: its prompt graphs run in Node, this process waits for them; the stand-ins are written here in
            # the meantime (a thread), and the fp32 stand-in's baseline starts in a worker process once they are,
            # as an ONNX folder's does (the reference waits for the stand-ins: both read the checkpoint)
            from concurrent.futures import ThreadPoolExecutor

            from .tf_quality import prepare

            pool = stack.enter_context(ThreadPoolExecutor(1))
            prepared = pool.submit(prepare, root, manifest, ckpt, variants, path.parent, progress)

            def before_reference():
                nonlocal stand_ins, early
                stand_ins = prepared.result()
                reread(ckpt)  # the stand-ins' weights read every page: not held under the reference
                if stand_ins.get("fp32") is not None and not _stepwise(manifest, variants, stand_ins):
                    early = _Later.start(root, manifest, eval_tokens, True, progress, stand_ins=stand_ins)
                    stack.callback(early.close)
        try:
            recorded, judged = _reference_side(root, manifest, ckpt, graphs, here, kept, progress, before_reference)

            base, jobs = early, [g for g in steps if not has_embedding(g)]
            if early is None:  # one thing after another, as ever
                judged()
                # the reference read every page of the checkpoint (340 MB at 169M shapes): not held through the rest
                reread(ckpt)
                if variants:
                    # TF.js's storage variants and TFLite's fp16 are read through stand-ins (ONNX eval graphs with the
                    # files' decoded weights), TFLite's int8/int4 step graphs sequentially, all against the fp32
                    # stand-in (the checkpoint's weights), written here: tf_quality.py
                    from .tf_quality import prepare

                    if stand_ins is None:
                        stand_ins = prepare(root, manifest, ckpt, variants, path.parent, progress)
                        reread(ckpt)  # the stand-ins' weights read every page again: not under the baseline's session
                    stepwise = _stepwise(manifest, variants, stand_ins)
                    base = _baseline(root, manifest, ckpt, path, eval_tokens, progress, sequential=not stepwise,
                                     stand_in=stand_ins.get("fp32"))
                    base.stand_ins = stand_ins  # travels with the baseline to the worker processes
                qualities = _run_jobs(root, manifest, jobs, recorded, base, processes, progress)
            else:  # the reference's own gates here (torch) while the step graphs' jobs start in worker processes
                qualities = _beside(judged, lambda: _run_jobs(root, manifest, jobs, recorded, base, processes,
                                                              progress))
                reread(ckpt)
            for graph, quality in zip(jobs, qualities):
                _judge(graph, quality)
            if isinstance(base, _Later):
                base = base()
            for graph in here:
                if graph["variant"] != "fp32":
                    with progress.stage(f"quality {graph['format']}/{graph['variant']} vs fp32"):
                        quality = _quality(root, manifest, graph, kept[graph["file"]], base)
                        while isinstance(quality, _pending()):
                            _extend_baseline(root, manifest, base, quality.need, progress)
                            quality = _quality(root, manifest, graph, kept[graph["file"]], base, quality)
                        _judge(graph, quality)
        finally:
            for runner in kept.values():
                _close(runner)
    reports = []
    for graph in graphs:
        reports.append(graph["parity"])
        if graph["kind"] != "sequence" and graph["variant"] != "fp32":
            reports.append(graph["quality"])
        if has_embedding(graph):
            reports.append(graph["embedding"])
    return reports


def _prompts_out_of_process(graphs: list) -> bool:
    """Whether the folder's prompt graphs run in a process of their own (TF.js's, in Node), so that this process is
    free while they run."""
    return any(g["kind"] == "sequence" for g in graphs) and all(g["format"] == "tfjs" for g in graphs)


def _stepwise(manifest: dict, variants: list, stand_ins: dict) -> bool:
    """Whether a variant's quality gate reads its own step graph token by token (no eval graph, no stand-in)."""
    return any(eval_graph_entry(manifest, g) is None and g["file"] not in stand_ins for g in variants)


def _reference_side(root: Path, manifest: dict, ckpt, graphs: list, here: list, kept: dict, progress: Progress,
                    before_reference=None):
    """Everything that runs the fp64 reference, which is freed after: its side of the step graphs' parity gate
    (recorded, returned with `judged`), then, when judged() is called, each prompt graph's parity gate (the graph run
    first, here, and its session closed, so that no session is open beside the reference: at 169M shapes each is
    ~0.7 GB, the fp64 model 0.31 GB and the checkpoint's pages 0.34 GB), and the parity and embedding gates of the
    graphs in `here`, whose runners are left open in `kept`. The greedy continuation is verified from the fp32
    prompt graph's guess (verify_greedy) where the folder has one. `before_reference`: called once the prompt
    graphs have run, before the reference is built."""
    import torch

    tokens, runs, guess = parity_tokens(ckpt.dims.vocab_size), {}, None
    for graph in graphs:
        if graph["kind"] == "sequence":
            # TFLite: one interpreter of the pair (prompt graph, step graph for the tail) at a time
            runner = make_runner(root, manifest, graph, threads=CHECK_THREADS, one_interpreter=True)
            try:
                # the engine in words where the runner says (TF.js: wasm, or the cpu fallback and why)
                engine = f" on {runner.engine}" if getattr(runner, "engine", None) else ""
                with progress.stage(f"running the {graph['format']}/{graph['variant']} prompt graph{engine}"):
                    runs[graph["file"]] = run_sequence(runner, tokens)
                    if guess is None and graph["variant"] == "fp32" and hasattr(runner, "forward"):
                        guess = greedy_guess(runner, runs[graph["file"]], N_GREEDY)
            finally:
                _close(runner)
                del runner  # the name held the session under the next one's and the reference's (0.85 GB, fp16 169M)
                give_back_freed_memory()
    if before_reference is not None:
        before_reference()
    with progress.stage(f"reference fp64 ({ckpt.arch.title}): the parity tokens in GPT mode, {N_GREEDY} greedy steps"):
        ref = SharedReference(ckpt.arch.reference(ckpt.tensors, torch.float64))
        fed = []
        for call in sequence_calls(tokens):  # the states judge_sequence reads after each call are kept
            fed += call
            ref.prefill(fed)
        if guess is not None:
            verify_greedy(ref, tokens, guess)
        recorded = record_reference(ref, tokens)
    held = [ref]

    def judged():
        """The gates that read the reference beyond `recorded`; the reference is let go after them."""
        ref = held.pop()
        probes = _probe_logits(ref, runs)
        for graph in graphs:
            if graph["kind"] == "sequence":
                with progress.stage(f"parity {graph['format']}/{graph['variant']} prompt graph vs the reference"):
                    graph["parity"] = judge_sequence(runs[graph["file"]], ref, target=graph["format"],
                                                     variant=graph["variant"], probe_logits=probes.get(graph["file"]))
                if has_embedding(graph):  # --embedding: the prompt graph's hidden / hidden_sum vs runtime_ref's
                    runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
                    try:
                        with progress.stage(f"the embedding of the {graph['format']}/{graph['variant']} prompt "
                                            "graph"):
                            graph["embedding"] = check_embedding(root, manifest, graph, runner, ref.model)
                    finally:
                        _close(runner)
        for graph in here:
            kept[graph["file"]] = runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
            with progress.stage(f"parity {graph['format']}/{graph['variant']}, embedding"):
                graph["parity"] = compare(runner, recorded, target=graph["format"], variant=graph["variant"],
                                          progress=progress)
                # --embedding: its vectors vs runtime_ref's hidden_seq (embed.py's gate)
                graph["embedding"] = check_embedding(root, manifest, graph, runner, ref.model)

    return recorded, judged


def _probe_logits(ref: SharedReference, runs: dict) -> dict:
    """file -> per call, the reference's logits over the state probe from the prompt graph's state after the call
    (parity.judge_sequence's probe_logits), for every graph's every call in one batched run. A state that is not
    finite or not the reference's size is left out (None): judge_sequence raises its own error for it."""
    import torch

    from .parity import state_probe

    want = ref.model.new_state()
    where, states = [], []
    for file, run in runs.items():
        for c, (_, state) in enumerate(run["outputs"]):
            arrays = {k: np.asarray(state.get(k, np.zeros(0)), np.float64) for k in want}
            if all(a.size == v.numel() and np.isfinite(a).all() for a, v in zip(arrays.values(), want.values())):
                where.append((file, c))
                states.append({k: torch.from_numpy(a.reshape(tuple(want[k].shape))).to(want[k].dtype)
                               for k, a in arrays.items()})
    logits = ref.logits_seq_many(state_probe(ref.vocab_size), states)
    out = {file: [None] * len(run["outputs"]) for file, run in runs.items()}
    for (file, c), rows in zip(where, logits or []):
        out[file][c] = rows
    return out


def _beside(first, second):
    """first() in a thread beside second() here (torch and onnxruntime release the GIL); second's value, once both
    are done; an error of either raised (first's before second's, the order they ran in one after the other)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(first)
        try:
            value, error = second(), None
        except Exception as e:
            value, error = None, e
        if fut.exception() is not None:
            raise fut.exception()
    if error is not None:
        raise error
    return value


def greedy_guess(runner, run: dict, n: int) -> list[int]:
    """A guess at the reference's greedy continuation after the parity tokens: the fp32 prompt graph's own, from its
    state after them (`run`: parity.run_sequence's), one token a call. verify_greedy checks it; a wrong guess costs
    time, never a number."""
    logits, state = run["outputs"][-1]
    guess = []
    for i in range(n):
        guess.append(int(np.asarray(logits).reshape(-1).argmax()))
        if i + 1 < n:
            logits, state = runner.forward([guess[-1]], state)
    return guess


def verify_greedy(ref: SharedReference, tokens: list[int], guess: list[int]) -> int:
    """Speculative verification of the reference's greedy continuation (parity.record_reference's N_GREEDY steps,
    each an fp64 step that casts every matrix: 0.15 s a step at 169M shapes): the whole guessed path in one GPT-mode
    run (SharedReference.prefill: the same equations as the steps, ~1e-16 apart), then the guess is kept as far as
    each guessed token is the argmax of the reference's logits before it. From the first token that is not, the
    reference steps as it always did (record_reference reads the logits prefilled along the kept part and steps
    the rest). The tokens and logits are the reference's own either way. Returns the tokens confirmed."""
    path = tuple(int(t) for t in tokens)
    ref.prefill(path + tuple(int(t) for t in guess))
    for i, tok in enumerate(guess):
        if int(np.asarray(ref._logits[path], dtype=np.float64).reshape(-1).argmax()) != int(tok):
            ref.prefill(path)  # the state where the steps start, from the longest kept prefix in GPT mode
            return i
        path = (*path, int(tok))
    return len(guess)


def eval_graph_entry(manifest: dict, graph: dict) -> dict | None:
    """The ONNX prompt graph of a step graph's variant, which quality.evaluate_against reads the eval text through
    as an eval graph (eval_graph.py), or None (--no-prompt, TFLite, TF.js: the text goes through the step graph)."""
    for g in manifest["graphs"]:
        if (g["kind"] == "sequence" and g["variant"] == graph["variant"] and g["format"] == graph["format"]
                and g["format"] in ("onnx", "ort") and str(g["file"]).endswith(".onnx") and "parts" not in g):
            return g
    return None


def _fp32_entries(manifest: dict) -> tuple:
    """(the fp32 ONNX step graph's entry, its prompt graph's, which the baseline's eval graph is made from), or None."""
    step = next((g for g in manifest["graphs"] if g["kind"] == "step" and g["variant"] == "fp32"
                 and g["format"] in ("onnx", "ort")), None)
    return step, (eval_graph_entry(manifest, step) if step is not None else None)


def _pending():
    from .quality import Pending

    return Pending


def _extend_baseline(root: Path, manifest: dict, base, rows: int, progress: Progress) -> None:
    """Read the fp32 eval graph on to row `rows` from the baseline's state (a variant's sequential gate reads on)."""
    from .eval_graph import EvalGraphRunner
    from .quality import EVAL_CHUNK

    if rows <= base.read:
        return
    _, seq = _fp32_entries(manifest)
    if seq is None and getattr(base, "stand_ins", {}).get("fp32") is not None:  # tf_quality's fp32 stand-in
        from .tf_quality import open_baseline

        evals = open_baseline(manifest, base.stand_ins["fp32"], CHECK_THREADS)[0]
    else:
        evals = EvalGraphRunner(root, manifest, seq, threads=CHECK_THREADS)
    with contextlib.closing(evals) as evals:
        with progress.stage(f"quality baseline: the fp32 eval graph on eval tokens {base.read}-{min(rows, base.fed)}"):
            base.extend(evals, rows, chunk=min(EVAL_CHUNK, evals.max_chunk))
    give_back_freed_memory()


def _baseline(root: Path, manifest: dict, ckpt, path: Path, eval_tokens, progress: Progress,
              sequential: bool = False, stand_in=None):
    """The fp32 side of every quality gate (quality.Baseline), computed once: by the fp32 prompt graph's eval graph
    where the folder has one (parity-gated against the fp64 reference at 1e-5 of std; the same cost as runtime_ref's
    fp32 GPT mode at 169M shapes, 26 s of CPU against 28 s, but the same session kind the variants are read by), its
    greedy continuation by the fp32 step graph; else by runtime_ref fp32 in GPT mode (freed after). `sequential`:
    the eval graph reads only the sequential gate's first level (parity.SEQ_LEVELS), the rest when a variant reads
    on (_extend_baseline). `stand_in`: where the folder has no fp32 ONNX prompt graph, tf_quality's fp32 stand-in
    (an ONNX eval graph with the checkpoint's fp32 weights, its greedy continuation fed one token a call) instead of
    runtime_ref."""
    from .parity import SEQ_LEVELS
    from .quality import DEFAULT_PROMPT_LEN, Baseline, level_rows
    from .runners import ReferenceRunner

    ids = eval_token_ids(root, manifest, eval_tokens)
    step, seq = _fp32_entries(manifest)
    upto = level_rows(len(ids) - 1, min(DEFAULT_PROMPT_LEN, len(ids)), SEQ_LEVELS)[0] if sequential else None
    if seq is None and stand_in is not None:
        from .tf_quality import open_baseline

        evals, steps = open_baseline(manifest, stand_in, CHECK_THREADS)
        try:
            return _read_baseline(evals, ids, path, upto, progress,
                                  "the fp32 stand-in (ONNX eval graph, the checkpoint's weights)",
                                  "fp32 stand-in (ONNX eval graph with the checkpoint's weights)", greedy_runner=steps)
        finally:
            evals.close()
    if seq is None:
        with progress.stage(f"quality baseline: runtime_ref fp32 on {len(ids)} tokens of eval text (GPT mode)"):
            base = Baseline.compute(ReferenceRunner(ckpt, "float32"), ids, path)
            base.source = "runtime_ref fp32"
            return base
    from .eval_graph import EvalGraphRunner

    def open_greedy():  # the fp32 step graph, once the eval graph's session is closed
        evals.close()
        return _opened(root, manifest, step)

    evals = EvalGraphRunner(root, manifest, seq, threads=CHECK_THREADS)
    try:
        return _read_baseline(evals, ids, path, upto, progress,
                              f"the fp32 eval graph ({seq['file']}, every token's logits)",
                              f"{seq['file']} (fp32 eval graph)", open_greedy=open_greedy)
    finally:
        evals.close()


def _read_baseline(evals, ids: list, path: Path, upto, progress: Progress, what: str, source: str, **greedy):
    """quality.Baseline.compute through an fp32 eval graph (`evals`) in its largest chunks, as one stage; `greedy`:
    how the baseline gets its greedy continuation (open_greedy or greedy_runner)."""
    from .quality import EVAL_CHUNK, Baseline

    chunk = min(EVAL_CHUNK, evals.max_chunk)
    read = len(ids) if upto is None else min(len(ids), upto + 1)
    with progress.stage(f"quality baseline: {what} on {read} of {len(ids)} tokens of eval text in chunks of {chunk}"):
        base = Baseline.compute(evals, ids, path, chunk=chunk, upto=upto, **greedy)
    base.source = source
    return base


def _quality(root: Path, manifest: dict, graph: dict, runner, base, resume=None, link_steps=None):
    """quality.evaluate_against of one step graph: through its variant's eval graph where it has one (then one
    session at a time: `runner`, an open step runner, or None to open one when needed), sequentially (a
    quality.Pending where it must read on past the baseline's rows: go on with resume=it)."""
    from .parity import quality_gate
    from .quality import evaluate_against, evaluate_in_chunks

    seq = eval_graph_entry(manifest, graph)
    stand_in = _stand_in(base, graph) if seq is None else None
    if stand_in is not None:  # TF.js fp16 / uint8, TFLite fp16: stand-ins; TFLite int8 / int4 sequentially
        from .tf_quality import evaluate

        gate = quality_gate(QUALITY_KIND.get(graph["variant"], graph["variant"]))
        return evaluate(root, manifest, graph, stand_in, base, gate=gate, resume=resume, threads=CHECK_THREADS,
                        steps=link_steps)
    if seq is None:
        if runner is not None:
            return evaluate_against(runner, base)
        with _opened(root, manifest, graph) as runner:
            return evaluate_against(runner, base)
    from .eval_graph import EvalGraphRunner

    def open_step():
        return contextlib.nullcontext(runner) if runner is not None else _opened(root, manifest, graph)

    def open_eval():
        return contextlib.closing(EvalGraphRunner(root, manifest, seq, threads=CHECK_THREADS))

    gate = quality_gate(QUALITY_KIND.get(graph["variant"], graph["variant"]))
    return evaluate_in_chunks(open_step, open_eval, base, gate=gate, resume=resume)


def _stand_in(base, graph: dict):
    """tf_quality's stand-in (or STEPS) for a step graph, which check_graphs put on the baseline, or None."""
    return getattr(base, "stand_ins", {}).get(graph["file"]) if base is not None else None


@contextlib.contextmanager
def _opened(root: Path, manifest: dict, graph: dict):
    runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
    try:
        yield runner
    finally:
        _close(runner)


def _judge(graph: dict, quality: dict | None) -> None:
    if quality is None:
        return
    from .quality import judge_quality

    kind = QUALITY_KIND.get(graph["variant"], graph["variant"])
    graph["quality"] = {"kind": "quality", "target": graph["format"], **judge_quality(quality, kind),
                        "variant": graph["variant"], "gate": kind, "eval_text": "tiny-pydoc-eval.txt",
                        "baseline": quality.get("baseline", "runtime_ref fp32")}


def _run_jobs(root: Path, manifest: dict, graphs: list, recorded, base, processes: int,
              progress: Progress) -> list:
    """Each step graph's parity and (for a variant other than fp32) raw quality report, in `processes` worker
    processes or here; the parity report goes into its graph entry, the quality reports are returned in order.
    In rounds: a variant whose sequential quality gate must read on past the baseline's rows comes back pending;
    the baseline reads on (in this process, from its state) and the variant goes on from its own, in a new job."""
    if not graphs:
        return []
    processes = min(processes, len(graphs))
    # the graphs with a quality gate take far longer (thousands of steps, not 96): started first, unless the baseline
    # they need is still being read (a _Later): then those without one start while it is
    later = isinstance(base, _Later)
    todo = sorted(range(len(graphs)), key=lambda i: (graphs[i]["variant"] == "fp32") != later)
    parity, quality, resume = [None] * len(graphs), [None] * len(graphs), {}
    what = f"{len(graphs)} step graph(s): parity" + (", quality" if base is not None else "")
    with progress.stage(f"checking {what}, in {processes} process(es)"):
        while todo:
            jobs = [(i, (root, manifest, graphs[i], base, resume.get(i))) for i in todo]
            if processes == 1:
                done = ((i, _graph_job(*_resolved(args), recorded=recorded)) for i, args in jobs)
            else:  # a fresh process each job: a process's peak is one graph's sessions, not every one it ran
                done = _Workers(min(processes, len(jobs)), recorded).map(jobs)
            for i, res in done:
                _report_done(progress, res, "" if processes == 1 else "in a worker process, ")
                parity[i] = res[0] if res[0] is not None else parity[i]
                quality[i] = res[1]
            todo = [i for i in todo if isinstance(quality[i], _pending())]
            resume = {i: quality[i] for i in todo}
            if todo:  # as far as the farthest needs (all stand at the same level: they started together)
                base = base() if isinstance(base, _Later) else base
                _extend_baseline(root, manifest, base, max(quality[i].need for i in todo), progress)
    for graph, p in zip(graphs, parity):
        graph["parity"] = p
    return quality


def _report_done(progress: Progress, result: tuple, where: str = "") -> tuple:
    _, _, desc, seconds, peak, cpu = result
    progress.note(f"{desc}: done in {seconds:.1f} s ({where}peak RSS {format_bytes(peak)}{cpu_note(cpu)})")
    return result


def _graph_job(root: Path, manifest: dict, graph: dict, base, resume=None, *, recorded) -> tuple:
    """One step graph, one session: (parity report or None where resumed, raw quality report (or quality.Pending)
    or None, what was done, seconds, peak RSS of this process, CPU seconds). `resume`: a quality.Pending to go on from (its
    parity was done)."""
    import time

    t0, c0 = time.perf_counter(), time.process_time()
    stepwise = eval_graph_entry(manifest, graph) is None and _stand_in(base, graph) is None
    parity = quality = None
    judged = graph["variant"] != "fp32" and base is not None
    steps = None  # the link guard's step-graph logits, run in this session (tf_quality.link_steps)
    if resume is None:
        with _opened(root, manifest, graph) as runner:
            parity = compare(runner, recorded, target=graph["format"], variant=graph["variant"])
            if judged and stepwise:
                quality = _quality(root, manifest, graph, runner, base)
            elif judged and isinstance(_stand_in(base, graph), tuple):  # (folder, entry): a stand-in's link guard
                from .tf_quality import link_steps

                steps = link_steps(runner, base)
        # the name held the session past the `with` (closing a runner only trims): under the eval graph's session
        # it doubled a job's peak (measured at 169M shapes: fp16 step 0.6 GB + eval graph 0.75 GB, 2.0 GB in all)
        del runner
        give_back_freed_memory()
    if judged and not stepwise:  # its sessions one at a time
        quality = _quality(root, manifest, graph, None, base, resume, link_steps=steps)
    name = f"{graph['format']}/{graph['variant']}"
    desc = f"parity {name}" + (" + quality" if quality else "") if parity is not None else f"quality {name} (read on)"
    if isinstance(quality, _pending()):
        look = quality.look
        desc += (f" on {look['tokens_read']} tokens of eval text: {look['gated_on']} {look['q']:.4g} "
                 f"+- {look['se']:.2g} against {look['gate']:g}, {look['why']}")
    elif quality:
        look = quality.get("sequential")
        desc += f" on {quality['tokens'] + 1} tokens of eval text" + (
            f" (eval graph, chunks of {quality['chunk']})" if "chunk" in quality else "") + (
            f": {look['gated_on']} {look['q']:.4g} +- {look['se']:.2g}, {look['stop']} at level {look['level']} "
            f"({look['why']})" if look else "")
    return parity, quality, desc, time.perf_counter() - t0, own_peak_rss(), time.process_time() - c0


def _resolved(args: tuple) -> tuple:
    """A job's arguments with a _Later (the baseline, read in a worker) waited for and replaced by its value; a job
    whose graph has no quality gate does not use it and does not wait (None in its place)."""
    graph = args[2]
    return tuple((a() if graph["variant"] != "fp32" else None) if isinstance(a, _Later) else a for a in args)


class _Job:
    """One job in a fresh worker process (_worker_main), started when made: `shared` (already pickled: for a step
    graph's job the recorded reference) and its pickled arguments are written to its stdin by a thread, so that a
    large argument does not hold the caller; result() reads the pickled (ok, value) from its stdout and raises a
    failed job's error as itself. Each a fresh interpreter (`python -c`, not multiprocessing, whose spawn re-imports
    the caller's main script and hangs on one without a __main__ guard)."""

    def __init__(self, target: str, args: tuple, shared: bytes = b""):
        import os
        import pickle
        import subprocess
        import sys
        import threading

        # this rwkv_export, wherever it was imported from, first on the worker's path
        here = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        # (and before the working directory, which `python -c` puts first: a checkout there is not this one)
        self.proc = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {here!r}); "
                                      f"from rwkv_export.check import _worker_main; _worker_main({target!r})"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": path})
        data = shared + pickle.dumps(args)
        self._feeder = threading.Thread(target=self._feed, args=(data,), daemon=True)
        self._feeder.start()

    def _feed(self, data: bytes) -> None:
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):  # the process ended (or was stopped): result() says so
            pass

    def result(self):
        import pickle

        try:
            ok, value = pickle.load(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError, ValueError):
            from .errors import RwkvExportError

            raise RwkvExportError(f"a check worker process ended unexpectedly (exit code {self.proc.wait()})") from None
        self.proc.wait()
        self._feeder.join()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                f.close()


class _Later:
    """The fp32 baseline being read in a worker process (a _Job of _baseline_job), its logits file in a temporary
    folder of its own: called, it waits for it (once, whichever thread asks first), notes its stage line and returns
    the Baseline (read on to the end here where extend_to_end). close() stops the worker and removes the folder."""

    def __init__(self, job: _Job, tmp, progress: Progress, root: Path, manifest: dict, eval_tokens, sequential: bool,
                 stand_ins: dict | None = None):
        import threading

        self.job, self.tmp, self.progress, self._lock, self._value = job, tmp, progress, threading.Lock(), None
        self.root, self.manifest, self.eval_tokens, self.sequential = root, manifest, eval_tokens, sequential
        self.stand_ins = stand_ins
        self.extend_to_end = False

    @classmethod
    def start(cls, root: Path, manifest: dict, eval_tokens, sequential: bool, progress: Progress,
              stand_ins: dict | None = None) -> "_Later":
        """`stand_ins`: tf_quality.prepare's, where the baseline is the fp32 stand-in's (a TF.js folder); they travel
        with the baseline to the jobs."""
        tmp = _tempdir()
        path = Path(tmp.name) / "fp32_logits.bin"
        stand_in = (stand_ins or {}).get("fp32")
        job = _Job("baseline", (root, manifest, None, path, eval_tokens, sequential, stand_in))
        return cls(job, tmp, progress, root, manifest, eval_tokens, sequential, stand_ins)

    def __call__(self):
        with self._lock:
            if self._value is None:
                base, desc, seconds, peak, cpu = self.job.result()
                if self.stand_ins is not None:
                    base.stand_ins = self.stand_ins
                self.progress.note(f"{desc}: done in {seconds:.1f} s (in a worker process, peak RSS "
                                   f"{format_bytes(peak)}{cpu_note(cpu)})")
                if self.extend_to_end:
                    _extend_baseline(self.root, self.manifest, base, base.fed, self.progress)
                self._value = base
            return self._value

    def close(self) -> None:
        self.job.close()
        self.tmp.cleanup()


def _tempdir():
    import tempfile

    return tempfile.TemporaryDirectory(prefix="rwkv-check-")


def _baseline_job(root: Path, manifest: dict, ckpt, path: Path, eval_tokens, sequential: bool,
                  stand_in=None) -> tuple:
    """_baseline in a worker process: (the Baseline, its stage's description, seconds, peak RSS of this process, CPU
    seconds)."""
    import time

    stage, c0 = _Recorder(), time.process_time()
    base = _baseline(root, manifest, ckpt, path, eval_tokens, stage, sequential=sequential, stand_in=stand_in)
    return base, stage.desc, stage.seconds, own_peak_rss(), time.process_time() - c0


class _Recorder(Progress):
    """A quiet Progress that keeps its (one) stage's description and time, for a worker to report back."""

    def __init__(self):
        super().__init__(enabled=False)
        self.desc, self.seconds = "", 0.0

    @contextlib.contextmanager
    def stage(self, desc: str):
        import time

        t0 = time.perf_counter()
        yield
        self.desc, self.seconds = desc, time.perf_counter() - t0


class _Workers:
    """Worker processes for _graph_job, a fresh one (_Job) for each job and at most `n` at a time, each reading the
    shared argument (the recorded reference) and then its one pickled job. One job a process because a process that
    ran one graph's sessions keeps memory from them (onnxruntime's arenas; measured at 169M shapes: a worker that
    checked fp32 and then fp16 peaked at 2.16 GB, one graph's sessions at ~0.8 GB). An error in a job is raised here
    as itself. A job's _Later argument (the baseline) is waited for before its process starts."""

    def __init__(self, n: int, shared):
        import pickle
        import threading

        self.n, self.shared = n, pickle.dumps(shared)
        self.jobs, self._lock, self._closed = set(), threading.Lock(), False

    def _start(self, args: tuple):
        with self._lock:
            if self._closed:
                return None
            job = _Job("graph", args, self.shared)
            self.jobs.add(job)
        return job

    def map(self, jobs: list):
        """(key, result) per (key, args) job, as they finish."""
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        def run(key_args):
            args = _resolved(key_args[1])
            job = self._start(args)
            if job is None:  # closed after another job's failure
                return None
            try:
                return key_args[0], job.result()
            finally:
                with self._lock:
                    self.jobs.discard(job)

        try:
            with ThreadPoolExecutor(self.n) as pool:
                futures = [pool.submit(run, job) for job in jobs]
                done = set()
                while len(done) < len(futures):
                    finished, _ = wait([f for f in futures if f not in done], return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        if fut.exception() is not None:
                            for f in futures:
                                f.cancel()
                            self.close()  # a worker busy with another job is stopped, not waited for
                            raise fut.exception()
                        done.add(fut)
                        yield fut.result()
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            jobs, self.jobs = list(self.jobs), set()
        for job in jobs:
            job.close()


def _worker_main(target: str) -> None:
    """A _Job's process ("graph": a step graph's job, "baseline": the fp32 baseline): its stdout carries only the
    pickled result (anything else printed goes to stderr)."""
    import os
    import pickle
    import sys

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    try:
        if target == "graph":
            recorded = pickle.load(inp)
            result = (True, _graph_job(*pickle.load(inp), recorded=recorded))
        else:
            result = (True, _baseline_job(*pickle.load(inp)))
    except Exception as e:  # sent back and raised in the caller
        result = (False, e)
    pickle.dump(result, out)
    out.flush()


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
                 update_manifest: bool = False, raise_on_fail: bool = True, processes: int | None = None) -> list[dict]:
    """`rwkv-export check`: every graph of the folder against the reference of its checkpoint (check_graphs, in
    `processes` side by side)."""
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
    reports = check_graphs(root, manifest, ckpt, progress=progress, raise_on_fail=False, processes=processes)
    if update_manifest:
        write_manifest(root, manifest)
    if raise_on_fail:
        gate_all(reports)
    return reports
