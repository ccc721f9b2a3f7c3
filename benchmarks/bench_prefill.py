"""Prefill benchmark: a whole prompt at 169M shapes (12 x 768, ffn 3072, vocab 50277; synthetic bf16 checkpoint).

Prompt tokens/s at T = 64 and 512 (by default) for
  - the sequence graph (GPT mode, rwkv_export.seq_model) in onnxruntime, fed in chunks by OnnxSequenceRunner,
  - the step graph in onnxruntime fed token by token (what a client without the sequence graph does),
  - the `rwkv` pip package's sequence mode, `model.forward(tokens, None)`, strategy "cpu fp32" (JIT and CUDA off),
and with --tflite also the TFLite prompt graph (prefill.tflite's `prefill` signature, fixed chunks of 16, the tail through
`step`) in the LiteRT interpreter, fp32 and int8, all in one run, printed as a table with ratios. A prompt is timed
from a fresh state to the last token's logits. The rows are interleaved: --repeats rounds, each running every row
once in a fresh Python process (one warm-up, then three timed runs per length; the step graph one); each cell gives
the median and the best over all timed runs.

    python benchmarks/bench_prefill.py [--workdir bench_out/prefill] [--lengths 64 512] [--threads 2] [--explore]
                                       [--tflite]

--explore adds a table of sequence-graph settings (chunk size x threads x ORT session options) at the longest length.
The machine's load average is printed with the numbers: on a shared box other processes take CPU from every row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT_DIR = "export"


def child(code: str, timeout: int = 3600) -> dict:
    """Run `code` in a fresh interpreter (rwkv JIT/CUDA off before any import); it sets `res`, printed as JSON."""
    prelude = ("import json, os, sys, time, statistics\n"
               "os.environ['RWKV_JIT_ON'] = '0'; os.environ['RWKV_CUDA_ON'] = '0'\n")
    epilogue = "\nprint(json.dumps(res))\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def timing_code(run_expr: str, lengths: list[int], repeats: int) -> str:
    """Code timing `run_expr` (which feeds the list `tokens` from a fresh state) for each prompt length: one warm-up,
    then `repeats` runs, each run's wall time and process CPU time (all threads; less disturbed than wall time by
    other processes on a shared machine) kept for merge_runs."""
    return f"""
import numpy as np
res = {{}}
for T in {lengths!r}:
    tokens = [int(t) for t in np.random.default_rng(T).integers(0, 50277, T)]
    {run_expr}
    walls, cpus = [], []
    for _ in range({repeats}):
        w0, c0 = time.perf_counter(), time.process_time()
        {run_expr}
        walls.append(time.perf_counter() - w0); cpus.append(time.process_time() - c0)
    res[str(T)] = {{'walls': walls, 'cpus': cpus}}
"""


def merge_runs(results: list[dict], lengths: list[int]) -> dict:
    """One row's children (timing_code results, one per round) as one cell per length: tokens/s from the median and
    the fastest wall time over all their timed runs, and the median CPU time."""
    cells = {}
    for T in lengths:
        walls = [w for r in results for w in r[str(T)]["walls"]]
        cpus = [c for r in results for c in r[str(T)]["cpus"]]
        cells[str(T)] = {"tok_s": T / statistics.median(walls), "best_tok_s": T / min(walls),
                         "cpu_s": statistics.median(cpus)}
    return cells


def export(ckpt: Path, out: Path, max_chunk: int | None) -> dict:
    """`rwkv-export onnx --quant int8,int4` (no parity check): the step and prompt graphs of fp32, int8 and int4.
    A --max-chunk other than the default re-exports the fp32 prompt graph with it."""
    return child(f"""
import shutil
from pathlib import Path
from rwkv_export.export import export_onnx
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.manifest import read_manifest, write_manifest
from rwkv_export.arch.rwkv4.step import RWKV4Step
from rwkv_export.arch.rwkv4.sequence import DEFAULT_MAX_CHUNK
from rwkv_export.targets import onnx_seq
out = Path({str(out)!r}); shutil.rmtree(out, ignore_errors=True)
t0 = time.perf_counter()
export_onnx({str(ckpt)!r}, out, check=False, tokenizer='bytes', quant=['int8', 'int4'])
t_all = time.perf_counter() - t0
max_chunk = {max_chunk!r} or DEFAULT_MAX_CHUNK
if max_chunk != DEFAULT_MAX_CHUNK:
    files = onnx_seq.export_sequence(RWKV4Step(load_checkpoint({str(ckpt)!r})), out / 'prefill.onnx', max_chunk=max_chunk)
    man = read_manifest(out, verify_files=False)
    man['graphs'] = [g if g['file'] != 'prefill.onnx' else onnx_seq.graph_entry(out / 'prefill.onnx', files=files)
                     for g in man['graphs']]
    write_manifest(out, man)
