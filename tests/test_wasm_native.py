"""wasm-native (web_demo/rt_wasm.js + rwkv4_int8.wasm): our own WebAssembly SIMD runtime for the RWKV-4 int8 step, in
headless Chromium through runtimes.html (rwkv-export serve's COOP/COEP headers make the page cross-origin isolated,
which its shared wasm memory needs).

On the trained tiny-pydoc's int8 file (a trained model's greedy path flips on small numeric differences, unlike a
random one): 64 greedy ids equal onnxruntime's (Python) on the same file, on the page's thread and in a Web Worker,
with 1 and 2 threads; the three integer kernels (u8, nib, i16) and 1 vs 2 threads give bit-identical logits (the
integer sums are exact, so nothing but the kernel may change them); the first steps' logits are within
LOGITS_ATOL of onnxruntime's; the committed .wasm is what its .wat builds; variants and models it cannot run are
refused in one line.

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


FIRST_JS = """async ([ids]) => {
  const rt = await import('./rt_wasm.js');
  const mf = await import('./manifest.js');
  const m = window.rwkvRuntimes.manifest;
  const ff = await import('./fetch_files.js');
  const base = new URL('/model/', location.href).href;
  const { files } = await ff.fetchGraphFiles(m, base, [mf.stepGraph(m, 'int8')], true);
  const r = await rt.RwkvWasm.create(m, 'int8', files, { threads: 2 });
  const out = ids.map((id) => Array.from(r.step(id)));
  r.dispose();
  return out;
}"""


def test_first_steps_logits_close_to_onnxruntime(page, pydoc):
    """The logits of each of the prompt's first 8 steps are within LOGITS_ATOL of onnxruntime's."""
    ids = list(PROMPT.encode())[:FIRST_STEPS]
    ours = np.array(page.evaluate(FIRST_JS, [ids]))
    _, ref = ort_run(pydoc, ids, 0)
    assert ours.shape == np.array(ref).shape
    assert np.abs(ours - np.array(ref)).max() <= LOGITS_ATOL
    assert page.page_errors == []


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
