"""`rwkv-export check DIR`: re-run the gates of every graph in an export folder against runtime_ref.

- every step graph: the parity gate (parity.compare: shapes, finiteness, logits and greedy continuation vs the
  reference over N_TOKENS tokens, tolerance per (target, variant));
- every variant other than fp32 also gets the quality gate (quality.evaluate_variant on the eval text, against the
  reference in fp32: perplexity delta gated per variant kind, KL, top-1 and greedy agreement reported);
- every sequence (prompt) graph: parity.compare_sequence's gate (its logits and states vs T reference steps).

What does not depend on the graph is computed once, in this process: the fp64 reference's side of the parity gate
(its logits over the parity tokens in GPT mode, its greedy continuation: parity.record_reference) and the fp32
baseline's side of the quality gate (quality.Baseline, GPT mode over the eval text). Then each step graph, with one
session for its parity and quality gates, is checked in a pool of worker processes (one graph per worker at a time,
its session closed after), which needs neither reference model in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

from .embed import check_embedding, format_embedding, gate_embedding, has_embedding
from .manifest import read_manifest, write_manifest
from .parity import (N_GREEDY, compare, format_report, gate, judge_sequence, parity_tokens, record_reference,
                     run_sequence, sequence_calls)
from .progress import QUIET, Progress, format_bytes, peak_rss_bytes
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
                 processes: int | None = None) -> list[dict]:
    """Check each graph against the reference built from `ckpt`; store each report in its manifest entry ("parity",
    and "quality" for variants other than fp32). Returns the reports (per graph in manifest order: parity, quality,
    embedding). `processes`: worker processes for the step graphs (default: up to MAX_CHECK_PROCESSES, one per
    core; 1 checks them here, one after another); the reports are the same either way."""
    import os

    if processes is None:
        processes = min(MAX_CHECK_PROCESSES, os.cpu_count() or 1)
    with _torch_threads(CHECK_THREADS):
        reports = _check_graphs(Path(root), manifest, ckpt, progress, variants, eval_tokens, processes)
    if raise_on_fail:
        gate_all(reports)
    return reports


def _check_graphs(root: Path, manifest: dict, ckpt, progress: Progress, variants, eval_tokens,
                  processes: int) -> list[dict]:
    import tempfile

    graphs = [g for g in manifest["graphs"] if not variants or g["variant"] in variants]
    steps = [g for g in graphs if g["kind"] != "sequence"]
    here = [g for g in steps if has_embedding(g)]  # their embedding gate runs the fp64 model: checked in this process
    kept: dict[str, object] = {}  # file -> the open runner of a graph in `here`, for its quality gate
    try:
        recorded = _reference_side(root, manifest, ckpt, graphs, here, kept, progress)
        with tempfile.TemporaryDirectory(prefix="rwkv-check-") as tmp:
            base = None
            if any(g["variant"] != "fp32" for g in steps):
                base = _baseline(root, manifest, ckpt, Path(tmp) / "fp32_logits.bin", eval_tokens, progress)
            jobs = [g for g in steps if not has_embedding(g)]
            for graph, quality in zip(jobs, _run_jobs(root, manifest, jobs, recorded, base, processes, progress)):
                _judge(graph, quality)
            for graph in here:
                if graph["variant"] != "fp32":
                    from .quality import evaluate_against

                    with progress.stage(f"quality {graph['format']}/{graph['variant']} vs fp32"):
                        _judge(graph, evaluate_against(kept[graph["file"]], base))
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


def _reference_side(root: Path, manifest: dict, ckpt, graphs: list, here: list, kept: dict, progress: Progress):
    """Everything that runs the fp64 reference, which is freed after: its side of the step graphs' parity gate
    (recorded, returned), each prompt graph's parity gate (the graph run first and its session closed, so that
    no session is open beside the reference: at 169M shapes each is ~0.7 GB, as the fp64 model is 1.4 GB), and the
    parity and embedding gates of the graphs in `here`, whose runners are left open in `kept`."""
    import torch

    tokens, runs = parity_tokens(ckpt.dims.vocab_size), {}
    for graph in graphs:
        if graph["kind"] == "sequence":
            runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
            try:
                with progress.stage(f"running the {graph['format']}/{graph['variant']} prompt graph"):
                    runs[graph["file"]] = run_sequence(runner, tokens)
            finally:
                _close(runner)
    with progress.stage(f"reference fp64 ({ckpt.arch.title}): the parity tokens in GPT mode, {N_GREEDY} greedy steps"):
        ref = SharedReference(ckpt.arch.reference(ckpt.tensors, torch.float64))
        fed = []
        for call in sequence_calls(tokens):  # the states judge_sequence reads after each call are kept
            fed += call
            ref.prefill(fed)
        recorded = record_reference(ref, tokens)
    for graph in graphs:
        if graph["kind"] == "sequence":
            with progress.stage(f"parity {graph['format']}/{graph['variant']} prompt graph vs the reference"):
                graph["parity"] = judge_sequence(runs[graph["file"]], ref, target=graph["format"],
                                                 variant=graph["variant"])
            if has_embedding(graph):  # --embedding: the prompt graph's hidden / hidden_sum vs runtime_ref's
                runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
                try:
                    with progress.stage(f"the embedding of the {graph['format']}/{graph['variant']} prompt graph"):
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
    return recorded


def _baseline(root: Path, manifest: dict, ckpt, path: Path, eval_tokens, progress: Progress):
    """The fp32 side of every quality gate (quality.Baseline), computed once; the fp32 reference is freed after."""
    from .quality import Baseline
    from .runners import ReferenceRunner

    ids = eval_token_ids(root, manifest, eval_tokens)
    with progress.stage(f"quality baseline: runtime_ref fp32 on {len(ids)} tokens of eval text (GPT mode)"):
        return Baseline.compute(ReferenceRunner(ckpt, "float32"), ids, path)


def _judge(graph: dict, quality: dict | None) -> None:
    if quality is None:
        return
    from .quality import judge_quality

    kind = QUALITY_KIND.get(graph["variant"], graph["variant"])
    graph["quality"] = {"kind": "quality", "target": graph["format"], **judge_quality(quality, kind),
                        "variant": graph["variant"], "gate": kind, "eval_text": "tiny-pydoc-eval.txt",
                        "baseline": "runtime_ref fp32"}


def _run_jobs(root: Path, manifest: dict, graphs: list, recorded, base, processes: int,
              progress: Progress) -> list:
    """Each step graph's parity and (for a variant other than fp32) raw quality report, in `processes` worker
    processes or here; the parity report goes into its graph entry, the quality reports are returned in order."""
    if not graphs:
        return []
    processes = min(processes, len(graphs))
    # the graphs with a quality gate take far longer (thousands of steps, not 96): started first
    order = sorted(range(len(graphs)), key=lambda i: graphs[i]["variant"] == "fp32")
    results = [None] * len(graphs)
    what = f"{len(graphs)} step graph(s): parity" + (", quality" if base is not None else "")
    with progress.stage(f"checking {what}, in {processes} process(es)"):
        if processes == 1:
            for i in order:
                results[i] = _report_done(progress, _graph_job(root, manifest, graphs[i], recorded, base))
        else:
            with _Workers(processes, (recorded, base)) as workers:
                for i, res in workers.map([(i, (root, manifest, graphs[i])) for i in order]):
                    results[i] = _report_done(progress, res, "in a worker process, ")
    quality = []
    for graph, (parity, qual, _, _, _) in zip(graphs, results):
        graph["parity"] = parity
        quality.append(qual)
    return quality


def _report_done(progress: Progress, result: tuple, where: str = "") -> tuple:
    _, _, desc, seconds, peak = result
    progress.note(f"{desc}: done in {seconds:.1f} s ({where}peak RSS {format_bytes(peak)})")
    return result


def _graph_job(root: Path, manifest: dict, graph: dict, recorded, base) -> tuple:
    """One step graph, one session: (parity report, raw quality report or None, what was done, seconds, peak RSS
    of this process)."""
    import time

    from .quality import evaluate_against

    t0 = time.perf_counter()
    runner = make_runner(root, manifest, graph, threads=CHECK_THREADS)
    try:
        parity = compare(runner, recorded, target=graph["format"], variant=graph["variant"])
        quality = None
        if graph["variant"] != "fp32" and base is not None:
            quality = evaluate_against(runner, base)
    finally:
        _close(runner)
    desc = f"parity {graph['format']}/{graph['variant']}" + (
        f" + quality on {quality['tokens'] + 1} tokens of eval text" if quality else "")
    return parity, quality, desc, time.perf_counter() - t0, _own_peak_rss()


def _own_peak_rss() -> int:
    """This process's own peak resident memory: /proc's VmHWM, which starts afresh at exec, where ru_maxrss (what
    progress.peak_rss_bytes reads) carries the parent's peak into a worker process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


