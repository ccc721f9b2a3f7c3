"""How long a full export takes and how much memory it needs: wall time, peak RSS, output size, and where they go.

    python benchmarks/bench_export.py [--shapes 169m,430m] [--target onnx,tflite,tfjs] [--quant fp16,int8,int4]
                                      [--no-check] [--work bench_out/export] [--no-stages]

Each row is one `rwkv-export TARGET CKPT -o DIR --quant ...` with every default on (prompt graphs, parity and quality
gates; --no-check leaves the gates out, and the rows say so), run in a fresh subprocess on a bf16 checkpoint with the
exact shapes of RWKV-4-Pile-169M (12 x 768) or -430M (24 x 1024), synthetic weights (rwkv_export.synthetic), or on
the README's try-it model (`--shapes tiny-pydoc`: builtin:tiny-pydoc). Without --quant each target gets every variant
it has (onnx and tflite: fp16,int8,int4; tfjs: fp16,uint8); shapes and targets are interleaved (each shape runs
every target before the next shape). Peak RSS is the child's own (os.wait4's ru_maxrss,
which covers the process tree's largest member). The per-stage rows come from the export's own progress lines
("STAGE: done in N s (peak RSS M, CPU C s)", the CPU figure asked for by RWKV_EXPORT_STAGE_CPU): a stage's CPU is
its own process's (all threads), and a check's worker process notes its job ("(worker process)" rows: their wall
overlaps the main process's stages, which then run beside them); stages not listed (imports, reading the
checkpoint's tensors, writing the manifest, worker start-up) are the difference to the total, whose CPU is the
whole process tree's (os.wait4: the child and every process it waited for).

The dev box is shared: the load average before and after each row is printed, and the CPU time (user + system) of
the child beside its wall time: on a loaded machine the wall time can be several times the CPU time.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rwkv_export.progress import STAGE_CPU_ENV  # noqa: E402

# name -> RWKV-4 shapes (n_layer, n_embd, ffn_dim, vocab_size) of the released Pile models
SHAPES = {"169m": (12, 768, 3072, 50277), "430m": (24, 1024, 4096, 50277)}
# "STAGE: done in N s (peak RSS M[, CPU C s])"; a check's worker process notes "(in a worker process, peak RSS ...)"
STAGE_LINE = re.compile(r"^(?P<stage>.+): done in (?P<s>[0-9.]+) s \((?P<worker>in a worker process, )?peak RSS "
                        r"(?P<rss>[0-9.]+) (?P<unit>MB|GB)(?:, CPU (?P<cpu>[0-9.]+) s)?\)$")


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


# target -> the variants a row exports when --quant is not given
TARGET_QUANT = {"onnx": "fp16,int8,int4", "tflite": "fp16,int8,int4", "tfjs": "fp16,uint8"}
BUILTIN = "tiny-pydoc"  # the README's try-it model: a source, not a shape


def checkpoint(work: Path, shape: str) -> Path | str:
    """The bf16 checkpoint of `shape`, made once and kept in `work` (the try-it model: its builtin: source)."""
    if shape == BUILTIN:
        return f"builtin:{BUILTIN}"
    path = work / f"rwkv4-{shape}-synthetic-bf16.pth"
    if not path.exists():  # in a child: a row's ru_maxrss starts from this process's size when it forks the export
        L, C, F, V = SHAPES[shape]
        subprocess.run([sys.executable, "-c", "import sys; from rwkv_export.synthetic import make_checkpoint; "
                        "make_checkpoint(sys.argv[1], '169m', version='4', n_layer=int(sys.argv[2]), "
                        "n_embd=int(sys.argv[3]), ffn_dim=int(sys.argv[4]), vocab_size=int(sys.argv[5]))",
                        str(path), str(L), str(C), str(F), str(V)], check=True, cwd=ROOT)
    return path


def run_export(target: str, ckpt: Path | str, out: Path, quant: str, check: bool = True,
               src: Path | None = None) -> dict:
    """One export in a fresh process: wall, CPU and peak RSS of the child, its stage lines, the output's size.
    `src`: the root of another checkout to import rwkv_export from (--against), else this one's."""
    exe = Path(sys.executable).with_name("rwkv-export")
    cmd = [str(exe) if exe.exists() else "rwkv-export", target, str(ckpt), "-o", str(out), "--force"]
    if quant:
        cmd += ["--quant", quant]
    if not check:
        cmd.append("--no-check")
    load0 = os.getloadavg()[0]
    log = out.with_name(out.name + ".log")
    t0 = time.perf_counter()
    with open(log, "w") as err:
        env = {**os.environ, "TQDM_DISABLE": "1", STAGE_CPU_ENV: "1", "PYTHONPATH": str(src or ROOT)}
        # run from the work folder: a `python -c` worker puts its working directory first on its path
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env=env, cwd=out.parent)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: its peak RSS)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    stderr = log.read_text()
    # a failed export (a gate refusing the model) still shows where its time went; its row says it failed
    error = next((ln for ln in stderr.splitlines() if ln.startswith("error:")), "") if proc.returncode else None
    stages = []
    for line in stderr.replace("\r", "\n").splitlines():
        m = STAGE_LINE.match(line.strip())
        if m:
            rss = float(m["rss"]) * (1024 if m["unit"] == "GB" else 1)
            cpu = float(m["cpu"]) if m["cpu"] is not None else None
            stages.append((m["stage"] + (" (worker process)" if m["worker"] else ""), float(m["s"]), rss, cpu))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else 0  # tfjs: subfolders
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mb": usage.ru_maxrss / 1024,
            "size": size, "stages": stages, "load": (load0, os.getloadavg()[0]), "error": error}


