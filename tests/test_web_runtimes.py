"""runtimes.html: one export folder in onnxruntime-web, TF.js and tfjs-tflite, in headless Chromium (Playwright).

On the trained fixture (builtin:tiny-pydoc, fp32), every runtime/backend that runs in CI's Chromium generates the same
64 greedy ids as runtime_ref (fp64), and its logits after the last token are within the target's fp32 tolerance
(rwkv_export.parity.TOLERANCES, max|Δ|/std(ref)). CPU backends: onnxruntime-web wasm, TF.js wasm and cpu, tfjs-tflite
wasm. GPU backends on SwiftShader (Chromium's CPU implementation of WebGL and WebGPU, --enable-unsafe-webgpu):
onnxruntime-web WebGPU and TF.js WebGL. What a runtime cannot do is said on the page: a folder without the runtime's
graph, a backend a runtime lacks, the prompt running token by token where there is no prompt graph. tfjs-tflite runs
the TFLite prompt graph (its own file) for whole chunks and the int8 variant, with the greedy ids of the Python LiteRT
runner; a runner in a Web Worker (?worker=1) gives the ids it gives on the page's thread.

Three exports of tiny-pydoc, made once for the module: ONNX and TF.js step graphs only, TFLite fp32, int8 and int4 with
their prompt graphs.
Needs (a missing one is a failure, never a skip): playwright (the Python package), /usr/bin/chromium, and
`npm ci --prefix web_demo` (onnxruntime-web and the TF.js packages).
"""

from __future__ import annotations

import http.client
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkv_export.parity import TOLERANCES
from rwkv_export.serve import WEB_DEMO_DIR, serve_in_thread

CHROMIUM = Path("/usr/bin/chromium")
BASE_ARGS = ["--headless", "--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync"]
CPU_ARGS = BASE_ARGS + ["--disable-gpu"]
SWIFTSHADER_ARGS = BASE_ARGS + ["--enable-unsafe-webgpu"]
TIMEOUT_MS = 240_000  # WebGPU on SwiftShader: ~25 s to build the kernels, then ~2 tok/s on this 2-core box
TOKENS = 64
PROMPT = 'def read(self, n=-1):\n    """Read'
FORMAT = {"ort": "onnx", "tfjs": "tfjs", "tflite": "tflite"}
# SwiftShader computes in fp32 like the CPU backends, but its exp/log and fused multiply-adds are its own and WebGL's
# shaders reorder sums; the tiny model's logits have std ~2.5, so 1e-4 of std is ~2.5e-4 absolute: 10x the fp32 CPU
# bound, still ~100x below a wrong equation (>1e-2, parity.py).
GPU_MAX_REL = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from rwkv_export.export import export_onnx, export_target

    root = tmp_path_factory.mktemp("runtimes")
    # the exporters' parity gates are tested elsewhere; here the page is compared against runtime_ref directly
    out = {"onnx": export_onnx("builtin:tiny-pydoc", root / "onnx", check=False, prefill=False).out,
           "tfjs": export_target("tfjs", "builtin:tiny-pydoc", root / "tfjs", check=False).out,
           # a TF.js folder without the prompt graph (--no-prefill): the page says how its prompt runs
           "tfjs_steps": export_target("tfjs", "builtin:tiny-pydoc", root / "tfjs_steps", check=False,
                                       prefill=False).out}
    out["tflite"] = export_target("tflite", "builtin:tiny-pydoc", root / "tflite", quant=["int8", "int4"],
                                  check=False).out
    return out


@pytest.fixture(scope="module")
def reference():
    from runtime_ref import RWKV4
    from rwkv_export.sources import Source

    model = RWKV4(Source("builtin:tiny-pydoc").load().tensors, dtype=torch.float64)
    prompt_ids = list(PROMPT.encode())
    ids, _ = model.greedy(prompt_ids, TOKENS)
    logits, _ = model.forward_seq(prompt_ids + ids, model.new_state())  # after the last generated token, as the page
    return prompt_ids, ids, logits.numpy()


