"""The browser demo (web_demo/ served by rwkv_export.serve) in headless Chromium, driven by Playwright.

Checks: greedy ids in the page equal runtime_ref's; seeded sampling is reproducible and only draws tokens the
sampling rule allows (and the JS rule equals runtime_ref.sampling_probs); the NeoX tokenizer in the page equals
Python `tokenizers`; broken model files, missing and invalid manifests show an error on the page; the page stays
responsive while generating and Stop stops; WebGPU without an adapter falls back visibly, and with SwiftShader's
adapter (--enable-unsafe-webgpu) runs the WebGPU EP for real with the same greedy ids; the server's headers,
path rules and one-line errors; the `serve` CLI. RWKV-7 from its manifest alone: greedy ids equal runtime_ref.rwkv7's
(fp64) through the prompt graph in chunks and token by token, and a World-vocab v7 tokenizes in the page like the
`rwkv` pip package's tokenizer (the v7 export folders are shared with test_v7_cli.py, which makes them). Saves a screenshot to tests/_artifacts/screenshot.png
(git-ignored; docs/screenshot.png in the README is a copy of one).

Needs (a missing one is a failure, never a skip):
  pip install playwright            (the Python package only; never `playwright install`)
  apt-get install -y chromium       (/usr/bin/chromium)
  npm ci --prefix web_demo          (onnxruntime-web)
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_export.errors import ManifestError, RwkvExportError
from rwkv_export.manifest import read_manifest, write_manifest
from rwkv_export.serve import ISOLATION_HEADERS, WEB_DEMO_DIR, make_server, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = ROOT / "tests" / "_artifacts" / "screenshot.png"

# Page-level timeouts (ms). Loading a sub-MB model takes ~2 s here (wasm compile + session); 60 s covers a loaded CI box.
LOAD_TIMEOUT_MS = 60_000
GENERATE_TIMEOUT_MS = 60_000
GREEDY_TOKENS = 32
# JS sampling runs in float64 like runtime_ref.sampling_probs; only summation order differs (~1e-16 per term).
SAMPLING_PROB_ATOL = 1e-12
# Generation runs in a worker: while the main thread is blocked for a second, tokens keep coming (they queue as
# messages). The tiny model makes hundreds of tokens a second; 5 still passes on a heavily loaded 2-core box, and
# generation on the main thread makes 0.
MAIN_BLOCK_MS = 1000
MIN_TOKENS_WHILE_MAIN_BLOCKED = 5
# Neox-vocab test model: the smallest with the real 50277-id vocab (1 layer, C=16), so the tokenizer fits it.
NEOX_TINY = dict(n_layer=1, n_embd=16, ffn_dim=64, vocab_size=50277)

TOKENIZER_TEXTS = [
    "Hello, world! Grüße aus Zürich — naïve café, 東京, Привет, مرحبا",
    "emoji 🙂🎉👍🏽 family 👨\u200d👩\u200d👧 flags 🇯🇵🇩🇪 keycap 1\ufe0f\u20e3",
    'def f(x):\n    return {"k": [1, 2.5, -3e10]}  # code\n\tif x != 0: print(x ** 2)\n',
    "  leading and trailing spaces   \n\n\nnewlines\r\n<|endoftext|>after",
    "e\u0301 decomposed, 12345 numbers 3.14159, don't I'm we'll",
]


# ---- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install playwright (the Python package; do not run `playwright install`)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    if not (WEB_DEMO_DIR / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        pytest.fail("onnxruntime-web is missing: npm ci --prefix web_demo")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 980, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(LOAD_TIMEOUT_MS)
    pg.page_errors = []
    pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
    yield pg
    ctx.close()


def _export(source: str, out: Path, tokenizer: str | None = None) -> Path:
    from rwkv_export.export import export_onnx

    # The exporter's parity gate is tested elsewhere; these tests compare the page against runtime_ref directly.
    export_onnx(source, out, check=False, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _export("builtin:tiny", tmp_path_factory.mktemp("web") / "tiny")


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> tuple[Path, Path]:
    from rwkv_export.synthetic import save_checkpoint
    from rwkv_export.arch.rwkv4.synthetic import SyntheticConfig, make_state_dict

    d = tmp_path_factory.mktemp("web_neox")
    ckpt = save_checkpoint(make_state_dict(SyntheticConfig(**NEOX_TINY), seed=1), d / "neox_tiny.pth")
    return _export(str(ckpt), d / "neox"), ckpt


@pytest.fixture(scope="module")
def v7(tmp_path_factory) -> Path:
    from test_v7_cli import v7_export

    return v7_export(tmp_path_factory, "bytes")  # builtin:v7-tiny, step + prompt graph


@pytest.fixture(scope="module")
def v7_world(tmp_path_factory) -> Path:
    from test_v7_cli import v7_export

    return v7_export(tmp_path_factory, "world")  # a World-vocab (65536) v7, step graph only


@contextmanager
def served(folder: Path):
    server, url = serve_in_thread(folder)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- page helpers -------------------------------------------------------------------------------------------------


def wait_status(page, *statuses: str, timeout: int = LOAD_TIMEOUT_MS) -> str:
    page.wait_for_function(
        "s => s.includes(document.body.dataset.status)", arg=list(statuses), timeout=timeout
    )
    return page.evaluate("document.body.dataset.status")


def open_demo(page, url: str, query: str = "") -> None:
    page.goto(url + query)
    status = wait_status(page, "setup", "error")
    assert status == "setup", page.inner_text("#error")


def load_model(page, url: str, query: str = "?autoload=1") -> dict:
    page.goto(url + query)
    status = wait_status(page, "ready", "error", "load-failed")
    assert status == "ready", f"demo did not load: {page.inner_text('#error')}"
    return page.evaluate("window.rwkvDemo.loadInfo")


def default_warmup_steps() -> int:
    m = re.search(r"^const DEFAULT_WARMUP_STEPS = (\d+);", (WEB_DEMO_DIR / "worker.js").read_text(), re.M)
    assert m, "worker.js defines DEFAULT_WARMUP_STEPS"
    return int(m.group(1))


def error_banner(page) -> str:
    page.wait_for_selector("#error:not([hidden])", timeout=LOAD_TIMEOUT_MS)
    return page.inner_text("#error")


def reference(ckpt_tensors) -> "object":
    from runtime_ref import RWKV4

    return RWKV4(ckpt_tensors, dtype=torch.float64)


def tiny_reference():
    from rwkv_export.sources import Source

    return reference(Source("builtin:tiny").load().tensors)


# ---- generation ---------------------------------------------------------------------------------------------------


def test_greedy_tokens_equal_reference_and_screenshot(page, tiny):
    """Through the UI controls: 32 greedy tokens (temperature 0) equal runtime_ref's fp64 greedy continuation."""
    prompt = "Hello"
    with served(tiny) as url:
        open_demo(page, url, "?threads=2")
        assert page.evaluate("crossOriginIsolated") is True  # COOP/COEP from serve.py work
        page.click("#load")
        assert wait_status(page, "ready", "load-failed") == "ready", page.inner_text("#error")
        info = page.evaluate("window.rwkvDemo.loadInfo")
        assert (info["backend"], info["numThreads"], info["variant"]) == ("wasm", 2, "fp32")
        assert info["warmupSteps"] == default_warmup_steps()
        # step graph, prompt graph and their one shared weights file, each downloaded once
        graphs = [g for g in read_manifest(tiny)["graphs"] if g["variant"] == "fp32"]
        files = {f for g in graphs for f in [g["file"], *g["data_files"]]}
        assert len(graphs) == 2 and len(files) == 3
        assert info["bytes"] == sum((tiny / f).stat().st_size for f in files)
        page.fill("#prompt", prompt)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", str(GREEDY_TOKENS))
        page.click("#generate")
        page.wait_for_function("window.rwkvDemo.lastResult !== null", timeout=GENERATE_TIMEOUT_MS)
        res = page.evaluate("window.rwkvDemo.lastResult")
        shown_ids = json.loads(page.get_attribute("body", "data-generated"))
        gen_text = page.inner_text("#out-gen")
        speed = page.inner_text("#stat-speed")
        prompt_stat = page.inner_text("#stat-prompt")
    expected, _ = tiny_reference().greedy(list(prompt.encode()), GREEDY_TOKENS)
    assert res["promptIds"] == list(prompt.encode())
    assert res["ids"] == expected
    assert shown_ids == expected
    assert gen_text == bytes(expected).decode("utf-8", errors="replace")
    assert re.fullmatch(r"\d+(\.\d+)? tok/s", speed), speed
    assert prompt_stat.startswith(f"{len(prompt)} tokens in "), prompt_stat
    assert res["stats"]["generatedTokens"] == GREEDY_TOKENS and res["stats"]["tokensPerSecond"] > 0
    assert 0 < res["stats"]["modelMs"] <= res["stats"]["generateMs"]
    assert page.page_errors == []


