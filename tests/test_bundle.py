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


def consume(bundle: Path, prompt: str, variant: str = "fp32", prompt_graph: str | None = None) -> list[int]:
    # -I: isolated mode, so neither the repo nor the tests folder is on sys.path; env without PYTHONPATH
    out = subprocess.run([sys.executable, "-I", str(CONSUMER), str(bundle), prompt, str(N_GREEDY), variant],
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, check=True)
    res = json.loads(out.stdout)
    assert res["leaked_modules"] == []
    assert res["prompt_graph"] == prompt_graph
    return res["ids"]


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
    assert "The `prefill` signature of `model.tflite`" in doc and "exactly 16 tokens" in doc
    prompt = "Phones run the step graph."  # 26 bytes: one chunk of 16 through `prefill`, then 10 steps
    assert consume(tmp_path / "b", prompt, prompt_graph="model.tflite") == reference_greedy(ckpt, list(prompt.encode()))
