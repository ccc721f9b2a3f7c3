"""onnxruntime-web vs TF.js vs tfjs-tflite on one model in headless Chromium (web_demo/runtimes.html): per runtime ×
backend × variant, load time, memory, decode tok/s (median and range over --repeats generations of --tokens greedy
tokens) and prompt tok/s, on the 169M shapes by default.

    python benchmarks/bench_web_runtimes.py [--cells ort:wasm:fp32,tfjs:wasm:fp32,tflite:wasm:int8:2:worker,...]
        [--threads 2]

A cell is runtime:backend:variant[:threads[:worker]]; `worker` runs the runtime in a Web Worker (runtimes.html's
?worker=1, rt_worker.js) instead of on the page's thread. Our own wasm runtime (rt_wasm.js, int8 only) is
wasm-native:wasm-native:int8 (its kernel forced with backend wasm-native-u8|nib|i16); benchmarks/bench_wasm_native.py
times it against onnxruntime-web interleaved in one page.

The exports (onnx fp32+int8 with the prompt graph, tfjs fp32+uint8, tflite fp32+int8) are made once into --cache
(default ~/.cache/rwkv-export/bench_web_runtimes/<source>/; --no-check: the parity gates are tested elsewhere). Each
cell loads its folder in a fresh page, runs one warm-up generation, then --repeats measured ones. The first cell is the
baseline; it runs again at the end, and every row shows its decode ratio to the baseline's first run (so load from the
other processes on the machine shows as a drift of the baseline between the two).

Memory: the peak resident memory (VmHWM) of the page's renderer process, read from /proc after the cell (each cell
runs in a fresh Chromium, so the peak is that cell's): JS heap, wasm memories and the runtime's threads, not the GPU
process. With --cdp (a Chromium this script did not start) it is the page's own measure instead:
performance.measureUserAgentSpecificMemory() (JS heaps, ArrayBuffers, wasm memories), the larger of two samples (after
load, after the generations), or where that does not answer (it waits for every thread of the page, and a wasm
thread pool parked in Atomics.wait never answers: onnxruntime-web with threads) the JS heap (usedJSHeapSize, which
leaves wasm memory out), marked "heap".

GPU machine (no Playwright, no Node; ../shared/tools/webgpu-device): here `--pack .wgpu/tf.tar.xz` writes the npm
files the page loads (~8 MB); there `--unpack .wgpu/tf.tar.xz` puts them into web_demo/node_modules, and
`bash .wgpu/B/device-b.sh python3 benchmarks/bench_web_runtimes.py --cdp` drives the Chromium that device-b.sh
started, over the DevTools protocol (.wgpu/B/cdp.py), making the onnx and tfjs exports there (tflite cells need ai-edge-litert and
ai-edge-quantizer there, or the folder in --cache).

Needs here: pip install playwright; /usr/bin/chromium; npm ci --prefix web_demo.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu",
                 "--enable-blink-features=ForceEagerMeasureMemory"]
# 69 tokens of the 20B tokenizer (274 bytes): long enough that a fixed-chunk prompt graph (TFLite: 16) runs whole chunks
PROMPT = ("\n\nThe RWKV language model is an RNN with transformer-level performance. It can be trained like a GPT, "
          "in parallel over a whole text, and it runs like an RNN, one token at a time with a state of fixed size, "
          "so it needs no cache of keys and values however long the text grows.")  # 4 chunks of 16 + 5 steps
WARMUP_TOKENS = 8
LOAD_TIMEOUT_MS = 900_000
EXPORTS = {  # target -> (CLI arguments after the source)
    "onnx": ["--quant", "int8", "--no-check"],
    "tfjs": ["--quant", "uint8", "--no-check"],
    "tflite": ["--quant", "int8", "--no-check"],
}
FORMAT = {"ort": "onnx", "native": "onnx", "wasm-native": "onnx", "tfjs": "tfjs", "tflite": "tflite"}
# TF.js's pure-JS cpu backend (~1 tok/s at 169M) and WebGL/WebGPU on SwiftShader (a CPU rendering GPU calls) are
# left out of the CPU default: they run (tests/test_web_runtimes.py, tiny model) but would take most of the run.
CPU_CELLS = ("ort:wasm:fp32,ort:wasm:int8,tfjs:wasm:fp32,tfjs:wasm:uint8,tflite:wasm:fp32:1,tflite:wasm:int8:1,"
             "tflite:wasm:int8:2,tflite:wasm:int8:1:worker,tflite:wasm:int8:2:worker,ort:wasm:int8:2:worker")
GPU_CELLS = ("ort:webgpu:fp32,native:webgpu-native:fp32,ort:wasm:fp32,tfjs:webgpu:fp32,tfjs:webgl:fp32,tfjs:wasm:fp32,"
             "ort:wasm:int8,tfjs:webgpu:uint8")
# What the page loads from node_modules (for --pack): runtimes.html's scripts and the wasm binaries they fetch.
PACK = [
    "node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", "node_modules/onnxruntime-web/dist/ort.webgpu.min.mjs",
    *[f"node_modules/@tensorflow/tfjs-{p}/dist/tf-{p}.min.js"
      for p in ("core", "converter", "backend-cpu", "backend-wasm", "backend-webgl", "backend-webgpu", "tflite")],
    *[f"node_modules/@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm{s}.wasm" for s in ("", "-simd", "-threaded-simd")],
    "node_modules/@tensorflow/tfjs-tflite/wasm",
]


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores"


def ensure_export(cache: Path, source: str, target: str) -> Path:
    out = cache / target
    if (out / "manifest.json").is_file():
        return out
    cli = [sys.executable, "-c", "import sys; from rwkv_export.cli import main; sys.argv[0] = 'rwkv-export'; main()"]
    cmd = cli + [target, source, "-o", str(out), "-q", *EXPORTS[target]]
    print(f"exporting {source} -> {out} (once) ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd)  # (on a shared machine, run with OMP_NUM_THREADS=1)
    if res.returncode != 0:
        raise RuntimeError(f"`rwkv-export {target}` failed (exit {res.returncode})")
    print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


# ---- one cell: page-side steps (the same JS for Playwright and for cdp.py) ----------------------------------------

READY = "!!(window.rwkvRuntimes && ['setup','error'].includes(document.body.dataset.status))"


def cell_exprs(runtime: str, backend: str, variant: str, threads: int, tokens: int, repeats: int,
               worker: bool = False) -> list[str]:
    opts = json.dumps({"runtime": runtime, "backend": backend, "variant": variant, "threads": threads,
                       "worker": worker, "verify": False})
    gen = "await window.rwkvRuntimes.generate({prompt: %s, maxTokens: %d}).then(r => JSON.stringify(r.stats))"
    mem = "await window.rwkvRuntimes.memory({timeoutMs: 20000}).then(m => JSON.stringify(m))"
    return ([f"await window.rwkvRuntimes.load({opts}).then(r => JSON.stringify(r))", mem,
             gen % (json.dumps(PROMPT), WARMUP_TOKENS)] + [gen % (json.dumps(PROMPT), tokens)] * repeats + [mem])


def summarize(values: list) -> dict:
    """values: the JSON results of cell_exprs, in order."""
    load = json.loads(values[0])
    if "error" in load:
        return {"error": load["error"]}
    for v in values[1:]:
        if not isinstance(v, str):
            return {"error": f"page error: {v}"}
    rss = json.loads(values.pop())["rssPeakBytes"] if values[-1].startswith('{"rssPeakBytes"') else None
    mems = [json.loads(values[1]), json.loads(values[-1])]
    runs = [json.loads(v) for v in values[3:-1]]
    tok = sorted(r["tokensPerSecond"] for r in runs)
    ua = [m["uaBytes"] for m in mems if m["uaBytes"]]
    heap = [m["jsHeapBytes"] for m in mems if m["jsHeapBytes"]]
    return {
        "load_s": load["loadSeconds"], "first_s": load["firstRunSeconds"], "bytes": load["bytes"],
        "threads": load["threads"], "backend": load["backend"], "prompt_mode": runs[0]["promptMode"],
        "mem": (rss, "rss") if rss else (max(ua), "ua") if ua else ((max(heap), "heap") if heap else (None, "")),
        "tok_s": statistics.median(tok), "tok_range": (tok[0], tok[-1]),
        "prompt_tok_s": statistics.median(r["promptTokensPerSecond"] for r in runs),
        "prompt_tokens": runs[0]["promptTokens"], "notes": load["notes"],
    }


def renderer_peak_bytes() -> int | None:
    """The largest VmHWM (peak RSS) among the Chromium renderer processes descended from this process."""
    procs = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            procs[int(d.name)] = (ppid, (d / "cmdline").read_bytes())
        except (ValueError, OSError, IndexError):
            continue
    mine, peak = {os.getpid()}, None
    for _ in range(8):  # descendants, a few levels deep (python -> playwright driver -> chromium -> zygote -> renderer)
        mine |= {pid for pid, (ppid, _) in procs.items() if ppid in mine}
    for pid in mine:
        if b"--type=renderer" in procs.get(pid, (0, b""))[1]:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
                peak = max(peak or 0, kb * 1024)
            except (OSError, StopIteration, ValueError):
                continue
    return peak


def playwright_cell(pw, url: str, exprs: list[str]) -> list:
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # fresh: the peak is this cell's
    page = browser.new_page()
    page.set_default_timeout(LOAD_TIMEOUT_MS)
    try:
        page.goto(f"{url}runtimes.html")
        page.wait_for_function(READY)
        out = []
        for e in exprs:
            try:
                out.append(page.evaluate(f"async () => ({e})"))
            except Exception as ex:  # a crash of the page's runtime: the row says so
                out.append({"exception": str(ex).splitlines()[0]})
                break
        out.append(json.dumps({"rssPeakBytes": renderer_peak_bytes()}))
        return out
    finally:
        browser.close()


def cdp_cell(script: str, url: str, exprs: list[str]) -> list:
    res = subprocess.run([sys.executable, script, f"{url}runtimes.html", READY, *exprs], capture_output=True, text=True,
                         env={**os.environ, "CDP_TIMEOUT": str(LOAD_TIMEOUT_MS // 1000)})
    vals = [json.loads(line)["value"] for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or len(vals) < len(exprs):
        vals.append({"exception": (res.stderr.strip().splitlines() or ["cdp.py failed"])[-1]})
    return vals


def row(cell: str, r: dict, base: float | None) -> str:
    if "error" in r:
        return f"| {cell} | cannot run: {r['error']} |"
    mem, kind = r["mem"]
    mem_s = f"{mem / 1e6:.0f} MB{' (heap)' if kind == 'heap' else ''}" if mem else "?"
    th = f" ×{r['threads']}" if r["threads"] else ""
    lo, hi = r["tok_range"]
    ratio = f"{r['tok_s'] / base:.2f}" if base else "–"
    prompt = f"{r['prompt_tok_s']:.1f} ({'prompt graph' if r['prompt_mode'] == 'sequence' else 'via steps'})"
    return (f"| {cell}{th} | {r['bytes'] / 1e6:.0f} MB | {r['load_s']:.1f} s (+{r['first_s']:.1f}) | {mem_s} | "
            f"{r['tok_s']:.1f} ({lo:.1f}–{hi:.1f}) | {ratio} | {prompt} |")


def pack(dest: Path) -> None:
    web = ROOT / "web_demo"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:xz") as tar:
        for p in PACK:
            if not (web / p).exists():
                fail(f"web_demo/{p} is missing: npm ci --prefix web_demo")
            tar.add(web / p, arcname=p)
    print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="builtin:169m-synthetic")
    ap.add_argument("--cache", type=Path, default=None, help="folder of the exports (made once)")
    ap.add_argument("--cells", default=None, help=f"runtime:backend:variant[:threads],... (default here: {CPU_CELLS}; "
                    f"--cdp: {GPU_CELLS})")
    ap.add_argument("--threads", type=int, default=2, help="wasm threads (onnxruntime-web, TF.js wasm, tfjs-tflite)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cdp", action="store_true", help="drive the Chromium at $CDP with cdp.py (the GPU machine)")
    ap.add_argument("--cdp-script", default=str(ROOT / ".wgpu" / "B" / "cdp.py"))
    ap.add_argument("--pack", type=Path, help="write the npm files the page needs into this .tar.xz and exit")
    ap.add_argument("--unpack", type=Path, help="extract a --pack file into web_demo/ and exit")
    args = ap.parse_args()
    if args.pack:
        return pack(args.pack)
    if args.unpack:
        with tarfile.open(args.unpack) as tar:
            tar.extractall(ROOT / "web_demo", filter="data")
        return print(f"unpacked {args.unpack} into web_demo/")
    from rwkv_export.node import cache_dir
    from rwkv_export.serve import serve_in_thread

    cache = args.cache or cache_dir() / "bench_web_runtimes" / args.source.replace("builtin:", "").replace("/", "_")
    spec = args.cells or (GPU_CELLS if args.cdp else CPU_CELLS)
    cells = [(c.split(":") + [None, None])[:5] for c in spec.split(",")]
    for c in cells:
        if c[4] not in (None, "worker"):
            fail(f"cell {':'.join(x for x in c if x)}: the fifth field can only be 'worker'")
    cells.append(cells[0])  # the baseline again at the end
    folders = {}
    for rt, *_ in cells:
        if rt not in FORMAT:
            fail(f"unknown runtime '{rt}' in --cells (choose from {', '.join(FORMAT)})")
        fmt = FORMAT[rt]
        if fmt not in folders:
            try:
                folders[fmt] = ensure_export(cache, args.source, fmt)
            except RuntimeError as e:
                folders[fmt] = e
    print(f"machine: {machine()}; Chromium {'at $CDP' if args.cdp else CHROMIUM}; {args.source}; {args.tokens} greedy "
          f"tokens × {args.repeats} (+{WARMUP_TOKENS} warm-up); prompt {len(PROMPT.encode())} bytes\n")
    print(f"| runtime:backend:variant ×threads | download | load (+first run) | "
          f"{'page memory' if args.cdp else 'renderer peak RSS'} | decode tok/s median "
          "(range) | vs baseline | prompt tok/s |")
    print("|---|---|---|---|---|---|---|")
    pw = None
    if not args.cdp:
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
    base, notes = None, {}
    try:
        for rt, be, variant, threads, worker in cells:
            folder = folders[FORMAT[rt]]
            cell = f"{rt}:{be}:{variant}{' worker' if worker else ''}"
            if isinstance(folder, Exception):
                print(row(cell, {"error": str(folder)}, base), flush=True)
                continue
            server, url = serve_in_thread(folder)
            try:
                exprs = cell_exprs(rt, be, variant, int(threads or args.threads), args.tokens, args.repeats,
                                   worker == "worker")
                vals = cdp_cell(args.cdp_script, url, exprs) if args.cdp else playwright_cell(pw, url, exprs)
            finally:
                server.shutdown()
                server.server_close()
            r = summarize(vals)
            if base is None and "error" not in r:
                base = r["tok_s"]
            print(row(cell, r, base), flush=True)
            notes.update({n: None for n in r.get("notes", [])})
    finally:
        if pw:
            pw.stop()
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
