"""Sentence embeddings from exported graphs (rwkv_export/embed.py, `rwkv-export embed`, the web demo's embed page).

- The graph outputs: `--embedding` appends `hidden` (step and prompt graph) and `hidden_sum` (prompt graph) after the
  unchanged logits and states, with their manifest roles; a plain export has none.
- Parity: each pooling (last, mean, state) from the step graph and from the prompt graph equals runtime_ref's
  `hidden_seq` in fp64, within parity.py's fp32 tolerance (max|Δ|/std 1e-5: fp32 rounding against fp64; a wrong
  equation shows as > 1e-2), for RWKV-4, 5.2, 6 and 7 (the tiny builtins), on texts shorter and longer than a prompt
  chunk (so the state and the mean's sum cross calls). The reference's `hidden_seq` is itself checked against its
  own `step` (an independent code path) and its `forward_seq` logits.
- The CLI: vectors printed / written to .npy, --similarity, and the one-line errors.
- TFLite: the step and prompt files' (`step` / `prefill` signatures) embedding against the same oracle; TF.js: the step graph in Node
  (tf_runners.TFJSStepRunner.step_hidden) against it too.
- The export-time gate: `check` (and so every export's check) compares each graph's embedding with the oracle, passes
  a healthy folder and fails one whose `hidden` is off by 1e-3.
- `rwkv-export bundle --embedding`: the bundle's graphs list the outputs with their roles, gated on the .ort files.
- The web demo's embed page: its vectors and the cosine similarity it shows (onnxruntime-web, wasm) equal
  runtime_ref's, from the prompt and the step graph; a folder without the outputs shows the re-export error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rwkv_export.cli import app
from rwkv_export.embed import POOLS, Embedder, compare_embedding, cosine, reference_embedding
from rwkv_export.manifest import read_manifest
from rwkv_export.parity import tolerance_for
from rwkv_export.sources import Source
from test_web_demo import browser, page, served, wait_status  # noqa: F401  (the demo's Playwright fixtures)

cli = CliRunner()
VERSIONS = ["tiny", "v5-tiny", "v6-tiny", "v7-tiny"]  # RWKV-4, 5.2, 6, 7
# one byte-token, a sentence, and a text longer than every prompt graph's max_chunk (v7 64, v5/v6 and v4 255
# tokens): its mean and state are carried across chunk calls
TEXTS = ["x", "The state is all the model remembers.",
         "def f(x):\n    return x ** 2  # a longer text, fed in several prompt-graph chunks\n" * 5]
FP32 = tolerance_for("onnx", "fp32").max_rel


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared 2-core box
    yield
    torch.set_num_threads(before)


def _export(source: str, out, **kw):
    from rwkv_export.export import export_onnx

    # the export's own parity gate is tested in test_cli / test_sequence; these tests compare with runtime_ref here
    export_onnx(source, out, check=False, **kw)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """builtin name -> its ONNX export folder made with --embedding (made once per module, on first use)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = _export(f"builtin:{name}", tmp_path_factory.mktemp("embed") / name, embedding=True)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """builtin:tiny exported without --embedding."""
    return _export("builtin:tiny", tmp_path_factory.mktemp("embed") / "plain")


def reference(name: str):
    ckpt = Source(f"builtin:{name}").load()
    return ckpt.arch.reference(ckpt.tensors, torch.float64)


# -- graph outputs ----------------------------------------------------------------------------------------------------


def test_embedding_outputs_are_appended(exports, plain):
    emb, base = read_manifest(exports("tiny")), read_manifest(plain)
    C = emb["model"]["n_embd"]
    for kind, extra in (("step", ["hidden"]), ("sequence", ["hidden", "hidden_sum"])):
        e = next(g for g in emb["graphs"] if g["kind"] == kind)
        b = next(g for g in base["graphs"] if g["kind"] == kind)
        assert e["inputs"] == b["inputs"]
        assert e["outputs"][:len(b["outputs"])] == b["outputs"]  # the existing outputs first, unchanged
        added = e["outputs"][len(b["outputs"]):]
        assert [o["name"] for o in added] == extra and [o["role"] for o in added] == extra
        assert all(o["shape"] == [1, C] and o["dtype"] == "float32" for o in added)
        assert not any(o["role"] in ("hidden", "hidden_sum") for o in b["outputs"])