@pytest.fixture(scope="module")
def pw():
    """One Playwright for the module: its sync API cannot be entered twice at once (the CPU browser stays open while
    the SwiftShader tests launch theirs)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing: pip install playwright (the Python package; do not run `playwright install`)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium")
    for pkg in ("onnxruntime-web/dist", "@tensorflow/tfjs-converter/dist", "@tensorflow/tfjs-tflite/wasm"):
        if not (WEB_DEMO_DIR / "node_modules" / pkg).is_dir():
            pytest.fail(f"{pkg} is missing: npm ci --prefix web_demo")
    with sync_playwright() as p:
        yield p


@contextmanager
def chromium(pw, args):
    b = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture(scope="module")
def cpu_browser(pw):
    with chromium(pw, CPU_ARGS) as b:
        yield b


@contextmanager
def runtimes_page(browser, folder: Path, query: str = ""):
    server, url = serve_in_thread(folder)
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.page_errors = []
    page.on("pageerror", lambda e: page.page_errors.append(str(e)))
    try:
        page.goto(f"{url}runtimes.html{query}")
        page.wait_for_function("['setup','error','ready','load-failed'].includes(document.body.dataset.status)")
        yield page, url
    finally:
        page.close()
        server.shutdown()
        server.server_close()


def run_greedy(page, runtime: str, backend: str, prompt_ids: list[int], variant: str = "fp32", threads: int = 1,
               worker: bool = False) -> tuple[dict, dict]:
    info = page.evaluate("o => window.rwkvRuntimes.load(o)", {"runtime": runtime, "backend": backend,
                                                              "variant": variant, "threads": threads, "worker": worker})
    assert "error" not in info, info
    res = page.evaluate("o => window.rwkvRuntimes.generate(o)", {"promptIds": prompt_ids, "maxTokens": TOKENS})
    return info, res


def max_rel(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, dtype=np.float64) - ref)) / np.std(ref))


CPU_CASES = [("ort", "wasm"), ("tfjs", "wasm"), ("tfjs", "cpu"), ("tflite", "wasm")]


@pytest.mark.parametrize("runtime,backend", CPU_CASES, ids=[f"{r}-{b}" for r, b in CPU_CASES])
def test_cpu_backends_greedy_ids_equal_reference(cpu_browser, folders, reference, runtime, backend):
    """64 greedy ids equal runtime_ref's (fp64) exactly; the last logits within the target's fp32 tolerance
    (parity.TOLERANCES: same fp32 math, only rounding differs)."""
    prompt_ids, want, ref_logits = reference
    with runtimes_page(cpu_browser, folders[FORMAT[runtime]]) as (page, _):
        info, res = run_greedy(page, runtime, backend, prompt_ids)
        assert page.page_errors == []
    assert info["backend"] == backend and info["crossOriginIsolated"]
    assert res["ids"] == want
    tol = TOLERANCES[(FORMAT[runtime], "fp32")].max_rel
    assert max_rel(res["lastLogits"], ref_logits) <= tol
    if runtime == "tflite":  # the prompt (33 tokens): two chunks of 16 through prefill.tflite, one step
        assert info["prompt"] == "prompt graph prefill.tflite" and res["stats"]["promptRuns"] == 3
    if runtime == "tfjs":  # the prompt graph in model.json (any T up to max_chunk): the 33 tokens in one call
        assert info["prompt"].startswith("prompt graph") and res["stats"]["promptRuns"] == 1, (info, res["stats"])


@pytest.fixture(scope="module")
def tflite_int8_ids(folders, reference):
    """The Python LiteRT runner's greedy ids for the int8 variant, fed as the page feeds it (whole chunks of the prompt
    through the prompt graph, the rest through the step graph)."""
    from rwkv_export.manifest import read_manifest
    from rwkv_export.tf_runners import TFLiteSequenceRunner

    prompt_ids = reference[0]
    m = read_manifest(folders["tflite"])
    seq = next(g for g in m["graphs"] if g["kind"] == "sequence" and g["variant"] == "int8")
    runner = TFLiteSequenceRunner(folders["tflite"], m, seq, threads=1)
    logits, state = runner.forward(prompt_ids, runner.new_state())
    ids = []
    for _ in range(TOKENS):
        ids.append(int(np.argmax(logits)))
        logits, state = runner.step_runner.step(ids[-1], state)
    return ids


def test_tflite_int8_runs_in_the_page_as_in_litert(cpu_browser, folders, reference, tflite_int8_ids):
    """The int8 .tflite in tfjs-tflite: the same 64 greedy ids as the Python LiteRT runner on the same file. Exact
    equality, not a tolerance: both are XNNPACK's dynamic-range int8 kernels on the same weights, and the ids are what a
    user sees (the quality gate judges int8 against fp32 elsewhere). A file the browser runtime misreads (weights
    addressed by offset, per-channel scales) gives zero or constant logits, far from these ids."""
    with runtimes_page(cpu_browser, folders["tflite"]) as (page, _):
        info, res = run_greedy(page, "tflite", "wasm", reference[0], variant="int8")
        assert page.page_errors == []
    assert info["prompt"] == "prompt graph prefill_int8.tflite"
    assert res["ids"] == tflite_int8_ids


def test_runner_in_a_web_worker_gives_the_same_ids(cpu_browser, folders, tflite_int8_ids):
    """?worker=1 runs the runtime in a Web Worker (rt_worker.js), where its wasm threads can block instead of spin:
    tfjs-tflite int8 with 2 threads there gives the page thread's ids (test above), and the page says where it ran."""
    with runtimes_page(cpu_browser, folders["tflite"], "?worker=1") as (page, _):
        assert page.is_checked("#worker")
        info, res = run_greedy(page, "tflite", "wasm", list(PROMPT.encode()), variant="int8", threads=2, worker=True)
        assert page.page_errors == []
    assert info["worker"] and "runs in a Web Worker" in info["notes"] and info["threads"] == 2
    assert res["stats"]["promptMode"] == "sequence" and res["ids"] == tflite_int8_ids


