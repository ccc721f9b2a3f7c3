import re

import pytest
import torch

from rwkv_export.arch.rwkv4.mapping import expected_shapes as v4_expected_shapes
from rwkv_export.checkpoint import load_checkpoint
from rwkv_export.errors import CheckpointError, UnsupportedVersionError

from ckpts import state_dict, v5_style, write


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_loads_each_float_dtype_and_reads_dims(tmp_path, dtype):
    ck = load_checkpoint(write(tmp_path / "m.pth", state_dict("tiny", dtype=dtype)))
    assert ck.version == "4"
    assert ck.dims.as_dict() == {"n_layer": 2, "n_embd": 64, "ffn_dim": 256, "vocab_size": 256}
    assert ck.source_dtype == dtype


def test_ffn_width_is_read_from_tensors_not_assumed(tmp_path):
    ck = load_checkpoint(write(tmp_path / "m.safetensors", state_dict("tiny-ffn")))
    assert (ck.dims.n_layer, ck.dims.n_embd, ck.dims.ffn_dim, ck.dims.vocab_size) == (3, 48, 160, 300)
    assert ck.dims.ffn_dim != 4 * ck.dims.n_embd


def test_safetensors_and_pth_give_the_same_tensors(tmp_path):
    sd = state_dict("tiny")
    a = load_checkpoint(write(tmp_path / "m.pth", sd)).tensors
    b = load_checkpoint(write(tmp_path / "m.safetensors", sd)).tensors
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_key_table_matches_169m_release_layout():
    from rwkv_export.checkpoint import ModelDims

    shapes = v4_expected_shapes(ModelDims(12, 768, 3072, 50277))
    # 6 global tensors + 18 per layer (ln1 x2, ln2 x2, decay, first, 3 att mixes, 4 att linears, 2 ffn mixes, 3 ffn)
    assert len(shapes) == 6 + 18 * 12
    assert shapes["emb.weight"] == (50277, 768) and shapes["blocks.11.ffn.value.weight"] == (768, 3072)
    assert shapes["blocks.0.att.time_mix_k"] == (1, 1, 768)


@pytest.mark.parametrize("title,marker", [("RWKV-6", "att.time_maa_x"), ("RWKV-7", "att.k_k"),
                                          ("RWKV-5.2", "att.time_faaaa")])
def test_another_versions_key_in_a_v4_file_is_named(tmp_path, title, marker):
    """Mixed-version keys: the file is RWKV-4 by its markers, and the foreign key is named with its version."""
    sd = dict(state_dict("tiny"))
    sd["blocks.1." + marker] = torch.zeros(64)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor 'blocks.1.{marker}'.*a key of {title}"):
        load_checkpoint(write(tmp_path / "m.pth", sd))


@pytest.mark.parametrize("marker", ["att.ln_x.weight", "att.gate.weight"])
def test_v5_0_and_5_1_are_refused_by_name(tmp_path, marker):
    """time_first with a GroupNorm (ln_x) is RWKV-5.0/5.1 (5.1 adds the gate); only 5.2 of the v5 family is ours."""
    sd = v5_style(state_dict("tiny"))
    if marker != "att.ln_x.weight":
        sd["blocks.0." + marker] = torch.zeros(64, 64)
    with pytest.raises(UnsupportedVersionError, match=r"RWKV-5\.0/5\.1"):
        load_checkpoint(write(tmp_path / "m.pth", sd))


@pytest.mark.parametrize("key,what", [("blocks.0.ffn.enn.weight", "RWKV-8"), ("blocks.3.ffn.s_emb.weight", "DeepEmbed"),
                                      ("blocks.0.ffn.s0", "DeepEmbed")])
def test_rwkv8_and_deepembed_are_refused_by_name(tmp_path, key, what):
    sd = dict(state_dict("tiny"))
    sd[key] = torch.zeros(4)
    with pytest.raises(UnsupportedVersionError, match=rf"{what}.*'{key}'"):
        load_checkpoint(write(tmp_path / "m.pth", sd))


def test_non_float_tensor_is_named(tmp_path):
    sd = dict(state_dict("tiny"))
    sd["ln_out.bias"] = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="'ln_out.bias' has dtype int32"):
        load_checkpoint(write(tmp_path / "m.pth", sd))


