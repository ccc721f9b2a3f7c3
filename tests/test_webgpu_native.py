"""webgpu-native (web_demo/rt_webgpu.js): the demo's hand-written WGSL runtime for RWKV-4, in headless Chromium with
SwiftShader's WebGPU adapter (--enable-unsafe-webgpu: a CPU implementation, so correctness here, not speed).

On the trained tiny-pydoc (a trained model's greedy path flips on small numeric differences, unlike a random one):
the page's 64 greedy ids on fp32 and fp16 equal onnxruntime's (Python) on model.onnx; the batched prompt path's last
logits equal the token-by-token path's and onnxruntime's (also for a prompt longer than one call's 512 tokens); an
int8 folder variant is refused in one line.

Needs (a missing one is a failure, never a skip): pip install playwright; apt-get install -y chromium.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rwkv_export.manifest import find_graph, read_manifest
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.serve import serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [  # tests/test_web_demo.py's, with SwiftShader's WebGPU adapter instead of --disable-gpu
    "--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--enable-unsafe-webgpu",
]
TIMEOUT_MS = 300_000  # SwiftShader runs a tiny-model token in ~0.3 s on a loaded 2-core box
TOKENS = 64
PROMPT = "def add(a, b):\n    return"
# f32 arithmetic in both runtimes; only the summation order differs (tiled matmuls vs onnxruntime's MLAS, the
# batched prompt's matmul vs the one-token matvec): measured 1.4e-6 (prompt vs steps) and 2.9e-6 (vs onnxruntime)
# on these logits, which reach 8.9.
LOGITS_ATOL_F32 = 1e-4
# fp16: the same fp16 weights, but onnxruntime computes the activations in fp16 (step.py) and rt_webgpu.js in f32:
# measured 1.1e-3 (onnxruntime fp16 vs fp32: 1.4e-3).
LOGITS_ATOL_F16 = 1e-2


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory) -> Path:
    from rwkv_export.export import export_onnx

    out = tmp_path_factory.mktemp("native") / "pydoc"
    export_onnx("builtin:tiny-pydoc", out, quant=["fp16", "int8"], check=False, prefill=False)
    return out


@pytest.fixture(scope="module")
def page(pydoc):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install playwright (the Python package; do not run `playwright install`)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    server, url = serve_in_thread(pydoc)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = b.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.url_base = url
        pg.page_errors = []
        pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
        yield pg
        b.close()
    server.shutdown()
    server.server_close()


def load(page, variant: str) -> str:
    page.goto(page.url_base + f"?autoload=1&backend=webgpu-native&variant={variant}&verify=0")
    page.wait_for_function("['ready','error','load-failed'].includes(document.body.dataset.status)")
    return page.evaluate("document.body.dataset.status")


def ort_run(folder: Path, variant: str, prompt_ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """onnxruntime in Python on the variant's step graph: the prompt token by token, then n greedy ids; also the
    logits after the prompt."""
    m = read_manifest(folder)
    runner = OnnxStepRunner(folder, m, find_graph(m, variant))
    state = runner.new_state()
    for t in prompt_ids:
        logits, state = runner.step(t, state)
    first = np.asarray(logits, dtype=np.float64).reshape(-1)
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        logits, state = runner.step(ids[-1], state)
    return ids, first


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_greedy_ids_equal_onnxruntime(page, pydoc, variant):
    """Through the demo's API (as benchmarks/bench_web.py drives it): 64 greedy ids after a prompt run through the
    batched prompt kernels equal onnxruntime's fp32 ids; fp16 too (its weights are fp16, its arithmetic f32)."""
    assert load(page, variant) == "ready", page.inner_text("#error")
    info = page.evaluate("window.rwkvDemo.loadInfo")
    assert (info["backend"], info["io"], info["variant"]) == ("webgpu-native", "native", variant)
    assert info["nodes"]["step"]["dispatches"] == 7 * 4 + 4  # 4 layers: 7 dispatches each + embed, ln_out, head, argmax
    assert "webgpu-native" in page.inner_text("#progress-text")
    res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % TOKENS, PROMPT)
    assert res["stats"]["promptMode"] == "sequence" and res["stats"]["promptRuns"] == 1
    expected, _ = ort_run(pydoc, "fp32", list(PROMPT.encode()), TOKENS)
    assert res["ids"] == expected
    assert page.page_errors == []


