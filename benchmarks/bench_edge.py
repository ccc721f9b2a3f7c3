"""Edge targets benchmark: TFLite variants in the LiteRT interpreter and TF.js variants in Node (@tensorflow/tfjs,
pure-JS CPU backend), beside ONNX fp32 in onnxruntime, on the exact RWKV-4-Pile-169M shapes (synthetic checkpoint).

Prints tables: export time and peak RSS per target; per variant the file size, decode tokens/s (greedy, the previous
argmax fed back, timed after warm-up) and quality against runtime_ref in fp64 (max|Δ|/std of the logits, top-1
agreement and mean KL(ref || variant) over teacher-forced tokens). Each phase runs in its own Python process so that
peak RSS belongs to it alone. Needs the [tflite] extra and `npm ci --prefix rwkv_export/js`.

    python benchmarks/bench_edge.py [--workdir bench_out] [--tokens 32] [--quality-tokens 32] [--threads 2]
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
TFLITE_VARIANTS = ["fp32", "fp16", "int8", "int4"]
TFJS_VARIANTS = ["fp32", "fp16", "uint8"]
WARMUP = 4  # untimed steps first: allocation, XNNPACK packing, V8 JIT


def child(code: str, timeout: int = 3600) -> dict:
    """Run `code` in a fresh interpreter; it sets `res`, printed as the last line with the child's peak RSS (MB)."""
    prelude = "import json, resource, time, os, sys\nimport numpy as np\n"
    epilogue = "\nres['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\nprint(json.dumps(res))\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_size_mb(root: Path, files: list[str]) -> float:
    return sum((root / f).stat().st_size for f in files) / 1e6


QUALITY = """
def quality(runner, ref_logits, tokens):
    st = runner.new_state(); rel = kl = 0.0; top1 = 0; kls = []
    for tok, r in zip(tokens, ref_logits):
        m, st = runner.step(tok, st)
        m = np.asarray(m, np.float64).reshape(-1)
        rel = max(rel, float(np.abs(m - r).max() / r.std()))
        lr = r - r.max(); lr -= np.log(np.exp(lr).sum()); lm = m - m.max(); lm -= np.log(np.exp(lm).sum())
        kls.append(float((np.exp(lr) * (lr - lm)).sum())); top1 += int(m.argmax() == r.argmax())
    return {'max_rel': rel, 'top1': top1 / len(tokens), 'kl_mean': float(np.mean(kls))}
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per runtime")
    ap.add_argument("--quality-tokens", type=int, default=32, help="teacher-forced tokens for the quality columns")
    ap.add_argument("--threads", type=int, default=2, help="threads for onnxruntime and the LiteRT interpreter")
    args = ap.parse_args()
    wd = args.workdir.resolve()
    out = wd / "edge169m"
    out.mkdir(parents=True, exist_ok=True)
    ckpt = wd / "rwkv4-169m-synthetic.pth"
    n, nq, th = args.tokens, args.quality_tokens, args.threads
    if not ckpt.exists():
        print(f"making {ckpt.name} (169M shapes, bf16) ...", file=sys.stderr)
        from rwkv_export.synthetic import make_checkpoint

        make_checkpoint(ckpt, "169m")

    build = f"""
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.arch.rwkv4.step import RWKV4Step
ck = load_checkpoint({str(ckpt)!r}); module = RWKV4Step(ck)
out = __import__('pathlib').Path({str(out)!r})
"""
    export_rows = []
    print("export ONNX fp32 ...", file=sys.stderr)
    r = child(build + """
from rwkv_export.targets import onnx as O
t0 = time.perf_counter(); files = O.export_step(module, out / 'model.onnx'); dt = time.perf_counter() - t0
ins, outs, opset = O.io_spec(out / 'model.onnx')
res = {'s': dt, 'entries': [{'name': 'step', 'kind': 'step', 'format': 'onnx', 'variant': 'fp32', 'file': files[0],
       'data_files': files[1:], 'opset': opset, 'inputs': ins, 'outputs': outs, 'parity': None}],
       'dims': ck.dims.as_dict()}
""")
    export_rows.append(("ONNX fp32 (written node by node)", r))
    graphs, dims = r["entries"], r["dims"]

    print("export TFLite ...", file=sys.stderr)
    r = child(build + f"""
from rwkv_export.targets.tflite import export_tflite
t0 = time.perf_counter(); ents = export_tflite(module, out, {TFLITE_VARIANTS!r}); res = {{'s': time.perf_counter() - t0, 'entries': ents}}
""")
    export_rows.append((f"TFLite {'+'.join(TFLITE_VARIANTS)} (our writer, ai-edge-quantizer)", r))
    graphs += r["entries"]

    print("export TF.js ...", file=sys.stderr)
    r = child(build + f"""