def test_seeded_sampling_reproducible_and_within_the_rule(page, tiny):
    """Same seed -> same tokens; another seed -> other tokens; each drawn token is allowed by runtime_ref's rule."""
    from runtime_ref import sampling_probs

    params = dict(temperature=1.3, topP=0.6, minPRatio=0.05, minPPower=2.0, maxTokens=24)
    prompt = "seed"
    with served(tiny) as url:
        info = load_model(page, url, "?autoload=1&threads=1&warmup=0")
        assert (info["numThreads"], info["warmupSteps"]) == (1, 0)
        run = lambda seed: page.evaluate(
            "([p, o]) => window.rwkvDemo.generate({prompt: p, ...o})", [prompt, {**params, "seed": seed}]
        )["ids"]
        a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    model = tiny_reference()
    state = model.new_state()
    logits, state = model.forward_seq(list(prompt.encode()), state)
    for tok in a:
        probs = sampling_probs(logits, params["temperature"], params["topP"], params["minPRatio"], params["minPPower"])
        assert probs[tok] > 0, f"token {tok} was drawn but the rule gives it probability 0"
        logits, state = model.step(tok, state)


def test_js_sampling_rule_equals_runtime_ref(page, tiny):
    """web_demo/sampling.js keptDistribution == runtime_ref.sampling_probs on random logits, for several settings."""
    from runtime_ref import sampling_probs

    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(300, generator=gen) * 3).float()
    cases = [
        dict(temperature=1.0, topP=1.0, minPRatio=0.0, minPPower=2.0),
        dict(temperature=1.0, topP=1.0, minPRatio=0.02, minPPower=2.0),
        dict(temperature=0.7, topP=0.85, minPRatio=0.02, minPPower=2.0),
        dict(temperature=2.0, topP=0.3, minPRatio=0.1, minPPower=1.0),
        dict(temperature=0.2, topP=0.95, minPRatio=0.5, minPPower=0.5),
    ]
    with served(tiny) as url:
        open_demo(page, url)
        got = page.evaluate(
            """async ([logits, cases]) => {
                 const s = await import('./sampling.js');
                 const x = Float32Array.from(logits);
                 return cases.map((c) => Array.from(s.samplingProbs(x, c)));
               }""",
            [logits.tolist(), cases],
        )
    for case, js in zip(cases, got):
        ref = sampling_probs(logits, case["temperature"], case["topP"], case["minPRatio"], case["minPPower"]).numpy()
        js = np.array(js)
        assert np.array_equal(js > 0, ref > 0), case  # the same tokens kept
        np.testing.assert_allclose(js, ref, rtol=0, atol=SAMPLING_PROB_ATOL, err_msg=str(case))