# Runs the runtime module directly: the last logits of a prompt through the batched kernels and token by token.
PATHS_JS = """async ([variant, ids, withSteps]) => {
  const rt = await import('./rt_webgpu.js');
  const mf = await import('./manifest.js');
  const m = window.rwkvDemo.manifest;
  const files = new Map();
  for (const f of mf.graphFiles(m, mf.stepGraph(m, variant))) {
    files.set(f.file, new Uint8Array(await (await fetch('model/' + f.file)).arrayBuffer()));
  }
  const { device } = await rt.requestDevice();
  const r = new rt.RwkvWebGPU(device, m, variant, files);
  r.reset();
  const batched = Array.from(await r.prompt(ids, 'logits'));
  r.reset();
  let steps = [];
  if (withSteps) for (const [i, id] of ids.entries()) steps = await r.forward([id], i === ids.length - 1 ? 'logits' : null);
  r.destroy();
  device.destroy();
  return { batched, steps: Array.from(steps), chunk: rt.PROMPT_CHUNK };
}"""


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_prompt_path_equals_step_path_and_onnxruntime(page, pydoc, variant):
    """A 100-token prompt (two 64-row tiles of the prompt matmuls) through the batched kernels and token by token:
    the last logits agree within LOGITS_ATOL_F32, and with onnxruntime's step graph of the same variant within the
    variant's tolerance."""
    assert load(page, variant) == "ready", page.inner_text("#error")
    ids = list((PROMPT * 5).encode())[:100]
    out = page.evaluate(PATHS_JS, [variant, ids, True])
    batched, steps = np.array(out["batched"]), np.array(out["steps"])
    _, ort_logits = ort_run(pydoc, variant, ids, 0)
    assert batched.shape == steps.shape == ort_logits.shape
    assert np.abs(batched - steps).max() <= LOGITS_ATOL_F32
    tol = LOGITS_ATOL_F32 if variant == "fp32" else LOGITS_ATOL_F16
    assert np.abs(steps - ort_logits).max() <= tol
    assert page.page_errors == []


def test_a_prompt_longer_than_a_chunk_runs_in_chunks(page, pydoc):
    """520 tokens: one call of PROMPT_CHUNK (512) tokens, then one of 8, the state carried between them on the GPU;
    the last logits equal onnxruntime's token-by-token ones within LOGITS_ATOL_F32."""
    assert load(page, "fp32") == "ready", page.inner_text("#error")
    ids = list((PROMPT * 30).encode())[:520]
    out = page.evaluate(PATHS_JS, ["fp32", ids, False])
    assert out["chunk"] < len(ids) < 2 * out["chunk"]
    _, ort_logits = ort_run(pydoc, "fp32", ids, 0)
    assert np.abs(np.array(out["batched"]) - ort_logits).max() <= LOGITS_ATOL_F32
    assert page.page_errors == []


def test_unsupported_variant_says_so_in_one_line(page):
    """int8 (DynamicQuantizeMatMul weights) is not a variant this runtime runs: the load fails with one line."""
    assert load(page, "int8") == "load-failed"
    err = page.inner_text("#error")
    assert err == ("Could not load the model: webgpu-native runs the fp32 and fp16 variants only, not 'int8' "
                   "(use wasm or webgpu for it)"), err
    other = page.evaluate("""async () => {
      const rt = await import('./rt_webgpu.js');
      const m = structuredClone(window.rwkvDemo.manifest);
      m.model.rwkv_version = '7';
      return rt.unsupported(m, 'fp32');
    }""")
    assert other == "webgpu-native runs RWKV-4 only; this model is RWKV-7 (use wasm or webgpu)"
    assert page.page_errors == []
