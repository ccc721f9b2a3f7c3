"""RWKV-7 benchmark: quality of every variant on every target (trained v7-tiny-pydoc), speed at G1 0.1B shapes.

    python benchmarks/bench_v7.py [--work bench_out/v7] [--rounds 12] [--steps 96] [--prompt-rounds 5]
                                  [--targets onnx,tflite,tfjs] [--skip-quality] [--skip-speed] [--reuse] [--quick]

1. Quality: `builtin:v7-tiny-pydoc` (a 4-layer byte-level RWKV-7 trained on CPython's docstrings) exported per
   target with the library (export_onnx / export_target, fp16, int8, int4; TF.js has fp16 and uint8), then, per
   graph, the parity gate against runtime_ref in fp64 (parity.compare / compare_sequence, as `rwkv-export check`
   does) and, per variant, quality.evaluate_variant + judge_quality on the held-out eval text against the fp32 ONNX
   step graph (itself anchored to runtime_ref fp32 on the first --anchor-tokens tokens): perplexity, its increase,
   KL(fp32 || variant), top-1 agreement, greedy agreement, the gate and its verdict. A target or a variant whose
   export or runner fails gets a row "not available: <stage>: <error>".
2. Speed: a synthetic checkpoint with RWKV-7 G1 0.1B's exact shapes (12 x 768, head 64, ffn 3072, vocab 65536,
   rwkv_export/arch/rwkv7/synthetic.py "0.1b", bf16 .pth) exported to fp32 ONNX (step + prompt graph), then each
   variant added (add_variants, one at a time so a failing one is named); every export stage is timed. Decode tok/s
   per variant with 1 and 2 onnxruntime threads, and the `rwkv` pip package (`cpu fp32`, RWKV_V7_ON=1 set before its
   import, in its own process) decoding the same .pth token by token: each decoder in its own process, rows
   interleaved in rounds (bench_quant.interleaved). Prompt tok/s at T = 64 and 512 through each variant's prompt
   graph, beside the pip package's sequence mode (`forward(tokens, None)`): each row in a fresh process per round,
   rows interleaved and rotated (bench_prefill.child / timing_code).

Every table names the machine (lscpu model name, cores), the load average and the date; each cell is the median
and, in brackets, the range (decode: of the per-round medians; prompt: of all timed runs). The CPU is shared: compare
ratios (same run, interleaved), not absolutes. Everything printed on stdout is also written to --work/bench_v7.md.
--quick: a smoke run of every code path at tiny shapes (the "tiny" preset), few tokens and rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prefill  # noqa: E402  (shared helpers: child processes, prompt timing code, prompt-graph parity)
import bench_quant  # noqa: E402  (shared helpers: interleaved decoders in their own processes)
from rwkv_export.progress import Progress  # noqa: E402

QUALITY_SOURCE = "builtin:v7-tiny-pydoc"
VARIANTS = ("fp16", "int8", "int4")
# the variant each target writes for a row (TF.js's 8-bit format is uint8; it has no 4-bit one)
TARGET_NAMES = {"onnx": {"fp16": "fp16", "int8": "int8", "int4": "int4"},
                "tflite": {"fp16": "fp16", "int8": "int8", "int4": "int4"},
                "tfjs": {"fp16": "fp16", "int8": "uint8", "int4": None}}
PIP_ENV = {"RWKV_V7_ON": "1"}  # read by the package at import: its RWKV becomes RWKV_x070
BASELINE = "rwkv pip {}, cpu fp32 (baseline)"
TIMING_VOCAB = 50277  # bench_prefill.timing_code draws prompt tokens below this


# ---------------------------------------------------------------------------------------------------------- output

class Tables:
    """Print to stdout and keep every line for the file written at the end."""

    def __init__(self, path: Path):
        self.path, self.lines = path, []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        self.path.write_text("\n".join(self.lines) + "\n")


def machine() -> str:
    """CPU model and cores (lscpu), CPUs online, versions of the runtimes timed."""
    from importlib.metadata import version

    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
        info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in out.splitlines() if ":" in ln)}
    except (OSError, subprocess.SubprocessError):
        pass
    model = info.get("Model name") or platform.processor() or "unknown CPU"
    try:
        cores = f"{int(info['Core(s) per socket']) * int(info.get('Socket(s)', 1))} cores"
    except (KeyError, ValueError):
        cores = "cores unknown"
    vers = ", ".join(f"{p} {version(p)}" for p in ("onnxruntime", "torch", "rwkv"))
    return (f"{model} ({info.get('Vendor ID', '?')}, {info.get('Hypervisor vendor', 'bare metal')}), {cores}, "
            f"{os.cpu_count()} CPUs online, {platform.machine()}; Python {platform.python_version()}, {vers}")


def stamp(what: str) -> str:
    load = os.getloadavg()
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"{what}: {now}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min)"


def last_line(text: str, n: int = 160) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else str(text))[:n]


# ------------------------------------------------------------------------------------ staged jobs in own processes

class StageLog(Progress):
    """A Progress that prints each stage on stderr and records its time and outcome in a JSON file, so that the
    parent knows which stage of a job failed, after how long, with what error."""

    def __init__(self, path: Path):
        super().__init__(enabled=True)
        self.path, self.doc, self.t0 = Path(path), {"stages": [], "result": None, "error": None}, time.perf_counter()

    def iter(self, items, desc: str, total: int | None = None):
        return items  # no bars: the stage lines say enough, and the log stays readable

    __call__ = iter

    def dump(self) -> None:
        self.path.write_text(json.dumps(self.doc, default=lambda o: o.item() if hasattr(o, "item") else str(o)))

    @contextlib.contextmanager
    def stage(self, desc: str):
        ev = {"stage": desc, "status": "running", "seconds": None}
        self.doc["stages"].append(ev)
        self.dump()
        t = time.perf_counter()
        print(f"    {desc} ...", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException as e:
            ev.update(status="failed", seconds=time.perf_counter() - t, error=f"{type(e).__name__}: {e}")
            self.dump()
            raise
        ev.update(status="done", seconds=time.perf_counter() - t)
        self.dump()
        print(f"    {desc}: {ev['seconds']:.1f} s", file=sys.stderr, flush=True)


def _job_main(fn_name: str, args: tuple, log: str) -> None:
    prog = StageLog(Path(log))
    try:
        prog.doc["result"] = globals()[fn_name](*args, progress=prog)
    except BaseException as e:  # recorded for the parent, which prints it
        prog.doc["error"] = f"{type(e).__name__}: {e}"
        prog.doc["traceback"] = traceback.format_exc()[-4000:]
        prog.dump()
        print(prog.doc["traceback"], file=sys.stderr, flush=True)
        sys.exit(1)
    prog.doc["seconds"] = time.perf_counter() - prog.t0
    prog.dump()


def run_job(fn, args: tuple, log: Path) -> dict:
    """fn(*args, progress=StageLog) in a fresh process (its memory goes when it ends); the log's document: stages
    with seconds and status, the result, and the error with the stage it failed in."""
    import multiprocessing as mp

    log.unlink(missing_ok=True)
    t = time.perf_counter()
    p = mp.get_context("spawn").Process(target=_job_main, args=(fn.__name__, args, str(log)))
    p.start()
    p.join()
    doc = json.loads(log.read_text()) if log.exists() else {"stages": [], "result": None, "error": None}
    doc["wall_s"] = time.perf_counter() - t
    if p.exitcode != 0 and not doc.get("error"):
        doc["error"] = f"process ended with exit code {p.exitcode} (killed: out of memory?)"
    if doc.get("error"):  # the innermost: stages are listed as they started, an outer one before its inner ones
        failed = [s for s in doc["stages"] if s["status"] in ("failed", "running")]
        doc["failed_stage"] = failed[-1] if failed else None
    return doc


def failure(doc: dict) -> str:
    """'<stage> (after N s): <error>' of a failed job."""
    st = doc.get("failed_stage")
    where = f"{st['stage']} (after {st['seconds'] or doc['wall_s']:.0f} s)" if st else "before any stage"
    return f"{where}: {last_line(doc['error'])}"


# ------------------------------------------------------------------------------------------------------ 1. quality

def _graph_mb(root: Path, graph: dict) -> float:
    return sum((Path(root) / f).stat().st_size for f in dict.fromkeys([graph["file"], *graph["data_files"]])) / 1e6


def quality_job(target: str, out: str, variants: list, onnx_dir: str, n_eval: int, n_anchor: int,
                progress: Progress) -> dict:
    """Export `target` (fp32 + variants), gate every graph's parity against runtime_ref fp64, measure every
    non-baseline step graph's quality against the fp32 ONNX step graph on the eval text."""
    import torch

    torch.set_num_threads(1)  # runtime_ref at these shapes: 2 threads measured ~7x slower than 1 on the shared box
    from rwkv_export.check import QUALITY_KIND, _close, eval_token_ids, make_runner
    from rwkv_export.export import export_onnx, export_target
    from rwkv_export.manifest import find_graph, read_manifest
    from rwkv_export.parity import compare, compare_sequence
    from rwkv_export.quality import evaluate_variant, judge_quality
    from rwkv_export.runners import ReferenceRunner
    from rwkv_export.sources import Source

    if target == "onnx":
        export_onnx(QUALITY_SOURCE, out, quant=variants, check=False, force=True, progress=progress)
    else:
        export_target(target, QUALITY_SOURCE, out, quant=variants, check=False, force=True, progress=progress)
    out, man = Path(out), read_manifest(out)
    ckpt = Source(QUALITY_SOURCE).load()
    ref = ckpt.arch.reference(ckpt.tensors, torch.float64)
    onnx_dir = out if target == "onnx" else Path(onnx_dir)
    onnx_man = read_manifest(onnx_dir)
    baseline = make_runner(onnx_dir, onnx_man, find_graph(onnx_man, "fp32"))
    tokens = eval_token_ids(out, man, n_eval)
    rows = []
    for graph in man["graphs"]:
        row = {"kind": graph["kind"], "variant": graph["variant"], "mb": _graph_mb(out, graph)}
        with progress.stage(f"{target}/{graph['variant']} {graph['kind']} graph: load, parity vs runtime_ref fp64"):
            runner = make_runner(out, man, graph)
            cmp = compare_sequence if graph["kind"] == "sequence" else compare
            row["parity"] = cmp(runner, ref, target=graph["format"], variant=graph["variant"])
        try:
            if graph["kind"] == "step" and target == "onnx" and graph["variant"] == "fp32":
                with progress.stage(f"anchor: onnx/fp32 vs runtime_ref fp32 on {n_anchor} tokens"):
                    row["quality"] = evaluate_variant(runner, ReferenceRunner(ckpt, "float32"), tokens[:n_anchor])
            elif graph["kind"] == "step":
                with progress.stage(f"quality {target}/{graph['variant']} vs onnx/fp32 on {len(tokens)} tokens"):
                    rep = evaluate_variant(runner, baseline, tokens)
                kind = QUALITY_KIND.get(graph["variant"])
                row["quality"] = judge_quality(rep, kind) if kind else rep
        finally:
            _close(runner)
        rows.append(row)
    _close(baseline)
    return {"rows": rows, "eval_tokens": len(tokens)}


