"""webgpu-native (web_demo/rt_webgpu.js): the demo's hand-written WGSL runtime for RWKV-4, in headless Chromium with
SwiftShader's WebGPU adapter (--enable-unsafe-webgpu: a CPU implementation, so correctness here, not speed).

On the trained tiny-pydoc (a trained model's greedy path flips on small numeric differences, unlike a random one):
the page's 64 greedy ids on fp32 and fp16 equal onnxruntime's (Python) on model.onnx, decoded in GPU batches
(decodeGreedy) and one round trip a token; int8 (dynamic-int7) and int4 (MatMulNBits) equal onnxruntime's on their own
files; batched decoding stops exactly at maxTokens and leaves the state the round-trip path leaves; the batched prompt
path's last logits equal the token-by-token path's and onnxruntime's (also for a prompt longer than one call's 512
tokens); profile=1 times every kernel kind; int8 formulations other than dynamic-int7, a 4-bit embedding, other RWKV
versions and a bad decode batch are refused in one line.

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
# int8 (dynamic-int7): the activation quantization (scale, zero point, round-half-even of x / scale: divided exactly on
# the GPU) and the int32 dots are onnxruntime's integers, so the logits differ only where the f32 parts (LayerNorm,
# exp, sigmoid) differ in the last bit and that moves an activation across a rounding step of its quantization:
# measured max|Δ| 0.0 after a 100-token prompt (prompt kernels and steps bit-identical too), greedy ids equal over
# 512. Not 0 here: another Chromium or SwiftShader may round exp or LayerNorm differently, and then, sooner or later,
# an activation rounds to the neighbouring step (quantize.py: native vs wasm onnxruntime first differ at token ~80-100
# of 512; on the H200, 169M shapes, after 5 steps, carrying ~0.15 on). 3e-2 (1/300 of the logits' range) bounds the
# last-bit drift before such a flip, not after one: a Chromium whose f32 math differs may fail this and say so; a
# different quantization is off by more (int4 below: 0.062 between f32 and int8 activations).
LOGITS_ATOL_I8 = 3e-2
# int4: rt_webgpu.js dequantizes the 4-bit blocks to f32 and computes f32 dots (MatMulNBits accuracy_level 0), while
# the file asks onnxruntime for accuracy_level 4 (activations quantized to int8 per 128-block inside its kernel, each
# input off by up to max|x| / 254). Against onnxruntime at accuracy_level 0 (the same file, that attribute changed)
# only f32 summation order differs: LOGITS_ATOL_F32. Against accuracy_level 4: measured max|Δ| 0.062 on logits
# reaching 9.1 (100-token prompt); 0.25 is ~4x that; the greedy ids on this prompt are measured equal to
# accuracy_level 4's all the same (512 of 512).
LOGITS_ATOL_Q4_LEVEL4 = 0.25


@pytest.fixture(scope="module")
def pydoc(tmp_path_factory) -> Path:
    from rwkv_export.export import export_onnx

    out = tmp_path_factory.mktemp("native") / "pydoc"
    export_onnx("builtin:tiny-pydoc", out, quant=["fp16", "int8", "int4"], check=False, prefill=False)
    return out


@pytest.fixture(scope="module")
def q4_level0(pydoc, tmp_path_factory) -> Path:
    """The int4 step graph with every MatMulNBits at accuracy_level 0 (fp32 compute), beside the same data file."""
    import onnx

    out = tmp_path_factory.mktemp("q4level0")
    m = onnx.load(pydoc / "model_q4.onnx", load_external_data=False)
    n = 0
    for node in m.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
                    n += 1
    assert n == 4 * 7 + 1
    onnx.save(m, out / "model_q4.onnx")
    (out / "model_q4.onnx.data").symlink_to(pydoc / "model_q4.onnx.data")
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


def load(page, variant: str, batch: int | None = None) -> str:
    extra = "" if batch is None else f"&batch={batch}"
    page.goto(page.url_base + f"?autoload=1&backend=webgpu-native&variant={variant}&verify=0{extra}")
    page.wait_for_function("['ready','error','load-failed'].includes(document.body.dataset.status)")
    return page.evaluate("document.body.dataset.status")


def ort_run(folder: Path, variant: str, prompt_ids: list[int], n: int, graph_folder: Path | None = None
            ) -> tuple[list[int], np.ndarray]:
    """onnxruntime in Python on the variant's step graph (graph_folder: the same file name from another folder): the
    prompt token by token, then n greedy ids; also the logits after the prompt."""
    m = read_manifest(folder)
    runner = OnnxStepRunner(graph_folder or folder, m, find_graph(m, variant))
    state = runner.new_state()
    for t in prompt_ids:
        logits, state = runner.step(t, state)
    first = np.asarray(logits, dtype=np.float64).reshape(-1)
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        logits, state = runner.step(ids[-1], state)
    return ids, first


@pytest.mark.parametrize("variant,batch", [("fp32", None), ("fp16", None), ("fp32", 1), ("int8", None), ("int4", None)])
def test_greedy_ids_equal_onnxruntime(page, pydoc, variant, batch):
    """Through the demo's API (as benchmarks/bench_web.py drives it): 64 greedy ids after a prompt run through the
    batched prompt kernels equal onnxruntime's fp32 ids, decoded in GPU batches of 16 steps (the default) and one round
    trip a token (batch=1); fp16 too (its weights are fp16, its arithmetic f32). int8 and int4 equal onnxruntime's on
    their own file (model_int8.onnx, model_q4.onnx): all 64, as measured (the LOGITS_ATOL_I8 / _Q4_LEVEL4 notes say why
    a longer run may part)."""
    assert load(page, variant, batch) == "ready", page.inner_text("#error")
    info = page.evaluate("window.rwkvDemo.loadInfo")
    assert (info["backend"], info["io"], info["variant"]) == ("webgpu-native", "native", variant)
    assert info["decodeBatch"] == (batch or 16)
    assert info["nodes"]["step"]["dispatches"] == 7 * 4 + 4  # 4 layers: 7 dispatches each + embed, ln_out, head, argmax
    assert "webgpu-native" in page.inner_text("#progress-text")
    res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % TOKENS, PROMPT)
    assert res["stats"]["promptMode"] == "sequence" and res["stats"]["promptRuns"] == 1
    expected, _ = ort_run(pydoc, variant if variant in ("int8", "int4") else "fp32", list(PROMPT.encode()), TOKENS)
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


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int4"])
def test_prompt_path_equals_step_path_and_onnxruntime(page, pydoc, q4_level0, variant):
    """A 100-token prompt (two 64-row tiles of the prompt matmuls) through the batched kernels and token by token:
    the last logits agree within LOGITS_ATOL_F32 (int8: equal, its matmuls are exact integer sums either way), and
    with onnxruntime's step graph of the same variant within the variant's tolerance (int4: also with the same graph
    at accuracy_level 0, which computes what rt_webgpu.js computes)."""
    assert load(page, variant) == "ready", page.inner_text("#error")
    info = page.evaluate("window.rwkvDemo.loadInfo")
    assert info["variant"] == variant and "weights" in info
    ids = list((PROMPT * 5).encode())[:100]
    out = page.evaluate(PATHS_JS, [variant, ids, True])
    batched, steps = np.array(out["batched"]), np.array(out["steps"])
    _, ort_logits = ort_run(pydoc, variant, ids, 0)
    assert batched.shape == steps.shape == ort_logits.shape
    if variant == "int8":
        assert np.array_equal(batched, steps)
    assert np.abs(batched - steps).max() <= LOGITS_ATOL_F32
    tol = {"fp32": LOGITS_ATOL_F32, "fp16": LOGITS_ATOL_F16, "int8": LOGITS_ATOL_I8, "int4": LOGITS_ATOL_Q4_LEVEL4}
    assert np.abs(steps - ort_logits).max() <= tol[variant]
    if variant == "int4":
        _, level0 = ort_run(pydoc, variant, ids, 0, graph_folder=q4_level0)
        assert np.abs(steps - level0).max() <= LOGITS_ATOL_F32
    assert page.page_errors == []


UNPACKED_JS = """async (ids) => {
  const rt = await import('./rt_webgpu.js');
  const mf = await import('./manifest.js');
  const m = window.rwkvDemo.manifest;
  const files = new Map();
  for (const f of mf.graphFiles(m, mf.stepGraph(m, 'int8'))) {
    files.set(f.file, new Uint8Array(await (await fetch('model/' + f.file)).arrayBuffer()));
  }
  const { device } = await rt.requestDevice();
  const out = {};
  for (const dot4 of [true, false]) {
    const r = new rt.RwkvWebGPU(device, m, 'int8', files, { dot4 });
    r.reset();
    out[dot4] = { logits: Array.from(await r.prompt(ids, 'logits')), weights: r.describeWeights() };
    r.destroy();
  }
  device.destroy();
  return { packed: out[true], unpacked: out[false], has: navigator.gpu.wgslLanguageFeatures.has('packed_4x8_integer_dot_product') };
}"""


def test_int8_dots_unpacked_equal_dot4i8packed(page, pydoc):
    """The int8 kernels' two ways to a dot of 4 signed bytes (dot4I8Packed where the WGSL has
    packed_4x8_integer_dot_product, as Chromium 156's SwiftShader and the H200's Vulkan do; else the bytes unpacked)
    give the same logits bit for bit (both are exact integer sums)."""
    assert load(page, "int8") == "ready", page.inner_text("#error")
    out = page.evaluate(UNPACKED_JS, list(PROMPT.encode()))
    assert out["has"], "this Chromium's WGSL lacks packed_4x8_integer_dot_product: only the unpacked path ran"
    assert "dot4I8Packed" in out["packed"]["weights"] and "bytes unpacked" in out["unpacked"]["weights"]
    assert out["packed"]["logits"] == out["unpacked"]["logits"]
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


def test_unsupported_variant_says_so_in_one_line(page, pydoc):
    """What this runtime does not run is refused with one line: an int8 variant of another formulation (here the
    manifest says matmul-nbits: the page's load fails with it), an int4 with a 4-bit embedding (GatherBlockQuantized),
    another RWKV version."""
    import json

    m = json.loads((pydoc / "manifest.json").read_text())
    for g in m["graphs"]:
        if g["variant"] == "int8":
            g["quantization"]["method"] = "matmul-nbits"
    page.route("**/manifest.json", lambda route: route.fulfill(status=200, content_type="application/json",
                                                              body=json.dumps(m)))
    try:
        assert load(page, "int8") == "load-failed"
        err = page.inner_text("#error")
    finally:
        page.unroute("**/manifest.json")
    assert err == ("Could not load the model: webgpu-native runs int8 as dynamic-int7 (DynamicQuantizeMatMul) only; "
                   "this int8 is 'matmul-nbits' (use wasm or webgpu for it)"), err
    assert load(page, "fp32") == "ready", page.inner_text("#error")
    other = page.evaluate("""async () => {
      const rt = await import('./rt_webgpu.js');
      const m = structuredClone(window.rwkvDemo.manifest);
      const q4 = m.graphs.find((g) => g.kind === 'step' && g.variant === 'int4');
      q4.quantization.options.embedding_bits = 4;
      const v7 = structuredClone(m);
      v7.model.rwkv_version = '7';
      return [rt.unsupported(m, 'int4'), rt.unsupported(v7, 'fp32'), rt.unsupported(m, 'int8'), rt.unsupported(m, 'fp16')];
    }""")
    assert other == [
        "webgpu-native runs int4 with an int8-row embedding only; int4 stores it as 4-bit blocks "
        "(GatherBlockQuantized; use wasm or webgpu for it)",
        "webgpu-native runs RWKV-4 only; this model is RWKV-7 (use wasm or webgpu)", None, None]
    assert page.page_errors == []


def test_batched_decoding_stops_exactly_at_max_tokens(page, pydoc):
    """maxTokens 1, 5, 16, 17 and 40 through the demo's default batches of 16: exactly maxTokens ids, each run a prefix
    of onnxruntime's greedy ids."""
    assert load(page, "fp32") == "ready", page.inner_text("#error")
    expected, _ = ort_run(pydoc, "fp32", list(PROMPT.encode()), 40)
    for n in [1, 5, 16, 17, 40]:
        res = page.evaluate("o => window.rwkvDemo.generate(o)", {"prompt": PROMPT, "temperature": 0, "maxTokens": n})
        assert (res["ids"], res["reason"], res["stats"]["generatedTokens"]) == (expected[:n], "max_tokens", n)
    assert page.page_errors == []


# RwkvWebGPU directly: n greedy tokens after a prompt one round trip a token (forward(..., 'argmax')) and through
# decodeGreedy in batches; then one more token's logits, which depend on the whole state the decoding left.
DECODE_JS = """async ([ids, ns, batch]) => {
  const rt = await import('./rt_webgpu.js');
  const mf = await import('./manifest.js');
  const m = window.rwkvDemo.manifest;
  const files = new Map();
  for (const f of mf.graphFiles(m, mf.stepGraph(m, 'fp32'))) {
    files.set(f.file, new Uint8Array(await (await fetch('model/' + f.file)).arrayBuffer()));
  }
  const { device } = await rt.requestDevice();
  const r = new rt.RwkvWebGPU(device, m, 'fp32', files);
  const out = [];
  for (const n of ns) {
    r.reset();
    let id = await r.prompt(ids, 'argmax');
    const single = [id];
    for (let i = 0; i < n; i++) single.push(id = await r.forward([id], 'argmax'));
    const singleAfter = Array.from(await r.forward([0], 'logits'));
    r.reset();
    const batched = [await r.prompt(ids, 'argmax')];
    const sizes = [];
    await r.decodeGreedy(n, batch, (got) => { sizes.push(got.length); batched.push(...got); return false; });
    const batchedAfter = Array.from(await r.forward([0], 'logits'));
    out.push({ single, batched, sizes, same_after: singleAfter.every((v, i) => v === batchedAfter[i]) });
  }
  r.destroy();
  device.destroy();
  return out;
}"""


def test_decode_batches_equal_the_round_trip_path(page, pydoc):
    """decodeGreedy(n, 16) runs exactly n steps in batches that end at n (1 -> [1], 17 -> [16, 1], 40 -> [16, 16, 8]):
    its ids equal n forward(..., 'argmax') calls' and onnxruntime's, and the state it leaves is the same one, bit for
    bit (the next token's logits are equal: the same kernels in the same order)."""
    assert load(page, "fp32") == "ready", page.inner_text("#error")
    prompt = list(PROMPT.encode())
    ns = [1, 17, 40]
    out = page.evaluate(DECODE_JS, [prompt, ns, 16])
    expected, _ = ort_run(pydoc, "fp32", prompt, max(ns) + 1)
    for n, r in zip(ns, out):
        assert r["sizes"] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
        assert r["batched"] == r["single"] == expected[: n + 1]
        assert r["same_after"]
    assert page.page_errors == []


def test_bad_decode_batch_says_so_in_one_line(page):
    """batch=0 (or above 64) is refused at load with one line."""
    assert load(page, "fp32", 0) == "load-failed"
    err = page.inner_text("#error")
    assert err == ("Could not load the model: the decode batch must be an integer from 1 (a round trip a token) "
                   "to 64, got 0"), err


def test_profile_times_every_kernel_kind_and_leaves_generation_unchanged(page, pydoc):
    """profile=1: loadInfo.profile has a positive time for each kernel kind, whose dispatches add up to a token's;
    the garbage the repeated kernels leave in the state is reset: the greedy ids still equal onnxruntime's."""
    page.goto(page.url_base + "?autoload=1&backend=webgpu-native&variant=fp32&verify=0&profile=1")
    page.wait_for_function("['ready','error','load-failed'].includes(document.body.dataset.status)")
    assert page.evaluate("document.body.dataset.status") == "ready", page.inner_text("#error")
    info = page.evaluate("window.rwkvDemo.loadInfo")
    prof = info["profile"]
    assert set(prof["kinds"]) == {"embed", "ln1+mix", "att k/v/r", "wkv", "att out", "ln2+mix", "ffn k/r", "ffn v",
                                  "ln_out", "head", "argmax"}
    assert sum(k["dispatches"] for k in prof["kinds"].values()) == info["nodes"]["step"]["dispatches"]
    assert prof["token_us"] > 0 and all(k["us"] > 0 for k in prof["kinds"].values())
    res = page.evaluate("o => window.rwkvDemo.generate(o)", {"prompt": PROMPT, "temperature": 0, "maxTokens": 20})
    expected, _ = ort_run(pydoc, "fp32", list(PROMPT.encode()), 20)
    assert res["ids"] == expected
    assert page.page_errors == []