def test_neox_tokenizer_parity_and_text_in_page(page, neox):
    """The page's tokenizer (manifest -> tokenizer.json) encodes like Python `tokenizers`; greedy text matches."""
    from tokenizers import Tokenizer

    from rwkv_export.checkpoint import load_checkpoint

    folder, ckpt = neox
    py_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = "The capital of France is"
    n = 16
    with served(folder) as url:
        load_model(page, url, "?autoload=1")
        assert page.evaluate("window.rwkvDemo.tokenizer.kind") == "hf-tokenizers"
        js_ids = page.evaluate("texts => texts.map((t) => window.rwkvDemo.encode(t))", TOKENIZER_TEXTS)
        res = page.evaluate(
            "p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % n, prompt
        )
        page.set_viewport_size({"width": 980, "height": 900})
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    for text, ids in zip(TOKENIZER_TEXTS, js_ids):
        assert ids == py_tok.encode(text).ids, text
    prompt_ids = py_tok.encode(prompt).ids
    assert res["promptIds"] == prompt_ids
    expected, _ = reference(load_checkpoint(ckpt).tensors).greedy(prompt_ids, n)
    eos = py_tok.token_to_id("<|endoftext|>")
    if eos in expected:  # the page stops at end-of-text (like `rwkv-export generate`)
        expected = expected[: expected.index(eos)]
    assert res["ids"] == expected
    assert res["text"] == py_tok.decode(expected, skip_special_tokens=False)
    assert SCREENSHOT.stat().st_size < 300_000  # committed to the repo: keep it small


