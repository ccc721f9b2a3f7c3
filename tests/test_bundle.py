"""App bundles: self-describing folders, proven by a consumer process that knows only the bundle."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rwkv_export.cli import app

from ckpts import state_dict, write

CONSUMER = Path(__file__).parent / "consumer" / "consume_bundle.py"
N_GREEDY = 32
runner = CliRunner()


def consume_all(bundle: Path, prompt: str, variant: str = "fp32", prompt_graph: str | None = None) -> dict:
    """The consumer's JSON: the greedy ids and the prompt ids it encoded."""
    # -I: isolated mode, so neither the repo nor the tests folder is on sys.path; env without PYTHONPATH
    out = subprocess.run([sys.executable, "-I", str(CONSUMER), str(bundle), prompt, str(N_GREEDY), variant],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=True)
    res = json.loads(out.stdout)
    assert res["leaked_modules"] == []
    assert res["prompt_graph"] == prompt_graph
    return res


def consume(bundle: Path, prompt: str, variant: str = "fp32", prompt_graph: str | None = None) -> list[int]:
    return consume_all(bundle, prompt, variant, prompt_graph)["ids"]


def reference_greedy(ckpt: Path, prompt_ids: list[int]) -> list[int]:
    from runtime_ref import RWKV4

    ids, _ = RWKV4.from_checkpoint(ckpt, dtype=torch.float64).greedy(prompt_ids, N_GREEDY)
    return ids


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write(tmp_path_factory.mktemp("ck") / "tiny.pth", state_dict("tiny"))


@pytest.fixture(scope="module")
def ort_bundle(tmp_path_factory, ckpt):
    out = tmp_path_factory.mktemp("b") / "bundle"
    from rwkv_export.bundle import make_bundle

    # parts of 200 kB force the split path on this ~600 kB model
    make_bundle(str(ckpt), out, runtime="ort-mobile", quant=["fp16"], part_bytes=200_000)
    return out


def test_ort_bundle_contents(ort_bundle):
    m = json.loads((ort_bundle / "manifest.json").read_text())
    assert m["bundle"]["runtime"] == "ort-mobile"
    assert [(g["format"], g["kind"], g["variant"]) for g in m["graphs"]] == [
        ("ort", "step", "fp32"), ("ort", "sequence", "fp32"), ("ort", "step", "fp16"), ("ort", "sequence", "fp16")]
    assert all(len(g["parts"]) >= 3 and all(p["size"] <= 200_000 for p in g["parts"]) for g in m["graphs"])
    assert not any(p.suffix in (".onnx", ".ort") for p in ort_bundle.iterdir())  # only parts remain
    ops = (ort_bundle / "required_operators.config").read_text()
    assert "ai.onnx;" in ops and "MatMul" in ops and "/tmp" not in ops
    doc = (ort_bundle / "INTEGRATION.md").read_text()
    for name in ("att_x_out", "att_pp", "-10000.0", "OrtSession", "ORTSession", "0.02", "Prompts in one call",
                 "prefill.ort"):
        assert name in doc, name
    assert all(g["onnx_parity"]["passed"] and g["parity"]["passed"] for g in m["graphs"])


def test_consumer_knowing_only_the_bundle_generates_the_reference_tokens(ort_bundle, ckpt):
    # 300+ bytes: more than the prompt graph's max_chunk (255), so the consumer feeds it in two chunks
    prompt = "The state is all the model remembers. " * 8
    assert len(prompt.encode()) > 255
    assert consume(ort_bundle, prompt, prompt_graph="prefill.ort") == reference_greedy(ckpt, list(prompt.encode()))


def test_consumer_detects_a_damaged_part(ort_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ort_bundle, copy)
    part = sorted(copy.glob("model.ort.part*"))[1]
    b = bytearray(part.read_bytes())
    b[100] ^= 0xFF
    part.write_bytes(bytes(b))
    res = subprocess.run([sys.executable, "-I", str(CONSUMER), str(copy), "x", "2"], capture_output=True, text=True)
    assert res.returncode != 0 and "damaged" in res.stderr


def test_bundle_is_checkable(ort_bundle):
    res = runner.invoke(app, ["check", str(ort_bundle), "-q"])
    assert res.exit_code == 0, res.output
    # parity of the four graphs, and the fp16 step graph's quality gate on the eval text
    assert res.stdout.count("PASS") == 5, res.stdout
    assert res.stdout.count("quality ort/fp16") == 1


def test_bundle_cli_bad_runtime(tmp_path):
    res = runner.invoke(app, ["bundle", "builtin:tiny", "-o", str(tmp_path / "b"), "--runtime", "coreml"])
    assert res.exit_code != 0 and "unknown --runtime 'coreml'" in res.stderr
    assert not (tmp_path / "b").exists()


def test_consumer_with_the_neox_tokenizer(tmp_path):
    """hf-tokenizers bundles: the consumer tokenizes with tokenizer.json from the bundle, nothing else."""
    from tokenizers import Tokenizer

    from rwkv_export.bundle import make_bundle
    from rwkv_export.tokenizer import NEOX_FILE

    ckpt = write(tmp_path / "neox.pth", state_dict("tiny-neox"))
    out = tmp_path / "bundle"
    make_bundle(str(ckpt), out, runtime="ort-mobile")
    assert (out / "tokenizer.json").read_bytes() == NEOX_FILE.read_bytes()
    prompt = "Hello, world! Ünïcödé and code: def f(x):\n    return x"
    ids = Tokenizer.from_file(str(NEOX_FILE)).encode(prompt).ids
    assert consume(out, prompt, prompt_graph="prefill.ort") == reference_greedy(ckpt, ids)


