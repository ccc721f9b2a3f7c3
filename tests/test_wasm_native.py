"""wasm-native (web_demo/rt_wasm.js + rwkv4_int8.wasm): our own WebAssembly SIMD runtime for the RWKV-4 int8 step, in
headless Chromium through runtimes.html (rwkv-export serve's COOP/COEP headers make the page cross-origin isolated,
which its shared wasm memory needs).

On the trained tiny-pydoc's int8 file (a trained model's greedy path flips on small numeric differences, unlike a
random one): 64 greedy ids equal onnxruntime's (Python) on the same file, on the page's thread and in a Web Worker,
with 1 and 2 threads; the three integer kernels (u8, nib, i16) and 1 vs 2 threads give bit-identical logits (the
integer sums are exact, so nothing but the kernel may change them); the elementwise work in wasm gives the same logits
to the bit as the JS reference step (also with the helper thread killed), and the module's exp rounds like
Math.exp; the demo page (index.html, backend wasm-native) gives the same greedy ids and stops on Stop; the first
steps' logits are within LOGITS_ATOL of onnxruntime's; the committed .wasm is what its .wat builds; variants and models
it cannot run are refused in one line.

Needs (a missing one is a failure, never a skip): pip install playwright; apt-get install -y chromium;
`npm ci --prefix web_demo` (wabt, for the rebuild check).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rwkv_export.manifest import find_graph, read_manifest
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.serve import WEB_DEMO_DIR, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-gpu"]
TIMEOUT_MS = 240_000
TOKENS = 64
PROMPT = "def add(a, b):\n    return"
FIRST_STEPS = 8
# The dot products are exact int32 sums and the quantization follows ONNX's DynamicQuantizeLinear bit for bit, so the
# logits differ from onnxruntime's only where the float32 elementwise math does: Math.exp and 1 / (1 + exp(-x))
# against MLAS's exp and logistic, in the last bit. Measured on tiny-pydoc's first 26 steps: max|Δ| = 0 (logits
# reach ~9). Once such a bit moves an activation across a rounding boundary of its uint8 quantization (measured:
# from token 27 of this prompt on), logits differ by ~3e-3 of std and more; the greedy ids still match (asserted
# below). 1e-4 passes last-bit noise through 8 steps and fails on any flipped quantization step or wrong equation.
LOGITS_ATOL = 1e-4


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory) -> Path:
    from rwkv_export.export import export_onnx

    out = tmp_path_factory.mktemp("wasm_native") / "pydoc"
    export_onnx("builtin:tiny-pydoc", out, quant=["int8"], check=False, prefill=False)
    return out


@pytest.fixture(scope="module")
def page(pydoc):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install playwright "
                    "(the Python package; do not run `playwright install`)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    server, url = serve_in_thread(pydoc)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = b.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.page_errors = []
        pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
        pg.goto(url + "runtimes.html")
        pg.wait_for_function("['setup','error'].includes(document.body.dataset.status)")
        assert pg.evaluate("document.body.dataset.status") == "setup", pg.inner_text("#error")
        assert pg.evaluate("self.crossOriginIsolated") is True
        yield pg
        b.close()
    server.shutdown()
    server.server_close()


def ort_run(folder: Path, prompt_ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """onnxruntime in Python on the int8 step graph: the prompt token by token (the logits of each step), then n
    greedy ids."""
    m = read_manifest(folder)
    runner = OnnxStepRunner(folder, m, find_graph(m, "int8"))
    state = runner.new_state()
    steps = []
    for t in prompt_ids:
        logits, state = runner.step(t, state)
        steps.append(np.asarray(logits, dtype=np.float64).reshape(-1))
    ids = []
    logits = steps[-1]
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        logits, state = runner.step(ids[-1], state)
    return ids, steps


def generate(page, backend: str, threads: int, worker: bool, n: int = TOKENS) -> dict:
    info = page.evaluate("o => window.rwkvRuntimes.load(o)", {"runtime": "wasm-native", "backend": backend,
                                                               "variant": "int8", "threads": threads,
                                                               "worker": worker, "verify": True})
    assert "error" not in info, info
    res = page.evaluate("o => window.rwkvRuntimes.generate(o)",
                        {"promptIds": list(PROMPT.encode()), "maxTokens": n, "temperature": 0})
    return {"info": info, **res}


@pytest.mark.parametrize("threads,worker", [(2, False), (1, True), (2, True)])
def test_greedy_ids_equal_onnxruntime(page, pydoc, threads, worker):
    """64 greedy ids through runtimes.html equal onnxruntime's on the same model_int8.onnx."""
    res = generate(page, "wasm-native", threads, worker)
    assert res["info"]["threads"] == threads and res["info"]["backend"] == "wasm-native"
    expected, _ = ort_run(pydoc, list(PROMPT.encode()), TOKENS)
    assert res["ids"] == expected
    assert page.page_errors == []


