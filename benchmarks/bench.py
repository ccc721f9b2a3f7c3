"""Spine benchmark: the exact RWKV-4-Pile-169M shapes (synthetic bf16 checkpoint), measured in one run.

Prints a table: checkpoint load time, ONNX export time, peak RSS, file size, and decode tokens/s for runtime_ref,
the official `rwkv` pip package (strategy `cpu fp32`, the baseline) and the exported ONNX fp32 model in onnxruntime.
Each measurement runs in its own Python process so that peak RSS belongs to that phase alone.

    python benchmarks/bench.py [--workdir bench_out] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(code: str, timeout: int = 1800) -> dict:
    """Run `code` in a fresh interpreter; it must print one JSON line last. Adds the child's peak RSS (MB)."""
    prelude = "import json, resource, time, os, sys\nos.environ.setdefault('RWKV_JIT_ON','0'); os.environ.setdefault('RWKV_CUDA_ON','0')\n"
    epilogue = "\nres['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\nprint(json.dumps(res))\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_loop(step_expr: str, state_expr: str, n: int) -> str:
    """Code that times n decode steps after 8 warm-up steps; the token fed is the previous argmax."""
    return f"""
state = {state_expr}
tok = 187
for _ in range(8):
    logits, state = {step_expr}
    tok = int(logits.reshape(-1).argmax())
t0 = time.perf_counter()
for _ in range({n}):
    logits, state = {step_expr}
    tok = int(logits.reshape(-1).argmax())
res = {{'tok_s': {n} / (time.perf_counter() - t0)}}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed per runtime")
    args = ap.parse_args()
    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    ckpt = wd / "rwkv4-169m-synthetic.pth"
    out = wd / "onnx169m"
    n = args.tokens

    if not ckpt.exists():
        print(f"making {ckpt.name} (169M shapes, bf16) ...", file=sys.stderr)
        from rwkv_export.synthetic import make_checkpoint

        make_checkpoint(ckpt, "169m")

    rows = []
    print("load ...", file=sys.stderr)
    r = child(f"""
from rwkv_export.checkpoint import load_checkpoint
t0 = time.perf_counter(); ck = load_checkpoint({str(ckpt)!r}); res = {{'load_s': time.perf_counter() - t0}}
""")
    rows.append(("load checkpoint (mmap, strict checks)", f"{r['load_s']:.2f} s", "", f"{r['peak_rss_mb']:.0f}"))

    print("export ...", file=sys.stderr)
    r = child(f"""
import shutil; shutil.rmtree({str(out)!r}, ignore_errors=True)
from rwkv_export.export import export_onnx
t0 = time.perf_counter(); er = export_onnx({str(ckpt)!r}, {str(out)!r}, check=False); res = {{'export_s': time.perf_counter() - t0}}
res['size_mb'] = os.path.getsize({str(out / "model.onnx")!r}) / 1e6
""")
    rows.append(("export ONNX fp32: step + prompt graphs (load, trace, save)", f"{r['export_s']:.1f} s", f"{r['size_mb']:.0f} MB",
                 f"{r['peak_rss_mb']:.0f}"))
    size_mb = r["size_mb"]

    print("check ...", file=sys.stderr)
    r = child(f"""
from rwkv_export.check import check_folder
t0 = time.perf_counter(); rep = check_folder({str(out)!r}, {str(ckpt)!r})[0]
res = {{'check_s': time.perf_counter() - t0, 'max_rel': rep['max_rel'], 'greedy': rep['greedy_identical']}}
""")
    rows.append((f"parity check (64+32 tokens vs fp64 ref): max|Δ|/std {r['max_rel']:.2e}, greedy "
                 f"{'identical' if r['greedy'] else 'DIFFERS'}", f"{r['check_s']:.1f} s", "", f"{r['peak_rss_mb']:.0f}"))

    speed = []
    print("decode: rwkv pip package ...", file=sys.stderr)
    r = child(f"""
import torch
from rwkv.model import RWKV
m = RWKV(model={str(ckpt)!r}, strategy='cpu fp32')
""" + decode_loop("m.forward([tok], state)", "None", n))
    speed.append(("rwkv pip package 0.8.32, cpu fp32 (baseline)", r))
    base = r["tok_s"]

    print("decode: runtime_ref ...", file=sys.stderr)
    r = child(f"""
import torch
torch.set_grad_enabled(False)
from runtime_ref import RWKV4
m = RWKV4.from_checkpoint({str(ckpt)!r}, dtype=torch.float32)
""" + decode_loop("m.step(tok, state)", "m.new_state()", n))
    speed.append(("runtime_ref (PyTorch, fp32, readable oracle)", r))

    for threads in (1, 2):
        print(f"decode: onnxruntime {threads} thread(s) ...", file=sys.stderr)
        r = child(f"""
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.runners import OnnxStepRunner
root = {str(out)!r}; man = read_manifest(root, verify_files=False)
runner = OnnxStepRunner(root, man, find_graph(man, 'fp32'), threads={threads})
""" + decode_loop("runner.step(tok, state)", "runner.new_state()", n))
        speed.append((f"ONNX fp32 in onnxruntime, {threads} thread{'s' if threads > 1 else ''}", r))

    import platform

    print(f"\n## rwkv-export benchmark: 169M shapes (12 x 768, ffn 3072, vocab 50277), synthetic bf16 checkpoint")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; "
          f"decode timed over {n} tokens after 8 warm-up\n")
    print("| phase | time | size | peak RSS (MB) |\n|---|---|---|---|")
    for name, t, s, rss in rows:
        print(f"| {name} | {t} | {s} | {rss} |")
    print("\n| decode runtime | tokens/s | vs rwkv pip | peak RSS (MB) |\n|---|---|---|---|")
    for name, r in speed:
        print(f"| {name} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {r['peak_rss_mb']:.0f} |")
    print(f"\nONNX fp32 file: {size_mb:.0f} MB")


if __name__ == "__main__":
    main()
