"""The architecture seam: one registered architecture per RWKV version, detected from the keys alone, each with a
strict mapping, a typed state spec and a synthetic fixture with the real key layout."""

from __future__ import annotations

import pytest
import torch

from rwkv_export import arch
from rwkv_export.arch.base import StateTensor
from rwkv_export.checkpoint import from_state_dict
from rwkv_export.errors import CheckpointError, UnsupportedVersionError
from rwkv_export.synthetic import make_state_dict

VERSIONS = ("4", "5.2", "6", "7")


@pytest.fixture(scope="module")
def fixtures():
    return {v: make_state_dict(v, "tiny") for v in VERSIONS}


def test_every_version_is_registered_newest_first():
    assert [a.version for a in arch.ARCHITECTURES] == ["7", "6", "5.2", "4"]
    assert all(arch.get(v).title == f"RWKV-{v}" for v in VERSIONS)
    with pytest.raises(UnsupportedVersionError, match="RWKV-8"):
        arch.get("8")


@pytest.mark.parametrize("version", VERSIONS)
def test_each_fixture_is_detected_as_its_own_version(fixtures, version):
    sd = fixtures[version]
    ckpt = from_state_dict(sd)
    assert ckpt.arch.version == version
    # the mapping is complete: every tensor of the file is expected, with its shape
    assert set(ckpt.arch.expected_shapes(ckpt.dims)) == set(sd)


@pytest.mark.parametrize("version", VERSIONS)
def test_state_spec_is_typed_and_matches_the_reference(fixtures, version):
    a = arch.get(version)
    ckpt = from_state_dict(fixtures[version])
    spec = a.state(ckpt.dims)
    assert spec and all(isinstance(t, StateTensor) and t.dtype == "float32" for t in spec)
    ref = a.reference(fixtures[version], torch.float64).new_state()
    # the reference (independent code) holds exactly these tensors with these shapes and initial values (v4's
    # att_pp: -1e30 in the reference, -1e4 in the graphs; both mean "no token yet", see arch/rwkv4/spec.py)
    assert list(ref) == [t.name for t in spec]
    for t in spec:
        assert tuple(ref[t.name].shape) == t.shape, t.name
        if t.init == 0.0:
            assert torch.all(ref[t.name] == 0), t.name
    if version != "4":
        L, C, H, N = ckpt.dims.n_layer, ckpt.dims.n_embd, ckpt.dims.n_head, ckpt.dims.head_size
        assert [t.shape for t in spec] == [(L, C), (L, H, N, N), (L, C)] and H * N == C


@pytest.mark.parametrize("version,foreign,title", [
    ("7", "blocks.1.att.time_maa_x", "RWKV-6"), ("7", "blocks.0.att.time_first", "RWKV-4"),
    ("6", "blocks.1.att.k_k", "RWKV-7"), ("5.2", "blocks.0.att.time_maa_x", "RWKV-6"),
])
def test_mixed_version_keys_name_the_tensor_and_its_version(fixtures, version, foreign, title):
    sd = dict(fixtures[version])
    sd[foreign] = torch.zeros(1, 1, 128)
    with pytest.raises(CheckpointError, match=rf"'{foreign}'.*{title}"):
        from_state_dict(sd)


@pytest.mark.parametrize("key", ["blocks.0.ffn.s_emb.weight", "blocks.2.ffn.s0", "blocks.1.ffn.enn.weight"])
def test_deepembed_and_rwkv8_in_a_v7_file_are_refused_by_name(fixtures, key):
    sd = dict(fixtures["7"])
    sd[key] = torch.zeros(4)
    with pytest.raises(UnsupportedVersionError, match=key.replace(".", r"\.")):
        from_state_dict(sd)


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_head_size_that_does_not_divide_the_width_is_named(fixtures, version):
    """A checkpoint whose per-head tensor claims N = 48 heads' worth of C = 128 channels cannot map."""
    sd = dict(fixtures[version])
    key = "blocks.0.att.r_k" if version == "7" else "blocks.0.att.time_faaaa"
    sd[key] = torch.zeros(3, 48)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        from_state_dict(sd)


@pytest.mark.parametrize("version,key", [("6", "blocks.1.att.time_decay_w2"), ("7", "blocks.1.att.a2"),
                                         ("7", "blocks.0.att.g1")])
def test_missing_or_misshaped_lora_is_named(fixtures, version, key):
    sd = dict(fixtures[version])
    del sd[key]
    with pytest.raises(CheckpointError, match=rf"missing tensor '{key}'"):
        from_state_dict(sd)
    t = fixtures[version][key]
    # a first LoRA factor [C, D] sets D (read from it), so it is cut along C; a second [D, C] along C too
    sd[key] = (t[:-1] if key.endswith("1") else t[..., :-1]).clone()
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        from_state_dict(sd)