def test_tflite_bundle_consumer(tmp_path, ckpt):
    """The TFLite runtime: .tflite with its `step` and `prefill` signatures; the consumer runs the prompt through
    `prefill` in whole chunks and the rest token by token, in the LiteRT interpreter."""
    res = runner.invoke(app, ["bundle", str(ckpt), "-o", str(tmp_path / "b"), "--runtime", "tflite", "--quant", "int8",
                              "-q"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [(g["format"], g["variant"], g["kind"], g["signature"]) for g in m["graphs"]] == [
        ("tflite", "fp32", "step", "step"), ("tflite", "fp32", "sequence", "prefill"),
        ("tflite", "int8", "step", "step"), ("tflite", "int8", "sequence", "prefill")]
    assert m["graphs"][2]["quality"]["passed"] and all(g["parity"]["passed"] for g in m["graphs"])
    doc = (tmp_path / "b" / "INTEGRATION.md").read_text()
    assert "Signature: `step`" in doc and "Interpreter" in doc
    assert "The `prefill` signature of `prefill.tflite`" in doc and "exactly 16 tokens" in doc
    prompt = "Phones run the step graph."  # 26 bytes: one chunk of 16 through `prefill`, then 10 steps
    assert consume(tmp_path / "b", prompt, prompt_graph="prefill.tflite") == reference_greedy(ckpt, list(prompt.encode()))


# ---- RWKV-7 -----------------------------------------------------------------------------------------------------


def v7_reference_greedy(tensors_or_path, prompt_ids: list[int]) -> list[int]:
    from runtime_ref.rwkv7 import RWKV7

    ref = (RWKV7.from_checkpoint(tensors_or_path, dtype=torch.float64) if isinstance(tensors_or_path, Path)
           else RWKV7(tensors_or_path, dtype=torch.float64))
    return ref.greedy(prompt_ids, N_GREEDY)[0]


def test_v7_world_ort_bundle_consumer(tmp_path):
    """A World-vocab RWKV-7 in ORT format: its state (att_kv [L, H, N, N]) built from the manifest, the prompt through
    the prompt graph in two chunks, the World vocab shipped in the bundle and read by the consumer's own tokenizer
    (it may not import rwkv_export): prompt ids equal the `rwkv` pip package's tokenizer's, greedy ids runtime_ref's."""
    from test_v7_cli import WORLD_PROMPT, one_torch_thread, world_oracle, world_v7_checkpoint

    from rwkv_export.bundle import make_bundle
    from rwkv_export.tokenizer import WORLD_FILE

    ckpt = world_v7_checkpoint(tmp_path / "world-v7.safetensors")
    out = tmp_path / "bundle"
    with one_torch_thread():  # --no-check: the consumer's tokens against the reference are this test's check
        make_bundle(str(ckpt), out, runtime="ort-mobile", check=False)
    m = json.loads((out / "manifest.json").read_text())
    assert [(g["format"], g["kind"], g["file"]) for g in m["graphs"]] == [
        ("ort", "step", "model.ort"), ("ort", "sequence", "prefill.ort")]
    assert (out / m["tokenizer"]["file"]).read_bytes() == WORLD_FILE.read_bytes()
    doc = (out / "INTEGRATION.md").read_text()
    for text in ("RWKV-7, 2 layers × 32 (2 heads of 16)", "three tensors in, the same three out", "[2, 2, 16, 16]",
                 "`att_kv_out`", "plus the same three state inputs", "`rwkv_vocab_v20230424.txt`, the RWKV World",
                 "FloatArray(1024)", "longArrayOf(2, 2, 16, 16)"):
        assert text in doc, text
    assert "five" not in doc

    prompt = WORLD_PROMPT + " " + WORLD_PROMPT  # more than max_chunk (64) tokens: two calls of the prompt graph
    prompt_ids = world_oracle().encode(prompt)
    assert len(prompt_ids) > m["graphs"][1]["max_chunk"]
    res = consume_all(out, prompt, prompt_graph="prefill.ort")
    assert res["prompt_ids"] == prompt_ids
    assert res["ids"] == v7_reference_greedy(ckpt, prompt_ids)

    # the consumer checks the vocab against the manifest's sha256 before it trusts it
    vocab = out / m["tokenizer"]["file"]
    vocab.write_bytes(vocab.read_bytes().replace(b"'\\x00' 1", b"'\\x01' 1", 1))
    bad = subprocess.run([sys.executable, "-I", str(CONSUMER), str(out), "x", "2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "rwkv_vocab_v20230424.txt is damaged" in bad.stderr, bad.stderr


def test_v7_tflite_bundle_consumer(tmp_path):
    """RWKV-7 in the TFLite runtime: the consumer runs the prompt through the `prefill` signature in whole chunks of
    16 and the rest through `step`, in the LiteRT interpreter, with the rank-4 state from the manifest."""
    from test_v7_cli import one_torch_thread

    from rwkv_export.bundle import make_bundle
    from rwkv_export.sources import Source

    out = tmp_path / "b"
    with one_torch_thread():
        make_bundle("builtin:v7-tiny", out, runtime="tflite", check=False)
    m = json.loads((out / "manifest.json").read_text())
    assert [(g["format"], g["kind"], g["signature"]) for g in m["graphs"]] == [
        ("tflite", "step", "step"), ("tflite", "sequence", "prefill")]
    doc = (out / "INTEGRATION.md").read_text()
    assert "three tensors in" in doc and "floats(16384, 0.0f),   // shape [2, 2, 64, 64]" in doc
    prompt = "RWKV-7 on a phone: the state is three tensors."  # 47 bytes: two chunks of 16, then 15 steps
    ids = v7_reference_greedy(Source("builtin:v7-tiny").load().tensors, list(prompt.encode()))
    assert consume(out, prompt, prompt_graph="prefill.tflite") == ids