def quality_target(target: str, work: Path, onnx_dir: Path, n_eval: int, n_anchor: int) -> tuple[list, dict]:
    """The target's rows: all variants in one export; if that fails, one export per variant, so that the failing
    ones are named and the others still measured. Returns (rows, {variant: failure})."""
    names = [TARGET_NAMES[target][v] for v in VARIANTS if TARGET_NAMES[target][v]]
    print(f"quality: {target} ({', '.join(names)}) ...", file=sys.stderr, flush=True)
    doc = run_job(quality_job, (target, str(work / target), names, str(onnx_dir), n_eval, n_anchor),
                  work / f"{target}.log.json")
    if not doc["error"]:
        return doc["result"]["rows"], {}
    print(f"  {target}: {failure(doc)}; retrying one variant at a time", file=sys.stderr, flush=True)
    rows, failed = [], {"*all*": failure(doc)}
    for v in names:
        d = run_job(quality_job, (target, str(work / f"{target}-{v}"), [v], str(onnx_dir), n_eval, n_anchor),
                    work / f"{target}-{v}.log.json")
        if d["error"]:
            failed[v] = failure(d)
            continue
        for r in d["result"]["rows"]:  # this variant's graphs, and the fp32 ones once
            if r["variant"] == v or not any(x["variant"] == r["variant"] and x["kind"] == r["kind"] for x in rows):
                rows.append(r)
    return rows, failed