from rwkv_export.targets.tfjs import export_tfjs
t0 = time.perf_counter(); ents = export_tfjs(module, out, {TFJS_VARIANTS!r}, onnx_path=out / 'model.onnx')
res = {{'s': time.perf_counter() - t0, 'entries': ents}}
""")
    export_rows.append((f"TF.js {'+'.join(TFJS_VARIANTS)} (from the ONNX above)", r))
    graphs += r["entries"]

    from rwkv_export import arch
    from rwkv_export.arch.base import ModelDims
    from rwkv_export.manifest import new_manifest, write_manifest

    manifest = new_manifest(arch=arch.get("4"), dims=ModelDims.from_dict(dims), source={"kind": "benchmark", "path": str(ckpt)}, tokenizer={"kind": "none"})
    manifest["graphs"] = graphs
    write_manifest(out, manifest)

    print("reference logits (runtime_ref fp64) ...", file=sys.stderr)
    child(f"""
import torch
torch.set_grad_enabled(False)
from runtime_ref import RWKV4
from rwkv_export.parity import parity_tokens
m = RWKV4.from_checkpoint({str(ckpt)!r}, dtype=torch.float64)
toks = parity_tokens(m.vocab_size, {nq}); st = m.new_state(); rows = []
for t in toks:
    lg, st = m.step(t, st); rows.append(lg.numpy().reshape(-1))
np.save({str(wd / 'ref_logits.npy')!r}, np.array(rows)); res = {{'tokens': toks}}
""")

    load = f"""
from rwkv_export.manifest import read_manifest
from rwkv_export.parity import parity_tokens
root = {str(out)!r}; man = read_manifest(root, verify_files=False)
ref = np.load({str(wd / 'ref_logits.npy')!r}); toks = parity_tokens(man['model']['vocab_size'], {nq})
""" + QUALITY
    timed = f"""
state = runner.new_state(); tok = 187
for _ in range({WARMUP}):
    logits, state = runner.step(tok, state); tok = int(logits.reshape(-1).argmax())
t0 = time.perf_counter()
for _ in range({n}):
    logits, state = runner.step(tok, state); tok = int(logits.reshape(-1).argmax())
res = {{'tok_s': {n} / (time.perf_counter() - t0)}}
res.update(quality(runner, ref, toks))
"""
    rows = []
    for i, g in enumerate(graphs):
        if g["kind"] != "step":  # the .tflite files' prompt signatures: decode is timed on the step graphs
            continue
        label = f"{g['format']} {g['variant']}"
        print(f"decode {label} ...", file=sys.stderr)
        if g["format"] == "onnx":
            make = f"from rwkv_export.runners import OnnxStepRunner\nrunner = OnnxStepRunner(root, man, man['graphs'][{i}], threads={th})\n"
            runtime = f"onnxruntime {th} thr"
            code = load + make + timed
        elif g["format"] == "tflite":
            make = f"from rwkv_export.tf_runners import TFLiteStepRunner\nrunner = TFLiteStepRunner(root, man, man['graphs'][{i}], threads={th})\n"
            runtime = f"LiteRT (XNNPACK) {th} thr"
            code = load + make + timed
        else:
            runtime = "Node tfjs cpu (pure JS)"
            code = load + f"""
from rwkv_export.tf_runners import TFJSStepRunner
runner = TFJSStepRunner(root, man, man['graphs'][{i}])
_, _, st = runner.greedy(187, {WARMUP}, runner.new_state())
toks_out, secs, _ = runner.greedy(187, {n}, runner.new_state())
res = {{'tok_s': {n} / secs, 'node_rss_mb': runner.node_rss_mb}}
res.update(quality(runner, ref, toks)); runner.close()
"""
        r = child(code)
        size = folder_size_mb(out, [g["file"], *g.get("data_files", [])])
        rows.append((g["format"], g["variant"], runtime, size, r))

    import platform

    print("\n## rwkv-export edge benchmark: 169M shapes (12 x 768, ffn 3072, vocab 50277), synthetic bf16 checkpoint")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; decode timed "
          f"over {n} greedy tokens after {WARMUP} warm-up; quality over {nq} teacher-forced tokens vs runtime_ref fp64\n")
    print("| export | time | peak RSS (MB) |\n|---|---|---|")
    for name, r in export_rows:
        print(f"| {name} | {r['s']:.1f} s | {r['peak_rss_mb']:.0f} |")
    print("\n| target | variant | runtime | size (MB) | tokens/s | max abs diff / std | top-1 | KL mean (nats) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt, var, runtime, size, r in rows:
        rss = f"{r['node_rss_mb']:.0f} (Node)" if r.get("node_rss_mb") else f"{r['peak_rss_mb']:.0f}"
        print(f"| {fmt} | {var} | {runtime} | {size:.0f} | {r['tok_s']:.2f} | {r['max_rel']:.2e} | {r['top1']:.3f} | "
              f"{r['kl_mean']:.2e} | {rss} |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n(total {time.time() - t0:.0f} s)", file=sys.stderr)
