import pytest
import torch

from rwkv_export.checkpoint import load_checkpoint, v4_expected_shapes
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


@pytest.mark.parametrize(
    "version,marker",
    [("5", "att.ln_x.weight"), ("5.2", "att.gate.weight"), ("6", "att.time_maa_x"), ("7", "att.k_k")],
)
def test_newer_versions_are_recognised_and_refused(tmp_path, version, marker):
    sd = dict(state_dict("tiny"))
    sd["blocks.0." + marker] = torch.zeros(64)
    if version == "5.2":
        sd["blocks.0.att.ln_x.weight"] = torch.zeros(64)  # v5.2 has both; the table must say 5.2
    with pytest.raises(UnsupportedVersionError, match=f"RWKV-{version} checkpoint"):
        load_checkpoint(write(tmp_path / "m.pth", sd))


def test_v5_helper_is_detected_as_v5(tmp_path):
    with pytest.raises(UnsupportedVersionError, match="RWKV-5 "):
        load_checkpoint(write(tmp_path / "m.pth", v5_style(state_dict("tiny"))))


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