def test_reference_hidden_seq_matches_its_step():
    """The oracle against an independent path: hidden_seq's last row through the head is forward_seq's logits, and
    its state is T `step` calls' state (step applies ln_out inside; hidden_seq is GPT mode)."""
    for name in VERSIONS:
        ref = reference(name)
        ids = list(TEXTS[1].encode())
        hidden, state = ref.hidden_seq(ids, ref.new_state())
        s = ref.new_state()
        for t in ids:
            logits, s = ref.step(t, s)
        assert torch.allclose(ref.head(hidden[-1]), logits, rtol=0, atol=1e-9), name
        for k in s:
            assert torch.allclose(state[k], s[k], rtol=0, atol=1e-9), (name, k)


# -- parity ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VERSIONS)
def test_parity_step_and_prompt_graph(exports, name):
    folder, ref = exports(name), reference(name)
    vectors = {}
    for kind in ("step", "sequence"):
        emb = Embedder(folder, kind=kind)
        report = compare_embedding(emb, ref, TEXTS)
        assert report["passed"], report
        assert max(report["max_rel"].values()) <= FP32
        vectors[kind] = [emb.embed(t) for t in TEXTS]
    # the two graphs agree with each other as closely (and the prompt graph really went through several chunks)
    assert Embedder(folder, kind="sequence").runner.chunk < len(TEXTS[2].encode())
    for a, b in zip(vectors["step"], vectors["sequence"]):
        for pool in POOLS:
            x, y = a.pooled(pool), b.pooled(pool)
            assert np.abs(x - y).max() <= FP32 * 10 * max(np.abs(y).max(), 1e-30), (name, pool)


def test_parity_gate_fails_on_a_wrong_vector(exports):
    """compare_embedding can fail: a reference that is off by a small amount in the last hidden state is caught."""
    folder, ref = exports("tiny"), reference("tiny")
    real = ref.hidden_seq

    def nudged(ids, state):
        h, s = real(ids, state)
        return h * (1 + 1e-3), s

    ref.hidden_seq = nudged
    report = compare_embedding(Embedder(folder, kind="step"), ref, TEXTS[1:2])
    assert not report["passed"] and report["max_rel"]["last"] > FP32


# -- CLI ---------------------------------------------------------------------------------------------------------------


def run(*args):
    return cli.invoke(app, [str(a) for a in args])


def test_cli_vectors_similarity_and_npy(exports, tmp_path):
    folder = exports("tiny")
    ref = reference("tiny")
    C = read_manifest(folder)["model"]["n_embd"]
    order = [t["name"] for t in read_manifest(folder)["state"]["tensors"]]
    want = {t: reference_embedding(ref, list(t.encode()), order) for t in TEXTS[:2]}
    for pool in POOLS:
        res = run("embed", folder, *TEXTS[:2], "--pool", pool)
        assert res.exit_code == 0, res.output
        rows = [np.array(line.split(), float) for line in res.output.strip().splitlines()]
        assert len(rows) == 2
        for row, t in zip(rows, TEXTS[:2]):
            w = want[t].pooled(pool)
            assert row.shape == w.shape and (pool == "state" or row.size == C)
            assert np.abs(row - w).max() <= 1e-5 * max(np.abs(w).max(), 1)  # printed with 7 significant digits
    res = run("embed", folder, "--similarity", *TEXTS[:2])
    assert res.exit_code == 0, res.output
    assert float(res.output) == pytest.approx(cosine(want[TEXTS[0]].mean, want[TEXTS[1]].mean), abs=2e-6)
    out = tmp_path / "v.npy"
    res = run("embed", folder, *TEXTS[:2], "--pool", "last", "--out", out)
    assert res.exit_code == 0 and out.is_file(), res.output
    arr = np.load(out)
    assert arr.shape == (2, C) and arr.dtype == np.float32
    assert np.abs(arr[1] - want[TEXTS[1]].last).max() <= 1e-5 * np.abs(want[TEXTS[1]].last).max()
    res = run("embed", folder, "a", "--out", out)
    assert res.exit_code == 2 and "exists" in res.output and np.array_equal(np.load(out), arr)


@pytest.mark.parametrize("args, message", [
    (["--similarity", "a"], "exactly two texts"),
    (["a", "--pool", "max"], "unknown pooling"),
    (["a", "--graph", "gpt"], "unknown --graph"),
    ([""], "empty text"),
    ([], "at least one text"),
])
def test_cli_errors(exports, args, message):
    res = run("embed", exports("tiny"), *args)
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output


def test_cli_folder_without_embedding(plain):
    res = run("embed", plain, "a")
    assert res.exit_code == 2 and "--embedding" in res.output and "re-export" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1


