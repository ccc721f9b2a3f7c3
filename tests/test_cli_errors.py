"""Every user error of every command: one line `error: ...`, exit 2, no traceback, and options checked before anything
is loaded (issue 18, point 6). One row per error class: argv -> a fragment of the expected message."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkv_export.cli import app

runner = CliRunner()
MISSING = "no-such-checkpoint.pth"  # an option error must be reported before the checkpoint is even looked for


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small export folder (builtin:tiny, fp32, step and prompt graphs; unchecked: the errors are the subject)."""
    from rwkv_export.export import export_onnx

    out = tmp_path_factory.mktemp("exp") / "tiny"
    export_onnx("builtin:tiny", out, check=False)
    return out


def _damaged(folder: Path, tmp: Path, file: str, damage) -> Path:
    """A copy of `folder` whose `file` is damaged and whose manifest was updated to match (so the sha256 check passes
    and the runtime meets the damage)."""
    copy = tmp / f"damaged-{file}"
    shutil.copytree(folder, copy)
    p = copy / file
    p.write_bytes(damage(p.read_bytes()))
    m = json.loads((copy / "manifest.json").read_text())

    def fix(node):
        if isinstance(node, dict):
            if node.get("file") == file and "sha256" in node:
                node["sha256"], node["size"] = hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size
            for v in node.values():
                fix(v)
        elif isinstance(node, list):
            for v in node:
                fix(v)

    fix(m)
    (copy / "manifest.json").write_text(json.dumps(m, indent=1))
    return copy


@pytest.fixture(scope="module")
def big_vocab_ckpt(tmp_path_factory):
    """RWKV-4, vocab 1000: the byte tokenizer (256 ids) cannot write most of its tokens."""
    from rwkv_export.arch.rwkv4.synthetic import PRESETS, make_state_dict
    from rwkv_export.synthetic import save_checkpoint

    sd = make_state_dict(replace(PRESETS["tiny"], vocab_size=1000), 0)
    return save_checkpoint(sd, tmp_path_factory.mktemp("ck") / "v1000.safetensors")


# (argv with {out}, {folder}, {ckpt} placeholders, expected message fragment)
CASES = {
    "onnx opset below": (["onnx", MISSING, "-o", "{out}", "--opset", "5"], "--opset must lie in [18, 24], got 5"),
    "onnx opset above": (["onnx", MISSING, "-o", "{out}", "--opset", "99"], "--opset must lie in [18, 24], got 99"),
    "onnx int4 block": (["onnx", MISSING, "-o", "{out}", "--quant", "int4", "--int4-block-size", "7"],
                        "--int4-block-size must be a power of two >= 16, got 7"),
    "onnx int4 block without int4": (["onnx", MISSING, "-o", "{out}", "--int4-block-size", "64"],
                                     "--int4-block-size applies to int4 quantization"),
    "onnx int4 embedding without int4": (["onnx", MISSING, "-o", "{out}", "--quant", "int8", "--int4-embedding"],
                                         "--int4-embedding applies to int4 quantization"),
    "onnx unknown variant": (["onnx", MISSING, "-o", "{out}", "--quant", "fp8"], "unknown --quant variant 'fp8'"),
    "onnx small tokenizer": (["onnx", "{ckpt}", "-o", "{out}", "--tokenizer", "bytes"], "not this model's tokenizer"),
    "tflite unknown variant": (["tflite", MISSING, "-o", "{out}", "--quant", "int3"], "unknown --quant variant 'int3'"),
    "tfjs unknown variant": (["tfjs", MISSING, "-o", "{out}", "--quant", "int4"], "unknown --quant variant 'int4'"),
    "quantize no variant": (["quantize", "{folder}", "--quant", ",,"], "--quant names no variant"),
    "quantize int4 block without int4": (["quantize", "{folder}", "--quant", "int8", "--int4-block-size", "32"],
                                         "--int4-block-size applies to int4 quantization"),
    "generate top-p 0": (["generate", MISSING, "-p", "hi", "--top-p", "0"], "--top-p must lie in (0, 1], got 0.0"),
    "generate top-p above 1": (["generate", MISSING, "-p", "hi", "--top-p", "1.5"], "--top-p must lie in (0, 1]"),
    "generate top-p nan": (["generate", MISSING, "-p", "hi", "--top-p", "nan"], "--top-p must lie in (0, 1], got nan"),
    "generate empty prompt": (["generate", MISSING, "-p", ""], "the prompt is empty"),
    "generate invalid utf-8 prompt": (["generate", MISSING, "-p", "ab\udcff\udcfecd"],
                                      "the prompt is not valid UTF-8 (byte 0xff at character 2)"),
    "generate small tokenizer": (["generate", "{ckpt}", "-p", "hi", "--tokenizer", "bytes"],
                                 "not this model's tokenizer"),
    "generate damaged graph": (["generate", "{damaged}", "-p", "hi", "-n", "2"], "does not load in onnxruntime"),
    "check damaged graph": (["check", "{damaged}", "-q"], "model.onnx does not load in onnxruntime"),
    "check damaged weights": (["check", "{damaged_data}", "-q"], "does not load in onnxruntime"),
    "check another checkpoint": (["check", "{folder}", "--checkpoint", "{ckpt}", "-q"], "is not the exported model"),
    "serve port above": (["serve", "{folder}", "--port", "99999"], "--port must lie in [0, 65535], got 99999"),
    "serve port below": (["serve", "{folder}", "--port", "-1"], "--port must lie in [0, 65535], got -1"),
    "onnx check jobs 0": (["onnx", MISSING, "-o", "{out}", "--check-jobs", "0"], "--check-jobs must lie in [1, 64], got 0"),
    "tflite check jobs 0": (["tflite", MISSING, "-o", "{out}", "--check-jobs", "0"], "--check-jobs must lie in [1, 64]"),
    "tfjs check jobs 0": (["tfjs", MISSING, "-o", "{out}", "--check-jobs", "0"], "--check-jobs must lie in [1, 64]"),
    "quantize check jobs 0": (["quantize", "{folder}", "--quant", "int8", "--check-jobs", "0"],
                              "--check-jobs must lie in [1, 64]"),
    "check check jobs 0": (["check", "{folder}", "--check-jobs", "0"], "--check-jobs must lie in [1, 64], got 0"),
    "bundle part size": (["bundle", MISSING, "-o", "{out}", "--part-mb", "0"], "--part-mb must be positive"),
    "bundle runtime": (["bundle", MISSING, "-o", "{out}", "--runtime", "foo"], "unknown --runtime 'foo'"),
}