GPU_CASES = [("ort", "webgpu"), ("tfjs", "webgl")]


@pytest.mark.parametrize("runtime,backend", GPU_CASES, ids=[f"{r}-{b}" for r, b in GPU_CASES])
def test_gpu_backends_on_swiftshader_equal_reference(pw, folders, reference, runtime, backend):
    """The GPU backends on SwiftShader: 64 greedy ids equal runtime_ref's; logits within GPU_MAX_REL (its reason above).
    (TF.js's WebGPU backend opens on SwiftShader too and builds its kernels in ~10 s, but 64 tokens did not finish
    within 300 s on this 2-core machine: it is measured by benchmarks/bench_web_runtimes.py on a GPU, not here.)"""
    prompt_ids, want, ref_logits = reference
    with chromium(pw, SWIFTSHADER_ARGS) as b, runtimes_page(b, folders[FORMAT[runtime]]) as (page, _):
        info, res = run_greedy(page, runtime, backend, prompt_ids)
        assert page.page_errors == []
    assert info["backend"] == backend
    assert res["ids"] == want
    assert max_rel(res["lastLogits"], ref_logits) <= GPU_MAX_REL


def test_what_cannot_run_is_said_on_the_page(cpu_browser, folders):
    """A folder without the runtime's graph names the export command; a backend that is missing or that a runtime
    lacks fails with a one-line reason; TF.js says its prompt runs token by token and what would change that."""
    with runtimes_page(cpu_browser, folders["tfjs_steps"], "?runtime=ort") as (page, _):
        assert page.inner_text("#runtime-note").startswith("This folder has no ONNX step graph: make one with `rwkv-export onnx")
        assert page.is_disabled("#load")
        info = page.evaluate("window.rwkvRuntimes.load({runtime: 'tfjs', backend: 'wasm', variant: 'fp32'})")
        assert info["prompt"] == "prompt via steps"
        assert any("has only the step graph" in n and "--no-prefill" in n for n in info["notes"]), info["notes"]
    with runtimes_page(cpu_browser, folders["onnx"]) as (page, _):
        res = page.evaluate("window.rwkvRuntimes.load({runtime: 'ort', backend: 'webgpu', variant: 'fp32'})")
        assert res["limit"] and "WebGPU is not available" in res["error"], res  # --disable-gpu: no adapter
        assert "WebGPU is not available" in page.inner_text("#error")
    with runtimes_page(cpu_browser, folders["tflite"]) as (page, _):
        res = page.evaluate("window.rwkvRuntimes.load({runtime: 'tflite', backend: 'webgl', variant: 'fp32'})")
        assert res["limit"] and "runs on wasm only" in res["error"], res