class _Workers:
    """Worker processes for _graph_job: each a fresh interpreter (`python -c`, not multiprocessing, whose spawn
    re-imports the caller's main script and hangs on one without a __main__ guard) reading pickled jobs on stdin and
    writing pickled results on stdout, started with the job's shared arguments (the recorded reference and the
    quality baseline, sent once). An error in a job is raised here as itself."""

    def __init__(self, n: int, shared: tuple):
        import os
        import pickle
        import subprocess
        import sys

        # this rwkv_export, wherever it was imported from, first on the worker's path
        path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
        self.procs = []
        try:
            for _ in range(n):
                proc = subprocess.Popen([sys.executable, "-c", "from rwkv_export.check import _worker_main; "
                                         "_worker_main()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env={**os.environ, "PYTHONPATH": path})
                self.procs.append(proc)
                pickle.dump(shared, proc.stdin)
                proc.stdin.flush()
        except BaseException:
            self.close()
            raise

    def map(self, jobs: list):
        """(key, result) per (key, args) job, as they finish; one job per worker at a time."""
        import pickle
        import queue
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        idle = self._idle = queue.Queue()
        for proc in self.procs:
            idle.put(proc)

        def run(job):
            proc = idle.get()
            if proc is None:  # closed after another job's failure
                return None
            try:
                pickle.dump(job[1], proc.stdin)
                proc.stdin.flush()
                ok, value = pickle.load(proc.stdout)
            except (EOFError, BrokenPipeError):
                from .errors import RwkvExportError

                raise RwkvExportError(f"a check worker process ended unexpectedly (exit code {proc.wait()})") from None
            idle.put(proc)
            if not ok:
                raise value
            return job[0], value

        with ThreadPoolExecutor(len(self.procs)) as pool:
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

    def close(self) -> None:
        for _ in self.procs:
            if hasattr(self, "_idle"):
                self._idle.put(None)  # a job thread waiting for a worker stops
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.close()
        for proc in self.procs:
            proc.stdin.close()  # end of jobs: each worker exits
        for proc in self.procs:
            proc.wait()
        self.procs = []


def _worker_main() -> None:
    """A _Workers process: its stdout carries only the pickled results (anything else printed goes to stderr)."""
    import os
    import pickle
    import sys

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    recorded, base = pickle.load(inp)
    while True:
        try:
            root, manifest, graph = pickle.load(inp)
        except EOFError:
            return
        try:
            result = (True, _graph_job(root, manifest, graph, recorded, base))
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
