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