def add_scan_sequence_graph(folder: Path, max_chunk: int) -> None:
    """Give FOLDER a graph of kind "sequence" (input role "tokens") built from its step graph with an ONNX Scan over
    the tokens, with the manifest fields of rwkv_export's sequence graphs (role "tokens", "max_chunk"), so the demo's
    prompt path is exercised on its own. Logits come out as [T, 1, V] (all positions); the page takes the last row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = read_manifest(folder)
    m["graphs"] = [g for g in m["graphs"] if g["kind"] != "sequence"]  # this test's graph replaces the exported one
    step = next(g for g in m["graphs"] if g["kind"] == "step")
    model = onnx.load(str(folder / step["file"]))
    g = model.graph
    token_in = next(i for i in step["inputs"] if i["role"] == "token")
    states_in = [i for i in step["inputs"] if i["role"] == "state"]
    states_out = {o["state"]: o for o in step["outputs"] if o["role"] == "state"}
    logits_out = next(o for o in step["outputs"] if o["role"] == "logits")
    # Scan body = the step graph, whose token input [1] now comes from the scanned scalar.
    body_inputs = [next(v for v in g.input if v.name == s["name"]) for s in states_in]
    body_inputs.append(helper.make_tensor_value_info("tok_elem", TensorProto.INT64, []))
    unsqueeze = helper.make_node("Unsqueeze", ["tok_elem", "unsq_axes"], [token_in["name"]])
    outs = {v.name: v for v in g.output}
    body = helper.make_graph(
        [unsqueeze, *g.node], "step_body", body_inputs,
        [outs[states_out[s["state"]]["name"]] for s in states_in] + [outs[logits_out["name"]]],
        initializer=[*g.initializer, numpy_helper.from_array(np.array([0], dtype=np.int64), "unsq_axes")],
    )
    outer_in = [helper.make_tensor_value_info("seq_" + s["name"], TensorProto.FLOAT, s["shape"]) for s in states_in]
    tokens = helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T"])
    outer_out = [helper.make_tensor_value_info("seq_" + s["name"] + "_out", TensorProto.FLOAT, s["shape"]) for s in states_in]
    v = logits_out["shape"][-1]
    seq_logits = helper.make_tensor_value_info("seq_logits", TensorProto.FLOAT, ["T", 1, v])
    scan = helper.make_node("Scan", [i.name for i in outer_in] + ["tokens"], [o.name for o in outer_out] + ["seq_logits"],
                            body=body, num_scan_inputs=1)
    seq = helper.make_model(helper.make_graph([scan], "sequence", [tokens, *outer_in], [seq_logits, *outer_out]),
                            opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.checker.check_model(seq)
    onnx.save(seq, str(folder / "sequence.onnx"))
    m["graphs"].append({
        "name": "sequence", "kind": "sequence", "format": "onnx", "variant": step["variant"], "file": "sequence.onnx",
        "data_files": [], "opset": step["opset"], "max_chunk": max_chunk, "all_logits": True,
        "inputs": [{"name": "tokens", "dtype": "int64", "shape": ["T"], "role": "tokens"}]
        + [{**s, "name": "seq_" + s["name"]} for s in states_in],
        "outputs": [{"name": "seq_logits", "dtype": "float32", "shape": ["T", 1, v], "role": "logits"}]
        + [{**states_out[s["state"]], "name": "seq_" + s["name"] + "_out"} for s in states_in],
        "parity": None,
    })
    write_manifest(folder, m)


def test_prompt_runs_through_a_sequence_graph_when_the_folder_has_one(page, tiny, tmp_path):
    folder = copy_folder(tiny, tmp_path / "with_sequence")
    max_chunk = 7
    add_scan_sequence_graph(folder, max_chunk)
    prompt = "A longer prompt, fed in chunks of max_chunk tokens."
    with served(folder) as url:
        info = load_model(page, url)
        res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % GREEDY_TOKENS,
                            prompt)
    assert info["sequence"] == "sequence.onnx"
    assert res["stats"]["promptMode"] == "sequence"
    assert res["stats"]["promptRuns"] == -(-len(prompt.encode()) // max_chunk)  # ceil: longer prompts go in chunks
    expected, _ = tiny_reference().greedy(list(prompt.encode()), GREEDY_TOKENS)
    assert res["ids"] == expected
    # ?sequence=0: the prompt graph is not loaded, the prompt goes token by token, the tokens are the same
    with served(folder) as url:
        info = load_model(page, url, "?autoload=1&sequence=0")
        res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % GREEDY_TOKENS,
                            prompt)
    assert info["sequence"] is None and res["stats"]["promptMode"] == "step"
    assert res["stats"]["promptRuns"] == len(prompt.encode()) and res["ids"] == expected


def test_page_stays_responsive_while_generating_and_stop_works(page, tiny):
    with served(tiny) as url:
        load_model(page, url)
        page.fill("#max_tokens", "1000000")
        page.fill("#temperature", "1")
        page.click("#generate")
        page.wait_for_function("document.body.dataset.status === 'generating' && "
                               "window.rwkvDemo.currentIds().length >= 20")
        # Block the main thread; the worker keeps generating, and its tokens arrive once the page is free again.
        n0, n1 = page.evaluate(
            """ms => {
                 const n0 = window.rwkvDemo.currentIds().length;
                 const t0 = performance.now();
                 while (performance.now() - t0 < ms) {}
                 return new Promise((resolve) => setTimeout(() => resolve([n0, window.rwkvDemo.currentIds().length]), 50));
               }""",
            MAIN_BLOCK_MS,
        )
        page.click("#ids-details summary")  # a UI action handled during generation
        assert page.evaluate("document.getElementById('ids-details').open") is True
        assert page.evaluate("document.body.dataset.status") == "generating"
        before = page.evaluate("window.rwkvDemo.currentIds().length")
        page.wait_for_function(f"window.rwkvDemo.currentIds().length > {before}")
        page.click("#stop")
        assert wait_status(page, "ready") == "ready"
        res = page.evaluate("window.rwkvDemo.lastResult")
        shown = page.inner_text("#stat-gen")
    assert n1 - n0 >= MIN_TOKENS_WHILE_MAIN_BLOCKED, f"only {n1 - n0} tokens while the main thread was blocked"
    assert res["reason"] == "stopped" and shown.endswith("(stopped)"), shown
    assert before < res["stats"]["generatedTokens"] < 1_000_000
    assert page.page_errors == []


def test_webgpu_choice_without_adapter_falls_back_visibly(page, tiny):
    with served(tiny) as url:
        info = load_model(page, url, "?autoload=1&backend=webgpu")
        webgpu = page.evaluate("window.rwkvDemo.webgpu")
        notices = page.evaluate("window.rwkvDemo.notices")
        visible = page.locator("#notices .banner.fallback").all_inner_texts()
    if webgpu["available"]:  # a machine with a GPU adapter runs WebGPU for real
        assert info["backend"] == "webgpu"
    else:
        assert info["backend"] == "wasm"
        assert any(n["kind"] == "fallback" and "WebGPU is not available" in n["message"] for n in notices), notices
        assert visible and "using wasm instead" in visible[0]


def swiftshader_runs(browser, folder: Path, query: str, prompt: str) -> tuple[dict, dict, list, list]:
    """Load `folder` in a Chromium with SwiftShader's WebGPU adapter (--enable-unsafe-webgpu) and generate
    GREEDY_TOKENS greedy tokens: (loadInfo, result, notices, page errors)."""
    args = [a for a in CHROMIUM_ARGS if a != "--disable-gpu"] + ["--enable-unsafe-webgpu"]
    with served(folder) as url:
        b = browser.browser_type.launch(executable_path=str(CHROMIUM), args=args)
        try:
            pg = b.new_page()
            pg.set_default_timeout(LOAD_TIMEOUT_MS)
            errors = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            info = load_model(pg, url, query)
            assert pg.evaluate("window.rwkvDemo.webgpu")["available"]
            res = pg.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % GREEDY_TOKENS,
                              prompt)
            notices = pg.evaluate("window.rwkvDemo.notices")
        finally:
            b.close()
    return info, res, notices, errors


def test_webgpu_runs_for_real_on_swiftshader(browser, tiny):
    """Chromium started with --enable-unsafe-webgpu exposes SwiftShader's WebGPU adapter (a CPU implementation that
    ships in Debian's chromium-common): the demo runs the step graph on onnxruntime-web's WebGPU EP with its default
    I/O (graph capture, the state in GPU buffers, only the logits row read back: web_demo/session_io.js), every node
    on WebGPU, and its 32 greedy tokens equal runtime_ref's. (Not a speed path: it exists so the WebGPU code path is
    tested without a GPU.)"""
    prompt = "Hello"
    info, res, notices, errors = swiftshader_runs(browser, tiny, "?autoload=1&backend=webgpu&sequence=0", prompt)
    assert info["backend"] == "webgpu" and info["io"] == "capture", notices
    assert not [n for n in notices if n["kind"] == "fallback"], notices
    assert info["offGpu"] == [] and info["nodes"]["step"].get("WebGpuExecutionProvider", 0) > 0, info["nodes"]
    assert info["stateBytesOnGpu"] > 0
    expected, _ = tiny_reference().greedy(list(prompt.encode()), GREEDY_TOKENS)
    assert res["ids"] == expected
    assert errors == []


@pytest.mark.parametrize("io", ["gpu", "cpu"])
def test_webgpu_state_on_the_gpu_with_the_prompt_graph(browser, tiny, io):
    """io=gpu: the state in two GPU buffer sets used alternately (no graph capture), the prompt through the prompt
    graph on WebGPU, its state handed to the step graph on the GPU; io=cpu: the state through the CPU at every run
    (the old way, kept for comparisons). Both give runtime_ref's greedy ids, and the prompt graph's nodes that
    onnxruntime keeps on the CPU (shape arithmetic over the dynamic length) are named on the page."""
    prompt = "Hello, WebGPU! " * 3
    info, res, notices, errors = swiftshader_runs(browser, tiny, f"?autoload=1&backend=webgpu&io={io}", prompt)
    assert info["backend"] == "webgpu" and info["io"] == io, notices
    assert res["stats"]["promptMode"] == "sequence"
    assert (info["stateBytesOnGpu"] > 0) == (io == "gpu")
    expected, _ = tiny_reference().greedy(list(prompt.encode()), GREEDY_TOKENS)
    assert res["ids"] == expected
    off = [n["message"] for n in notices if "run on the CPU, not on WebGPU" in n["message"]]
    assert info["offGpu"] and off and "prefill.onnx" in off[0], notices
    assert errors == []


def test_io_choices_and_node_placement_parsing(page, tiny):
    """The pure parts of session_io.js: what load() tries in order (WebGPU: capture, then the state on the GPU without
    capture, then wasm; a backend that is not WebGPU: wasm only), and the node placement read from onnxruntime's
    verbose session log (the format of its VerifyEachNodeIsAssignedToAnEp lines)."""
    with served(tiny) as url:
        open_demo(page, url)
        got = page.evaluate("""async () => {
          const io = await import('./session_io.js');
          const log = [
            '2026-12-01 [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 2',
            '2026-12-01 [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]   DynamicQuantizeMatMul (mm_0)',
            '2026-12-01 [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]   Shape (shape_1)',
            '2026-12-01 [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [WebGpuExecutionProvider]. Number of nodes: 3',
            '2026-12-01 [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]   MatMul (mm_1)',
            '2026-12-01 [V:onnxruntime:, inference_session.cc:2 Initialize] Session successfully initialized.',
          ];
          let bad = null;
          try { io.attempts('webgpu', 'fast'); } catch (e) { bad = e.message; }
          return { webgpu: io.attempts('webgpu'), gpu: io.attempts('webgpu', 'gpu'), wasm: io.attempts('wasm', 'capture'),
                   placement: io.nodePlacement(log), bad, opts: io.sessionOptions('capture', {
                     logits: { name: 'logits' }, names: ['s'], stateOut: new Map([['s', { name: 's_out' }]]) }) };
        }""")
    assert [a["mode"] for a in got["webgpu"]] == ["capture", "gpu", "cpu"]
    assert [a["backend"] for a in got["webgpu"]] == ["webgpu", "webgpu", "wasm"]
    assert [(a["backend"], a["mode"]) for a in got["gpu"]] == [("webgpu", "gpu"), ("wasm", "cpu")]
    assert [(a["backend"], a["mode"]) for a in got["wasm"]] == [("wasm", "cpu")]
    assert "unknown io mode 'fast'" in got["bad"]
    assert got["placement"]["counts"] == {"CPUExecutionProvider": 2, "WebGpuExecutionProvider": 3}
    assert [(n["op"], n["name"]) for n in got["placement"]["offGpu"]] == [("DynamicQuantizeMatMul", "mm_0"), ("Shape", "shape_1")]
    assert got["opts"] == {"enableGraphCapture": True,
                           "preferredOutputLocation": {"logits": "gpu-buffer", "s_out": "gpu-buffer"}}


# ---- errors shown on the page -------------------------------------------------------------------------------------


def test_broken_model_file_shows_error(page, tiny, tmp_path):
    # Garbage bytes, with the manifest rewritten to match them: the server accepts the folder, onnxruntime refuses it.
    garbage = copy_folder(tiny, tmp_path / "garbage")
    (garbage / "model.onnx").write_bytes(b"this is not an onnx model\n" * 1000)
    write_manifest(garbage, read_manifest(garbage, verify_files=False))
    with served(garbage) as url:
        page.goto(url + "?autoload=1")
        msg = error_banner(page)
        assert wait_status(page, "load-failed") == "load-failed"
    assert "could not open model.onnx" in msg, msg

    # Damaged after the server checked it (same size, other bytes): the page's sha256 check catches it.
    damaged = copy_folder(tiny, tmp_path / "damaged")
    with served(damaged) as url:
        data = bytearray((damaged / "model.onnx").read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        (damaged / "model.onnx").write_bytes(bytes(data))
        page.goto(url + "?autoload=1")
        msg = error_banner(page)
    assert "model.onnx does not match the manifest (sha256" in msg, msg

    # Truncated: the size differs from the manifest.
    truncated = copy_folder(tiny, tmp_path / "truncated")
    with served(truncated) as url:
        (truncated / "model.onnx").write_bytes((tiny / "model.onnx").read_bytes()[:1000])
        page.goto(url + "?autoload=1")
        msg = error_banner(page)
    assert "1000 bytes but the manifest says" in msg, msg


def test_missing_or_invalid_manifest_shows_error(page, tiny, tmp_path):
    with served(tiny) as url:
        page.goto(url + "?model=/model/nothing-here/")
        msg = error_banner(page)
        assert wait_status(page, "error") == "error"
        assert "no manifest.json at" in msg and "HTTP 404" in msg, msg
        assert page.inner_text("#model-summary") == "No model."
    folder = copy_folder(tiny, tmp_path / "bad_manifest")
    with served(folder) as url:
        (folder / "manifest.json").write_text("{ not json")
        page.goto(url)
        msg = error_banner(page)
        assert "is not valid JSON" in msg, msg
        (folder / "manifest.json").write_text(json.dumps({"format": "something-else"}))
        page.goto(url)
        msg = error_banner(page)
        assert "is not an rwkv-export manifest" in msg, msg


# ---- the server ---------------------------------------------------------------------------------------------------


def _get(url: str, path: str):
    """(status, headers (case-insensitive), body) of GET path, sent as is."""
    host, port = url.split("//")[1].rstrip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", path)  # raw path: no client-side normalisation of '..'
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.headers, body


def test_server_headers_and_paths(tiny):
    with served(tiny) as url:
        status, headers, body = _get(url, "/")
        assert status == 200 and b"main.js" in body
        for k, v in ISOLATION_HEADERS.items():
            assert headers.get(k) == v, (k, headers)
        status, headers, body = _get(url, "/model/manifest.json")
        assert status == 200 and json.loads(body)["format"] == "rwkv-export-manifest"
        assert headers["Cross-Origin-Resource-Policy"] == "same-origin"
        for js in ["/main.js", "/worker.js", "/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs"]:
            status, headers, _ = _get(url, js)
            assert status == 200 and headers["Content-Type"].startswith("text/javascript"), js
        status, headers, _ = _get(url, "/node_modules/onnxruntime-web/dist/ort-wasm-simd-threaded.wasm")
        assert status == 200 and headers["Content-Type"] == "application/wasm"
        status, headers, _ = _get(url, "/model/model.onnx")
        assert status == 200 and int(headers["Content-Length"]) == (tiny / "model.onnx").stat().st_size
        for path in ["/node_modules/onnxruntime-web/package.json", "/model/../../../../etc/passwd",
                     "/model/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/../../etc/passwd", "/model/", "/nope.js",
                     "/node_modules/onnxruntime-web/dist/../package.json", "/node_modules/", "/model/..%2f..%2fx"]:
            assert _get(url, path)[0] == 404, path


def test_make_server_validates_folder_and_demo(tiny, tmp_path):
    with pytest.raises(ManifestError, match="has no manifest.json") as e:
        make_server(tmp_path, "127.0.0.1", 0)
    assert "\n" not in str(e.value)
    damaged = copy_folder(tiny, tmp_path / "damaged")
    (damaged / "model.onnx").write_bytes(b"x")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        make_server(damaged, "127.0.0.1", 0)
    no_modules = tmp_path / "web"
    no_modules.mkdir()
    (no_modules / "index.html").write_text("<!doctype html>")
    with pytest.raises(RwkvExportError, match=r"npm ci --prefix") as e:
        make_server(tiny, "127.0.0.1", 0, web_root=no_modules)
    assert "\n" not in str(e.value)
    with pytest.raises(RwkvExportError, match="web demo files not found"):
        make_server(tiny, "127.0.0.1", 0, web_root=tmp_path / "missing")


def test_cli_serve_prints_url_and_serves(tiny, tmp_path):
    from typer.testing import CliRunner

    from rwkv_export.cli import app

    bad = CliRunner().invoke(app, ["serve", str(tmp_path / "nope")])
    assert bad.exit_code == 2
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: "), bad.stderr
    assert "not an export folder" in bad.stderr
    exe = [sys.executable, "-m", "rwkv_export.cli"]
    proc = subprocess.Popen(exe + ["serve", str(tiny), "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        with urllib.request.urlopen(m.group(1) + "model/manifest.json", timeout=10) as r:
            assert json.load(r)["graphs"][0]["kind"] == "step"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pydoc_quant(tmp_path_factory) -> Path:
    from rwkv_export.export import export_onnx

    out = tmp_path_factory.mktemp("web_pydoc") / "pydoc"
    export_onnx("builtin:tiny-pydoc", out, quant=["int8", "int4"], check=False)
    return out


def python_ort_greedy(folder: Path, variant: str, prompt_ids: list[int], n: int) -> list[int]:
    """onnxruntime in Python on the same files: the prompt through the variant's prompt graph, then greedy steps."""
    from rwkv_export.manifest import find_graph, read_manifest
    from rwkv_export.runners import OnnxStepRunner
    from rwkv_export.seq_runner import OnnxSequenceRunner

    m = read_manifest(folder)
    step = OnnxStepRunner(folder, m, find_graph(m, variant))
    logits, state = OnnxSequenceRunner(folder, m, find_graph(m, variant, kind="sequence")).forward(
        prompt_ids, step.new_state())
    ids = []
    for _ in range(n):
        ids.append(int(np.argmax(logits)))
        logits, state = step.step(ids[-1], state)
    return ids


