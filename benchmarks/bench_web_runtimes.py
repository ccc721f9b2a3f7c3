"""onnxruntime-web vs TF.js vs tfjs-tflite on one model in headless Chromium (web_demo/runtimes.html): per runtime ×
backend × variant, load time, memory, decode tok/s (median and range over --repeats generations of --tokens greedy
tokens) and prompt tok/s, on the 169M shapes by default.

    python benchmarks/bench_web_runtimes.py [--cells ort:wasm:fp32,tfjs:wasm:fp32,tflite:wasm:int8:2:worker,...]
        [--threads 2] [--ids] [--out table.md] [--cell-timeout-s S] [--budget-s S]

A cell is runtime:backend:variant[:threads[:worker|steps|worker+steps]][@tokens]; `worker` runs the runtime in a Web
Worker (runtimes.html's ?worker=1, rt_worker.js) instead of on the page's thread; `steps` feeds the prompt token by
token though the folder has a prompt graph (?promptgraph=0: a prompt graph's failure apart from the step graph's);
@tokens generates that many tokens instead of --tokens (a slow cell: tfjs:cpu:fp32@8). Our own wasm runtime (rt_wasm.js, int8 only) is
wasm-native:wasm-native:int8 (its kernel forced with backend wasm-native-u8|nib|i16); benchmarks/bench_wasm_native.py
times it against onnxruntime-web interleaved in one page.

The exports (onnx, tfjs, tflite; fp32 and the cells' other variants of each format, ONNX and TFLite with their prompt
graphs) are made once into --cache (default ~/.cache/rwkv-export/bench_web_runtimes/<source>/; --no-check: the parity
gates are tested elsewhere); a cached folder that lacks a cell's variant is made again. Each cell loads its folder in a
fresh page, runs one warm-up generation, then --repeats measured ones. The first cell is the baseline; it runs again at
the end (list it in the middle of --cells too, to interleave), and every row shows its decode ratio to the baseline's
first run and the 1-minute load average after it (so load from the other processes on the machine shows as a drift of
the baseline). A cell that cannot run is a row saying why, in the page's words; one still running after
--cell-timeout-s ends its row ("timed out"); with --budget-s no cell starts after that many seconds of the run.

--ids: every measured generation's greedy ids are compared with runtime_ref's (fp64, RWKV-4, computed here with torch
on the --source's weights, for the prompt ids the page's tokenizer gave), and the last logits' max|Δ|/std is shown:
an fp32 row must give the reference's ids (tests/test_web_runtimes.py checks the CPU backends in CI; the GPU backends
need a GPU). --out FILE.md: the table written row by row to FILE.md, and FILE.json (every number) beside it.

Memory: the peak resident memory (VmHWM) of the page's renderer process, read from /proc after the cell (each cell
runs in a fresh Chromium, so the peak is that cell's): JS heap, wasm memories and the runtime's threads, not the GPU
process. With --cdp (a Chromium this script did not start) it is the page's own measure instead:
performance.measureUserAgentSpecificMemory() (JS heaps, ArrayBuffers, wasm memories), the larger of two samples (after
load, after the generations), or where that does not answer within --mem-timeout-s (it waits for every thread of the
page, and a wasm thread pool parked in Atomics.wait never answers: onnxruntime-web with threads; device-b.sh's Chromium
answers only at a GC) the JS heap (usedJSHeapSize, which leaves wasm memory out), marked "heap".

GPU machine (no Playwright, no Node, no ai-edge-litert; ../shared/tools/webgpu-device): device-b.sh brings
onnxruntime-web's files; `--pack F --pack-set gpu` writes here what else the page loads there (TF.js and tfjs-tflite,
threaded SIMD builds only, ~1.3 MB) and `--unpack F` there puts it into web_demo/node_modules. Then
`bash .wgpu/B/device-b.sh python3 benchmarks/bench_web_runtimes.py --cdp ...` drives the Chromium that device-b.sh
started, over the DevTools protocol (.wgpu/B/cdp.py), making the onnx and tfjs exports there; tflite cells need the
folder in --cache (written here and carried: the TFLite writer and quantizer need ai-edge-litert).

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
# target -> CLI arguments after the source; the --quant list is the cells' variants of that format (fp32 is always made)
EXPORTS = {"onnx": ["--no-check"], "tfjs": ["--no-check"], "tflite": ["--no-check"]}
FORMAT = {"ort": "onnx", "native": "onnx", "wasm-native": "onnx", "tfjs": "tfjs", "tflite": "tflite"}
# TF.js's pure-JS cpu backend (~1 tok/s at 169M) and WebGL/WebGPU on SwiftShader (a CPU rendering GPU calls) are
# left out of the CPU default: they run (tests/test_web_runtimes.py, tiny model) but would take most of the run.
CPU_CELLS = ("ort:wasm:fp32,ort:wasm:int8,tfjs:wasm:fp32,tfjs:wasm:uint8,tflite:wasm:fp32:1,tflite:wasm:int8:1,"
             "tflite:wasm:int8:2,tflite:wasm:int8:1:worker,tflite:wasm:int8:2:worker,ort:wasm:int8:2:worker")
GPU_CELLS = ("ort:webgpu:fp32,native:webgpu-native:fp32,ort:wasm:fp32,tfjs:webgpu:fp32,tfjs:webgl:fp32,tfjs:wasm:fp32,"
             "ort:wasm:int8,tfjs:webgpu:uint8")
# What the page loads from node_modules (for --pack): runtimes.html's scripts and the wasm binaries they fetch.
PACKS = {"all": [
    "node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", "node_modules/onnxruntime-web/dist/ort.webgpu.min.mjs",
    *[f"node_modules/@tensorflow/tfjs-{p}/dist/tf-{p}.min.js"
      for p in ("core", "converter", "backend-cpu", "backend-wasm", "backend-webgl", "backend-webgpu", "tflite")],
    *[f"node_modules/@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm{s}.wasm" for s in ("", "-simd", "-threaded-simd")],
    "node_modules/@tensorflow/tfjs-tflite/wasm",
]}
# The GPU machine (device-b.sh brings onnxruntime-web; its Chromium is cross-origin isolated with SIMD and threads, so
# TF.js wasm and tfjs-tflite fetch their threaded-SIMD builds only).
PACKS["gpu"] = [
    *[f"node_modules/@tensorflow/tfjs-{p}/dist/tf-{p}.min.js"
      for p in ("core", "converter", "backend-cpu", "backend-wasm", "backend-webgl", "backend-webgpu", "tflite")],
    "node_modules/@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm",
    *[f"node_modules/@tensorflow/tfjs-tflite/wasm/tflite_web_api_cc_simd_threaded.{x}" for x in ("js", "wasm")],
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


def ensure_export(cache: Path, source: str, target: str, variants: set[str]) -> Path:
    """The export folder of `target` with (at least) these variants: the cached one, or made now (all of them)."""
    out = cache / target
    have = set()
    if (out / "manifest.json").is_file():
        have = {g["variant"] for g in json.loads((out / "manifest.json").read_text()).get("graphs", [])}
        if variants <= have:
            return out
    quant = sorted((variants | have) - {"fp32"})
    cli = [sys.executable, "-c", "import sys; from rwkv_export.cli import main; sys.argv[0] = 'rwkv-export'; main()"]
    cmd = cli + [target, source, "-o", str(out), "-q", *EXPORTS[target], *(["--quant", ",".join(quant)] if quant else [])]
    print(f"exporting {source} -> {out} ({', '.join(['fp32', *quant])}) ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd)  # (on a shared machine, run with OMP_NUM_THREADS=1)
    if res.returncode != 0:
        raise RuntimeError(f"`rwkv-export {target}` failed (exit {res.returncode})")
    print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def parse_cell(spec: str) -> dict:
    """runtime:backend:variant[:threads[:worker|steps|worker+steps]][@tokens] -> a cell (threads/tokens None: the
    command line's)."""
    body, at, tok = spec.partition("@")
    parts = body.split(":")
    if not 3 <= len(parts) <= 5 or not all(parts[:3]):
        fail(f"cell '{spec}': write runtime:backend:variant[:threads[:worker]][@tokens]")
    if parts[0] not in FORMAT:
        fail(f"cell '{spec}': unknown runtime '{parts[0]}' (choose from {', '.join(FORMAT)})")
    threads = parts[3] if len(parts) > 3 and parts[3] else None
    if threads is not None and not (threads.isdigit() and int(threads) > 0):
        fail(f"cell '{spec}': threads must be a positive integer, not '{threads}'")
    flags = parts[4].split("+") if len(parts) > 4 else []
    if not set(flags) <= {"worker", "steps"}:
        fail(f"cell '{spec}': the fifth field takes worker, steps or worker+steps, not '{parts[4]}'")
    if at and not (tok.isdigit() and int(tok) > 0):
        fail(f"cell '{spec}': @tokens must be a positive integer, not '{tok}'")
    return {"spec": spec, "runtime": parts[0], "backend": parts[1], "variant": parts[2],
            "threads": int(threads) if threads else None, "worker": "worker" in flags, "steps": "steps" in flags,
            "tokens": int(tok) if at else None}


# ---- one cell: page-side steps (the same JS for Playwright and for cdp.py) ----------------------------------------

READY = "!!(window.rwkvRuntimes && ['setup','error'].includes(document.body.dataset.status))"


def cell_exprs(cell: dict, threads: int, tokens: int, repeats: int, *, ids: bool = False, mem_timeout_s: float = 20,
               timeout_s: float = LOAD_TIMEOUT_MS / 1000) -> tuple[list[str], list[str]]:
    """(kinds, expressions): load, memory, a warm-up generation, `repeats` measured ones, memory again (and with
    `ids` the last logits). Each expression races the cell's deadline (timeout_s from the first one), so a runtime that
    hangs or crawls (TF.js WebGPU on SwiftShader) ends its row instead of the run."""
    opts = json.dumps({"runtime": cell["runtime"], "backend": cell["backend"], "variant": cell["variant"],
                       "threads": threads, "worker": cell["worker"], "verify": False,
                       "promptGraph": not cell.get("steps")})
    gen = ("await window.rwkvRuntimes.generate({prompt: %s, maxTokens: %d})"
           ".then(r => JSON.stringify({stats: r.stats, ids: r.ids, promptIds: r.promptIds}))")
    mem = f"await window.rwkvRuntimes.memory({{timeoutMs: {int(mem_timeout_s * 1000)}}}).then(m => JSON.stringify(m))"
    steps = ([("load", f"await window.rwkvRuntimes.load({opts}).then(r => JSON.stringify(r))"), ("mem", mem),
              ("warmup", gen % (json.dumps(PROMPT), min(WARMUP_TOKENS, tokens)))]
             + [("run", gen % (json.dumps(PROMPT), tokens))] * repeats + [("mem", mem)])
    if ids:
        steps.append(("logits", "JSON.stringify(window.rwkvRuntimes.lastResult.lastLogits)"))
    deadline = ("(self.__cellDeadline ??= Date.now() + %d, await Promise.race([(async () => (%s))(), new Promise((_, "
                "no) => setTimeout(() => no(new Error('cell timed out after %d s (--cell-timeout-s)')), "
                "Math.max(0, self.__cellDeadline - Date.now())))]))")
    return [k for k, _ in steps], [deadline % (timeout_s * 1000, e, timeout_s) for _, e in steps]


def summarize(kinds: list[str], values: list, rss: int | None = None) -> dict:
    """values: the results of cell_exprs' expressions, in order (fewer, ending in {'exception': ...}, where the page
    failed); rss: the renderer's peak RSS, where measured."""
    if not values:
        return {"error": "the page gave no result"}
    if isinstance(values[0], str) and "error" in json.loads(values[0]):
        return {"error": json.loads(values[0])["error"]}
    for kind, v in zip(kinds, values):
        if not isinstance(v, str):
            why = v.get("exception", v) if isinstance(v, dict) else v
            return {"error": f"page error at {kind}: {str(why).splitlines()[0] if str(why) else why}"}
    if len(values) < len(kinds):
        return {"error": f"the page stopped after {len(values)} of {len(kinds)} steps"}
    got = {}
    for kind, v in zip(kinds, values):
        got.setdefault(kind, []).append(json.loads(v))
    load, runs = got["load"][0], got["run"]
    tok = sorted(r["stats"]["tokensPerSecond"] for r in runs)
    ua = [m["uaBytes"] for m in got["mem"] if m["uaBytes"]]
    heap = [m["jsHeapBytes"] for m in got["mem"] if m["jsHeapBytes"]]
    return {
        "load_s": load["loadSeconds"], "first_s": load["firstRunSeconds"], "bytes": load["bytes"],
        "threads": load["threads"], "backend": load["backend"], "prompt_mode": runs[0]["stats"]["promptMode"],
        "mem": (rss, "rss") if rss else (max(ua), "ua") if ua else ((max(heap), "heap") if heap else (None, "")),
        "tok_s": statistics.median(tok), "tok_range": (tok[0], tok[-1]),
        "prompt_tok_s": statistics.median(r["stats"]["promptTokensPerSecond"] for r in runs),
        "prompt_tokens": runs[0]["stats"]["promptTokens"], "notes": load["notes"],
        "prompt_ids": runs[0]["promptIds"], "ids": [r["ids"] for r in runs],
        "last_logits": got["logits"][0] if "logits" in got else None,
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


NPM_FETCHED: set[str] = set()  # what the pages fetched from node_modules (Playwright runs): --pack-set gpu's check


def playwright_cell(pw, url: str, exprs: list[str], timeout_s: float) -> tuple[list, int | None]:
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # fresh: the peak is this cell's
    page = browser.new_page()
    page.set_default_timeout(timeout_s * 1000 + 30_000)
    page.on("request", lambda req: NPM_FETCHED.add("node_modules/" + req.url.split("/node_modules/", 1)[1])
            if "/node_modules/" in req.url else None)
    try:
        page.goto(f"{url}runtimes.html")
        page.wait_for_function(READY)
        out = []
        for e in exprs:
            try:
                out.append(page.evaluate(f"async () => ({e})"))
            except Exception as ex:  # a crash of the page's runtime, or the cell's deadline: the row says so
                out.append({"exception": str(ex).splitlines()[0]})
                break
        return out, renderer_peak_bytes()
    finally:
        browser.close()


def cdp_cell(script: str, url: str, exprs: list[str], timeout_s: float) -> tuple[list, None]:
    try:  # the page's own deadline ends a slow cell; this one is for a page that stops answering at all
        res = subprocess.run([sys.executable, script, f"{url}runtimes.html", READY, *exprs], capture_output=True,
                             text=True, timeout=timeout_s + 30, env={**os.environ, "CDP_TIMEOUT": str(timeout_s + 20)})
    except subprocess.TimeoutExpired:
        return [{"exception": f"cdp.py did not finish in {timeout_s + 30:.0f} s"}], None
    vals = []
    for line in res.stdout.splitlines():
        if line.startswith("{"):
            v = json.loads(line)["value"]
            vals.append(v)
            if not isinstance(v, str):
                break
    if (res.returncode != 0 or len(vals) < len(exprs)) and (not vals or isinstance(vals[-1], str)):
        vals.append({"exception": (res.stderr.strip().splitlines() or ["cdp.py failed"])[-1]})
    return vals, None


_REF = {}


def reference(source: str, prompt_ids: list[int], tokens: int):
    """runtime_ref (fp64) on the source's weights: (greedy ids, logits after the last of them), once per prompt."""
    key = (tuple(prompt_ids), tokens)
    if key not in _REF:
        import torch

        torch.set_num_threads(1)  # a shared machine; the reference is a few seconds even at 169M
        from runtime_ref import RWKV4
        from rwkv_export.sources import Source

        t = time.perf_counter()
        model = RWKV4(Source(source).load().tensors, dtype=torch.float64)
        ids, _ = model.greedy(list(prompt_ids), tokens)
        logits, _ = model.forward_seq(list(prompt_ids) + ids, model.new_state())
        _REF[key] = (ids, [float(x) for x in logits.reshape(-1)])
        print(f"runtime_ref fp64: {tokens} greedy ids in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return _REF[key]


def ids_check(r: dict, source: str, tokens: int) -> dict:
    """Every measured generation's ids against runtime_ref's; the last logits' max|Δ|/std(ref)."""
    want, ref_logits = reference(source, r["prompt_ids"], tokens)
    bad = [next(i for i, (a, b) in enumerate(zip(got + [None] * tokens, want)) if a != b)
           for got in r["ids"] if got != want]
    out = {"ids_equal": not bad, "first_diff": min(bad) if bad else None, "logits_max_rel": None}
    if r["last_logits"] is not None and len(r["last_logits"]) == len(ref_logits):
        mean = sum(ref_logits) / len(ref_logits)
        std = (sum((x - mean) ** 2 for x in ref_logits) / len(ref_logits)) ** 0.5
        out["logits_max_rel"] = max(abs(a - b) for a, b in zip(r["last_logits"], ref_logits)) / std
    return out


def row(cell: str, r: dict, base: float | None, load_avg: float, ids: bool, tag: str = "") -> str:
    if "error" in r:
        return f"| {cell}{tag} | cannot run: {r['error']} |"
    mem, kind = r["mem"]
    mem_s = f"{mem / 1e6:,.0f} MB{' (heap)' if kind == 'heap' else ''}" if mem else "?"
    th = f" ×{r['threads']}" if r["threads"] else ""
    lo, hi = r["tok_range"]
    ratio = f"{r['tok_s'] / base:.2f}" if base else "–"
    prompt = f"{r['prompt_tok_s']:.1f} ({'prompt graph' if r['prompt_mode'] == 'sequence' else 'via steps'})"
    out = (f"| {cell}{th}{tag} | {r['bytes'] / 1e6:,.0f} MB | {r['load_s']:.1f} s (+{r['first_s']:.1f}) | {mem_s} | "
           f"{r['tok_s']:.1f} ({lo:.1f}–{hi:.1f}) | {ratio} | {prompt} | {load_avg:.1f} |")
    if ids:
        rel = f", logits {r['logits_max_rel']:.1e} of std" if r.get("logits_max_rel") is not None else ""
        out += (f" {'equal' if r['ids_equal'] else 'differ from token %d' % r['first_diff']}{rel} |")
    return out


def pack(dest: Path, files: list[str]) -> None:
    web = ROOT / "web_demo"
    for p in files:
        if not (web / p).exists():
            fail(f"web_demo/{p} is missing: npm ci --prefix web_demo")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for p in files:
            tar.add(web / p, arcname=p)
    tmp.replace(dest)
    print(f"wrote {dest} ({dest.stat().st_size / 1e6:.1f} MB)")


class Report:
    """The table on stdout and, with --out, in a markdown file and a JSON file beside it, rewritten after every row
    (so a run cut short leaves the rows it measured)."""

    def __init__(self, out: Path | None, header: list[str]):
        self.out, self.lines, self.rows = out, list(header), []
        for line in header:
            print(line, flush=True)
        self.flush()

    def add(self, line: str, data: dict | None = None) -> None:
        print(line, flush=True)
        self.lines.append(line)
        if data is not None:
            self.rows.append(data)
        self.flush()

    def flush(self) -> None:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text("\n".join(self.lines) + "\n")
            self.out.with_suffix(".json").write_text(json.dumps(self.rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="builtin:169m-synthetic")
    ap.add_argument("--cache", type=Path, default=None, help="folder of the exports (made once)")
    ap.add_argument("--cells", default=None, help="runtime:backend:variant[:threads[:worker|steps]][@tokens],... ("
                    "default "
                    f"here: {CPU_CELLS}; --cdp: {GPU_CELLS}); the first is the baseline, run again at the end")
    ap.add_argument("--threads", type=int, default=2, help="wasm threads (onnxruntime-web, TF.js wasm, tfjs-tflite)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ids", action="store_true", help="check every generation's greedy ids (and the last logits) "
                    "against runtime_ref fp64 on the source's weights (RWKV-4; torch computes it here)")
    ap.add_argument("--out", type=Path, help="also write the table here (markdown) and as JSON beside it, row by row")
    ap.add_argument("--cell-timeout-s", type=float, default=LOAD_TIMEOUT_MS / 1000,
                    help="a cell still running after this long ends its row (timed out)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no cell after this many seconds of the run")
    ap.add_argument("--mem-timeout-s", type=float, default=20, help="wait for measureUserAgentSpecificMemory so long "
                    "(a Chromium without --enable-blink-features=ForceEagerMeasureMemory answers only at a GC)")
    ap.add_argument("--cdp", action="store_true", help="drive the Chromium at $CDP with cdp.py (the GPU machine)")
    ap.add_argument("--cdp-script", default=str(ROOT / ".wgpu" / "B" / "cdp.py"))
    ap.add_argument("--pack", type=Path, help="write the npm files the page needs into this .tar.xz and exit")
    ap.add_argument("--pack-set", choices=sorted(PACKS), default="all", help="which files --pack writes: all, or "
                    "gpu (what the GPU machine's cells need beyond device-b.sh's onnxruntime-web, ~1.4 MB)")
    ap.add_argument("--unpack", type=Path, help="extract a --pack file into web_demo/ and exit")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.pack:
        return pack(args.pack, PACKS[args.pack_set])
    if args.unpack:
        if not args.unpack.is_file():
            fail(f"{args.unpack} does not exist")
        with tarfile.open(args.unpack) as tar:
            tar.extractall(ROOT / "web_demo", filter="data")
        return print(f"unpacked {args.unpack} into web_demo/")
    for name in ("threads", "tokens", "repeats"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1")
    from rwkv_export.node import cache_dir
    from rwkv_export.serve import serve_in_thread

    cache = args.cache or cache_dir() / "bench_web_runtimes" / args.source.replace("builtin:", "").replace("/", "_")
    cells = [parse_cell(c) for c in (args.cells or (GPU_CELLS if args.cdp else CPU_CELLS)).split(",")]
    cells.append(dict(cells[0], again=True))  # the baseline again at the end
    folders = {}
    for fmt in dict.fromkeys(FORMAT[c["runtime"]] for c in cells):
        try:
            folders[fmt] = ensure_export(cache, args.source, fmt,
                                         {c["variant"] for c in cells if FORMAT[c["runtime"]] == fmt})
        except RuntimeError as e:
            folders[fmt] = e
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    la = "/".join(f"{x:.1f}" for x in os.getloadavg())
    cols = ["runtime:backend:variant ×threads", "download", "load (+first run)",
            "page memory" if args.cdp else "renderer peak RSS", "decode tok/s median (range)", "vs baseline",
            "prompt tok/s", "load avg"] + (["greedy ids vs runtime_ref fp64"] if args.ids else [])
    rep = Report(args.out, [
        f"machine: {machine()}; Chromium {'at $CDP' if args.cdp else CHROMIUM}; {args.source}; {args.tokens} greedy "
        f"tokens × {args.repeats} (+{WARMUP_TOKENS} warm-up) unless a cell says @N; prompt {len(PROMPT.encode())} bytes; "
        f"{started}; load average {la} (1/5/15 min)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)])
    pw = None
    if not args.cdp:
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
    base, notes = None, {}
    try:
        for c in cells:
            label = (f"{c['runtime']}:{c['backend']}:{c['variant']}{' worker' if c['worker'] else ''}"
                     + (" prompt via steps" if c["steps"] else "")
                     + (f" @{c['tokens']} tokens" if c["tokens"] else ""))
            tag = " (baseline again)" if c.get("again") else " (baseline)" if c is cells[0] else ""
            folder = folders[FORMAT[c["runtime"]]]
            spent = time.perf_counter() - t_start
            if isinstance(folder, Exception):
                r = {"error": str(folder)}
            elif args.budget_s is not None and spent > args.budget_s:
                r = {"error": f"not run: the run's --budget-s {args.budget_s:.0f} s was spent"}
            else:
                timeout = args.cell_timeout_s
                if args.budget_s is not None:
                    timeout = max(10.0, min(timeout, args.budget_s - spent))
                tokens = c["tokens"] or args.tokens
                kinds, exprs = cell_exprs(c, c["threads"] or args.threads, tokens, args.repeats, ids=args.ids,
                                          mem_timeout_s=args.mem_timeout_s, timeout_s=timeout)
                server, url = serve_in_thread(folder)
                try:
                    vals, rss = (cdp_cell(args.cdp_script, url, exprs, timeout) if args.cdp
                                 else playwright_cell(pw, url, exprs, timeout))
                finally:
                    server.shutdown()
                    server.server_close()
                r = summarize(kinds, vals, rss)
                if args.ids and "error" not in r:
                    r.update(ids_check(r, args.source, tokens))
            if c is cells[0] and "error" not in r:  # no baseline, no ratios (rather than another row as one)
                base = r["tok_s"]
            load_avg = os.getloadavg()[0]
            data = {k: v for k, v in r.items() if k not in ("ids", "last_logits", "prompt_ids")}
            rep.add(row(label, r, base, load_avg, args.ids, tag),
                    {"cell": c["spec"], "label": label, **data, "load_avg_1min": load_avg,
                     "vs_baseline": r["tok_s"] / base if base and "tok_s" in r else None,
                     "utc": time.strftime("%H:%M:%S", time.gmtime())})
            notes.update({n: None for n in r.get("notes", [])})
    finally:
        if pw:
            pw.stop()
    rep.add("")
    if args.ids:
        rep.add("- greedy ids: an fp32 row must equal runtime_ref's (the same arithmetic, rounded in fp32); a "
                "quantized variant's are shown for information (its weights differ)")
    rep.add(f"finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} after {time.perf_counter() - t_start:.0f} s;"
            f" load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    for n in notes:
        rep.add(f"- {n}")
    if NPM_FETCHED:
        print(f"npm files the pages fetched: {', '.join(sorted(NPM_FETCHED))}", file=sys.stderr)


if __name__ == "__main__":
    main()