# -- TFLite ------------------------------------------------------------------------------------------------------------


def test_tflite_step_and_prefill_signatures(tmp_path):
    """TFLite (LiteRT interpreter): the `step` signature token by token, and `prefill` (whole chunks of 16, the tail
    through `step`, so `mean` adds both kinds of calls) against runtime_ref, within parity.py's tflite/fp32 bound for
    RWKV-7."""
    from rwkv_export.export import export_target

    folder = tmp_path / "tflite"
    export_target("tflite", "builtin:v7-tiny", folder, check=False, embedding=True)
    graphs = read_manifest(folder)["graphs"]
    assert [o["role"] for o in graphs[0]["outputs"]][-1:] == ["hidden"]
    assert [o["role"] for o in graphs[1]["outputs"]][-2:] == ["hidden", "hidden_sum"]
    ref = reference("v7-tiny")
    texts = [TEXTS[1], TEXTS[1] * 2]  # 37 and 74 bytes: 2 and 4 whole chunks, then 5 and 10 tail tokens
    for kind in ("step", "sequence"):
        report = compare_embedding(Embedder(folder, kind=kind), ref, texts)
        # RWKV-7's own fp32 row of parity.py's table (its GroupNorm and matrix state round more than RWKV-4)
        assert report["passed"] and report["tolerance"] == tolerance_for("tflite", "fp32", "7").max_rel, report


@pytest.fixture(scope="module")
def tfjs_folder(tmp_path_factory):
    """`rwkv-export tfjs builtin:tiny --embedding` (its own check off: test_tfjs_embedding_parity compares here)."""
    from rwkv_export.export import export_target

    folder = tmp_path_factory.mktemp("embed") / "tfjs"
    export_target("tfjs", "builtin:tiny", folder, check=False, embedding=True)
    return folder


def test_tfjs_signature_has_hidden(tfjs_folder):
    """TF.js: the step graph model's signature and manifest entry list `hidden` after the states."""
    folder = tfjs_folder
    m = read_manifest(folder)
    graph = m["graphs"][0]
    assert [(o["name"], o["role"], o["shape"]) for o in graph["outputs"]][-1] == ("hidden", "hidden", [1, 64])
    signature = json.loads((folder / graph["file"]).read_text())["signature"]
    assert "hidden" in signature["outputs"]


def test_tfjs_embedding_parity(tfjs_folder):
    """TF.js (@tensorflow/tfjs's CPU backend in Node): last, mean and state from the step graph equal runtime_ref's
    within parity.py's tfjs/fp32 bound (1e-5 of std: fp32 rounding against fp64); `embed` prints them; step() still
    returns the same logits and state as step_hidden()."""
    ref = reference("tiny")
    emb = Embedder(tfjs_folder)
    try:
        assert emb.kind == "step" and emb.graph["format"] == "tfjs"
        report = compare_embedding(emb, ref, TEXTS[:2])
        assert report["passed"] and report["tolerance"] == tolerance_for("tfjs", "fp32").max_rel, report
        assert max(report["max_rel"].values()) <= tolerance_for("tfjs", "fp32").max_rel
        state = emb.runner.new_state()
        logits, s1 = emb.runner.step(5, state)
        logits2, s2, hidden = emb.runner.step_hidden(5, state)
        assert np.array_equal(logits, logits2) and all(np.array_equal(s1[k], s2[k]) for k in s1)
        assert hidden.shape == (1, read_manifest(tfjs_folder)["model"]["n_embd"])
    finally:
        emb.close()
    order = [t["name"] for t in read_manifest(tfjs_folder)["state"]["tensors"]]
    want = reference_embedding(ref, list(TEXTS[1].encode()), order).last
    res = run("embed", tfjs_folder, TEXTS[1], "--pool", "last")
    assert res.exit_code == 0, res.output
    assert np.abs(np.array(res.output.split(), float) - want).max() <= FP32 * want.std() + 1e-6 * np.abs(want).max()


# -- the export-time gate (check.py) ----------------------------------------------------------------------------------


