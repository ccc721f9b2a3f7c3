"""Quantized ONNX variants: size, decode speed (169M shapes) and quality (tiny-pydoc), in one run.

    python benchmarks/bench_quant.py [--work bench_out/quant] [--steps 96] [--rounds 12] [--skip-speed] [--skip-quality]

1. Speed: the synthetic checkpoint with RWKV-4-Pile-169M's exact shapes (rwkv_export.synthetic, "169m"), exported to
   fp32 ONNX, then every variant; decode tok/s in onnxruntime (single-token step graph, state fed back, median of
   per-step times after warm-up) with 1 and 2 intra-op threads; the `rwkv` pip package's `cpu fp32` strategy on the
   same checkpoint as the outside baseline. All rows are timed interleaved (rounds of a few steps each), so that the
   shared machine's load drift lands on every row alike.
2. Quality: the trained tiny-pydoc model (rwkv_export/data), every variant against fp32 on the held-out eval text:
   perplexity, its increase, KL(fp32||variant), top-1 agreement, greedy agreement, and the gate.
3. Web: if node and web_demo/node_modules/onnxruntime-web are present, the tiny-pydoc variants run in
   onnxruntime-web (wasm) and are compared with native onnxruntime on the same tokens.

The CPU is shared on the dev box: the load average is printed with the speed table; compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 5  # steps before timing: session arenas, first-call kernel packing
FAST_QUANTILE = 0.1  # besides the median step, the 10th-percentile step: an estimate of the uncontended speed when
# other processes share the two cores (their load comes in bursts; the fastest steps ran between them)
# (label, kind, options); kind None = the fp32 export itself
VARIANTS = [
    ("fp32", None, {}),
    ("int8 dynamic-int7 per-channel (default)", "int8", {}),
    ("int8 dynamic-int7 per-tensor", "int8", {"per_channel": False}),
    ("int8 dynamic-uint8 per-channel", "int8", {"method": "dynamic-uint8"}),
    ("int8 matmul-nbits b128 acc4", "int8", {"method": "matmul-nbits", "block_size": 128}),
    ("int8 matmul-nbits b32 acc4", "int8", {"method": "matmul-nbits", "block_size": 32}),
    ("int8 qdq (DQ->MatMul, per-column)", "int8", {"method": "qdq"}),
    ("int4 b128 acc4 (default)", "int4", {}),
    ("int4 b128 acc4 +embedding", "int4", {"include_embedding": True}),
    ("int4 b64 acc4", "int4", {"block_size": 64}),
    ("int4 b32 acc4", "int4", {"block_size": 32}),
    ("int4 b32 acc0", "int4", {"block_size": 32, "accuracy_level": 0}),
]
# measured ~0.8 tok/s (level 0 dequantizes to fp32 on every call on AVX2): too slow to time, kept out of the table
NOT_TIMED = {"int8 matmul-nbits acc0": "~0.8 tok/s at 169M shapes, 1 thread"}


def quantize(kind, src: Path, dst: Path, options: dict) -> dict:
    from rwkv_export.quantize import quantize_int4, quantize_int8

    return (quantize_int8 if kind == "int8" else quantize_int4)(src, dst, **options)


def variant_files(export_dir: Path, tag: str) -> list[tuple[str, str, Path, dict]]:
    src = export_dir / "model.onnx"
    out = []
    for i, (label, kind, options) in enumerate(VARIANTS):
        if kind is None:
            out.append((label, "fp32", src, {}))
            continue
        dst = export_dir / f"{tag}-{i}.onnx"
        t = time.perf_counter()
        info = quantize(kind, src, dst, options)
        print(f"  {label}: quantized in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        out.append((label, kind, dst, info))
    return out


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rates(times: list[float]) -> tuple[float, float]:
    """(tok/s of the median step, tok/s of the FAST_QUANTILE step) over the timed steps."""
    t = sorted(times)
    return 1.0 / statistics.median(t), 1.0 / t[int(FAST_QUANTILE * (len(t) - 1))]


class OrtDecoder:
    """Greedy decode in onnxruntime, one step per call, state fed back; `step()` returns the step's seconds."""

    def __init__(self, path: Path, manifest: dict, threads: int):
        import numpy as np

        self.np = np
        self.sess = ort_session(path, threads)
        self.state = {t["name"]: np.full(t["shape"], t["init"], np.float32) for t in manifest["state"]["tensors"]}
        self.names = [t["name"] for t in manifest["state"]["tensors"]]
        self.tok = 0

    def step(self) -> float:
        t = time.perf_counter()
        out = self.sess.run(None, {"token": self.np.array([self.tok], self.np.int64), **self.state})
        dt = time.perf_counter() - t
        self.state = dict(zip(self.names, out[1:]))
        self.tok = int(out[0].argmax())
        return dt