res = {{'export_s': t_all, 'max_chunk': max_chunk, 'seq_mb': os.path.getsize(out / 'prefill.onnx') / 1e6}}
""")


def parity(out: Path, n: int = 64) -> dict:
    """Sequence graph vs the step graph over the same n tokens: max|Δlogits|/std and the worst state tensor."""
    return child(f"""
import numpy as np
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.seq_runner import OnnxSequenceRunner
root = {str(out)!r}; man = read_manifest(root, verify_files=False)
step = OnnxStepRunner(root, man, find_graph(man, 'fp32'))
seq = OnnxSequenceRunner(root, man, find_graph(man, 'fp32', kind='sequence'))
tokens = [int(t) for t in np.random.default_rng(0).integers(0, 50277, {n})]
state = step.new_state()
for t in tokens:
    ref, state = step.step(t, state)
got, seq_state = seq.forward(tokens, seq.new_state())
d = np.abs(got.astype(np.float64) - ref).max() / ref.std()
ds = max(float(np.abs(seq_state[k].astype(np.float64) - state[k]).max() / np.abs(state[k]).max()) for k in state)
res = {{'logits_rel': float(d), 'state_rel': ds, 'top1_same': bool(got.argmax() == ref.argmax())}}
""")


def export_tflite(ckpt: Path, out: Path) -> dict:
    """`rwkv-export tflite --quant int8` (no parity check): fp32 and int8 step and prompt-graph .tflite files."""
    return child(f"""
from rwkv_export.export import export_target
t0 = time.perf_counter()
export_target('tflite', {str(ckpt)!r}, {str(out)!r}, quant=['int8'], check=False, tokenizer='bytes', force=True)
res = {{'export_s': time.perf_counter() - t0}}
""")


TFLITE_SETUP = """
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.tf_runners import TFLiteSequenceRunner
root = {root!r}; man = read_manifest(root, verify_files=False)
runner = TFLiteSequenceRunner(root, man, find_graph(man, {variant!r}, kind='sequence'), threads={threads})
"""

SEQ_SETUP = """
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.seq_runner import OnnxSequenceRunner
root = {root!r}; man = read_manifest(root, verify_files=False)
runner = OnnxSequenceRunner(root, man, find_graph(man, {variant!r}, kind='sequence'), threads={threads}, chunk={chunk})
"""
SEQ_RUN = "runner.forward(tokens, runner.new_state())"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "prefill")
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 512], help="prompt lengths T")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for the main table")
    ap.add_argument("--repeats", type=int, default=5,
                    help="rounds; each runs every row once, 3 timed runs (the step graph: 1, in a third of the rounds)")
    ap.add_argument("--max-chunk", type=int, default=None, help="sequence graph max_chunk (default: seq_model's)")
    ap.add_argument("--reuse", action="store_true", help="reuse an export in --workdir made by an earlier run")
    ap.add_argument("--explore", action="store_true", help="also time chunk sizes, threads and session options")
    ap.add_argument("--tflite", action="store_true",
                    help="also time the TFLite prompt graph (needs the [tflite] extra; exports it once)")
    args = ap.parse_args()
    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    ckpt = wd / "rwkv4-169m-synthetic.pth"
    out = wd / EXPORT_DIR
    lengths, reps = sorted(args.lengths), args.repeats

    if not ckpt.exists():
        print(f"making {ckpt.name} (169M shapes, bf16) ...", file=sys.stderr)
        from rwkv_export.synthetic import make_checkpoint

        make_checkpoint(ckpt, "169m")
    info_file = wd / "export_info.json"
    if args.reuse and info_file.exists() and (out / "prefill.onnx").exists():
        info = json.loads(info_file.read_text())
    else:
        print("exporting the step and sequence graphs ...", file=sys.stderr)
        info = export(ckpt, out, args.max_chunk)
        info_file.write_text(json.dumps(info))
    tflite_out = wd / "tflite"
    if args.tflite and not (args.reuse and (tflite_out / "manifest.json").exists()):
        print("exporting the TFLite files (fp32, int8) ...", file=sys.stderr)
        export_tflite(ckpt, tflite_out)
    print("parity: sequence graph vs step graph ...", file=sys.stderr)
    par = parity(out)

    # Every row is timed in rounds: each round runs each row once, in a fresh process (load, one warm-up, then three
    # timed runs per length), so a busy minute on this shared machine lands on every row alike instead of on
    # whichever row was running then. The step graph row (~15 s per 512-token prompt) runs once per round and joins
    # the first third of the rounds.
    from importlib.metadata import version

    seq_name = "sequence graph {}, onnxruntime, {} threads, chunks <= {}"
    specs = [(seq_name.format(v, args.threads, info["max_chunk"]),
              SEQ_SETUP.format(root=str(out), threads=args.threads, chunk=None, variant=v), SEQ_RUN, reps, 3)
             for v in ("fp32", "int8", "int4")]
    specs.append((f"step graph token by token, onnxruntime, {args.threads} threads", f"""
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.runners import OnnxStepRunner
root = {str(out)!r}; man = read_manifest(root, verify_files=False)
runner = OnnxStepRunner(root, man, find_graph(man, 'fp32'), threads={args.threads})
def feed(tokens):
    state = runner.new_state()
    for t in tokens:
        logits, state = runner.step(t, state)
    return logits