def onnx_baseline_dir(work: Path) -> Path | None:
    """The ONNX folder holding the fp32 baseline: the all-variants export, else the first per-variant one."""
    for name in ("onnx", *(f"onnx-{v}" for v in VARIANTS)):
        if (work / name / "manifest.json").exists():
            return work / name
    return None


def _parity_cell(rows: list, variant: str, kind: str) -> str:
    r = next((r for r in rows if r["variant"] == variant and r["kind"] == kind), None)
    if r is None:
        return "-"
    p = r["parity"]
    return f"{'PASS' if p['passed'] else 'FAIL'} {p['max_rel']:.1e}"


def quality(work: Path, targets: list, n_eval: int, n_eval_tfjs: int, n_anchor: int, emit: Tables) -> None:
    results = {"onnx": quality_target("onnx", work, work / "onnx", n_eval, n_anchor)}
    onnx_dir = onnx_baseline_dir(work)
    for target in [t for t in targets if t != "onnx"]:
        if onnx_dir is None:
            results[target] = ([], {"*": "no fp32 ONNX baseline (the ONNX export failed)"})
            continue
        n = min(n_eval, n_eval_tfjs) if target == "tfjs" else n_eval  # node answers one step per request: slow
        results[target] = quality_target(target, work, onnx_dir, n, n_anchor)
    emit(f"\n## RWKV-7 quality: {QUALITY_SOURCE} (4 layers, C=128, bytes; trained), held-out eval text")
    emit(stamp("measured"))
    onnx_rows = results["onnx"][0]
    anchor = next((r["quality"] for r in onnx_rows if r["kind"] == "step" and r["variant"] == "fp32"), None)
    q = next((r["quality"] for r in onnx_rows if r.get("quality") and r["variant"] != "fp32"), None)
    if q:
        emit(f"baseline: the fp32 ONNX step graph, perplexity {q['ppl_fp32']:.4f} on {q['tokens']} next-byte "
             f"predictions (state fed back); greedy: {q['greedy_tokens']} tokens after a {q['prompt_tokens']}-byte "
             f"prompt, counted to the first difference")
    if anchor:
        emit(f"anchor: fp32 ONNX vs runtime_ref fp32 on the first {anchor['tokens']} predictions: Δppl "
             f"{anchor['ppl_delta'] * 100:+.5f} %, KL {anchor['kl']:.1e}, top-1 {anchor['top1_agreement']:.4f}, "
             f"greedy {anchor['greedy_match']}/{anchor['greedy_tokens']}")
    emit("parity: each graph vs runtime_ref fp64 (rwkv_export.parity, the `rwkv-export check` gate): verdict and "
         "max|Δlogits|/std over 64 tokens (+32 greedy for step graphs); prompt = the prompt graph")
    emit("Δppl, KL, top-1, greedy: against the baseline over the same tokens (the 'tokens' column; TF.js: the first "
         "--tfjs-eval-tokens, so its ppl column is over that prefix)")
    emit("gate: quality.judge_quality, max perplexity increase per kind (fp16 0.1 %, int8 1 %, int4 5 %)\n")
    emit("| target | variant | MB | tokens | ppl | Δppl % | KL nats | top-1 | greedy | gate % | verdict | "
         "step parity | prompt parity |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for target, (rows, failed) in results.items():
        if "*" in failed:
            emit(f"| {target} | all | not available: {failed['*']} |")
            continue
        if "*all*" in failed and all(v in failed for v in TARGET_NAMES[target].values() if v):
            emit(f"| {target} | all | not available: {failed['*all*']} |")
            continue
        if "*all*" in failed:
            emit(f"| {target} | (all at once) | export with every variant failed: {failed['*all*']}; rows below: "
                 f"one export per variant |")
        shown = ["fp32"] * (target != "onnx") + [TARGET_NAMES[target][v] or v for v in VARIANTS]
        for v in shown:
            if target == "tfjs" and v == "int4":
                emit(f"| {target} | int4 | not available: TF.js has no 4-bit variant (export.TARGET_VARIANTS: "
                     f"fp16, uint8) |")
                continue
            if v in failed:
                emit(f"| {target} | {v} | not available: {failed[v]} |")
                continue
            r = next((r for r in rows if r["variant"] == v and r["kind"] == "step"), None)
            if r is None or not r.get("quality"):
                emit(f"| {target} | {v} | not available: no step graph of this variant in the export |")
                continue
            qr = r["quality"]
            gate = f"{qr['max_ppl_delta'] * 100:g}" + (" (on info loss)" if qr.get("gated_on") == "info_loss" else "") \
                if "max_ppl_delta" in qr else "-"
            verdict = ("PASS" if qr["passed"] else "FAIL") if "passed" in qr else "(fp32 vs onnx/fp32)"
            emit(f"| {target} | {v} | {r['mb']:.2f} | {qr['tokens']} | {qr['ppl']:.4f} | {qr['ppl_delta'] * 100:+.3f} | "
                 f"{qr['kl']:.2e} | {qr['top1_agreement']:.4f} | {qr['greedy_match']}/{qr['greedy_tokens']} | "
                 f"{gate} | {verdict} | {_parity_cell(rows, v, 'step')} | {_parity_cell(rows, v, 'sequence')} |")


# -------------------------------------------------------------------------------------------------------- 2. speed

def export_job(pth: str, out: str, quant: list, progress: Progress) -> dict:
    """`rwkv-export onnx --quant ... --no-check`: the step and prompt graphs of fp32 and each variant."""
    from rwkv_export.export import export_onnx

    export_onnx(pth, out, quant=quant, check=False, force=True, progress=progress)
    return {}


def _timed_export(work: Path, label: str, pth: Path, out: Path, quant: list, stages: list) -> dict:
    """One export job; its stages (and the whole job's wall time) appended to `stages` under `label`."""
    print(f"exporting {pth.name} -> {out.name} (fp32{''.join(', ' + q for q in quant)}) ...", file=sys.stderr,
          flush=True)
    doc = run_job(export_job, (str(pth), str(out), quant), work / f"export-{label}.log.json")
    stages += [(label, st) for st in doc["stages"]]
    stages.append((label, {"stage": "(whole job, process start included)", "seconds": doc["wall_s"],
                           "status": "failed" if doc["error"] else "done", "error": doc["error"] or ""}))
    return doc


def export_speed_model(work: Path, preset: str, reuse: bool) -> tuple[Path, dict, dict, list, bool]:
    """The synthetic .pth and its ONNX export, every stage timed: one `export_onnx(quant=fp16,int8,int4)`, as the
    CLI does; if that fails, fp32 alone and then each variant in an export of its own, so that the failing one is
    named and the others still timed. Returns (pth, {variant: folder}, {variant: failure}, stages, reused); the
    stage times are kept in speed-PRESET.export.json for --reuse."""
    pth = work / f"rwkv7-{preset}-synthetic.pth"
    exp = work / f"speed-{preset}"
    info_file = work / f"speed-{preset}.export.json"
    if reuse and info_file.exists():
        info = json.loads(info_file.read_text())
        folders = {v: Path(f) for v, f in info["folders"].items()}
        if all((f / "manifest.json").exists() for f in folders.values()):
            return pth, folders, info["failed"], info["stages"], True
    if not pth.exists():
        from rwkv_export.synthetic import make_checkpoint

        print(f"making {pth.name} ...", file=sys.stderr, flush=True)
        make_checkpoint(pth, preset, version="7")
    stages, failed = [], {}
    doc = _timed_export(work, "all", pth, exp, list(VARIANTS), stages)
    if not doc["error"]:
        folders = {v: exp for v in ("fp32", *VARIANTS)}
    else:
        failed["all at once"] = failure(doc)
        folders = {}
        d32 = _timed_export(work, "fp32", pth, exp, [], stages)
        if not d32["error"]:
            folders["fp32"] = exp
            for v in VARIANTS:
                d = _timed_export(work, v, pth, work / f"speed-{preset}-{v}", [v], stages)
                if d["error"]:
                    failed[v] = failure(d)
                else:
                    folders[v] = work / f"speed-{preset}-{v}"
        else:
            failed["fp32"] = failure(d32)
    info_file.write_text(json.dumps({"folders": {v: str(f) for v, f in folders.items()}, "failed": failed,
                                     "stages": stages}))
    return pth, folders, failed, stages, False


SANITY = """
import numpy as np, torch
os.environ.update({env!r})
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.runners import OnnxStepRunner
folders = {folders!r}
tokens = [int(t) for t in np.random.default_rng(0).integers(0, {vocab}, {n})]
def run(step, state):
    out = []
    for t in tokens:
        lg, state = step(t, state)
        out.append(np.asarray(lg, np.float64).reshape(-1))
    return np.array(out)
def vs(got, ref):
    return {{'rel': float((np.abs(got - ref).max(1) / ref.std(1)).max()), 'top1': float((got.argmax(1) == ref.argmax(1)).mean())}}
res, ref = {{}}, None
for v, root in folders.items():
    try:
        man = read_manifest(root, verify_files=False)
        t0 = time.perf_counter(); r = OnnxStepRunner(root, man, find_graph(man, v), threads=1); load = time.perf_counter() - t0
        t0 = time.perf_counter(); lg = run(r.step, r.new_state()); dt = time.perf_counter() - t0
        ref = lg if ref is None else ref
        res[v] = {{'load_s': load, 'first_ms': dt / len(tokens) * 1e3, **vs(lg, ref)}}
        del r
    except Exception as e:
        res[v] = {{'error': (type(e).__name__ + ': ' + str(e))[:300]}}
try:
    import contextlib
    torch.set_num_threads(1); torch.set_grad_enabled(False)
    with contextlib.redirect_stdout(sys.stderr):
        from rwkv.model import RWKV
        t0 = time.perf_counter(); model = RWKV({pip_model!r}, 'cpu fp32'); load = time.perf_counter() - t0
    t0 = time.perf_counter(); lg = run(lambda t, s: model.forward(t, s), None); dt = time.perf_counter() - t0
    res['pip'] = {{'load_s': load, 'first_ms': dt / len(tokens) * 1e3, 'cls': type(model).__name__, **vs(lg, ref)}}
except Exception as e:
    res['pip'] = {{'error': (type(e).__name__ + ': ' + str(e))[:300]}}
"""

PIP_SEQ_SETUP = """
import contextlib, torch
os.environ.update({env!r})
torch.set_grad_enabled(False)
torch.set_num_threads({threads})
with contextlib.redirect_stdout(sys.stderr):
    from rwkv.model import RWKV
    model = RWKV(model={model!r}, strategy='cpu fp32')
# x070 is TorchScript (whatever RWKV_JIT_ON says): its profiling executor optimizes a function on the second call
# of a shape; two calls per length before timing_code's own warm-up, so that no timed call is an optimizing one
for T in {lengths!r}:
    for _ in range(2):
        model.forward([int(t) % {vocab} for t in range(1, T + 1)], None)
"""


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def cell(s: tuple, digits: int = 1) -> str:
    return f"{s[0]:.{digits}f} [{s[1]:.{digits}f}-{s[2]:.{digits}f}]"


def decode(pth: Path, folders: dict, steps: int, rounds: int) -> tuple[dict, dict]:
    """{threads: {row: (median tok/s over all steps, min and max of the per-round median tok/s)}}, and per-thread
    failures. folders: variant -> its export folder."""
    from importlib.metadata import version

    from rwkv_export.manifest import find_graph, read_manifest

    base = BASELINE.format(version("rwkv"))
    res, failed = {}, {}
    for threads in (1, 2):
        print(f"decode: {len(folders) + 1} decoders interleaved, {threads} thread(s), {rounds} rounds ...",
              file=sys.stderr, flush=True)
        specs = {}
        for v, root in folders.items():
            man = read_manifest(root, verify_files=False)
            specs[f"onnx {v}"] = ("ort", (root / find_graph(man, v)["file"], man, threads))
        specs[base] = ("pip", (pth, threads, PIP_ENV))
        try:
            raw = bench_quant.interleaved(specs, steps, rounds, raw=True)
        except Exception as e:  # a decoder that does not start: name the error, time the others without it
            failed[threads] = f"{type(e).__name__}: {e}"
            continue
        res[threads] = {n: (1.0 / statistics.median([s for rnd in t for s in rnd]),
                            *summary([1.0 / statistics.median(rnd) for rnd in t])[1:]) for n, t in raw.items()}
    return res, failed


def prompt(pth: Path, folders: dict, lengths: list, rounds: int, runs: int, threads: int,
           vocab: int) -> tuple[dict, dict]:
    """{row: {T: (median, min, max) tok/s over all timed runs}}, {row: failure}; rows interleaved, rotated per
    round, each in a fresh process."""
    from importlib.metadata import version

    toks = "tokens" if vocab >= TIMING_VOCAB else f"[t % {vocab} for t in tokens]"  # --quick's tiny vocab
    seq_run = bench_prefill.SEQ_RUN.replace("forward(tokens", f"forward({toks}")
    specs = {f"onnx {v} prompt graph, {threads} threads":
             (bench_prefill.SEQ_SETUP.format(root=str(root), threads=threads, chunk=None, variant=v), seq_run)
             for v, root in folders.items()}
    specs[f"rwkv pip {version('rwkv')} forward(tokens) sequence mode, cpu fp32, torch {threads} threads"] = (
        PIP_SEQ_SETUP.format(env=PIP_ENV, threads=threads, model=str(pth.with_suffix("")), lengths=lengths,
                             vocab=vocab),
        f"model.forward({toks}, None)")
    runs_of, failed = {n: [] for n in specs}, {}
    names = list(specs)
    for rnd in range(rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            if name in failed:
                continue
            print(f"prompt round {rnd + 1}/{rounds}: {name} ...", file=sys.stderr, flush=True)
            setup, run_expr = specs[name]
            t = time.perf_counter()
            try:
                runs_of[name].append(bench_prefill.child(setup + bench_prefill.timing_code(run_expr, lengths, runs)))
            except Exception as e:
                failed[name] = f"round {rnd + 1}, after {time.perf_counter() - t:.0f} s: {last_line(e, 300)}"
    cells = {n: {T: summary([T / w for r in rs for w in r[str(T)]["walls"]]) for T in lengths}
             for n, rs in runs_of.items() if rs and n not in failed}
    return cells, failed


def speed(work: Path, preset: str, steps: int, rounds: int, prompt_rounds: int, prompt_runs: int, threads: int,
          lengths: list, reuse: bool, emit: Tables) -> None:
    from rwkv_export.manifest import find_graph, read_manifest

    t_start = stamp("started")
    pth, folders, failed, stages, reused = export_speed_model(work, preset, reuse)
    emit(f"\n## RWKV-7 export at the '{preset}' shapes (synthetic bf16 .pth, {pth.stat().st_size / 1e6:.0f} MB): "
         f"stage times{' (reused: measured by an earlier run)' if reused else ''}")
    emit(t_start)
    emit("\n| variant | stage | s | status |\n|---|---|---|---|")
    for v, s in stages:
        err = f": {last_line(s.get('error', ''), 200)}" if s["status"] == "failed" else ""
        secs = f"{s['seconds']:.1f}" if s["seconds"] is not None else "-"
        emit(f"| {v} | {s['stage']} | {secs} | {s['status']}{err} |")
    for v, f in failed.items():
        emit(f"| {v} | FAILED | - | {f} |")
    if "fp32" not in folders:
        emit("\nno fp32 export: nothing to time")
        return
    manifest = read_manifest(folders["fp32"], verify_files=False)
    dims = manifest["model"]
    vocab = int(dims["vocab_size"])

    print("sanity: every variant and the pip package vs onnx fp32 ...", file=sys.stderr, flush=True)
    try:
        san = bench_prefill.child(SANITY.format(env=PIP_ENV, folders={v: str(f) for v, f in folders.items()},
                                                vocab=vocab, n=16, pip_model=str(pth.with_suffix(""))))
    except RuntimeError as e:
        san = {"*": {"error": last_line(e, 300)}}
    seq_par = None
    if vocab >= TIMING_VOCAB:
        print("parity: prompt graph vs step graph (bench_prefill.parity) ...", file=sys.stderr, flush=True)
        try:
            seq_par = bench_prefill.parity(folders["fp32"])
        except RuntimeError as e:
            seq_par = {"error": last_line(e, 300)}
    bad = [v for v in folders if "error" in san.get(v, {})]
    timed = {v: f for v, f in folders.items() if v not in bad}

    dec, dec_failed = decode(pth, timed, steps, rounds)
    pro, pro_failed = prompt(pth, timed, lengths, prompt_rounds, prompt_runs, threads, vocab)
    t_end = stamp("ended")

    emit(f"\n## RWKV-7 speed at the '{preset}' shapes: {dims.get('n_layer')} layers x {dims.get('n_embd')}, "
         f"vocab {vocab} (synthetic weights), CPU")
    emit(f"machine: {machine()}")
    emit(t_start)
    emit(t_end)
    emit("\nsanity, 16 tokens from a fresh state, 1 thread, each vs onnx fp32 (max|Δlogits|/std, top-1 same):")
    for v in [*folders, "pip"]:
        s = san.get(v, san.get("*", {}))
        if "error" in s:
            emit(f"- {v}: FAILED: {s['error']}")
        else:
            emit(f"- {v if v != 'pip' else 'rwkv pip ' + s.get('cls', '')}: session/model load {s['load_s']:.1f} s, "
                 f"{s['first_ms']:.0f} ms/token over the first 16 (untimed warm-up), Δ {s['rel']:.1e}, top-1 "
                 f"{s['top1']:.2f}")
    if seq_par:
        emit("- prompt graph fp32 vs step graph fp32, 64 tokens: " + (
            f"FAILED: {seq_par['error']}" if "error" in seq_par else
            f"max|Δlogits|/std {seq_par['logits_rel']:.1e}, worst state {seq_par['state_rel']:.1e}, top-1 "
            f"{'same' if seq_par['top1_same'] else 'DIFFERS'}"))

    base = next((n for n in next(iter(dec.values()), {}) if n.startswith("rwkv pip")), None)
    emit(f"\n### Decode: tok/s, median step over {steps} timed steps per row and thread count after "
         f"{bench_quant.WARMUP} warm-up, [range of the {rounds} per-round medians]; rows interleaved in {rounds} "
         f"rounds, each decoder in its own process; ratios on medians, same thread count\n")
    emit("| row | MB | 1 thread | 2 threads | x fp32 1t | x fp32 2t | x rwkv 1t | x rwkv 2t |")
    emit("|---|---|---|---|---|---|---|---|")
    rows = [f"onnx {v}" for v in timed] + ([base] if base else [])
    for row in rows:
        if row == base:
            mb = pth.stat().st_size / 1e6
        else:
            root = timed[row[5:]]
            mb = _graph_mb(root, find_graph(read_manifest(root, verify_files=False), row[5:]))
        c = [cell(dec[t][row]) if t in dec else "-" for t in (1, 2)]
        ratio = [f"{dec[t][row][0] / dec[t][ref][0]:.2f}" if t in dec else "-"
                 for ref in ("onnx fp32", base) for t in (1, 2)]
        emit(f"| {row} | {mb:.0f} | {c[0]} | {c[1]} | {' | '.join(ratio)} |")
    for t, f in dec_failed.items():
        emit(f"| (all rows, {t} thread(s)) | - | FAILED: {last_line(f, 300)} |")
    for v in bad:
        emit(f"| onnx {v} | - | not timed: its session failed in the sanity run: {san[v]['error']} |")

    pbase = next((n for n in pro if n.startswith("rwkv pip")), None)
    pfp32 = next((n for n in pro if n.startswith("onnx fp32")), None)
    emit(f"\n### Prompt: tok/s from a fresh state to the last token's logits, median [range] over "
         f"{prompt_rounds} rounds x {prompt_runs} timed runs (one warm-up per length and process; the pip package "
         f"two more: TorchScript optimizes on a shape's second call), each row in a fresh process per round, rows "
         f"rotated; prompt graph chunks <= its max_chunk; tokens random ids < {min(vocab, TIMING_VOCAB)}\n")
    head = " | ".join(f"T={T}" for T in lengths)
    ratios = " | ".join(f"x fp32 T={T} | x rwkv T={T}" for T in lengths)
    emit(f"| row | {head} | {ratios} |")
    emit("|---|" + "---|" * (3 * len(lengths)))
    for name, c in pro.items():
        rr = [f"{c[T][0] / pro[pfp32][T][0]:.2f} | {c[T][0] / pro[pbase][T][0]:.2f}" if pfp32 and pbase else "- | -"
              for T in lengths]
        emit(f"| {name} | {' | '.join(cell(c[T]) for T in lengths)} | {' | '.join(rr)} |")
    for name, f in pro_failed.items():
        emit(f"| {name} | FAILED: {f} |")


# ----------------------------------------------------------------------------------------------------------- main

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "bench_out" / "v7")
    p.add_argument("--steps", type=int, default=96, help="timed decode steps per row and thread count")
    p.add_argument("--rounds", type=int, default=12, help="rounds the decode steps are interleaved in")
    p.add_argument("--prompt-rounds", type=int, default=5, help="prompt rounds (each row in a fresh process)")
    p.add_argument("--prompt-runs", type=int, default=3, help="timed runs per length in each prompt round")
    p.add_argument("--threads", type=int, default=2, help="threads of the prompt rows")
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 512], help="prompt lengths T")
    p.add_argument("--preset", default="0.1b", help="RWKV-7 synthetic preset for the speed tables")
    p.add_argument("--eval-tokens", type=int, default=None, help="eval text bytes for the quality table (all)")
    p.add_argument("--tfjs-eval-tokens", type=int, default=1000,
                   help="at most this many for TF.js (its runner answers one step per node request: ~0.1 s here)")
    p.add_argument("--anchor-tokens", type=int, default=1000,
                   help="eval bytes on which fp32 ONNX is compared with runtime_ref fp32 (slow: ~20 ms/token)")
    p.add_argument("--targets", default="onnx,tflite,tfjs", help="quality targets (onnx always)")
    p.add_argument("--reuse", action="store_true", help="reuse the speed export an earlier run made in --work")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 'tiny' shapes, 8 steps in 2 rounds, 1 prompt round, T = 16 80, 256 eval bytes")
    a = p.parse_args()
    if a.quick:
        a.preset, a.steps, a.rounds, a.prompt_rounds, a.prompt_runs = "tiny", 8, 2, 1, 1
        a.lengths, a.eval_tokens, a.anchor_tokens = [16, 80], a.eval_tokens or 256, min(a.anchor_tokens, 64)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    emit = Tables(a.work / "bench_v7.md")
    emit(f"# bench_v7 ({' '.join(sys.argv[1:]) or 'defaults'})")
    emit(f"machine: {machine()}")
    emit(stamp("started"))
    t0 = time.perf_counter()
    if not a.skip_quality:
        qwork = a.work / "quality"
        shutil.rmtree(qwork, ignore_errors=True)
        qwork.mkdir(parents=True)
        targets = [t.strip() for t in a.targets.split(",") if t.strip()]
        quality(qwork, targets, a.eval_tokens or 10**9, a.tfjs_eval_tokens, a.anchor_tokens, emit)
    if not a.skip_speed:
        speed(a.work, a.preset, a.steps, a.rounds, a.prompt_rounds, a.prompt_runs, a.threads, sorted(a.lengths),
              a.reuse, emit)
    emit(f"\n(total {time.perf_counter() - t0:.0f} s; tables also in {a.work / 'bench_v7.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
