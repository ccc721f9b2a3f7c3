"""Decode speed of the web demo in headless Chromium (onnxruntime-web, wasm, 1 and 2 threads) beside onnxruntime in
Python, on the same files, for every ONNX step-graph variant an export folder's manifest lists.

    python benchmarks/bench_web.py FOLDER [--tokens 64] [--threads 1,2] [--repeats 3] [--variants int8,fp32]

FOLDER is an export folder, e.g. the 169M shapes:  rwkv-export onnx builtin:169m-synthetic -o out169
Both sides run the same greedy continuation of the same prompt after a warm-up (the page also runs its own JIT warm-up
while loading, as for a user), and report generated tokens per second (sampling + one step per token, as
`rwkv-export generate` measures it), the median of --repeats generations. The page feeds the prompt through the prompt
graph when the folder has one (as the demo does), Python token by token; prompt times are reported apart.

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
    ap.add_argument("--backend", choices=["wasm", "webgpu"], default="wasm",
                    help="webgpu starts Chromium with --enable-unsafe-webgpu (headless: SwiftShader's CPU adapter)")
    ap.add_argument("--variants", default=None, help="comma-separated variants to run (default: every step graph)")
    args = ap.parse_args()
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
