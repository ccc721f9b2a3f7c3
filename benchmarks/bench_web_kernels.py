"""The matmul ceiling of each weight formulation in onnxruntime-web (wasm, headless Chromium), beside onnxruntime in
Python: how many tokens per second the linear layers alone would allow, with nothing else in the graph.

    python benchmarks/bench_web_kernels.py [--workdir bench_out/web_kernels] [--threads 1,2] [--rounds 5] [--calls 4]

For the model shapes (default: RWKV-4-Pile-169M's, 12 x 768, FFN 3072, vocab 50277) the script builds one ONNX graph
holding exactly one token's matmuls -- per layer the four 768x768 attention matrices, the FFN's key, value and
receptance, then the head -- chained x -> x @ W so that none is dead code, with random weights scaled 1/sqrt(fan-in).
It quantizes that graph with the exporter's own functions (rwkv_export.quantize: int8 int7 = the default,
int8 uint8, int8 MatMulNBits, int4 MatMulNBits block 128 at accuracy level 4 = the default, and level 0), so every
formulation is the one `rwkv-export` writes, and times one call (= one token's matmuls) in the page and in Python.

A decode step of the real graph does this plus ~500 small ops, sampling and the state's round trip through JS, so the
"page ceiling" column is an upper bound for the demo's tokens/s with that variant.

Needs: pip install playwright; apt-get install -y chromium; npm ci --prefix web_demo (no `playwright install`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ORT_DIST = ROOT / "web_demo" / "node_modules" / "onnxruntime-web" / "dist"
WARMUP = 3
PAGE_TIMEOUT_MS = 900_000  # the fp32 graph is 0.5 GB: download + session creation take a while on 2 cores

PAGE = """<!doctype html><html><body><script type="module">
const q = new URLSearchParams(location.search);
const ort = await import('/ort/ort.wasm.min.mjs');
ort.env.wasm.wasmPaths = location.origin + '/ort/';
ort.env.wasm.numThreads = Number(q.get('threads'));
ort.env.logLevel = 'error';
const sessions = new Map();
window.openGraph = async (file, warmup, dim) => {
  const bytes = new Uint8Array(await (await fetch('/m/' + file)).arrayBuffer());
  const s = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
  const x = new ort.Tensor('float32', new Float32Array(dim).fill(0.1), [1, dim]);
  for (let i = 0; i < warmup; i++) await s.run({ x });
  sessions.set(file, { s, x });
};
window.timeGraph = async (file, calls) => {
  const { s, x } = sessions.get(file);
  const ts = [];
  for (let i = 0; i < calls; i++) { const t = performance.now(); await s.run({ x }); ts.push(performance.now() - t); }
  return ts;
};
window.closeAll = async () => { for (const { s } of sessions.values()) await s.release(); sessions.clear(); };
window.ready = true;
</script></body></html>"""

# (label, file, how to make it from the fp32 chain)
FORMULATIONS = [
    ("fp32 MatMul", "fp32.onnx", None),
    ("int8 int7 (DynamicQuantizeMatMul, default)", "int8_int7.onnx", ("int8", {"method": "dynamic-int7"})),
    ("int8 int7 per tensor", "int8_int7_tensor.onnx", ("int8", {"method": "dynamic-int7", "per_channel": False})),
    ("int8 uint8 (DynamicQuantizeMatMul)", "int8_uint8.onnx", ("int8", {"method": "dynamic-uint8"})),
    ("int8 MatMulNBits b128 acc4", "int8_nbits.onnx", ("int8", {"method": "matmul-nbits"})),
    ("int4 MatMulNBits b128 acc4 (default)", "int4_acc4.onnx", ("int4", {})),
    ("int4 MatMulNBits b128 acc0", "int4_acc0.onnx", ("int4", {"accuracy_level": 0})),
]


def build_chain(path: Path, n_layer: int, n_embd: int, ffn: int, vocab: int) -> int:
    """One token's matmuls as a chain; returns the number of weights."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(n_layer):
        shapes += [(n_embd, n_embd)] * 4 + [(n_embd, ffn), (ffn, n_embd), (n_embd, n_embd)]
    shapes.append((n_embd, vocab))
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(shapes):
        w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "logits" if i == len(shapes) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(nodes, "matmul_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n_embd])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, vocab])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return sum(k * n for k, n in shapes)


class NativeSession:
    """One onnxruntime session in a process of its own (idle thread pools of other sessions in the same process would
    take a core), timing `calls` runs whenever asked, so that its rounds interleave with everyone else's."""

    CODE = """
import json, sys, time, numpy as np, onnxruntime as ort
path, threads, dim, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.log_severity_level = 3
s = ort.InferenceSession(path, so, providers=['CPUExecutionProvider'])
x = np.full((1, dim), 0.1, np.float32)
for _ in range(warmup): s.run(None, {'x': x})
print('ready', flush=True)
for line in sys.stdin:
    ts = []
    for _ in range(int(line)):
        t = time.perf_counter(); s.run(None, {'x': x}); ts.append(1000 * (time.perf_counter() - t))
    print(json.dumps(ts), flush=True)
"""

    def __init__(self, path: Path, threads: int, dim: int):
        self.p = subprocess.Popen([sys.executable, "-c", self.CODE, str(path), str(threads), str(dim), str(WARMUP)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.p.stdout.readline().strip() != "ready":
            raise SystemExit(f"error: onnxruntime could not run {path}")

    def time(self, calls: int) -> list[float]:
        self.p.stdin.write(f"{calls}\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def serve(workdir: Path):
    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                body = PAGE.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def translate_path(self, path):
            path = path.split("?")[0]
            if path.startswith("/ort/"):
                return str(ORT_DIST / Path(path[5:]).name)
            if path.startswith("/m/"):
                return str(workdir / Path(path[3:]).name)
            return str(workdir / "missing")

        def end_headers(self):  # multi-threaded wasm needs cross-origin isolation
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            super().end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "web_kernels")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all rows")
    ap.add_argument("--calls", type=int, default=4, help="timed calls per row and round (after a warm-up)")
    ap.add_argument("--shape", default="12,768,3072,50277", help="n_layer,n_embd,ffn,vocab")
    ap.add_argument("--only", default=None, help="comma-separated files to run (e.g. int8_int7.onnx)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    n_layer, n_embd, ffn, vocab = (int(v) for v in args.shape.split(","))
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("error: Playwright is missing: pip install playwright (do not run `playwright install`)")
    if not Path(CHROMIUM).exists():
        sys.exit(f"error: {CHROMIUM} is missing: apt-get install -y chromium")
    if not ORT_DIST.is_dir():
        sys.exit("error: onnxruntime-web is missing: npm ci --prefix web_demo")

    from rwkv_export.quantize import quantize_int4, quantize_int8

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    fp32 = wd / "fp32.onnx"
    print(f"building the matmul chain ({n_layer} x {n_embd}, FFN {ffn}, vocab {vocab})…", file=sys.stderr, flush=True)
    n_weights = build_chain(fp32, n_layer, n_embd, ffn, vocab)
    rows = [f for f in FORMULATIONS if not args.only or f[1] in args.only.split(",")]
    for label, file, how in rows:
        if how is None or (wd / file).exists():
            continue
        print(f"quantizing: {label}…", file=sys.stderr, flush=True)
        kind, opts = how
        (quantize_int8 if kind == "int8" else quantize_int4)(fp32, wd / file, **opts)

    server, url = serve(wd)
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for t in threads:
            page = browser.new_page()
            page.goto(f"{url}?threads={t}")
            page.wait_for_function("window.ready === true", timeout=60_000)
            print(f"{t} thread(s): opening {len(rows)} graphs in the page and in Python…", file=sys.stderr, flush=True)
            native = {}
            for _, file, _ in rows:
                page.evaluate("([f, w, d]) => window.openGraph(f, w, d)", [file, WARMUP, n_embd])
                native[file] = NativeSession(wd / file, t, n_embd)
            web_ts = {file: [] for _, file, _ in rows}
            nat_ts = {file: [] for _, file, _ in rows}
            # every row a few calls per round, the page and Python in turn: a busy minute lands on all rows alike
            for r in range(args.rounds):
                print(f"{t} thread(s): round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for _, file, _ in rows:
                    web_ts[file] += page.evaluate("([f, n]) => window.timeGraph(f, n)", [file, args.calls])
                    nat_ts[file] += native[file].time(args.calls)
            page.evaluate("window.closeAll()")
            page.close()
            for label, file, _ in rows:
                native[file].close()
                results.append((label, file, t, statistics.median(web_ts[file]), statistics.median(nat_ts[file])))
        browser.close()
    server.shutdown()

    print(f"\nOne token's matmuls ({n_weights / 1e6:.1f}M weights: {n_layer} layers x (4 x {n_embd}^2 + FFN "
          f"{n_embd}x{ffn}, {ffn}x{n_embd}, {n_embd}^2) + head {n_embd}x{vocab}); median of {args.rounds} interleaved rounds x {args.calls} calls\n")
    print("| formulation | file | threads | page (wasm) ms | page ceiling tok/s | Python ms | page / Python |")
    print("|---|---|---|---|---|---|---|")
    for label, file, t, web_ms, nat_ms in results:
        mb = (wd / file).stat().st_size / 1e6
        print(f"| {label} | {mb:.0f} MB | {t} | {web_ms:.2f} | {1000 / web_ms:.1f} | {nat_ms:.2f} | {web_ms / nat_ms:.1f}x |")


if __name__ == "__main__":
    main()
