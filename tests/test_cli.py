"""The CLI end to end on tiny synthetic checkpoints (Typer's CliRunner), including the bad-input set."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rwkv_export.cli import app
from rwkv_export.manifest import MANIFEST_NAME

from ckpts import malicious_pth, state_dict, v5_style, write

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, out: Path, match: str, code: int | None = None):
    """One-line error naming the problem, nonzero exit, and nothing written (no folder, no .partial leftovers)."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # progress lines may come before it
    assert "Traceback" not in result.output
    assert match in errors[0], errors[0]
    assert not out.exists() or (out.is_dir() and not any(out.iterdir()))
    leftovers = [p.name for p in out.parent.iterdir() if ".partial-" in p.name or ".rwkv-export-probe-" in p.name]
    assert leftovers == []


@pytest.fixture(scope="module")
def ffn_pth(tmp_path_factory):
    return write(tmp_path_factory.mktemp("ck") / "tiny-ffn.pth", state_dict("tiny-ffn"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ffn_pth):
    out = tmp_path_factory.mktemp("exp") / "out"
    res = run("onnx", ffn_pth, "-o", out, "--tokenizer", "bytes", "-q")
    assert res.exit_code == 0, res.output
    return out, res


def test_help_does_not_import_torch():
    code = "import sys; from rwkv_export.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "rwkv_export.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "onnx" in out.stdout


def test_export_writes_folder_with_manifest_and_passing_parity(exported):
    out, res = exported
    assert "PASS" in res.stdout
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["format_version"] == 1 and m["model"]["rwkv_version"] == "4"
    assert (m["model"]["n_layer"], m["model"]["n_embd"], m["model"]["ffn_dim"], m["model"]["vocab_size"]) == (3, 48, 160, 300)
    g, seq = m["graphs"]  # the step graph, then the prompt graph (exported by default)
    assert (seq["kind"], seq["file"], seq["variant"], seq["max_chunk"]) == ("sequence", "prefill.onnx", "fp32", 255)
    assert next(i for i in seq["inputs"] if i["role"] == "tokens")["shape"] == ["T"]
    assert seq["parity"]["passed"] and seq["parity"]["max_rel"] <= 1e-5 and seq["parity"]["state_max_rel"] <= 1e-5
    assert g["file"] == "model.onnx" and g["opset"] >= 18
    roles = {i["name"]: i["role"] for i in g["inputs"]}
    assert roles["token"] == "token" and [i["state"] for i in g["inputs"] if i["role"] == "state"] == [
        "att_x", "att_aa", "att_bb", "att_pp", "ffn_x"]
    assert all(i["shape"] == [3, 48] and i["dtype"] == "float32" for i in g["inputs"] if i["role"] == "state")
    assert next(o for o in g["outputs"] if o["role"] == "logits")["shape"] == [1, 300]
    p = g["parity"]
    assert p["passed"] and p["max_rel"] <= 1e-5 and p["greedy_identical"] and p["tokens"] >= 64
    listed = {f["file"]: f for f in m["files"]}
    assert set(listed) == {"model.onnx", "prefill.onnx", "model.onnx.data"}  # the two graphs share one weights file
    assert listed["model.onnx"]["size"] == (out / "model.onnx").stat().st_size
    assert all(s["init"] is not None and np.isfinite(np.float16(s["init"])) for s in m["state"]["tensors"])


def test_graph_uses_matmul_not_gemm(exported):
    from rwkv_export.targets.onnx import op_counts

    ops = op_counts(exported[0] / "model.onnx")
    assert "Gemm" not in ops
    # per layer: r, k, v, output in time mix; key, receptance, value in channel mix; plus the head
    assert ops["MatMul"] == 3 * 7 + 1


def test_check_passes_and_reports(exported):
    res = run("check", exported[0], "-q")
    assert res.exit_code == 0, res.output
    assert "PASS" in res.stdout and "greedy 32/32 identical" in res.stdout


def test_check_against_a_different_checkpoint_fails(exported, tmp_path):
    other = write(tmp_path / "other.pth", state_dict("tiny-ffn", seed=1))
    res = run("check", exported[0], "--checkpoint", other, "-q")
    assert res.exit_code == 3, res.output
    assert "exceeds" in res.stderr and res.stderr.startswith("error: ")


def test_check_detects_a_damaged_file(exported, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(exported[0], copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"\0" * 10)
    res = run("check", copy, "-q")
    assert res.exit_code != 0 and "does not match the manifest" in res.stderr


def test_export_is_byte_identical(tmp_path, ffn_pth):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("onnx", ffn_pth, "-o", a, "--tokenizer", "bytes", "-q", "--no-check").exit_code == 0
    assert run("onnx", ffn_pth, "-o", b, "--tokenizer", "bytes", "-q", "--no-check").exit_code == 0
    assert (a / "model.onnx").read_bytes() == (b / "model.onnx").read_bytes()
    assert (a / MANIFEST_NAME).read_bytes() == (b / MANIFEST_NAME).read_bytes()


def test_external_data_mechanism(tmp_path):
    """Models >= 2 GB must keep weights outside the protobuf; forced here on a tiny model to test the path."""
    from rwkv_export.export import export_onnx

    res = export_onnx("builtin:tiny", tmp_path / "o", external_data=True, prefill=False)
    g = res.manifest["graphs"][0]
    assert g["data_files"] == ["model.onnx.data"]
    # the big weights move out; small constants may stay inline
    assert 4 * (tmp_path / "o" / "model.onnx").stat().st_size < (tmp_path / "o" / "model.onnx.data").stat().st_size
    assert g["parity"]["passed"]
    assert {f["file"] for f in res.manifest["files"]} == {"model.onnx", "model.onnx.data"}


def test_generate_greedy_from_export_equals_reference(exported, ffn_pth):
    from runtime_ref import RWKV4

    res = run("generate", exported[0], "-p", "hello", "-n", "16", "--temperature", "0", "-q")
    assert res.exit_code == 0, res.output
    ref = RWKV4.from_checkpoint(ffn_pth, dtype=torch.float64)
    ids, _ = ref.greedy(list(b"hello"), 16)
    # tokens >= 256 have no byte; the byte tokenizer decodes only the ones below 256
    expected = "hello" + bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
    assert res.stdout.rstrip("\n") == expected


def test_generate_on_checkpoint_runs_reference(ffn_pth):
    res = run("generate", ffn_pth, "-p", "ab", "-n", "8", "--temperature", "0", "--tokenizer", "bytes", "-q")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("ab")


def test_builtin_169m_shapes_are_listed():
    res = run("builtins")
    assert res.exit_code == 0 and "builtin:169m-synthetic" in res.stdout


# ---- the bad-input set: a one-line error, exit != 0, nothing written --------------------------------------------


def _bad(tmp_path, name, sd=None, raw=None):
    p = tmp_path / name
    if raw is not None:
        p.write_bytes(raw)
    else:
        write(p, sd)
    return p


def test_bad_truncated_file(tmp_path):
    good = write(tmp_path / "good.pth", state_dict("tiny")).read_bytes()
    p = _bad(tmp_path, "trunc.pth", raw=good[: len(good) // 2])
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out", "truncated or corrupt")


def test_bad_truncated_safetensors(tmp_path):
    good = write(tmp_path / "good.safetensors", state_dict("tiny")).read_bytes()
    p = _bad(tmp_path, "trunc.safetensors", raw=good[: len(good) // 2])
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out", "cannot read trunc.safetensors")


def test_bad_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    p = malicious_pth(tmp_path / "evil.pth", marker)
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out", "refusing to load evil.pth")
    assert not marker.exists(), "the pickle's code ran"


def test_bad_missing_key(tmp_path):
    sd = dict(state_dict("tiny"))
    del sd["blocks.1.att.time_first"]
    p = _bad(tmp_path, "m.pth", sd)
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out", "missing tensor 'blocks.1.att.time_first'")


def test_bad_extra_key(tmp_path):
    sd = dict(state_dict("tiny"))
    sd["blocks.0.att.mystery.weight"] = torch.zeros(3)
    p = _bad(tmp_path, "m.pth", sd)
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out",
                         "unexpected tensor 'blocks.0.att.mystery.weight'")


def test_bad_wrong_shape(tmp_path):
    sd = dict(state_dict("tiny"))
    sd["blocks.1.ffn.value.weight"] = torch.zeros(64, 200, dtype=torch.bfloat16)
    p = _bad(tmp_path, "m.pth", sd)
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out",
                         "tensor 'blocks.1.ffn.value.weight' has shape [64, 200], expected [64, 256]")


def test_bad_v5_checkpoint(tmp_path):
    p = _bad(tmp_path, "m.pth", v5_style(state_dict("tiny")))
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out", "RWKV-5.0/5.1 checkpoint")


def test_bad_nan_weight(tmp_path):
    sd = dict(state_dict("tiny"))
    w = sd["blocks.0.att.key.weight"].clone()
    w[3, 5] = float("nan")
    sd["blocks.0.att.key.weight"] = w
    p = _bad(tmp_path, "m.pth", sd)
    assert_clean_failure(run("onnx", p, "-o", tmp_path / "out"), tmp_path / "out",
                         "tensor 'blocks.0.att.key.weight' contains NaN or Inf")


def test_bad_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run("onnx", "builtin:tiny", "-o", out, "-q")
    assert res.exit_code != 0 and "use --force" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = run("onnx", "builtin:tiny", "-o", out, "-q", "--force", "--no-check", "--no-prefill")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME, "model.onnx"]


@pytest.mark.parametrize("where", ["under_a_file", "proc"])
def test_bad_unwritable_output_path(tmp_path, where):
    if where == "under_a_file":
        f = tmp_path / "afile"
        f.write_text("x")
        out = f / "out"
    else:
        out = Path("/proc/rwkv-export-test-out")  # /proc refuses new folders even to root
    res = run("onnx", "builtin:tiny", "-o", out, "-q")
    assert res.exit_code != 0
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and ("cannot" in err), err  # fails before work
    assert not out.exists()


def test_bad_missing_checkpoint_and_unknown_builtin(tmp_path):
    assert_clean_failure(run("onnx", tmp_path / "nope.pth", "-o", tmp_path / "out"), tmp_path / "out", "not found")
    assert_clean_failure(run("onnx", "builtin:nope", "-o", tmp_path / "out"), tmp_path / "out", "unknown built-in")


def test_bad_check_folder_without_manifest(tmp_path):
    res = run("check", tmp_path)
    assert res.exit_code != 0 and "no manifest.json" in res.stderr


def _words(text: str) -> str:
    """Whitespace collapsed, and a line break after a hyphen dropped (the help formatter wraps at hyphens)."""
    import re

    return re.sub(r"-\s+", "-", " ".join(text.split()))


def test_help_prints_every_docstring_and_option_help_as_written():
    """Nothing in a command's docstring or an option's help is eaten as markup (issue 18: `rwkv-export tflite
    --help` printed 'Extra: .' for 'Extra: [tflite].')."""
    import typer.main

    group = typer.main.get_command(app)
    assert group.commands, "no commands"
    for name, cmd in group.commands.items():
        res = run(name, "--help")
        assert res.exit_code == 0, (name, res.output)
        shown = _words(res.output)
        assert _words(cmd.help or "") in shown, (name, res.output)
        for p in cmd.params:
            if getattr(p, "help", None):
                assert _words(p.help) in shown, (name, p.name, res.output)
    assert "Extra: [tflite]." in _words(run("tflite", "--help").output)