""", "feed(tokens)", max(1, reps // 3), 1))
    specs.append((f"rwkv pip package {version('rwkv')}, forward(tokens), cpu fp32, torch {args.threads} threads", f"""
import torch
from rwkv.model import RWKV
torch.set_grad_enabled(False)
torch.set_num_threads({args.threads})
model = RWKV(model={str(ckpt)!r}, strategy='cpu fp32')
""", "model.forward(tokens, None)", reps, 3))
    if args.tflite:
        specs += [(f"TFLite prompt graph {v}, LiteRT, {args.threads} threads, chunks of 16 + steps",
                   TFLITE_SETUP.format(root=str(tflite_out), threads=args.threads, variant=v), SEQ_RUN, reps, 3)
                  for v in ("fp32", "int8")]
    runs = {name: [] for name, *_ in specs}
    for rnd in range(reps):
        for name, setup, run_expr, n_rounds, per_round in specs:
            if rnd < n_rounds:
                print(f"round {rnd + 1}/{reps}: {name} ...", file=sys.stderr)
                runs[name].append(child(setup + timing_code(run_expr, lengths, per_round)))
    rows = [(name, merge_runs(runs[name], lengths)) for name, *_ in specs]
    seq, quant_rows = rows[0][1], {"int8": rows[1][1], "int4": rows[2][1]}
    step, pip = rows[3][1], rows[4][1]

    load = os.getloadavg()
    print(f"\n## Prefill (prompt) speed: 169M shapes, synthetic bf16 checkpoint")
    print(f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; "
          f"load average after the runs {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min); "
          f"rows interleaved: {reps} rounds (the step graph {max(1, reps // 3)}), each row in a fresh process per "
          f"round (one warm-up, then 3 timed runs per length; the step graph 1); median and best over all timed runs\n")
    print(f"sequence graph: max_chunk {info['max_chunk']}, fp32 {info['seq_mb']:.0f} MB (the whole export, step and "
          f"prompt graphs of fp32, int8, int4: {info['export_s']:.0f} s); fp32 vs the step graph over 64 tokens: max|Δlogits|/std "
          f"{par['logits_rel']:.1e}, worst state tensor {par['state_rel']:.1e}, top-1 "
          f"{'same' if par['top1_same'] else 'DIFFERS'}\n")
    head = " | ".join(f"T={T} tok/s, median / best | CPU s" for T in lengths)
    print(f"| runtime | {head} |\n|---|" + "---|---|" * len(lengths))
    for name, r in rows:
        cells = " | ".join(f"{r[str(T)]['tok_s']:.0f} / {r[str(T)]['best_tok_s']:.0f} | {r[str(T)]['cpu_s']:.2f}"
                           for T in lengths)
        print(f"| {name} | {cells} |")
    print()
    for T in lengths:
        s, st, p = seq[str(T)]["tok_s"], step[str(T)]["tok_s"], pip[str(T)]["tok_s"]
        print(f"T={T} (medians): sequence graph = {s / st:.1f}x the step graph token by token, {s / p:.1f}x the "
              f"rwkv pip package; int8 sequence graph {quant_rows['int8'][str(T)]['tok_s'] / p:.1f}x, int4 "
              f"{quant_rows['int4'][str(T)]['tok_s'] / p:.1f}x the rwkv pip package")

    if args.explore:
        explore(out, info["max_chunk"], lengths[-1], reps)


def explore(out: Path, max_chunk: int, T: int, reps: int) -> None:
    """Sequence-graph settings at one prompt length: chunk sizes x threads, then ORT session options."""
    chunks = [c for c in (16, 32, 64, 128, max_chunk) if c <= max_chunk]
    results = []
    for threads in (1, 2):
        for chunk in chunks:
            print(f"explore: {threads} threads, chunk {chunk} ...", file=sys.stderr)
            r = child(SEQ_SETUP.format(root=str(out), threads=threads, chunk=chunk, variant='fp32')
                      + timing_code(SEQ_RUN, [T], reps))
            results.append((f"{threads} threads, chunks <= {chunk}", merge_runs([r], [T])[str(T)]))
    options = {
        "no spinning (session.intra_op.allow_spinning=0)":
            "so.add_session_config_entry('session.intra_op.allow_spinning', '0')",
        "basic graph optimizations only":
            "so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC",
        "parallel execution mode, 2 inter-op threads":
            "so.execution_mode = ort.ExecutionMode.ORT_PARALLEL; so.inter_op_num_threads = 2",
    }
    for name, line in options.items():
        print(f"explore: {name} ...", file=sys.stderr)
        r = child(f"""