def _size(ckpt: Path | str) -> str:
    return f"{ckpt.stat().st_size / 1e6:.0f} MB" if isinstance(ckpt, Path) else str(ckpt)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="169m,430m", help=f"comma-separated: {', '.join([*SHAPES, BUILTIN])}")
    ap.add_argument("--quant", default=None, help="the variants of every row (default: each target's own, as above)")
    ap.add_argument("--target", default="onnx", help="comma-separated: onnx, tflite, tfjs")
    ap.add_argument("--no-check", action="store_true", help="export without the parity and quality gates")
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "export")
    ap.add_argument("--no-stages", action="store_true", help="only the total row per shape")
    ap.add_argument("--against", type=Path, default=None,
                    help="the root of another checkout (a copy of its rwkv_export/ and runtime_ref/): each row is run "
                    "with it too, interleaved (it first), and the totals compared")
    ap.add_argument("--rounds", type=int, default=1, help="times each row is run (interleaved with --against's)")
    args = ap.parse_args(argv)
    targets = args.target.split(",")
    bad = [t for t in targets if t not in TARGET_QUANT]
    if bad:
        ap.error(f"unknown target '{bad[0]}'; choose from {', '.join(TARGET_QUANT)}")
    args.work.mkdir(parents=True, exist_ok=True)
    gates = "no gates (--no-check)" if args.no_check else "every gate on"
    print(f"machine: {machine()}; targets {', '.join(targets)}; {gates}; each row a fresh process")
    rows = []
    sources = [("before", args.against.resolve()), ("now", None)] if args.against else [("", None)]
    for shape in args.shapes.split(","):
        ckpt = checkpoint(args.work, shape)
        for target in targets:
            quant = TARGET_QUANT[target] if args.quant is None else args.quant
            for rnd in range(args.rounds):
                for label, src in sources:
                    out = args.work / f"out-{target}-{shape}"
                    res = run_export(target, ckpt, out, quant, check=not args.no_check, src=src)
                    shutil.rmtree(out, ignore_errors=True)
                    rows.append((shape, ckpt, target, quant, res, label + (f" #{rnd + 1}" if args.rounds > 1 else "")))
    print()
    print("| model (bf16 checkpoint) | target, --quant | stage | wall s | CPU s | peak RSS | output |")
    print("|---|---|---|---:|---:|---:|---:|")
    for shape, ckpt, target, quant, res, label in rows:
        what = (f"{target} {quant or '(none)'}" + (" --no-check" if args.no_check else "")
                + (f", {label}" if label else ""))
        if not args.no_stages:
            for stage, s, rss, cpu in res["stages"]:
                print(f"| {shape} | {what} | {stage} | {s:.1f} | {'' if cpu is None else f'{cpu:.1f}'} | "
                      f"{rss:.0f} MB | |")
        print(f"| **{shape}** ({_size(ckpt)}) | {what} | **total** (load {res['load'][0]:.1f} -> "
              f"{res['load'][1]:.1f}) | **{res['wall']:.1f}** | **{res['cpu']:.1f}** | **{res['peak_mb']:.0f} MB** "
              f"| {res['size'] / 1e6:.0f} MB |" + (f" FAILED ({res['error'] or 'see the log'})" if res["error"] is not None else ""))
    if args.against:
        print()
        print("| model | target | now / before: wall | CPU | peak RSS | rounds |")
        print("|---|---|---:|---:|---:|---:|")
        for shape in args.shapes.split(","):
            for target in targets:
                mine = [r[4] for r in rows if r[0] == shape and r[2] == target]
                before, now = mine[0::2], mine[1::2]
                ratio = {k: sum(r[k] for r in now) / sum(r[k] for r in before) for k in ("wall", "cpu", "peak_mb")}
                print(f"| {shape} | {target} | {ratio['wall']:.2f}x | {ratio['cpu']:.2f}x | {ratio['peak_mb']:.2f}x "
                      f"| {len(now)} |")


if __name__ == "__main__":
    main()