class PipDecoder:
    """The `rwkv` pip package, strategy "cpu fp32" (JIT and CUDA off), the same greedy loop. `env`: more switches
    set before the import, where the package reads them (RWKV_V7_ON=1 selects its RWKV-7 class)."""

    def __init__(self, pth: Path, threads: int, env: dict | None = None):
        import contextlib

        os.environ["RWKV_JIT_ON"] = "0"
        os.environ["RWKV_CUDA_ON"] = "0"
        os.environ.update(env or {})
        import torch

        with contextlib.redirect_stdout(sys.stderr):  # its banners ("Loading ...") stay out of the tables
            from rwkv.model import RWKV

            kwargs = {} if (env or {}).get("RWKV_V7_ON") == "1" else {"verbose": False}  # x070 takes no verbose
            self.model = RWKV(model=str(pth.with_suffix("")), strategy="cpu fp32", **kwargs)
        self.torch = torch
        torch.set_num_threads(threads)  # its own process (interleaved()): set once
        self.state, self.tok = None, 0

    def step(self) -> float:
        with self.torch.no_grad():
            t = time.perf_counter()
            out, self.state = self.model.forward([self.tok], self.state)
            dt = time.perf_counter() - t
        self.tok = int(out.argmax())
        return dt


def _decoder_worker(conn, kind: str, args: tuple) -> None:
    """One decoder in its own process: build it, then run the number of steps asked, answering their times."""
    decoder = OrtDecoder(*args) if kind == "ort" else PipDecoder(*args)
    conn.send("ready")
    while (n := conn.recv()) is not None:
        conn.send([decoder.step() for _ in range(n)])


