"""Memory between export stages (issue 19): a memory-mapped checkpoint is re-read after each module is built, so that
the pages the build read stop counting while the graphs are written. Re-reading must not change a byte of the export,
and must be refused where a module still holds the checkpoint's own tensors."""

import hashlib

import torch

from rwkv_export.checkpoint import load_checkpoint, reread
from rwkv_export.embed import step_module
from rwkv_export.export import export_onnx
from rwkv_export.sources import Source
from rwkv_export.synthetic import make_checkpoint, make_state_dict, save_checkpoint


def _hashes(folder):
    """sha256 of every graph and weights file (the manifest records the source, which differs by design)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix in (".onnx", ".data")}


def test_reread_gives_the_same_tensors_in_a_fresh_mapping(tmp_path):
    for suffix in (".pth", ".safetensors"):
        path = make_checkpoint(tmp_path / f"tiny{suffix}", "tiny", version="4")
        ckpt = load_checkpoint(path)
        before = {k: t.clone() for k, t in ckpt.tensors.items()}
        old = ckpt.tensors
        module = step_module(ckpt, "fp32")  # bf16 -> fp32: the module holds copies, not the file's tensors
        assert reread(ckpt, keep=[module])
        assert ckpt.tensors is not old
        for k, t in ckpt.tensors.items():
            assert t.untyped_storage().data_ptr() != old[k].untyped_storage().data_ptr()
            assert torch.equal(t, before[k]), k


def test_reread_refused_while_a_module_holds_the_files_tensors(tmp_path):
    sd = {k: t.float() for k, t in make_state_dict("4", "tiny").items()}
    path = save_checkpoint(sd, tmp_path / "tiny.pth")
    ckpt = load_checkpoint(path)
    module = step_module(ckpt, "fp32")  # fp32 vectors pass into the module as they are (the same storage)
    held = {t.untyped_storage().data_ptr() for t in module.parameters()}
    assert any(t.untyped_storage().data_ptr() in held for t in ckpt.tensors.values())
    tensors = ckpt.tensors
    assert not reread(ckpt, keep=[module])
    assert ckpt.tensors is tensors


def test_reread_leaves_an_in_memory_checkpoint_alone():
    ckpt = Source("builtin:tiny").load()
    tensors = ckpt.tensors
    assert not reread(ckpt)
    assert ckpt.tensors is tensors


def test_export_from_a_file_is_byte_identical_to_the_same_model_in_memory(tmp_path):
    """builtin:tiny is made in memory (never re-read); the same seeded tensors saved as .pth are memory-mapped and
    re-read after the fp32 and fp16 modules are built: every graph and data file must be the same bytes."""
    path = make_checkpoint(tmp_path / "tiny.pth", "tiny", version="4")
    assert torch.equal(load_checkpoint(path).tensors["head.weight"], Source("builtin:tiny").load().tensors["head.weight"])
    quant = ["fp16", "int8", "int4"]
    export_onnx("builtin:tiny", tmp_path / "mem", quant=quant, check=False)
    export_onnx(str(path), tmp_path / "file", quant=quant, check=False)
    mem, file = _hashes(tmp_path / "mem"), _hashes(tmp_path / "file")
    assert len(mem) == 12  # 4 variants x (step, prompt, shared data file)
    assert file == mem
