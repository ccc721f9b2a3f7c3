"""Every file a manifest names stays inside its folder (issue 18, point 4), and a manifest missing what consumers read
is a one-line error (point 6), for every command that opens a folder: check, quantize, generate, serve.

The folders here are hand-made (a manifest from new_manifest plus stand-in files): every refusal happens in
read_manifest, before any graph is opened, so no export is needed."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rwkv_export.cli import app
from rwkv_export.errors import ManifestError
from rwkv_export.manifest import MANIFEST_NAME, new_manifest, read_manifest, write_manifest
from rwkv_export.sources import Source

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    return Source("builtin:tiny").load()


def make_folder(root: Path, ckpt, **graph_fields) -> Path:
    """A folder whose manifest describes one ONNX step graph `model.onnx` (stand-in bytes) plus `graph_fields`."""
    root.mkdir()
    (root / "model.onnx").write_bytes(b"stand-in graph\n")
    m = new_manifest(arch=ckpt.arch, dims=ckpt.dims, source={"builtin": "tiny"},
                     tokenizer={"kind": "bytes", "vocab_size": 256})
    m["graphs"].append({"name": "step", "kind": "step", "format": "onnx", "variant": "fp32", "file": "model.onnx",
                        "data_files": [], "opset": 18, "inputs": [{"name": "token", "role": "token"}],
                        "outputs": [{"name": "logits", "role": "logits"}], "parity": None, **graph_fields})
    write_manifest(root, m)
    return root


def edit_manifest(root: Path, edit) -> Path:
    m = json.loads((root / MANIFEST_NAME).read_text())
    edit(m)
    (root / MANIFEST_NAME).write_text(json.dumps(m))
    return root


def assert_one_line_error(res, match: str):
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in res.output, res.output
    assert match in err, err


ESCAPES = ["/etc/passwd", "../outside.onnx", "sub/../../outside.onnx", "..", ".hidden.onnx", "sub\\..\\x",
           "https://example.com/x.onnx", "//example.com/x", "model.onnx?x=1", "%2e%2e/x", ""]


@pytest.mark.parametrize("value", ESCAPES)
def test_a_graph_file_outside_the_folder_is_refused(tmp_path, tiny, value):
    root = edit_manifest(make_folder(tmp_path / "f", tiny), lambda m: m["graphs"][0].update(file=value))
    with pytest.raises(ManifestError, match="not a plain relative path inside the folder"):
        read_manifest(root)


@pytest.mark.parametrize("slot", ["data_files", "files", "tokenizer", "parts"])
def test_every_path_a_manifest_names_is_confined(tmp_path, tiny, slot):
    """Not only graph files: external data, the file list, the tokenizer and a bundle's parts take the same rule."""
    def edit(m):
        bad = "../../etc/passwd"
        if slot == "data_files":
            m["graphs"][0]["data_files"] = [bad]
        elif slot == "files":
            m["files"].append({"file": bad, "size": 1, "sha256": "0" * 64})
        elif slot == "tokenizer":
            m["tokenizer"] = {"kind": "hf-tokenizers", "file": bad}
        else:
            m["graphs"][0]["parts"] = [{"file": bad, "size": 1, "sha256": "0" * 64}]

    root = edit_manifest(make_folder(tmp_path / "f", tiny), edit)
    with pytest.raises(ManifestError, match=r"'\.\./\.\./etc/passwd' is not a plain relative path"):
        read_manifest(root, verify_files=False)


def test_a_symlink_out_of_the_folder_is_refused_and_one_inside_is_not(tmp_path, tiny):
    outside = tmp_path / "secret.onnx"
    outside.write_bytes(b"not yours\n")
    root = make_folder(tmp_path / "f", tiny)
    (root / "inside.onnx").symlink_to("model.onnx")  # a link within the folder is fine
    edit_manifest(root, lambda m: m["graphs"][0].update(file="inside.onnx"))
    assert read_manifest(root, verify_files=False)["graphs"][0]["file"] == "inside.onnx"
    (root / "out.onnx").symlink_to(outside)
    edit_manifest(root, lambda m: m["graphs"][0].update(file="out.onnx"))
    with pytest.raises(ManifestError, match=rf"leads out of the folder \(a symbolic link to {outside}\)"):
        read_manifest(root, verify_files=False)


def test_a_special_file_inside_the_folder_is_refused(tmp_path, tiny):
    root = make_folder(tmp_path / "f", tiny)
    os.mkfifo(root / "pipe.onnx")
    edit_manifest(root, lambda m: m["graphs"][0].update(file="pipe.onnx"))
    with pytest.raises(ManifestError, match="'pipe.onnx' is not a regular file"):
        read_manifest(root, verify_files=False)


COMMANDS = {
    "check": lambda d: ["check", d, "-q"],
    "quantize": lambda d: ["quantize", d, "--quant", "int8", "-q"],
    "generate": lambda d: ["generate", d, "-p", "hi", "-n", "1", "-q"],
    "serve": lambda d: ["serve", d, "--port", "0"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_manifest_that_escapes(tmp_path, tiny, command):
    """quantize used to follow data_files out of the folder and create a link there; check opened /etc/passwd."""
    root = edit_manifest(make_folder(tmp_path / "f", tiny),
                         lambda m: m["graphs"][0].update(data_files=["../../outside.onnx.data"]))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    res = runner.invoke(app, [str(a) for a in COMMANDS[command](root)])
    assert_one_line_error(res, "'../../outside.onnx.data' is not a plain relative path inside the folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, inside or beside


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("graphs"), "['graphs'] is missing"),
    (lambda m: m["graphs"][0].pop("data_files"), "graphs[0]['data_files'] is missing"),
    (lambda m: m["files"][0].update(size="12"), "files[0]['size'] is not an integer"),
    (lambda m: m["model"].pop("vocab_size"), "model['vocab_size'] is missing"),
    (lambda m: m.update(state=[]), "manifest['state'] is not an object"),
], ids=["no-graphs", "no-data_files", "size-a-string", "no-vocab", "state-a-list"])
def test_an_incomplete_manifest_is_one_line(tmp_path, tiny, command, edit, match):
    """`check` on a manifest without graphs was a KeyError traceback."""
    root = edit_manifest(make_folder(tmp_path / "f", tiny), edit)
    assert_one_line_error(runner.invoke(app, [str(a) for a in COMMANDS[command](root)]), match)


def test_a_recorded_checkpoint_that_is_a_device_is_not_read(tmp_path, tiny):
    """The manifest's source path is the one path allowed outside the folder (the checkpoint); a device there is
    refused like any checkpoint argument, not hashed without end."""
    root = edit_manifest(make_folder(tmp_path / "f", tiny),
                         lambda m: m["model"].update(source={"file": "zero", "path": "/dev/zero", "sha256": "0" * 64}))
    assert_one_line_error(runner.invoke(app, ["check", str(root), "-q"]), "/dev/zero")