import onnxruntime as ort
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.seq_runner import OnnxSequenceRunner
root = {str(out)!r}; man = read_manifest(root, verify_files=False)
runner = OnnxSequenceRunner(root, man, find_graph(man, 'fp32', kind='sequence'), threads=2)
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
{line}
runner.session = ort.InferenceSession(os.path.join(root, runner.graph['file']), so, providers=['CPUExecutionProvider'])
""" + timing_code(SEQ_RUN, [T], reps))
        results.append((f"2 threads, chunks <= {max_chunk}, {name}", merge_runs([r], [T])[str(T)]))
    print("explore: QUInt8 dynamic quantization of the sequence graph ...", file=sys.stderr)
    r = child(f"""
import numpy as np, onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from rwkv_export.manifest import read_manifest, find_graph
from rwkv_export.seq_runner import OnnxSequenceRunner
root = {str(out)!r}; man = read_manifest(root, verify_files=False)
graph = find_graph(man, 'fp32', kind='sequence')
q8 = os.path.join(root, 'prefill_int8.onnx')
if not os.path.exists(q8):
    quantize_dynamic(os.path.join(root, graph['file']), q8, weight_type=QuantType.QUInt8)
fp32 = OnnxSequenceRunner(root, man, graph, threads=2)
runner = OnnxSequenceRunner(root, man, dict(graph, file='prefill_int8.onnx'), threads=2)
probe = [int(t) for t in np.random.default_rng(1).integers(0, 50277, {T})]
ref, got = fp32.forward(probe, fp32.new_state())[0], runner.forward(probe, runner.new_state())[0]
del fp32
dev = float(np.abs(got.astype(np.float64) - ref).max() / ref.std())
""" + timing_code(SEQ_RUN, [T], reps) + "res['dev'] = dev\n")
    results.append((f"2 threads, chunks <= {max_chunk}, QUInt8 dynamic weights (max|Δlogits|/std vs fp32 "
                    f"{r['dev']:.2f})", merge_runs([r], [T])[str(T)]))
    print("explore: fp32 MatMul-only ceiling ...", file=sys.stderr)
    r = child(f"""
import numpy as np, onnxruntime as ort
from onnx import helper, numpy_helper
from rwkv_export.seq_runner import chunk_sizes
C, Fd, L = 768, 3072, 12
shapes = ([(C, C)] * 5 + [(C, Fd), (Fd, C)]) * L  # per layer: r, k, v, output, ffn receptance; ffn key, value
nodes, inits, x = [], [], 'x'
rng = np.random.default_rng(0)
for i, (a, b) in enumerate(shapes):  # distinct weights per layer: 368 MB, as much memory traffic as the model
    inits.append(numpy_helper.from_array((rng.standard_normal((a, b), dtype=np.float32) * 0.02), f'W{{i}}'))
    nodes.append(helper.make_node('MatMul', [x, f'W{{i}}'], [f'y{{i}}'])); x = f'y{{i}}'
g = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('x', 1, ['T', C])],
                      [helper.make_tensor_value_info(x, 1, ['T', C])], inits)
model = helper.make_model(g, opset_imports=[helper.make_opsetid('', 18)])
so = ort.SessionOptions(); so.intra_op_num_threads = 2
sess = ort.InferenceSession(model.SerializeToString(), so, providers=['CPUExecutionProvider'])
def run_all(tokens):
    xs = np.ones(({max_chunk}, C), np.float32) * 0.1
    for n in chunk_sizes(len(tokens), {max_chunk}):  # the chunks OnnxSequenceRunner feeds
        sess.run(None, {{'x': xs[:n]}})
""" + timing_code("run_all(tokens)", [T], reps))
    results.append((f"ceiling: nothing but the layers' 12 x 7 fp32 MatMuls (one chain, same shapes), 2 threads, "
                    f"chunks <= {max_chunk}", merge_runs([r], [T])[str(T)]))
    load = os.getloadavg()
    print(f"\n### Sequence graph settings, T={T} (load average {load[0]:.1f} / {load[1]:.1f})\n")
    print("| setting | tok/s, median / best | CPU s |\n|---|---|---|")
    for name, r in results:
        print(f"| {name} | {r['tok_s']:.0f} / {r['best_tok_s']:.0f} | {r['cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