def interleaved(specs: dict, steps: int, rounds: int, raw: bool = False) -> dict:
    """Each decoder (name -> (kind, args)) in its own process, as an app would run it; WARMUP steps, then `steps`
    timed steps in `rounds` rounds, every round visiting the decoders in a rotated order. Load on a shared machine
    drifts over minutes: interleaving spreads it over every row alike, where timing one variant after another would
    hand each its own slice of the drift. (Decoders sharing one process measured slower with 2 threads: the idle
    sessions' thread pools compete for the second core.) Returns name -> rates(); with raw, name -> the step times
    of each round (a list per round)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    try:
        for name, (kind, args) in specs.items():
            parent, child_end = ctx.Pipe()
            procs[name] = ctx.Process(target=_decoder_worker, args=(child_end, kind, args), daemon=True)
            procs[name].start()
            conns[name] = parent
            if parent.recv() != "ready":
                raise RuntimeError(f"decoder {name} did not start")
        names = list(specs)
        for n in names:
            conns[n].send(WARMUP)
            conns[n].recv()
        times = {n: [] for n in names}
        per_round = max(1, steps // rounds)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                time.sleep(SWITCH_PAUSE_S)
                conns[n].send(per_round)
                times[n].append(conns[n].recv())
        if raw:
            return times
        return {n: rates([s for rnd in t for s in rnd]) for n, t in times.items()}
    finally:
        for c in conns.values():
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in procs.values():
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


BASELINE = "rwkv pip 0.8.32, cpu fp32 (baseline)"
# Before each decoder's turn: the previous decoder's idle worker threads (onnxruntime's spin-wait after a run, torch's
# OpenMP pool) must have parked, or they take the second core from the next decoder's first steps.
SWITCH_PAUSE_S = 0.2


def speed(work: Path, steps: int, rounds: int) -> None:
    from rwkv_export.export import export_onnx
    from rwkv_export.synthetic import make_checkpoint

    pth = work / "rwkv4-169m-synthetic.pth"
    if not pth.exists():
        make_checkpoint(pth, "169m")
    exp = work / "169m"
    if not (exp / "model.onnx").exists():
        print("exporting the 169M-shape checkpoint (fp32) ...", file=sys.stderr, flush=True)
        export_onnx(str(pth), exp, tokenizer="bytes", check=False, force=True)
    manifest = json.loads((exp / "manifest.json").read_text())
    files = variant_files(exp, "169m")
    res = {}
    for threads in (1, 2):
        print(f"  timing {len(files) + 1} decoders interleaved, {threads} thread(s) ...", file=sys.stderr, flush=True)
        specs = {label: ("ort", (path, manifest, threads)) for label, _, path, _ in files}
        specs[BASELINE] = ("pip", (pth, threads))
        res[threads] = interleaved(specs, steps, rounds)
    rows = [(label, path.stat().st_size / 1e6) for label, _, path, _ in files] + [(BASELINE, pth.stat().st_size / 1e6)]
    fp1, fp2, base1 = res[1][rows[0][0]][0], res[2][rows[0][0]][0], res[1][BASELINE][0]
    print(f"\n## Decode speed, 169M shapes (synthetic weights), onnxruntime CPU; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"tok/s of the median step (and of the p{FAST_QUANTILE * 100:.0f} step: less contention); ratios on medians; "
          f"{steps} timed steps per row and thread count, all rows interleaved in {rounds} rounds")
    print(f"{'variant':44s} {'size MB':>8s} {'1 thread':>15s} {'2 threads':>15s} {'x fp32 1t':>9s} {'x fp32 2t':>9s}"
          f" {'x rwkv 1t':>9s} {'x rwkv 2t':>9s}")
    for label, mb in rows:
        r1, r2 = res[1][label], res[2][label]
        print(f"{label:44s} {mb:8.1f} {r1[0]:7.1f} ({r1[1]:5.1f}) {r2[0]:7.1f} ({r2[1]:5.1f}) {r1[0] / fp1:9.2f} "
              f"{r2[0] / fp2:9.2f} {r1[0] / base1:9.2f} {r2[0] / res[2][BASELINE][0]:9.2f}")
    for label, note in NOT_TIMED.items():
        print(f"{label:44s} not timed: {note}")


def quality(work: Path, n_tokens: int | None) -> tuple[list, Path, dict]:
    from rwkv_export.export import export_onnx
    from rwkv_export.quality import check_quality, evaluate_variant, format_quality
    from rwkv_export.errors import ParityToleranceError
    from rwkv_export.runners import OnnxStepRunner
    from rwkv_export.arch.rwkv4.train import EVAL_TEXT, MODEL_FILE

    exp = work / "tiny-pydoc"
    export_onnx(str(MODEL_FILE), exp, check=True, force=True)
    manifest = json.loads((exp / "manifest.json").read_text())
    graph = manifest["graphs"][0]
    tokens = list(EVAL_TEXT.read_bytes())[:n_tokens]
    fp32 = OnnxStepRunner(exp, manifest, graph, threads=1)
    print(f"\n## Quality on tiny-pydoc (rwkv_export/data), held-out eval text, {len(tokens)} bytes, state fed back")
    print(f"{'variant':44s} {'size KB':>8s} {'ppl':>8s} {'Δppl %':>8s} {'KL nats':>9s} {'top1':>7s} {'greedy':>7s}"
          f" {'gate %':>7s}  verdict")
    files = variant_files(exp, "tiny")
    for label, kind, path, info in files:
        runner = fp32 if kind == "fp32" else OnnxStepRunner(exp, manifest, {**graph, "file": path.name}, threads=1)
        rep = evaluate_variant(runner, fp32, tokens)
        gate, verdict = "", ""
        if kind != "fp32":
            try:
                rep = check_quality(rep, kind)
                verdict = "PASS"
            except ParityToleranceError:
                verdict = "FAIL"
            gate = f"{rep.get('max_ppl_delta', 0) * 100:g}" if "max_ppl_delta" in rep else ""
        print(f"{label:44s} {path.stat().st_size / 1e3:8.1f} {rep['ppl']:8.4f} {rep['ppl_delta'] * 100:+8.3f} "
              f"{rep['kl']:9.2e} {rep['top1_agreement']:7.4f} {rep['greedy_match']:3d}/{rep['greedy_tokens']:<3d} "
              f"{gate:>7s}  {verdict}", flush=True)
    return [(label, path) for label, _, path, _ in files], exp, manifest


WEB_APART = 1e-4
WEB_SCRIPT = r"""
import * as ort from '%(ort)s';
import fs from 'node:fs';
const [modelPath, tokensPath, statePath] = process.argv.slice(2);
ort.env.wasm.numThreads = 1;
const tokens = JSON.parse(fs.readFileSync(tokensPath, 'utf8'));
const init = JSON.parse(fs.readFileSync(statePath, 'utf8'));
const session = await ort.InferenceSession.create(fs.readFileSync(modelPath));
let state = {};
for (const t of init) state[t.name] = new ort.Tensor('float32', new Float32Array(t.shape[0] * t.shape[1]).fill(t.init), t.shape);
const out = [];
for (const tok of tokens) {
  const feeds = {token: new ort.Tensor('int64', BigInt64Array.from([BigInt(tok)]), [1]), ...state};
  const r = await session.run(feeds);
  out.push(Array.from(r.logits.data));
  for (const t of init) state[t.name] = r[t.name + '_out'];
}
process.stdout.write(JSON.stringify(out));
"""


def web(files, exp: Path, manifest: dict, n_tokens: int) -> None:
    import numpy as np

    from rwkv_export.runners import OnnxStepRunner
    from rwkv_export.arch.rwkv4.train import EVAL_TEXT

    ort_web = ROOT / "web_demo" / "node_modules" / "onnxruntime-web" / "dist" / "ort.node.min.mjs"
    if not ort_web.exists():
        ort_web = ROOT / "web_demo" / "node_modules" / "onnxruntime-web" / "dist" / "ort.min.mjs"
    if shutil.which("node") is None or not ort_web.exists():
        print("\n## onnxruntime-web: not measured (needs node and web_demo/node_modules; npm ci --prefix web_demo)")
        return
    script = exp / "web_run.mjs"
    script.write_text(WEB_SCRIPT % {"ort": ort_web.as_uri()})
    tokens = list(EVAL_TEXT.read_bytes())[:n_tokens]
    (exp / "tokens.json").write_text(json.dumps(tokens))
    (exp / "state.json").write_text(json.dumps(manifest["state"]["tensors"]))
    graph = manifest["graphs"][0]
    print(f"\n## onnxruntime-web (wasm, node) vs native onnxruntime, same file, {n_tokens} tokens, state fed back")
    print(f"max|Δ|/std per token; 'apart' = tokens whose logits differ by more than {WEB_APART:g} of std (float rounding "
          "alone stays near 1e-6; a larger gap means an int8 activation rounded to a different step somewhere)")
    print(f"{'variant':44s} {'max|Δ|/std':>11s} {'apart':>7s} {'first apart':>11s} {'top1 same':>9s}")
    for label, path in files:
        r = subprocess.run(["node", str(script), str(path), str(exp / "tokens.json"), str(exp / "state.json")],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            print(f"{label:44s} failed in onnxruntime-web: {r.stderr.strip().splitlines()[-1][:100]}")
            continue
        web_logits = np.array(json.loads(r.stdout), dtype=np.float64)
        runner = OnnxStepRunner(exp, manifest, {**graph, "file": path.name}, threads=1)
        state, native = runner.new_state(), []
        for tok in tokens:
            lg, state = runner.step(tok, state)
            native.append(lg.reshape(-1))
        native = np.array(native, dtype=np.float64)
        per_token = np.abs(web_logits - native).max(axis=1) / native.std(axis=1)
        top1 = float((web_logits.argmax(1) == native.argmax(1)).mean())
        apart = per_token > WEB_APART
        first = str(int(np.argmax(apart))) if apart.any() else "-"
        print(f"{label:44s} {per_token.max():11.2e} {apart.mean():7.1%} {first:>11s} {top1:9.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench_out" / "quant")
    p.add_argument("--steps", type=int, default=96, help="timed decode steps per variant and thread count")
    p.add_argument("--rounds", type=int, default=12, help="rounds the timed steps are interleaved in")
    p.add_argument("--eval-tokens", type=int, default=None, help="eval text bytes for the quality table (all)")
    p.add_argument("--web-tokens", type=int, default=512)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not a.skip_speed:
        speed(a.work, a.steps, a.rounds)
    if not a.skip_quality:
        files, exp, manifest = quality(a.work, a.eval_tokens)
        web(files, exp, manifest, a.web_tokens)
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