def test_not_rwkv_at_all(tmp_path):
    with pytest.raises(CheckpointError, match="not an RWKV checkpoint"):
        load_checkpoint(write(tmp_path / "m.pth", {"weight": torch.zeros(3)}))


def test_missing_layer_is_named(tmp_path):
    sd = {k: v for k, v in state_dict("tiny-ffn").items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match=r"layer 1 \('blocks.1.\*'\)"):
        load_checkpoint(write(tmp_path / "m.pth", sd))


# ---- files that are not checkpoints (issue 18, points 6, 7 and 12), through the CLI ---------------------------------


def _cli(*args, timeout=120):
    """The CLI in a subprocess with a timeout: a command that started reading a device or FIFO would never end."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "rwkv_export.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def _assert_refused(res, match: str):
    err = res.stderr.strip()
    assert res.returncode == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, res.stderr
    assert match in err, err


@pytest.mark.parametrize("kind", ["dev-zero", "symlink-to-dev-zero", "fifo"])
def test_special_files_are_refused_without_reading(tmp_path, kind):
    """/dev/zero was read without bound until the kernel killed the process (22 GB); a FIFO blocks forever."""
    import os

    if kind == "dev-zero":
        p = "/dev/zero"
    elif kind == "symlink-to-dev-zero":
        p = tmp_path / "m.pth"
        p.symlink_to("/dev/zero")
    else:
        p = tmp_path / "m.pth"
        os.mkfifo(p)
    match = "a FIFO (pipe), not a regular file" if kind == "fifo" else "a character device, not a regular"
    _assert_refused(_cli("onnx", p, "-o", tmp_path / "out", "-q"), match)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,raw,match", [
    ("m.pth", bytes(range(256)) * 40, "not a PyTorch or safetensors checkpoint"),
    ("m.bin", b"\x00" * 5000, "not a PyTorch or safetensors checkpoint"),
    ("m.pth", b"", "is empty (0 bytes)"),
    ("m.safetensors", b"this is not a safetensors file at all", "not a PyTorch or safetensors checkpoint"),
    ("m.safetensors", (10**9).to_bytes(8, "little") + b'{"a": 1}',
     "its header claims 1000000000 bytes, the file has 16"),
], ids=["random-pth", "zeros-bin", "empty", "text-safetensors", "header-past-the-end"])
def test_random_bytes_are_not_reported_as_python_objects(tmp_path, name, raw, match):
    """Random bytes in a .pth used to read "holds Python objects"; the format is judged from the first bytes."""
    from rwkv_export.checkpoint import read_state_dict

    p = tmp_path / name
    p.write_bytes(raw)
    with pytest.raises(CheckpointError, match=re.escape(match)) as e:
        read_state_dict(p)
    assert "Python objects" not in str(e.value)


def test_random_bytes_through_the_cli_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from rwkv_export.cli import app

    p = tmp_path / "m.pth"
    p.write_bytes(bytes(range(256)) * 40)
    res = CliRunner().invoke(app, ["onnx", str(p), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2 and res.stderr.strip() == (
        "error: m.pth is not a PyTorch or safetensors checkpoint (its first bytes are neither a zip archive, a "
        "pickle nor a safetensors header)"), res.output


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_ddp_module_prefix_is_stripped_with_a_notice(tmp_path, capsys, suffix):
    from rwkv_export.progress import Progress

    sd = state_dict("tiny")
    ck = load_checkpoint(write(tmp_path / f"ddp{suffix}", {"module." + k: v for k, v in sd.items()}),
                         progress=Progress(enabled=True))
    assert set(ck.tensors) == set(sd) and ck.dims.n_layer == 2
    assert all(torch.equal(ck.tensors[k], sd[k]) for k in sd)
    assert "every key starts with 'module.' (a DistributedDataParallel checkpoint)" in capsys.readouterr().err


def test_a_partial_module_prefix_is_not_stripped(tmp_path):
    """Only when every key has it: a stray 'module.' key is an unexpected tensor like any other."""
    sd = dict(state_dict("tiny"))
    sd["module.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="module.extra"):
        load_checkpoint(write(tmp_path / "m.pth", sd))