def test_check_gates_the_embedding(exports, monkeypatch):
    """`rwkv-export check` on an --embedding folder: one embedding report per graph (step and prompt), within the
    fp32 bound, and exit 0; the same folder with `hidden` read 1e-3 too large (a real slip, e.g. ln_out's weight
    off by 0.1 %) fails the embedding gate, exit 3, while the logits' parity still passes."""
    from rwkv_export import embed
    from rwkv_export.check import check_folder

    folder = exports("tiny")
    reports = check_folder(folder, raise_on_fail=False)
    emb = [r for r in reports if r.get("kind") == "embedding"]
    assert sorted(r["graph"] for r in emb) == ["sequence", "step"]
    assert all(r["passed"] and max(r["max_rel"][p] for p in ("last", "mean")) <= FP32 for r in emb), emb
    res = run("check", folder)
    assert res.exit_code == 0 and res.output.count("embedding onnx/fp32") == 2, res.output

    real = embed.Embedder._call

    def nudged(self, runner, graph, feeds):
        outs = real(self, runner, graph, feeds)
        return {k: v * (1 + 1e-3) if k in ("hidden", "hidden_sum") else v for k, v in outs.items()}

    monkeypatch.setattr(embed.Embedder, "_call", nudged)
    reports = check_folder(folder, raise_on_fail=False)
    assert all(r["passed"] for r in reports if r.get("kind") != "embedding")
    assert [r["passed"] for r in reports if r.get("kind") == "embedding"] == [False, False]
    res = run("check", folder)
    # exit 3: a parity failure (errors.ParityError), like the logits'
    assert res.exit_code == 3 and "`mean` embedding" in res.output and "exceeds 1e-05" in res.output, res.output


# -- bundle -------------------------------------------------------------------------------------------------------------


def test_bundle_embedding(tmp_path):
    """`rwkv-export bundle --embedding` (ort-mobile): the .ort graphs list `hidden` (and the prompt graph
    `hidden_sum`) with their roles, each gated by check (the .ort's own embedding report, the ONNX one kept)."""
    out = tmp_path / "bundle"
    res = run("bundle", "builtin:tiny", "-o", out, "--embedding", "-q")
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    for g in m["graphs"]:
        extra = ["hidden"] if g["kind"] == "step" else ["hidden", "hidden_sum"]
        assert g["format"] == "ort" and [o["role"] for o in g["outputs"]][-len(extra):] == extra
        assert [o["name"] for o in g["outputs"]][-len(extra):] == extra
        assert g["embedding"]["passed"] and g["embedding"]["target"] == "ort" and g["onnx_embedding"]["passed"]
    assert "embedding output `hidden`" in (out / "INTEGRATION.md").read_text()


# -- the web demo's embed page ----------------------------------------------------------------------------------------

PAGE_TEXTS = ["Return the number of items in a container.", "Return the length (the number of items) of an object."]


@pytest.mark.parametrize("graph", ["prefill", "step"])
def test_web_embed_page_similarity(exports, page, graph):
    """The page's vectors (onnxruntime-web, wasm, fp32) equal runtime_ref's fp64 ones within the fp32 tolerance, and
    the similarity it shows is their cosine (to 1e-5: fp32 vectors within 1e-5 of std move a cosine by less)."""
    folder = exports("tiny")
    ref = reference("tiny")
    order = [t["name"] for t in read_manifest(folder)["state"]["tensors"]]
    want = [reference_embedding(ref, list(t.encode()), order) for t in PAGE_TEXTS]
    with served(folder) as url:
        page.goto(url + f"embed.html?graph={graph}")
        assert wait_status(page, "ready", "error") == "ready", page.inner_text("#error")
        assert page.evaluate("window.rwkvEmbed.graph") == graph
        for pool in POOLS:
            for text, w in zip(PAGE_TEXTS, want):
                got = np.array(page.evaluate("([t, p]) => window.rwkvEmbed.embed(t, p).then(Array.from)", [text, pool]))
                scale = w.pooled(pool).std() if pool != "state" else np.abs(w.pooled(pool)).max()
                assert got.shape == w.pooled(pool).shape and np.abs(got - w.pooled(pool)).max() <= FP32 * scale, pool
        page.fill("#text-a", PAGE_TEXTS[0])
        page.fill("#text-b", PAGE_TEXTS[1])
        page.select_option("#pool", "mean")
        page.click("#compare")
        page.wait_for_function("document.getElementById('similarity').textContent !== '–'")
        shown = float(page.inner_text("#similarity"))
        assert shown == pytest.approx(cosine(want[0].mean, want[1].mean), abs=1e-5)
        assert page.page_errors == []


def test_web_embed_page_without_embedding(plain, page):
    with served(plain) as url:
        page.goto(url + "embed.html")
        assert wait_status(page, "ready", "error") == "error"
        assert "--embedding" in page.inner_text("#error")