def test_a_variant_the_tflite_build_cannot_open_says_why_and_what_runs(cpu_browser, folders):
    """tfjs-tflite's TFLite build has no int4 tensors: the page repeats what the runtime printed (type 17, INT4 in
    the TFLite schema) once, and names the variant that runs instead."""
    with runtimes_page(cpu_browser, folders["tflite"]) as (page, _):
        res = page.evaluate("window.rwkvRuntimes.load({runtime: 'tflite', backend: 'wasm', variant: 'int4'})")
        assert res["limit"] and "Unsupported data type 17 in tensor" in res["error"], res
        assert res["error"].count("Unsupported data type 17") == 1, res  # printed once per tensor, said once
        assert res["fix"].startswith("use the int8 variant"), res
        assert "Unsupported data type 17" in page.inner_text("#error")


def test_the_prompt_graph_can_be_left_out(cpu_browser, folders, reference):
    """load({promptGraph: false}) (?promptgraph=0; the benchmark's `steps` cells) feeds the prompt token by token
    through the step graph though the folder has a prompt graph, says so, and gives the reference's ids."""
    prompt_ids, want, _ = reference
    with runtimes_page(cpu_browser, folders["tfjs"]) as (page, _):
        info = page.evaluate("window.rwkvRuntimes.load({runtime: 'tfjs', backend: 'wasm', variant: 'fp32', "
                             "threads: 1, promptGraph: false})")
        res = page.evaluate("o => window.rwkvRuntimes.generate(o)", {"promptIds": prompt_ids, "maxTokens": TOKENS})
    assert info["prompt"] == "prompt via steps" and any("promptgraph=0" in n for n in info["notes"]), info
    assert res["stats"]["promptMode"] == "step" and res["stats"]["promptRuns"] == len(prompt_ids)
    assert res["ids"] == want


def test_url_parameters_choose_and_run(cpu_browser, folders):
    """?runtime=&backend=&variant=&tokens=&autorun=1 loads and generates without a click; the controls show the choice."""
    query = "?runtime=tflite&backend=wasm&variant=fp32&threads=1&tokens=8&autorun=1"
    with runtimes_page(cpu_browser, folders["tflite"], query) as (page, _):
        page.wait_for_function("window.rwkvRuntimes.lastResult !== null")
        assert page.evaluate("window.rwkvRuntimes.info")["runtime"] == "tflite"
        assert len(page.evaluate("window.rwkvRuntimes.lastResult.ids")) == 8
        assert page.input_value("#runtime") == "tflite" and page.input_value("#backend") == "wasm"