def test_kernels_and_threads_give_identical_logits(page):
    """u8, nib and i16 compute the same integers, 1 and 2 threads split the same sums: the last logits after 64
    generated tokens are bit-identical across all of them (the relaxed-dot probe found u8 exact on this browser)."""
    runs = {(k, t): generate(page, f"wasm-native-{k}", t, False) for k in ("u8", "nib", "i16") for t in (1, 2)}
    first = runs[("u8", 1)]
    assert any("kernel u8 (relaxed-dot probe exact)" in n for n in first["info"]["notes"]), first["info"]["notes"]
    for key, r in runs.items():
        assert r["ids"] == first["ids"], key
        assert r["lastLogits"] == first["lastLogits"], key
    assert page.page_errors == []


# The page-side start of the JS snippets below: rt_wasm.js's runtime `r` on the folder's int8 step file, with `threads`
# threads (a JS expression over the snippet's arguments `args`); `body` uses `r` and returns.
OPEN_RUNTIME_JS = """  const rt = await import('./rt_wasm.js');
  const mf = await import('./manifest.js');
  const m = window.rwkvRuntimes.manifest;
  const ff = await import('./fetch_files.js');
  const base = new URL('/model/', location.href).href;
  const { files } = await ff.fetchGraphFiles(m, base, [mf.stepGraph(m, 'int8')], true);
"""


def open_runtime_js(args: str, threads: str, body: str) -> str:
    return (f"async ([{args}]) => {{\n" + OPEN_RUNTIME_JS
            + f"  const r = await rt.RwkvWasm.create(m, 'int8', files, {{ threads: {threads} }});\n" + body + "}")


FIRST_JS = open_runtime_js("ids", "2", """  const out = ids.map((id) => Array.from(r.step(id)));
  r.dispose();
  return out;
""")


def test_first_steps_logits_close_to_onnxruntime(page, pydoc):
    """The logits of each of the prompt's first 8 steps are within LOGITS_ATOL of onnxruntime's."""
    ids = list(PROMPT.encode())[:FIRST_STEPS]
    ours = np.array(page.evaluate(FIRST_JS, [ids]))
    _, ref = ort_run(pydoc, ids, 0)
    assert ours.shape == np.array(ref).shape
    assert np.abs(ours - np.array(ref)).max() <= LOGITS_ATOL
    assert page.page_errors == []


ELEMENTWISE_JS = open_runtime_js("ids, n, threads, killHelper", "threads", """  if (killHelper) { for (const w of r.workers) w.terminate(); await new Promise((res) => setTimeout(res, 50)); }
  const am = (l) => { let b = 0; for (let j = 1; j < l.length; j++) if (l[j] > l[b]) b = j; return b; };
  const run = (step) => {
    r.reset();
    const logits = [];
    let l;
    for (const id of ids) l = step(id);
    const gen = [];
    for (let i = 0; i < n; i++) { gen.push(am(l)); logits.push(Array.from(l)); l = step(gen[i]); }
    return { gen, logits };
  };
  const wasm = run((id) => r.step(id));
  const js = run((id) => r.stepJs(id));
  r.dispose();
  return { wasm, js, mode: r.mode };
""")


@pytest.mark.parametrize("threads,kill_helper", [(1, False), (2, False), (2, True)])
def test_wasm_elementwise_equals_js_reference(page, pydoc, threads, kill_helper):
    """The step's elementwise work in wasm (layernorm, mix, wkv, add, relusq, addsigmul) gives the same logits, to the
    bit, as the float32 JS reference (stepJs) over the prompt and 64 greedy tokens: every operation is the same
    float32 operation in the same order, and exp (computed in double in wasm, V8's Math.exp in JS, both rounded to
    float32) agreed on all 2^20 values of test_wasm_exp_rounds_like_math_exp. The greedy ids equal onnxruntime's.
    With the helper thread terminated (kill_helper), thread 0 does every chunk itself: still no hang and the same
    logits (rwkv4_int8.wat's run never waits for a helper)."""
    res = page.evaluate(ELEMENTWISE_JS, [list(PROMPT.encode()), TOKENS, threads, kill_helper])
    assert res["wasm"]["gen"] == res["js"]["gen"]
    assert res["wasm"]["logits"] == res["js"]["logits"]
    expected, _ = ort_run(pydoc, list(PROMPT.encode()), TOKENS)
    assert res["wasm"]["gen"] == expected
    assert page.page_errors == []