@pytest.mark.parametrize("variant", ["int8", "int4"])
def test_quantized_variant_in_the_page_equals_onnxruntime_in_python(page, pydoc_quant, variant):
    """The quantized files compute the same numbers in onnxruntime-web (wasm) as in onnxruntime (Python): on the
    trained tiny-pydoc, 32 greedy tokens after a prompt run through the variant's own prompt graph are identical
    (a trained model's greedy path is sensitive: a formulation the two runtimes compute differently, like QInt8 in
    the toolchain probe, flips tokens within a few steps)."""
    prompt = "Return the value of the"
    with served(pydoc_quant) as url:
        info = load_model(page, url, f"?autoload=1&threads=1&variant={variant}&backend=wasm")
        assert info["backend"] == "wasm" and info["variant"] == variant and info["sequence"] == f"prefill_{'q4' if variant == 'int4' else variant}.onnx"
        res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % GREEDY_TOKENS,
                            prompt)
    assert res["ids"] == python_ort_greedy(pydoc_quant, variant, list(prompt.encode()), GREEDY_TOKENS)
    assert page.page_errors == []


def test_variant_follows_the_backend_from_the_manifest(page, pydoc_quant):
    """The manifest records which web backends each variant suits (quantize.web_backends; webgpu-native, the demo's
    own WGSL runtime, runs all three of this RWKV-4 folder): the page offers the smallest suitable variant for the
    chosen backend (wasm: int8; WebGPU: int4, whose MatMulNBits runs on the GPU; webgpu-native: int4), says so under
    the controls, keeps a variant the user picked, and warns when it does not suit the backend. (This Chromium has no
    WebGPU: the page says webgpu-native will not load, and names no GPU alternative for int8.)"""
    m = read_manifest(pydoc_quant)
    assert {g["variant"]: g["backends"] for g in m["graphs"] if g["kind"] == "step"} == {
        "fp32": ["wasm", "webgpu", "webgpu-native"], "int8": ["wasm", "webgpu-native"],
        "int4": ["webgpu", "webgpu-native"]}
    with served(pydoc_quant) as url:
        open_demo(page, url)
        state = lambda: (page.input_value("#variant"), page.inner_text("#variant-note"))  # noqa: E731
        on_default = state()  # wasm native is the page's default for an RWKV-4 int8 folder (tests/test_wasm_native.py)
        default_backend = page.input_value("#backend")
        page.select_option("#backend", "wasm")
        on_wasm = state()
        page.select_option("#backend", "webgpu-native")
        on_native = state()
        page.select_option("#backend", "webgpu")
        on_gpu = state()
        page.select_option("#variant", "int8")
        picked = state()
        page.select_option("#backend", "wasm")
        kept = state()
        page.select_option("#backend", "webgpu")
        info = page.evaluate("window.rwkvDemo.load({threads: 1}).then(() => window.rwkvDemo.loadInfo)")
        notices = page.evaluate("window.rwkvDemo.notices")
    assert default_backend == "wasm-native" and on_default[0] == "int8" and "default here" in on_default[1], on_default
    assert on_wasm[0] == "int8" and "int8 suits wasm" in on_wasm[1], on_wasm
    assert on_gpu[0] == "int4" and "int4 suits webgpu" in on_gpu[1], on_gpu
    assert on_native[0] == "int4" and on_native[1].startswith(
        "int4 runs on webgpu-native (the smallest variant here that it runs)"), on_native
    assert "WebGPU is unavailable here" in on_native[1], on_native
    assert "choose WebGPU native" not in picked[1], picked
    assert picked[0] == "int8" and "int8 does not suit webgpu" in picked[1] and "int4" in picked[1], picked
    assert kept[0] == "int8" and "int8 suits wasm" in kept[1], kept
    assert info["variant"] == "int8"
    assert any(n["kind"] == "warn" and "int8 does not suit webgpu" in n["message"] for n in notices), notices


