"""Decode speed of the web demo in headless Chromium (onnxruntime-web, wasm, 1 and 2 threads) beside onnxruntime in
Python, on the same files, for every ONNX step-graph variant an export folder's manifest lists.

    python benchmarks/bench_web.py FOLDER [--tokens 64] [--threads 1,2] [--repeats 3] [--variants int8,fp32]

FOLDER is an export folder, e.g. the 169M shapes:  rwkv-export onnx builtin:169m-synthetic -o out169
Both sides run the same greedy continuation of the same prompt after a warm-up (the page also runs its own JIT warm-up
while loading, as for a user), and report generated tokens per second (sampling + one step per token, as
`rwkv-export generate` measures it), the median of --repeats generations. The page feeds the prompt through the prompt
graph when the folder has one (as the demo does), Python token by token; prompt times are reported apart.

--cdp (the GPU machine, ../shared/tools/webgpu-device) measures WebGPU cells side by side: onnxruntime-web's WebGPU EP
(each state I/O mode), the demo's own WGSL runtime (backend webgpu-native, web_demo/rt_webgpu.js: io "native"; greedy
steps chained on the GPU in batches of 16, or with :pertoken one round trip a token; :profile prints its kernel time
per kind; fp32, fp16, int8 and int4) and wasm, one cell per variant:backend:io; e.g. for 169M shapes with its fp16,
int8 and int4 variants:

    rwkv-export onnx builtin:169m-synthetic -o /tmp/out169 --quant fp16,int8,int4 --no-check
    python3 benchmarks/bench_web.py /tmp/out169 --cdp --probe

Needs: pip install playwright; apt-get install -y chromium; npm ci --prefix web_demo (no `playwright install`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PROMPT = "\n\nThe RWKV language model is an RNN with transformer-level performance."
WARMUP_TOKENS = 8
LOAD_TIMEOUT_MS = 600_000  # a 680 MB fp32 graph: download + session creation take tens of seconds on 2 cores


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def browser_runs(url: str, variant: str, threads: int, tokens: int, browser, backend: str = "wasm",
                 repeats: int = 3) -> dict:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{url}?autoload=1&backend={backend}&verify=0&variant={variant}&threads={threads}")
        page.wait_for_function("['ready','error','load-failed'].includes(document.body.dataset.status)",
                               timeout=LOAD_TIMEOUT_MS)
        if page.evaluate("document.body.dataset.status") != "ready":
            return {"error": page.inner_text("#error")}
        info = page.evaluate("window.rwkvDemo.loadInfo")
        if info["backend"] != backend:
            return {"error": f"page ran {info['backend']}, asked {backend}"}
        if info["numThreads"] != threads:
            return {"error": f"page ran {info['numThreads']} threads, asked {threads}"}
        gen = "o => window.rwkvDemo.generate(o)"
        page.evaluate(gen, {"prompt": PROMPT, "temperature": 0, "maxTokens": WARMUP_TOKENS})
        runs = [page.evaluate(gen, {"prompt": PROMPT, "temperature": 0, "maxTokens": tokens}) for _ in range(repeats)]
        runs.sort(key=lambda r: r["stats"]["tokensPerSecond"])
        res = runs[len(runs) // 2]  # the median generation
        st = res["stats"]
        return {
            "tok_s": st["tokensPerSecond"], "all_tok_s": [r["stats"]["tokensPerSecond"] for r in runs],
            "n": st["generatedTokens"], "prompt_ms": st["promptMs"],
            "model_share": st["modelMs"] / st["generateMs"],
            "prompt_tokens": st["promptTokens"], "load_s": info["totalSeconds"], "session_s": info["sessionSeconds"],
            "ids": res["ids"], "errors": errors,
        }
    finally:
        page.close()


LONG_PROMPT_REPEAT = 24  # the prompt-speed run feeds PROMPT this many times (~450 tokens at 169M)


def cdp_runs(url: str, variant: str, threads: int, tokens: int, backend: str, io: str, sequence: bool,
             repeats: int = 3, long_prompt: bool = True, ort: str = "webgpu", decode_batch: int | None = None,
             profile: bool = False) -> dict:
    """browser_runs' measurement over the DevTools protocol of an already running Chromium ($CDP; the GPU machine's
    recipe in ../shared/tools/webgpu-device starts one and has no Playwright): cdp.py evaluates each step."""
    import json
    import os
    import subprocess

    cdp = os.environ.get("CDP_PY", str(ROOT / ".wgpu" / "B" / "cdp.py"))
    load = {"variant": variant, "backend": backend, "threads": threads, "verify": False, "io": io, "useSequence": sequence,
            "ort": ort, "profile": profile, **({} if decode_batch is None else {"decodeBatch": decode_batch})}
    gen = "await window.rwkvDemo.generate(%s).then(r => ({ids: r.ids, stats: r.stats}))"
    opts = {"prompt": PROMPT, "temperature": 0, "maxTokens": tokens}
    exprs = [f"await window.rwkvDemo.load({json.dumps(load)})", "window.rwkvDemo.notices",
             gen % json.dumps({**opts, "maxTokens": WARMUP_TOKENS}), *[gen % json.dumps(opts)] * repeats]
    if long_prompt:
        exprs.append(gen % json.dumps({**opts, "prompt": PROMPT * LONG_PROMPT_REPEAT, "maxTokens": 1}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, cdp, f"{url}?verify=0", "document.body.dataset.status === 'setup'", *exprs],
                          capture_output=True, text=True, timeout=900)
    values = [json.loads(line)["value"] for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or len(values) != len(exprs):
        return {"error": (proc.stderr or proc.stdout)[-300:]}
    bad = next((v for v in values if isinstance(v, dict) and "exception" in v), None)
    if bad:
        return {"error": bad["exception"][:300]}
    info, notices, _, *runs = values
    long = runs.pop() if long_prompt else None
    runs.sort(key=lambda r: r["stats"]["tokensPerSecond"])
    st = runs[len(runs) // 2]["stats"]
    res = {
        "tok_s": st["tokensPerSecond"], "all_tok_s": [r["stats"]["tokensPerSecond"] for r in runs],
        "n": st["generatedTokens"], "prompt_ms": st["promptMs"], "model_share": st["modelMs"] / st["generateMs"],
        "prompt_tokens": st["promptTokens"], "load_s": info["totalSeconds"], "session_s": info["sessionSeconds"],
        "ids": runs[len(runs) // 2]["ids"], "info": info, "notices": notices, "wall_s": time.perf_counter() - t0,
    }
    if long:
        res["long_prompt"] = {"tokens": long["stats"]["promptTokens"], "ms": long["stats"]["promptMs"],
                              "mode": long["stats"]["promptMode"], "runs": long["stats"]["promptRuns"]}
    return res


# What one WebGPU dispatch costs in this browser, without onnxruntime: N tiny compute dispatches (one workgroup each)
# in one command buffer, in N passes of one command buffer, and in N submits; and a 200 kB mapAsync readback. The
# decode step of the 169M graph is ~580 dispatches, so this is the floor of a step's time on the GPU path.
DISPATCH_PROBE = """(async () => {
  const a = await navigator.gpu.requestAdapter(); const d = await a.requestDevice();
  const info = a.info || {}; const N = 600;
  const m = d.createShaderModule({code: '@group(0) @binding(0) var<storage, read_write> b: array<f32>;' +
    '@compute @workgroup_size(64) fn main(@builtin(global_invocation_id) i: vec3u) { b[i.x] = b[i.x] * 0.5 + 1.0; }'});
  const pl = d.createComputePipeline({layout: 'auto', compute: {module: m, entryPoint: 'main'}});
  const buf = d.createBuffer({size: 4096, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC});
  const bg = d.createBindGroup({layout: pl.getBindGroupLayout(0), entries: [{binding: 0, resource: {buffer: buf}}]});
  const time = async (fn) => { await fn(); const t = performance.now(); for (let r = 0; r < 5; r++) await fn(); return (performance.now() - t) / 5; };
  const onePass = () => { const e = d.createCommandEncoder(); const p = e.beginComputePass(); p.setPipeline(pl);
    for (let i = 0; i < N; i++) { p.setBindGroup(0, bg); p.dispatchWorkgroups(1); } p.end(); d.queue.submit([e.finish()]); return d.queue.onSubmittedWorkDone(); };
  const passes = () => { const e = d.createCommandEncoder(); for (let i = 0; i < N; i++) { const p = e.beginComputePass();
    p.setPipeline(pl); p.setBindGroup(0, bg); p.dispatchWorkgroups(1); p.end(); } d.queue.submit([e.finish()]); return d.queue.onSubmittedWorkDone(); };
  const submits = () => { for (let i = 0; i < N; i++) { const e = d.createCommandEncoder(); const p = e.beginComputePass();
    p.setPipeline(pl); p.setBindGroup(0, bg); p.dispatchWorkgroups(1); p.end(); d.queue.submit([e.finish()]); } return d.queue.onSubmittedWorkDone(); };
  const big = d.createBuffer({size: 201108, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC});
  const st = d.createBuffer({size: 201108, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST});
  const readback = async () => { const e = d.createCommandEncoder(); e.copyBufferToBuffer(big, 0, st, 0, 201108);
    d.queue.submit([e.finish()]); await st.mapAsync(GPUMapMode.READ); st.unmap(); };
  const us = (ms) => Math.round(1000 * ms / N * 10) / 10;
  const r = {adapter: [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(' / '),
    features: [...a.features].join(','), dispatches: N};
  r.one_pass_us_per_dispatch = us(await time(onePass)); r.pass_per_dispatch_us = us(await time(passes));
  r.submit_per_dispatch_us = us(await time(submits)); r.readback_200kB_ms = Math.round(await time(readback) * 1000) / 1000;
  d.destroy(); return r; })()"""


def dispatch_probe(url: str) -> dict:
    import json
    import os
    import subprocess

    cdp = os.environ.get("CDP_PY", str(ROOT / ".wgpu" / "B" / "cdp.py"))
    proc = subprocess.run([sys.executable, cdp, url, "true", f"await {DISPATCH_PROBE}"], capture_output=True,
                          text=True, timeout=300)
    lines = [json.loads(line)["value"] for line in proc.stdout.splitlines() if line.startswith("{")]
    return lines[0] if lines else {"error": (proc.stderr or proc.stdout)[-300:]}


def gpu_main(args, folder: Path) -> None:
    """--cdp: WebGPU (each io mode) and wasm cells on the GPU machine, one JSON line per cell, then a table."""
    import json

    from rwkv_export.manifest import read_manifest
    from rwkv_export.serve import serve_in_thread

    server, url = serve_in_thread(folder)
    manifest = read_manifest(folder, verify_files=False)
    sizes = {f["file"]: f["size"] for f in manifest["files"]}
    graphs = {g["variant"]: g for g in manifest["graphs"] if g["kind"] == "step" and g["format"] == "onnx"}
    rows = []
    if args.probe:
        print(json.dumps({"dispatch_probe": dispatch_probe(url)}), flush=True)
    for cell in filter(None, args.cells.split(",")):  # variant:backend:io[:noseq]
        variant, backend, io, *rest = cell.split(":")
        if variant not in graphs:
            continue
        g = graphs[variant]
        mb = sum(sizes.get(f, 0) for f in [g["file"], *g.get("data_files", [])]) / 1e6
        t = max(int(x) for x in args.threads.split(","))
        web = cdp_runs(url, variant, t, args.tokens, backend, io, "noseq" not in rest, args.repeats,
                       long_prompt="short" not in rest,
                       ort=next((r[4:] for r in rest if r.startswith("ort=")), "webgpu"),
                       decode_batch=1 if "pertoken" in rest else None, profile="profile" in rest)
        print(json.dumps({"cell": cell, **{k: v for k, v in web.items() if k != "ids"}}), flush=True)
        prof = (web.get("info") or {}).get("profile")
        if prof:  # rt_webgpu.js profile(): wall µs a token per kernel kind (its dispatches repeated in one submit)
            kinds = ", ".join(f"{k} {v['us']} ({v['dispatches']})" for k, v in prof["kinds"].items())
            print(f"profile {cell}: token {prof['token_us']} µs, empty submit {prof['empty_us']} µs; per kind, µs "
                  f"(dispatches): {kinds}", flush=True)
        rows.append((cell, variant, mb, web))
    ref = None
    refs = {}
    if "fp32" in graphs and args.reference:
        from rwkv_export.tokenizer import TokenizerSpec, load_tokenizer

        tk = manifest["tokenizer"]
        tok = load_tokenizer(TokenizerSpec("bytes") if tk["kind"] == "bytes"
                             else TokenizerSpec("hf-tokenizers", folder / tk["file"]))
        ref = python_runs(folder, manifest, graphs["fp32"], 8, tok.encode(PROMPT), args.tokens, 1)["ids"]
        # int8 and int4 against onnxruntime on their own file (webgpu-native computes their integers / blocks)
        refs = {v: python_runs(folder, manifest, graphs[v], 8, tok.encode(PROMPT), args.tokens, 1)["ids"]
                for v in ("int8", "int4") if v in graphs and any(r[1] == v for r in rows)}
    server.shutdown()
    d = manifest["model"]
    print(f"\n{d['n_layer']} x {d['n_embd']}, vocab {d['vocab_size']}; {args.tokens} greedy tokens, median of "
          f"{args.repeats}; prompt tok/s from a {LONG_PROMPT_REPEAT}x prompt; same ids: vs onnxruntime (Python, CPU) fp32"
          "; int8 and int4: on their own file\n")
    print("| variant | file | backend | io | decode tok/s | prompt tok/s (how) | load s | off-GPU nodes (step graph's nodes per provider; webgpu-native: its dispatches a token) | same ids as the onnxruntime ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cell, variant, mb, web in rows:
        _, backend, io, *rest = cell.split(":")
        if "error" in web:
            print(f"| {variant} | {mb:.0f} MB | {backend} | {io} | error: {web['error'][:100]} | | | | |")
            continue
        lp = web.get("long_prompt")
        prompt = f"{1000 * lp['tokens'] / lp['ms']:.0f} ({lp['mode']}, {lp['runs']} runs)" if lp else ""
        spread = "–".join(f"{v:.0f}" for v in (web["all_tok_s"][0], web["all_tok_s"][-1]))
        want = refs.get(variant, ref) if ref is not None else None
        same = "" if want is None else ("yes" if web["ids"] == want else f"no ({sum(a == b for a, b in zip(web['ids'], want))}/{len(want)})")
        step_nodes = (web["info"].get("nodes") or {}).get("step") or {}
        nodes = ", ".join(f"{k.replace('ExecutionProvider', '')} {v}" for k, v in step_nodes.items()) or "–"
        ran = web["info"]["backend"] + ("/" + web["info"]["io"] if web["info"]["backend"] == "webgpu" else "")
        if web["info"]["backend"] == "webgpu-native":  # the page's own WGSL kernels: dispatches, not ONNX nodes
            ran += f", decode batch {web['info'].get('decodeBatch')} ({web['info'].get('adapter') or 'adapter?'})"
        print(f"| {variant} | {mb:.0f} MB | {ran} | {io} | {web['tok_s']:.1f} ({spread}) | {prompt} | {web['load_s']:.1f} | "
              f"{len(web['info'].get('offGpu', []))} ({nodes}) | {same} |")


def python_runs(folder: Path, manifest: dict, graph: dict, threads: int, prompt_ids: list[int], tokens: int,
                repeats: int = 3) -> dict:
    import numpy as np

    from rwkv_export.runners import OnnxStepRunner

    runner = OnnxStepRunner(folder, manifest, graph, threads=threads)

    def run(n):
        state = runner.new_state()
        t0 = time.perf_counter()
        for tok in prompt_ids:
            logits, state = runner.step(tok, state)
        t1 = time.perf_counter()
        ids = []
        for _ in range(n):
            ids.append(int(np.argmax(logits.reshape(-1))))
            logits, state = runner.step(ids[-1], state)
        t2 = time.perf_counter()
        return ids, t1 - t0, t2 - t1

    run(WARMUP_TOKENS)
    runs = sorted((run(tokens) for _ in range(repeats)), key=lambda r: r[2])
    ids, prompt_s, gen_s = runs[len(runs) // 2]
    return {"tok_s": tokens / gen_s, "prompt_ms": 1000 * prompt_s, "ids": ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens measured (after a warm-up)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--repeats", type=int, default=3, help="generations per cell; the table shows the median one")
    ap.add_argument("--backend", choices=["wasm", "webgpu", "wasm-native"], default="wasm",
                    help="webgpu starts Chromium with --enable-unsafe-webgpu (headless: SwiftShader's CPU adapter)")
    ap.add_argument("--variants", default=None, help="comma-separated variants to run (default: every step graph)")
    ap.add_argument("--cdp", action="store_true",
                    help="drive the Chromium at $CDP (the GPU machine's recipe) instead of Playwright; see --cells")
    ap.add_argument("--cells", default="fp32:webgpu:capture,fp32:webgpu-native:native:profile,fp16:webgpu-native:native,"
                    "int8:webgpu-native:native:profile,int4:webgpu-native:native:profile,"
                    "fp32:webgpu-native:native:pertoken,"
                    "int4:webgpu:capture,fp32:webgpu-native:native:noseq,fp32:webgpu:gpu,fp32:webgpu:cpu,"
                    "int4:webgpu:capture:noseq,int8:wasm:cpu,fp32:wasm:cpu",
                    help="--cdp: variant:backend:io[:noseq][:short][:pertoken] cells (backend: webgpu, webgpu-native "
                         "(io native: web_demo/rt_webgpu.js) or wasm; io: capture, gpu, cpu; noseq: prompt by steps; "
                         "short: no prompt-speed run; ort=jspi|jsep: another onnxruntime-web build; pertoken: "
                         "webgpu-native greedy decoding with a round trip a token instead of GPU batches; profile: "
                         "webgpu-native's kernel time per kind after loading, printed in a line)")
    ap.add_argument("--probe", action="store_true", help="--cdp: first time raw WebGPU dispatches (no onnxruntime)")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="--cdp: skip the fp32 greedy ids from onnxruntime in Python")
    args = ap.parse_args()
    if args.cdp:
        gpu_main(args, args.folder)
        return
    threads = [int(t) for t in args.threads.split(",")]

    from rwkv_export.errors import RwkvExportError
    from rwkv_export.manifest import read_manifest
    from rwkv_export.serve import serve_in_thread
    from rwkv_export.tokenizer import TokenizerSpec, load_tokenizer

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        fail("Playwright is missing: pip install playwright (do not run `playwright install`)")
    if not Path(CHROMIUM).exists():
        fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        server, url = serve_in_thread(args.folder)  # checks the folder (files, sizes, sha256)
        manifest = read_manifest(args.folder, verify_files=False)
        t = manifest["tokenizer"]
        tok = load_tokenizer(TokenizerSpec("bytes") if t["kind"] == "bytes"
                             else TokenizerSpec("hf-tokenizers", args.folder / t["file"]))
    except RwkvExportError as e:
        fail(str(e))
    prompt_ids = tok.encode(PROMPT)
    graphs = [g for g in manifest["graphs"] if g["kind"] == "step" and g["format"] == "onnx"]
    if args.variants:
        wanted = args.variants.split(",")
        missing = sorted(set(wanted) - {g["variant"] for g in graphs})
        if missing:
            fail(f"{args.folder} has no ONNX step graph for variant(s) {', '.join(missing)}")
        graphs = [g for g in graphs if g["variant"] in wanted]
    sizes = {f["file"]: f["size"] for f in manifest["files"]}
    rows = []
    print(f"serving {args.folder} at {url}", file=sys.stderr)
    with sync_playwright() as p:
        extra = ["--enable-unsafe-webgpu"] if args.backend == "webgpu" else []
        base = [a for a in CHROMIUM_ARGS if not (extra and a == "--disable-gpu")]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=base + extra)
        for g in graphs:
            mb = sum(sizes.get(f, 0) for f in [g["file"], *g.get("data_files", [])]) / 1e6
            for t in threads:
                print(f"[{g['variant']}] browser wasm, {t} thread(s)…", file=sys.stderr, flush=True)
                web = browser_runs(url, g["variant"], t, args.tokens, browser, args.backend, args.repeats)
                print(f"[{g['variant']}] onnxruntime Python, {t} thread(s)…", file=sys.stderr, flush=True)
                py = python_runs(args.folder, manifest, g, t, prompt_ids, args.tokens, args.repeats)
                rows.append((g, mb, t, web, py))
        browser.close()
    server.shutdown()

    d = manifest["model"]
    print(f"\n{d['n_layer']} layers x {d['n_embd']}, vocab {d['vocab_size']}; prompt {len(prompt_ids)} tokens; "
          f"{args.tokens} greedy tokens after {WARMUP_TOKENS} warm-up, median of {args.repeats} generations; tok/s of "
          f"generated tokens; 'in session.run': the share of the page's generation time spent in onnxruntime-web\n")
    print("| variant | file | threads | browser wasm tok/s | in session.run | onnxruntime Python tok/s | browser/Python | "
          "browser prompt | Python prompt | browser load (session) | same ids |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for g, mb, t, web, py in rows:
        if "error" in web:
            print(f"| {g['variant']} | {mb:.0f} MB | {t} | error: {web['error'][:80]} | | {py['tok_s']:.1f} | | | | | |")
            continue
        same = "yes" if web["ids"] == py["ids"] else f"no ({sum(a == b for a, b in zip(web['ids'], py['ids']))}/{len(py['ids'])})"
        spread = "–".join(f"{v:.0f}" for v in (web["all_tok_s"][0], web["all_tok_s"][-1]))
        print(f"| {g['variant']} | {mb:.0f} MB | {t} | {web['tok_s']:.1f} ({spread}) | {100 * web['model_share']:.0f} % | {py['tok_s']:.1f} | "
              f"{web['tok_s'] / py['tok_s']:.2f} | {web['prompt_ms']:.0f} ms | {py['prompt_ms']:.0f} ms | "
              f"{web['load_s']:.1f} s ({web['session_s']:.1f} s) | {same} |")


if __name__ == "__main__":
    main()