EXP_JS = open_runtime_js("n", "1", """  const xs = new Float32Array(n);
  for (let i = 0; i < n; i++) xs[i] = -104 + 193 * (i / n); // float32's whole exp range: e^-104 rounds to 0, e^89 to inf
  const ys = r.expf(xs);
  const bits = (v) => new Int32Array(Float32Array.of(v).buffer)[0];
  let differ = 0;
  let maxUlp = 0;
  for (let i = 0; i < n; i++) {
    const ref = Math.fround(Math.exp(xs[i]));
    if (ref !== ys[i]) { differ++; maxUlp = Math.max(maxUlp, Math.abs(bits(ref) - bits(ys[i]))); }
  }
  const special = [0, -0, 1, -1, 0.5, -1e30, -Infinity, 1e30, Infinity, 88.72, 88.73, -87.33, -103.97, -103.98, 1e-8, -1e-8];
  const got = Array.from(r.expf(Float32Array.from(special)));
  const want = Array.from(Float32Array.from(special), (x) => Math.fround(Math.exp(x)));
  r.dispose();
  return { differ, maxUlp, got, want };
""")
EXP_VALUES = 1 << 20
# $exp64's relative error is below 1e-14 (degree-11 Taylor on |r| <= ln2/2, plus a few double roundings), so it can
# round to another float32 than V8's Math.exp only where e^x lies within ~1e-14 of a float32 rounding midpoint: a
# share of ~1e-14 / 2^-24 ~ 2e-7 of values, ~0.2 of 2^20 (measured: 0). 4 allows for that and fails on any real
# error in the polynomial or the range reduction (which would move thousands of values).
EXP_MAX_DIFFER = 4


def test_wasm_exp_rounds_like_math_exp(page):
    """The module's exp (rwkv4_int8.wat $expf4) gives fround(Math.exp(x)) on 2^20 float32 values spread over the whole
    float32 exp range, but for at most EXP_MAX_DIFFER values that differ by one unit in the last place; special
    values (0, -0, +-inf, -1e30, over/underflow edges, subnormal results) equal it exactly."""
    res = page.evaluate(EXP_JS, [EXP_VALUES])
    assert res["differ"] <= EXP_MAX_DIFFER, res["differ"]
    assert res["maxUlp"] <= 1, res["maxUlp"]
    assert res["got"] == res["want"]
    assert page.page_errors == []


def test_demo_page_greedy_ids_and_stop(page, pydoc):
    """The demo (index.html, backend wasm-native, 2 threads: wasm_native_worker.js, which lets Stop in every YIELD_MS
    instead of after every token and posts tokens in batches): 64 greedy ids equal onnxruntime's, and the streamed
    text is their decoding; a long sampled run stops on Stop."""
    ctx = page.context.browser.new_context()
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    base = page.url.rsplit("/", 1)[0] + "/"
    pg.goto(base + "?autoload=1&backend=wasm-native&variant=int8&threads=2&verify=0")
    pg.wait_for_function("['ready','error','load-failed'].includes(document.body.dataset.status)")
    assert pg.evaluate("document.body.dataset.status") == "ready", pg.inner_text("#error")
    info = pg.evaluate("window.rwkvDemo.loadInfo")
    assert info["backend"] == "wasm-native" and info["numThreads"] == 2 and info["kernel"] == "u8", info
    res = pg.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % TOKENS, PROMPT)
    expected, _ = ort_run(pydoc, list(PROMPT.encode()), TOKENS)
    assert res["promptIds"] == list(PROMPT.encode())
    assert res["ids"] == expected
    # the worker sends tokens in batches ('tokens', flushed before 'done'): the text the page streamed must hold
    # every id once, in order, and the page must show it
    assert res["text"] == pg.evaluate("ids => window.rwkvDemo.decode(ids)", expected)
    assert pg.inner_text("#out-gen") == res["text"]
    pg.evaluate("p => { window.rwkvDemo.generate({prompt: p, temperature: 1, maxTokens: 1000000}).catch(() => {}); }",
                PROMPT)
    pg.wait_for_function("window.rwkvDemo.currentIds().length >= 40")
    pg.evaluate("window.rwkvDemo.stop()")
    pg.wait_for_function("document.body.dataset.status === 'ready'")
    last = pg.evaluate("window.rwkvDemo.lastResult")
    assert last["reason"] == "stopped" and 40 <= last["stats"]["generatedTokens"] < 1_000_000, last["stats"]
    ctx.close()
    assert errors == []