BAD_FILE_NAMES = ["../model.onnx", "/etc/passwd", "https://example.com/m.onnx", "a/../../m.onnx", "C:/m.onnx",
                  "sub\\m.onnx", "./model.onnx"]


def test_manifest_file_names_must_stay_inside_the_folder(page, tiny):
    """Like the Python side (every file a manifest names resolves inside its folder), the page refuses a manifest
    naming a file by an absolute path, with '..' or with a scheme: validateManifest raises for each, and a served
    manifest with such a name shows the error on the page instead of fetching it."""
    good = json.loads((tiny / "manifest.json").read_text())
    with served(tiny) as url:
        open_demo(page, url)
        got = page.evaluate("""async (names) => {
          const mf = await import('./manifest.js');
          const out = {};
          for (const name of names) {
            const m = structuredClone(window.rwkvDemo.manifest);
            m.graphs[0].file = name;
            try { mf.validateManifest(m); out[name] = 'accepted'; } catch (e) { out[name] = e.message; }
          }
          const ok = structuredClone(window.rwkvDemo.manifest);
          ok.graphs[0].data_files = ['sub/model.onnx.data'];
          mf.validateManifest(ok);
          return out;
        }""", BAD_FILE_NAMES)
        bad = {**good, "graphs": [{**good["graphs"][0], "data_files": ["../../secret.data"]}, *good["graphs"][1:]]}
        page.route("**/manifest.json", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                  body=json.dumps(bad)))
        page.goto(url)
        banner = error_banner(page)
    assert all("inside the model folder" in msg for msg in got.values()), got
    assert "../../secret.data" in banner and "inside the model folder" in banner, banner