def _status(url: str, path: str) -> int:
    host, port = url.split("//")[1].strip("/").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("HEAD", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_serve_serves_the_runtime_packages_only(folders):
    """`rwkv-export serve` serves the top level of the TF.js packages' dist/ (and tfjs-tflite's wasm/), nothing else
    of node_modules; a TF.js or TFLite folder is served like an ONNX one."""
    server, url = serve_in_thread(folders["tflite"])
    try:
        for path in ["/runtimes.html", "/rt_tflite.js", "/node_modules/@tensorflow/tfjs-core/dist/tf-core.min.js",
                     "/node_modules/@tensorflow/tfjs-backend-wasm/dist/tfjs-backend-wasm-threaded-simd.wasm",
                     "/node_modules/@tensorflow/tfjs-tflite/wasm/tflite_web_api_cc_simd_threaded.wasm",
                     "/model/model.tflite"]:
            assert _status(url, path) == 200, path
        for path in ["/node_modules/@tensorflow/tfjs-core/package.json", "/node_modules/@tensorflow/tfjs-core/dist/",
                     "/node_modules/@tensorflow/tfjs-core/dist/ops/add.js", "/node_modules/@tensorflow/tfjs-core/src/index.ts",
                     "/node_modules/@tensorflow/tfjs-tflite/wasm/../package.json"]:
            assert _status(url, path) == 404, path
    finally:
        server.shutdown()
        server.server_close()


def _bench():
    """benchmarks/bench_web_runtimes.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_web_runtimes.py"
    spec = importlib.util.spec_from_file_location("bench_web_runtimes", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cells_parse_and_a_bad_cell_fails_in_one_line(capsys):
    """The benchmark's cell syntax runtime:backend:variant[:threads[:worker]][@tokens]; a bad cell is one line on
    stderr and exit 2, before anything is exported or started."""
    b = _bench()
    assert b.parse_cell("tflite:wasm:int8:2:worker@16") == {
        "spec": "tflite:wasm:int8:2:worker@16", "runtime": "tflite", "backend": "wasm", "variant": "int8",
        "threads": 2, "worker": True, "steps": False, "tokens": 16}
    assert b.parse_cell("ort:webgpu:fp32") == {"spec": "ort:webgpu:fp32", "runtime": "ort", "backend": "webgpu",
                                               "variant": "fp32", "threads": None, "worker": False, "steps": False,
                                               "tokens": None}
    assert b.parse_cell("tfjs:webgpu:fp32::steps")["steps"] is True
    for bad in ["ort:wasm", "onnx:wasm:fp32", "ort:wasm:fp32:0", "ort:wasm:fp32:1:gpu", "ort:wasm:fp32@0",
                "ort:wasm:fp32@x", "ort::fp32", "ort:wasm:fp32:1:worker+gpu"]:
        with pytest.raises(SystemExit) as e:
            b.parse_cell(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: cell '{bad}'") and err.count("\n") == 1, (bad, err)


def test_bench_ids_check_names_the_first_token_that_differs(reference):
    """--ids: each measured generation's ids against runtime_ref's (computed by the benchmark itself), the first
    differing token of any of them, and the last logits' max|Δ|/std; a row whose page failed is an error row."""
    b = _bench()
    prompt_ids, want, ref_logits = reference
    wrong = want[:5] + [(want[5] + 1) % 256] + want[6:]
    r = {"prompt_ids": prompt_ids, "ids": [want, wrong, want[:40]], "last_logits": [float(x) for x in ref_logits]}
    got = b.ids_check(r, "builtin:tiny-pydoc", TOKENS)
    assert got["ids_equal"] is False and got["first_diff"] == 5
    assert got["logits_max_rel"] < 1e-9  # the fixture's own fp64 logits, rounded to Python floats only
    shifted = [float(x) + 0.01 * float(np.std(ref_logits)) for x in ref_logits]
    got = b.ids_check({**r, "ids": [want, want[:40]], "last_logits": shifted}, "builtin:tiny-pydoc", TOKENS)
    assert got["first_diff"] == 40 and abs(got["logits_max_rel"] - 0.01) < 1e-6
    assert b.ids_check({**r, "ids": [want] * 3}, "builtin:tiny-pydoc", TOKENS)["ids_equal"] is True
    load = '{"loadSeconds": 1}'
    assert b.summarize(["load", "mem", "run"], [load, {"exception": "Error: cell timed out after 9 s"}]) == {
        "error": "page error at mem: Error: cell timed out after 9 s"}
    assert b.summarize(["load", "mem"], ['{"error": "tfjs-tflite cannot run this model: X"}']) == {
        "error": "tfjs-tflite cannot run this model: X"}