def test_demo_defaults_to_wasm_native_and_falls_back_to_onnxruntime_web(page):
    """An RWKV-4 int8 folder in a cross-origin isolated page with relaxed SIMD: with no ?backend the demo picks wasm
    native and says so; ?backend=wasm keeps onnxruntime-web; where wasm native then cannot load (here its .wasm
    module answers 404) the model loads on onnxruntime-web's wasm with a notice that says why."""
    base = page.url.rsplit("/", 1)[0] + "/"
    ctx = page.context.browser.new_context()
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(base + "?verify=0")
        pg.wait_for_function("document.body.dataset.status === 'setup' || document.body.dataset.status === 'idle'"
                             " || !!window.rwkvDemo?.manifest")
        assert pg.evaluate("WebAssembly.validate(new Uint8Array([0,97,115,109,1,0,0,0,1,8,1,96,3,123,123,123,1,123,"
                           "3,2,1,0,10,13,1,11,0,32,0,32,1,32,2,253,147,2,11]))") is True  # the page's probe
        assert pg.input_value("#backend") == "wasm-native" and pg.input_value("#variant") == "int8"
        assert "default here" in pg.inner_text("#variant-note")
        info = pg.evaluate("window.rwkvDemo.load({threads: 1}).then(() => window.rwkvDemo.loadInfo)")
        assert info["backend"] == "wasm-native", info

        pg.goto(base + "?verify=0&backend=wasm")
        pg.wait_for_function("!!window.rwkvDemo?.manifest")
        assert pg.input_value("#backend") == "wasm"

        pg.route("**/rwkv4_int8.wasm", lambda route: route.fulfill(status=404, body="gone"))
        pg.goto(base + "?verify=0")
        pg.wait_for_function("!!window.rwkvDemo?.manifest")
        assert pg.input_value("#backend") == "wasm-native"
        info = pg.evaluate("window.rwkvDemo.load({threads: 1}).then(() => window.rwkvDemo.loadInfo)")
        assert info["backend"] == "wasm", info
        assert pg.input_value("#backend") == "wasm"
        notices = " ".join(n["message"] for n in pg.evaluate("window.rwkvDemo.notices"))
        assert "wasm native could not load" in notices and "404" in notices, notices
    finally:
        ctx.close()


def test_unsupported_says_so_in_one_line(page):
    """fp32 through runtimes.html fails to load with one line; fp16, int4 and RWKV-5/6/7 are refused by
    unsupported() with one line each."""
    info = page.evaluate("o => window.rwkvRuntimes.load(o)", {"runtime": "wasm-native", "backend": "wasm-native",
                                                               "variant": "fp32", "threads": 1})
    assert info["error"] == ("wasm native (wasm-native, fp32) cannot run this model: wasm-native runs the int8 "
                             "variant only, not 'fp32' (use wasm for it)"), info
    lines = page.evaluate("""async () => {
      const rt = await import('./rt_wasm.js');
      const m = window.rwkvRuntimes.manifest;
      const out = { fp16: rt.unsupported(m, 'fp16'), int4: rt.unsupported(m, 'int4') };
      for (const v of ['5', '6', '7']) {
        const o = structuredClone(m);
        o.model.rwkv_version = v;
        out[v] = rt.unsupported(o, 'int8');
      }
      const u = structuredClone(m);
      u.graphs.find((g) => g.variant === 'int8').quantization.method = 'dynamic-uint8';
      out.uint8 = rt.unsupported(u, 'int8');
      out.ok = rt.unsupported(m, 'int8');
      try {
        await rt.RwkvWasm.create(m, 'int8', new Map(), { elementwise: 'gpu' });
      } catch (e) {
        out.elementwise = e.message;
      }
      return out;
    }""")
    assert lines == {
        "fp16": "wasm-native runs the int8 variant only, not 'fp16' (use wasm for it)",
        "int4": "wasm-native runs the int8 variant only, not 'int4' (use wasm for it)",
        "5": "wasm-native runs RWKV-4 only; this model is RWKV-5 (use wasm)",
        "6": "wasm-native runs RWKV-4 only; this model is RWKV-6 (use wasm)",
        "7": "wasm-native runs RWKV-4 only; this model is RWKV-7 (use wasm)",
        "uint8": "wasm-native runs int8 method dynamic-int7 only; this file is 'dynamic-uint8' (use wasm)",
        "ok": None,
        "elementwise": "wasm-native has no elementwise 'gpu' (has wasm, js)",
    }
    assert page.page_errors == []


def test_wasm_is_what_the_wat_builds():
    """web_demo/rwkv4_int8.wasm is byte for byte what `node web_demo/build_wasm.mjs` builds from rwkv4_int8.wat."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: apt-get install -y nodejs")
    if not (WEB_DEMO_DIR / "node_modules" / "wabt").is_dir():
        pytest.fail("web_demo/node_modules/wabt is missing: npm ci --prefix web_demo")
    res = subprocess.run([node, str(WEB_DEMO_DIR / "build_wasm.mjs"), "--check"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