@pytest.fixture(scope="module")
def places(folder, big_vocab_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    return {"folder": folder, "ckpt": big_vocab_ckpt,
            "damaged": _damaged(folder, tmp, "model.onnx", lambda b: b[: len(b) // 2]),
            "damaged_data": _damaged(folder, tmp, "model.onnx.data", lambda b: b[: len(b) // 2])}


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_exit_2(case, places, tmp_path):
    argv, fragment = CASES[case]
    out = tmp_path / "out"
    args = [a.format(out=out, **places) for a in argv]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)  # an escaped exception exits 1
    assert "Traceback" not in res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln]
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], res.stderr
    assert sum(ln.startswith("error: ") for ln in lines) == 1 and len(lines[-1].splitlines()) == 1
    assert not out.exists()


def test_invalid_utf8_argument_from_a_real_shell(folder):
    """The bytes a shell passes (`-p $'ab\\xff\\xfecd'`), not a str: one line, exit 2 (was UnicodeEncodeError)."""
    cmd = [sys.executable, "-m", "rwkv_export.cli", "generate", str(folder), "-p"]
    res = subprocess.run([os.fsencode(c) for c in cmd] + [b"ab\xff\xfecd"], capture_output=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr
    assert res.stderr.decode().strip() == "error: the prompt is not valid UTF-8 (byte 0xff at character 2)"


def test_generate_to_a_terminal_that_cannot_show_the_text(folder):
    """Text that stdout's encoding cannot hold prints as '?', not a UnicodeEncodeError."""
    cmd = [sys.executable, "-m", "rwkv_export.cli", "generate", str(folder), "-p", "h\u00e9llo", "-n", "4",
           "--temperature", "0", "-q"]
    res = subprocess.run(cmd, capture_output=True, env={**os.environ, "PYTHONIOENCODING": "ascii",
                                                         "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(b"h?llo") and b"Traceback" not in res.stderr


@pytest.mark.parametrize("argv", [["onnx", "builtin:tiny", "-o", "{out}", "--check-jobs", "1", "-q"],
                                  ["check", "{folder}", "--check-jobs", "1", "-q"],
                                  ["quantize", "{copy}", "--quant", "int8", "--check-jobs", "1", "-q"]],
                         ids=["onnx", "check", "quantize"])
def test_check_jobs_reaches_the_check(argv, folder, tmp_path, monkeypatch):
    """--check-jobs N is the check's `processes` (1: every graph checked in this process, one after another)."""
    import rwkv_export.check as check

    seen, real = [], check.check_graphs

    def spy(*a, **kw):
        seen.append(kw.get("processes"))
        return real(*a, **kw)

    monkeypatch.setattr(check, "check_graphs", spy)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    args = [a.format(out=tmp_path / "out", folder=folder, copy=copy) for a in argv]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert seen == [1]
