"""TF.js Node driver, cpu vs wasm backend, interleaved: load, greedy steps in Node (TFJSStepRunner.greedy), the prompt
graph (TFJSSequenceRunner.forward), and optionally the fp32 parity (max|Δ|/std against an fp64 reference).

  python benchmarks/bench_tfjs_backends.py EXPORT_DIR [--rounds 2] [--steps 16] [--prompt 64] [--parity]
"""
import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)
from rwkv_export import parity  # noqa: E402
from rwkv_export.manifest import read_manifest  # noqa: E402
from rwkv_export.sources import source_from_manifest  # noqa: E402
from rwkv_export.targets.tfjs import TFJSSequenceRunner  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("root")
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--steps", type=int, default=16)
ap.add_argument("--prompt", type=int, default=64)
ap.add_argument("--parity", action="store_true")
ap.add_argument("--variants", default="")
a = ap.parse_args()
m = read_manifest(a.root)
cpu = [ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
       .splitlines() if ln.startswith("Model name")]
print(f"# {cpu[0] if cpu else platform.processor()}, {os.cpu_count()} cores, load {os.getloadavg()}, "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, model {m['model'].get('n_layer')}x{m['model'].get('n_embd')}"
      f" vocab {m['model']['vocab_size']}")
seqs = [g for g in m["graphs"] if g["kind"] == "sequence" and g["format"] == "tfjs"
        and (not a.variants or g["variant"] in a.variants.split(","))]
vocab = m["model"]["vocab_size"]
prompt = parity.parity_tokens(vocab, a.prompt)
recorded = None
if a.parity:
    ck = source_from_manifest(m["model"]["source"]).load()
    ref = ck.arch.reference(ck.tensors, torch.float64)
    t0 = time.perf_counter()
    recorded = parity.record_reference(ref)
    print(f"# fp64 reference recorded in {time.perf_counter() - t0:.1f} s")
    del ref
rows = {}
for r in range(a.rounds):
    for backend in (("cpu", "wasm") if r % 2 == 0 else ("wasm", "cpu")):
        for g in seqs:
            t0 = time.perf_counter()
            with TFJSSequenceRunner(a.root, m, g, backend=backend) as sr:
                load = time.perf_counter() - t0
                assert sr.backend == backend, sr.engine
                step = sr.step_runner
                toks, secs, _ = step.greedy(5, a.steps, step.new_state())
                _, _ = sr.forward(prompt, sr.new_state())
                pre = sr.last_seconds
                rel = None
                if recorded is not None and g["variant"] == "fp32" and r == 0:
                    rep = parity.compare(step, recorded, target="tfjs", variant="fp32")
                    rel = rep["max_rel"]
                    rows.setdefault((g["variant"], backend, "parity"), []).append(
                        (rep["max_rel"], rep["top1_agreement"], rep["greedy_identical"]))
                rss = step.node_rss_mb
            rows.setdefault((g["variant"], backend), []).append((load, secs / a.steps, pre, rss))
            print(f"round {r} {g['variant']:5} {backend:4}: load {load:6.2f} s, step {secs / a.steps * 1e3:7.1f} ms, "
                  f"prompt({a.prompt}) {pre:6.2f} s, node rss {rss:.0f} MB"
                  + (f", fp32 parity max|d|/std {rel:.2e}" if rel is not None else ""), flush=True)
print(f"\n# best of {a.rounds} rounds; load {os.getloadavg()}")
print(f"| variant | backend | load s | step ms | prompt({a.prompt} tok) s | step speedup vs cpu | prompt speedup vs cpu |")
print("|---|---|---|---|---|---|---|")
for g in seqs:
    v = g["variant"]
    base = [min(x[i] for x in rows[(v, "cpu")]) for i in range(3)]
    for b in ("cpu", "wasm"):
        best = [min(x[i] for x in rows[(v, b)]) for i in range(3)]
        print(f"| {v} | {b} | {best[0]:.2f} | {best[1] * 1e3:.1f} | {best[2]:.2f} | {base[1] / best[1]:.2f}x | "
              f"{base[2] / best[2]:.2f}x |")
for k, vals in rows.items():
    if len(k) == 3:
        print(f"# parity {k[0]} {k[1]}: max|d|/std {max(v[0] for v in vals):.2e}, top1 {min(v[1] for v in vals)}, "
              f"greedy identical {all(v[2] for v in vals)}; tolerance {parity.tolerance_for('tfjs', 'fp32').max_rel:.0e}")