def test_page_defaults_progress_and_output_follow_the_stream(page, tiny):
    """Issue 18's demo items: no progress bar before anything loads (the CSS display rule no longer overrides
    `hidden`); the default prompt fits the model's tokenizer (bytes: code-like text); the output box follows the
    stream to its end."""
    with served(tiny) as url:
        open_demo(page, url)
        hidden_before = page.is_hidden("#progress")
        prompt = page.input_value("#prompt")
        page.evaluate("window.rwkvDemo.load({threads: 1})")
        page.evaluate("window.rwkvDemo.generate({temperature: 1, maxTokens: 3000, seed: 1})")
        box = page.evaluate("(() => { const o = document.getElementById('output'); "
                            "return [o.scrollHeight, o.scrollTop, o.clientHeight]; })()")
    assert hidden_before
    assert prompt == "def "
    height, top, client = box
    assert height > client and height - top - client < 24, box  # it scrolled, and to the end


# ---- RWKV-7 -------------------------------------------------------------------------------------------------------


V7_GREEDY_TOKENS = 48


def test_v7_greedy_tokens_equal_reference_with_and_without_the_prompt_graph(page, v7):
    """RWKV-7 (state att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C]) from its manifest alone: the model line says
    RWKV-7, and 48 greedy tokens equal runtime_ref.rwkv7's fp64 ones, with a 164-byte prompt through the prompt graph
    (three calls: max_chunk is 64) and, with ?sequence=0, token by token through the step graph."""
    from test_v7_cli import one_torch_thread, v7_tiny_reference

    prompt = "RWKV-7 in the browser: the state is three tensors, one of them a matrix per head. " * 2
    prompt_ids = list(prompt.encode())
    max_chunk = next(g for g in read_manifest(v7)["graphs"] if g["kind"] == "sequence")["max_chunk"]
    assert max_chunk == 64 and len(prompt_ids) > 2 * max_chunk
    runs = []
    with served(v7) as url:
        for query in ("?autoload=1&threads=1&warmup=4", "?autoload=1&threads=1&warmup=0&sequence=0"):
            info = load_model(page, url, query)
            summary = page.inner_text("#model-summary")
            res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})"
                                % V7_GREEDY_TOKENS, prompt)
            runs.append((info, summary, res))
    with one_torch_thread():
        expected, _ = v7_tiny_reference().greedy(prompt_ids, V7_GREEDY_TOKENS)
    (info, summary, res), (info0, _, res0) = runs
    assert summary == "RWKV-7 · 2 layers × 128 (2 heads of 64) · vocab 256 · builtin:v7-tiny · tokenizer: bytes"
    assert info["sequence"] == "prefill.onnx" and res["stats"]["promptMode"] == "sequence"
    assert res["stats"]["promptRuns"] == -(-len(prompt_ids) // max_chunk)  # ceil: 3 calls of at most 64 tokens
    assert res["promptIds"] == prompt_ids
    assert res["ids"] == expected
    assert res["text"] == bytes(expected).decode("utf-8", errors="replace")
    assert info0["sequence"] is None and res0["stats"]["promptMode"] == "step"
    assert res0["stats"]["promptRuns"] == len(prompt_ids) and res0["ids"] == expected
    assert page.page_errors == []


def test_v7_world_vocab_tokenizes_and_generates_in_the_page(page, v7_world):
    """A World-vocab RWKV-7: the page picks the rwkv-world tokenizer from the manifest, fetches the vocab .txt from the
    server (UTF-8 text, cross-origin isolated), encodes the prompt like the `rwkv` pip package's tokenizer, and its
    greedy ids (stopping at end-of-text, id 0) and text equal the fp64 reference's."""
    from runtime_ref.rwkv7 import RWKV7

    from test_v7_cli import WORLD_PROMPT, greedy_until_eos, one_torch_thread, world_checkpoint_of, world_oracle

    vocab = read_manifest(v7_world)["tokenizer"]["file"]
    with served(v7_world) as url:
        status, headers, body = _get(url, f"/model/{vocab}")
        info = load_model(page, url, "?autoload=1&threads=1&warmup=0")
        kind = page.evaluate("window.rwkvDemo.tokenizer.kind")
        summary = page.inner_text("#model-summary")
        res = page.evaluate("p => window.rwkvDemo.generate({prompt: p, temperature: 0, maxTokens: %d})" % GREEDY_TOKENS,
                            WORLD_PROMPT)
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == (v7_world / vocab).read_bytes()
    assert all(headers.get(k) == v for k, v in ISOLATION_HEADERS.items()), headers
    assert kind == "rwkv-world" and info["sequence"] is None
    assert summary.startswith("RWKV-7 · 2 layers × 32 (2 heads of 16) · vocab 65536 · ") and \
        summary.endswith("tokenizer: rwkv-world"), summary
    oracle = world_oracle()
    prompt_ids = oracle.encode(WORLD_PROMPT)
    with one_torch_thread():
        ref = RWKV7.from_checkpoint(world_checkpoint_of(v7_world), dtype=torch.float64)
        expected = greedy_until_eos(ref, prompt_ids, GREEDY_TOKENS, eos=0)
    assert res["promptIds"] == prompt_ids
    assert res["ids"] == expected and len(expected) >= 8
    assert res["text"] == oracle.decodeBytes(expected).decode("utf-8", errors="replace")
    assert page.page_errors == []
