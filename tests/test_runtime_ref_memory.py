"""runtime_ref's weights cast per use (issue 19): a reference built from a bf16 checkpoint holds its embedding and
linear weights as the checkpoint's own tensors and casts them where they are used. Its results must be the very bits
of the all-in-`dtype` path (every weight converted at load, as before), and its own weight memory what `_held` says:
the head and the vectors in the compute dtype, nothing else."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

from rwkv_export.synthetic import make_state_dict

# version (as make_state_dict names it) -> (runtime_ref's module, its model class)
MODELS = {"4": ("rwkv4", "RWKV4"), "5.2": ("rwkv5", "RWKV5"), "6": ("rwkv6", "RWKV6"), "7": ("rwkv7", "RWKV7")}


def _module(version: str):
    return importlib.import_module(f"runtime_ref.{MODELS[version][0]}")


def _model(version: str):
    return getattr(_module(version), MODELS[version][1])


def _run(model, tokens: list[int]):
    """GPT mode over `tokens` (all logits), then three steps: every output and state, in order."""
    logits, state = model.forward_seq(tokens, model.new_state(), all_logits=True)
    out = [logits, *state.values()]
    for tok in (3, 1, 4):
        logits, state = model.step(tok, state)
        out += [logits, *state.values()]
    hidden, _ = model.hidden_seq(tokens[:5], model.new_state())
    return out + [hidden]


@pytest.mark.parametrize("version", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cast_per_use_gives_the_bits_of_weights_held_in_dtype(version, dtype, one_torch_thread):
    """The old path, every weight held in `dtype`, is the same model given a state dict already in `dtype` (then no
    tensor needs a cast). Equal bits, not a tolerance: the same values in the same layout reach the same kernels."""
    sd = make_state_dict(version, "tiny")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    tokens = [int(t) for t in torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(5))]
    cast, held = _model(version)(sd, dtype), _model(version)({k: v.to(dtype) for k, v in sd.items()}, dtype)
    assert cast.dtype == held.dtype == dtype
    assert any(p.dtype == torch.bfloat16 for p in cast.parameters())  # the cast path is the one under test
    assert all(p.dtype == dtype for p in held.parameters())
    for a, b in zip(_run(cast, tokens), _run(held, tokens), strict=True):
        assert a.dtype == b.dtype == dtype and torch.equal(a, b)


def _own_bytes(model, sd: dict) -> int:
    """Bytes of the model's parameters that are not the checkpoint's own tensors."""
    given = {t.untyped_storage().data_ptr() for t in sd.values()}
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.untyped_storage().data_ptr() not in given)


@pytest.mark.parametrize("version", sorted(MODELS))
def test_the_reference_holds_only_its_head_and_vectors(version):
    """An fp64 model of a bf16 checkpoint holds (beyond the checkpoint) exactly the head and the non-matrix tensors
    in fp64; an fp32 model of an fp32 checkpoint holds the same set in fp32; the matrices are the checkpoint's."""
    sd = make_state_dict(version, "tiny")
    model = _model(version)(sd, torch.float64)
    per_use = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, (torch.nn.Embedding, _module(version).Linear))}
    assert "emb.weight" in per_use and "head.weight" not in per_use and len(per_use) > 4
    held = sum(t.numel() for k, t in sd.items() if k not in per_use)
    assert _own_bytes(model, sd) == 8 * held
    for k, p in model.state_dict().items():
        assert (p.data_ptr() == sd[k].data_ptr()) == (k in per_use), k
    sd32 = {k: v.float() for k, v in sd.items()}
    assert _own_bytes(_model(version)(sd32, torch.float32), sd32) == 4 * held


# at 12 x 768, vocab 50277 (RWKV-4-Pile-169M's shapes), in a fresh process: the fp64 model of its bf16 checkpoint
# (339 MB) and its steps may add the head in fp64 (309 MB) and one cast matrix at a time, not 1.35 GB of fp64 weights
_MEASURE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from rwkv_export.synthetic import make_state_dict
from runtime_ref.rwkv4 import RWKV4
sd = make_state_dict("4", "169m")
def rss():
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1]) * 1024
before = rss()
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
model = RWKV4(sd, torch.float64)
built = rss() - before
with torch.no_grad():
    logits, state = model.forward_seq([1, 2, 3, 4], model.new_state())
    for tok in range(3):
        logits, state = model.step(tok, state)
peak = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) * 1024 - before
print(json.dumps({"built": built, "peak": peak, "head": 8 * sd["head.weight"].numel()}))
"""


def test_fp64_reference_memory_at_169m_shapes():
    """Measured in a subprocess (RSS and its peak, /proc): building adds the head in fp64 and no more (measured: +1.6
    MB over it, the vectors; allowed 16 MB); GPT mode and steps add the casts per use, one matrix at a time (the
    largest [3072, 768], 19 MB in fp64; measured: +6 MB over the head; allowed 64 MB). The all-fp64 model (the old
    path) added 1.35 GB when built: it fails both bounds by over a gigabyte."""
    out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    mb = 1024**2
    assert m["built"] <= m["head"] + 16 * mb, m
    assert m["peak"] <= m["head"] + 64 * mb, m
