"""Decode speed against its memory-bandwidth floor, per ONNX step-graph variant of an export folder, in one run.

A decode step is matrix-vector work: every weight matrix is read once per token, so a step cannot be faster than
(bytes of weights read per token) / (memory read bandwidth). This script measures, in the same run:

1. read bandwidth: 2 threads each reducing half of a 1 GiB float32 buffer (sum, max, dot; the best of 21 runs);
2. per variant: the bytes a step reads (every initializer, except that a Gather'd table — the embedding — costs one
   row), the floor in tok/s, and the measured decode tok/s in onnxruntime (median step time after warm-up);
3. the options tried for each variant: intra-op threads 1 vs 2, thread spinning off, and I/O binding (the state stays
   in onnxruntime-owned buffers, swapped between steps instead of copied through numpy).

    rwkv-export onnx builtin:169m-synthetic -o bench_out/169 --quant fp16,int8,int4 --no-check
    python benchmarks/bench_decode.py bench_out/169 [--steps 48]

Absolute numbers depend on what else runs on the machine; the ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WARMUP = 4


def read_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 7) -> float:
    """Bytes/s read by `threads` threads, each streaming its share of a buffer much larger than the caches through a
    reduction (numpy releases the GIL): the best over three kernels (sum, max, dot) and `repeats` runs, since a floor
    must use the fastest read rate the machine shows (sum alone is partly compute-bound and swings between runs)."""
    buf = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(buf, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for kernel in (np.sum, np.max, lambda p: np.dot(p, p)):
            for _ in range(repeats):
                t = time.perf_counter()
                list(pool.map(kernel, parts))
                best = min(best, time.perf_counter() - t)
    return buf.nbytes / best


def bytes_per_token(path: Path) -> tuple[int, int]:
    """(bytes read per step, file bytes of all initializers): a Gather'd table costs one row per step."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    total = per_step = 0
    for name, init in inits.items():
        n = numpy_helper.to_array(init).nbytes
        total += n
        if name in gathered:
            rows = init.dims[0] if init.dims else 1
            per_step += n // max(rows, 1)
        else:
            per_step += n
    return per_step, total


def session(path: Path, threads: int, spinning: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def decode_plain(sess, io, state0: dict, steps: int) -> float:
    """Median seconds per step, feeding numpy arrays (the state copied in and out each step)."""
    names = [io["logits"]] + [io["out"][s] for s in io["states"]]
    state = dict(state0)
    tok = np.array([1], dtype=np.int64)
    times = []
    for i in range(WARMUP + steps):
        feeds = {io["token"]: tok, **{io["in"][s]: state[s] for s in io["states"]}}
        t = time.perf_counter()
        outs = sess.run(names, feeds)
        times.append(time.perf_counter() - t)
        state = dict(zip(io["states"], outs[1:]))
        tok = np.array([int(outs[0].argmax())], dtype=np.int64)
    return statistics.median(times[WARMUP:])


def decode_bound(sess, io, state0: dict, steps: int) -> float:
    """Median seconds per step with I/O binding: two sets of state OrtValues, outputs of one step bound to the
    buffers the next step reads (swapped, never copied); the token is the only host input."""
    import onnxruntime as ort

    bufs = [{s: ort.OrtValue.ortvalue_from_numpy(np.array(v)) for s, v in state0.items()},
            {s: ort.OrtValue.ortvalue_from_numpy(np.empty_like(v)) for s, v in state0.items()}]
    logits = ort.OrtValue.ortvalue_from_shape_and_type(io["logits_shape"], np.float32)
    binding = sess.io_binding()
    tok = np.array([1], dtype=np.int64)
    times = []
    for i in range(WARMUP + steps):
        src, dst = bufs[i % 2], bufs[(i + 1) % 2]
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        binding.bind_cpu_input(io["token"], tok)
        for s in io["states"]:
            binding.bind_ortvalue_input(io["in"][s], src[s])
            binding.bind_ortvalue_output(io["out"][s], dst[s])
        binding.bind_ortvalue_output(io["logits"], logits)
        t = time.perf_counter()
        sess.run_with_iobinding(binding)
        times.append(time.perf_counter() - t)
        tok = np.array([int(logits.numpy().argmax())], dtype=np.int64)
    return statistics.median(times[WARMUP:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", type=int, default=48, help="timed decode steps per configuration")
    args = ap.parse_args()
    from rwkv_export.manifest import read_manifest
    from rwkv_export.runners import io_by_role, new_state_from_manifest

    m = read_manifest(args.folder, verify_files=False)
    bw = read_bandwidth()
    print(f"# decode vs memory-bandwidth floor — {m['model']['n_layer']} x {m['model']['n_embd']}, vocab "
          f"{m['model']['vocab_size']}; {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.2f}")
    print(f"read bandwidth (2 threads, 1 GiB, best of sum/max/dot): {bw / 1e9:.1f} GB/s\n")
    rows = []
    for g in (g for g in m["graphs"] if g["kind"] == "step" and g["format"] == "onnx"):
        path = args.folder / g["file"]
        r = io_by_role(g)
        io = {"token": r["token"]["name"], "logits": r["logits"]["name"], "logits_shape": r["logits"]["shape"],
              "states": list(r["state_in"]), "in": {s: v["name"] for s, v in r["state_in"].items()},
              "out": {s: v["name"] for s, v in r["state_out"].items()}}
        state0 = new_state_from_manifest(m, g)
        per_step, _ = bytes_per_token(path)
        floor = bw / per_step
        res = {}
        for label, threads, spin, bound in (("1 thread", 1, True, False), ("2 threads", 2, True, False),
                                            ("2 threads, no spinning", 2, False, False),
                                            ("2 threads + I/O binding", 2, True, True)):
            sess = session(path, threads, spin)
            sec = (decode_bound if bound else decode_plain)(sess, io, state0, args.steps)
            res[label] = 1.0 / sec
            del sess
        best = max(res, key=res.get)
        rows.append((g["variant"], per_step, floor, res, best))
    labels = list(rows[0][3])
    head = "| variant | MB read/token | floor tok/s | " + " | ".join(f"{lb} tok/s" for lb in labels) + " | best / floor |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for variant, per_step, floor, res, best in rows:
        cells = " | ".join(f"{res[lb]:.1f}" for lb in labels)
        print(f"| {variant} | {per_step / 1e6:.0f} | {floor:.0f} | {cells} | {res[best] / floor:.0%} ({best}) |")


if __name__ == "__main__":
    main()
