"""The RWKV-5.2 / RWKV-6 step and prompt graphs written node by node (arch/rwkv5/onnx_graph.py and rwkv6's)
against the torch modules they mirror (RWKV5Step / RWKV6Step, RWKV5Sequence / RWKV6Sequence), from the same inputs:
the graph's I/O contract (names, shapes, dtypes from the module's state spec), then every output by
max|Δ| / std(module's output), for fresh and random states, the fp16 variant, fp64 copies, the embedding outputs,
all_logits, T across the level-1 block edges and up to max_chunk, the chunk guard past it, other block sizes, and a
deep model's grouped state split. The independent reference (runtime_ref) is test_arch_v5_v6.py's business: here the
question is only whether the graph computes what its module computes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rwkv_export.arch.base import MAX_NODE_IO, Checkpoint
from rwkv_export.arch.rwkv5 import RWKV5Arch
from rwkv_export.arch.rwkv5 import onnx_graph as graph5
from rwkv_export.arch.rwkv5 import synthetic as syn5
from rwkv_export.arch.rwkv6 import RWKV6Arch
from rwkv_export.arch.rwkv6 import onnx_graph as graph6
from rwkv_export.arch.rwkv6 import synthetic as syn6
from rwkv_export.embed import with_embedding
from rwkv_export.onnx_build import Graph
from rwkv_export.targets import onnx as onnx_target
from rwkv_export.targets import onnx_seq

# version -> (architecture, synthetic fixtures, its onnx_graph module)
VERSIONS = {"5.2": (RWKV5Arch(), syn5, graph5), "6": (RWKV6Arch(), syn6, graph6)}
OPSET = onnx_target.DEFAULT_OPSET

# fp32 graph against the fp32 module: the same ops on the same fp32 tensors, only the kernels' summation order differs
# (onnxruntime's MatMul / LayerNormalization / ReduceSum against torch's). Measured (tiny presets, this file's cases):
# <= 5.0e-6 for the step (a fresh state's att_kv_out, k (x) v alone: entries that are dot products with cancellation,
# max/std ~ 10), <= 3.4e-6 for the prompt graph (T = 64, random state), 3.5e-6 at 14 layers. A wrong node is far
# above: measured 0.46 - 1.1 with the FFN's token-shift ends swapped, 0.50 with the state-before-block index off by one.
FP32_TOL = 1e-5
# fp16 graph against the fp16 module: fp16 rounding of activations in another order (onnxruntime's fp16 kernels
# against torch's); measured <= 8.5e-3 (step, random state) and 3.9e-3 (prompt graph). The traced graph (torch.onnx)
# gave outputs bit-identical to these graphs', so this is the kernels', not the graph's. 3e-2: 3.5x headroom.
FP16_TOL = 3e-2
# fp64 copies (`.double()`): ONNX float attributes are fp32, so the graph's LayerNormalization epsilons are 1e-5 and
# 64e-5 rounded to fp32 (64e-5 moves by 1.6e-11, against a WKV output variance that can be 1e-3: 2.4e-9 measured);
# the module is run with the same rounded epsilons (`_fp32_epsilons`), which leaves the kernels' summation order:
# measured <= 8.6e-15. A stray fp32 Cast in the fp64 graph would be ~1e-7.
FP64_TOL = 1e-12
# T across the level-1 block (8 tokens) edges, a single token, and the default max_chunk (64)
SEQ_LENGTHS = (1, 2, 15, 16, 17, 19, 64)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def _fp32_epsilons(monkeypatch):
    """torch's layer_norm with its eps rounded to fp32, as an ONNX LayerNormalization's `epsilon` attribute is."""
    layer_norm = torch.nn.functional.layer_norm

    def rounded(x, shape, weight=None, bias=None, eps=1e-5):
        return layer_norm(x, shape, weight, bias, float(np.float32(eps)))

    monkeypatch.setattr(torch.nn.functional, "layer_norm", rounded)


def _ckpt(version: str, preset: str = "tiny", **overrides) -> Checkpoint:
    arch, syn, _ = VERSIONS[version]
    from dataclasses import replace

    sd = syn.make_state_dict(replace(syn.PRESETS[preset], **overrides), 0)
    return Checkpoint(arch, arch.validate(sd), sd, "bfloat16")


@pytest.fixture(scope="module", params=list(VERSIONS), ids=lambda v: f"v{v}")
def ckpt(request):
    return _ckpt(request.param)


def _step(ckpt, variant: str = "fp32", embedding: bool = False):
    """The step module of a variant ("fp32", "fp16", or "double": the .double() copy of the fp32 build)."""
    module = ckpt.arch.step_module(ckpt, "fp16" if variant == "fp16" else "fp32")
    if variant == "double":
        module = module.double()
    return with_embedding(module) if embedding else module


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def _built(build, module) -> onnx.ModelProto:
    """The graph `build(module, g)` writes, in memory (weights inside), checked by onnx's checker."""
    g = Graph("test", OPSET)
    build(module, g)
    model = g.model()
    onnx.checker.check_model(model)
    return model


def _state(module, seed: int | None, dtype) -> list[torch.Tensor]:
    """The module's state tensors: fresh (seed None) or random (unit-scale values in every tensor)."""
    if seed is None:
        return [torch.zeros(s.shape, dtype=dtype) for s in module.state_spec]
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s.shape, generator=g) * 0.5).to(dtype) for s in module.state_spec]


def _rel(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.double().numpy()
    return float(np.abs(got.astype(np.float64) - want).max() / want.std())


def _compare(sess, module, token_name: str, tokens, state, tol: float, what) -> list[np.ndarray]:
    """Run the graph and the module on the same inputs; every output by name, shape, dtype and value."""
    with torch.no_grad():
        want = module(tokens, *state)
    feeds = {token_name: tokens.numpy(), **{s.name: t.numpy() for s, t in zip(module.state_spec, state)}}
    got = sess.run(None, feeds)
    names, outs = onnx_target.io_names(module, token_name)
    assert [o.name for o in sess.get_outputs()] == outs, what
    assert len(got) == len(want), what
    for name, x, w in zip(outs, got, want):
        assert x.shape == tuple(w.shape) and x.dtype == w.numpy().dtype, (what, name, x.shape, x.dtype)
        if torch.isnan(w).all():
            assert np.isnan(x).all(), (what, name)
            continue
        assert np.isfinite(x).all(), (what, name)
        assert _rel(x, w) <= tol, (what, name, _rel(x, w))
    return got


def _shape(v) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def _io(model: onnx.ModelProto) -> tuple[list, list]:
    from onnx.helper import tensor_dtype_to_np_dtype

    def entry(v):
        return v.name, _shape(v), tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name

    return [entry(v) for v in model.graph.input], [entry(v) for v in model.graph.output]


def _expected_io(module, token_name: str, n_tokens, logits_rows, io: str) -> tuple[list, list]:
    from rwkv_export.embed import output_names

    C, V = module.dims.n_embd, module.dims.vocab_size
    states = [(s.name, list(s.shape), io) for s in module.state_spec]
    ins = [(token_name, [n_tokens], "int64"), *states]
    outs = [("logits", [logits_rows, V], io), *((f"{n}_out", shape, dt) for n, shape, dt in states),
            *((name, [1, C], io) for name in output_names(module))]
    return ins, outs


# -- the step graph --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "fp16", "double"])
def test_step_graph_matches_the_step_module(ckpt, variant, _fp32_epsilons):
    module = _step(ckpt, variant)
    model = _built(VERSIONS[ckpt.arch.version][2].build_step, module)
    io = "float64" if variant == "double" else "float32"  # the state's and logits' dtype (fp32 in the fp16 variant)
    assert _io(model) == _expected_io(module, "token", 1, 1, io)
    sess = _session(model)
    dtype = torch.float64 if variant == "double" else torch.float32
    tol = {"fp32": FP32_TOL, "fp16": FP16_TOL, "double": FP64_TOL}[variant]
    for seed in (None, 1, 2):  # fresh, then random states
        for token in (0, 7, ckpt.dims.vocab_size - 1):
            _compare(sess, module, "token", torch.tensor([token]), _state(module, seed, dtype), tol, (seed, token))


def test_step_graph_embedding_output(ckpt):
    module = _step(ckpt, embedding=True)
    model = _built(VERSIONS[ckpt.arch.version][2].build_step, module)
    assert _io(model) == _expected_io(module, "token", 1, 1, "float32")
    assert _io(model)[1][-1][0] == "hidden"
    got = _compare(_session(model), module, "token", torch.tensor([5]), _state(module, 3, torch.float32), FP32_TOL,
                   "hidden")
    assert np.abs(got[-1]).max() > 0


def test_step_graph_ops(ckpt):
    """MatMul only (no Gemm: MatMulNBits takes every weight), and only ops the TF.js writer translates."""
    tfjs_ops = {"Add", "Sub", "Mul", "Div", "Exp", "Sigmoid", "Relu", "Neg", "Tanh", "MatMul", "Gather", "Concat",
                "Reshape", "LayerNormalization", "Cast", "Split"}
    for variant in ("fp32", "fp16"):
        model = _built(VERSIONS[ckpt.arch.version][2].build_step, _step(ckpt, variant))
        ops = {n.op_type for n in model.graph.node}
        assert "Gemm" not in ops and "MatMul" in ops
        assert ops <= tfjs_ops, ops - tfjs_ops


# -- the prompt graph ------------------------------------------------------------------------------------------------


def _sequence(step, **kw):
    return step.arch.sequence_module(step, **kw).eval()


def _tokens(T: int, V: int, seed: int) -> torch.Tensor:
    return torch.randint(0, V, (T,), generator=torch.Generator().manual_seed(seed))


def test_sequence_graph_matches_the_sequence_module(ckpt):
    """The shipped form (last token's logits, default max_chunk) for T up to max_chunk, fresh and random states;
    max_chunk + 1 tokens give NaN in every output (the chunk guard), as the module does."""
    module = _sequence(_step(ckpt))
    model = _built(VERSIONS[ckpt.arch.version][2].build_sequence, module)
    assert _io(model) == _expected_io(module, "tokens", onnx_seq.SEQ_DIM, 1, "float32")
    sess = _session(model)
    V = ckpt.dims.vocab_size
    assert module.max_chunk == max(SEQ_LENGTHS)
    for T in SEQ_LENGTHS:
        for seed in (None, T):
            _compare(sess, module, "tokens", _tokens(T, V, T), _state(module, seed, torch.float32), FP32_TOL,
                     (T, seed))
    got = _compare(sess, module, "tokens", _tokens(module.max_chunk + 1, V, 0), _state(module, 1, torch.float32),
                   FP32_TOL, "guard")
    assert all(np.isnan(x).all() for x in got)


@pytest.mark.parametrize("all_logits,embedding", [(True, False), (False, True), (True, True)])
def test_sequence_graph_all_logits_and_embedding(ckpt, all_logits, embedding):
    module = _sequence(_step(ckpt, embedding=embedding), all_logits=all_logits, max_chunk=20)
    model = _built(VERSIONS[ckpt.arch.version][2].build_sequence, module)
    rows = onnx_seq.SEQ_DIM if all_logits else 1
    assert _io(model) == _expected_io(module, "tokens", onnx_seq.SEQ_DIM, rows, "float32")
    sess = _session(model)
    for T in (1, 9, 20, 21):  # 20: max_chunk, two and a half blocks of 8; 21: past it (NaN)
        _compare(sess, module, "tokens", _tokens(T, ckpt.dims.vocab_size, T), _state(module, T, torch.float32),
                 FP32_TOL, (T, all_logits, embedding))


@pytest.mark.parametrize("variant", ["fp16", "double"])
def test_sequence_graph_fp16_and_fp64(ckpt, variant, _fp32_epsilons):
    module = _sequence(_step(ckpt, variant), max_chunk=24)
    model = _built(VERSIONS[ckpt.arch.version][2].build_sequence, module)
    io = "float64" if variant == "double" else "float32"
    assert _io(model) == _expected_io(module, "tokens", onnx_seq.SEQ_DIM, 1, io)
    sess = _session(model)
    dtype = torch.float64 if variant == "double" else torch.float32
    tol = FP16_TOL if variant == "fp16" else FP64_TOL
    for T in (1, 17, 24):
        _compare(sess, module, "tokens", _tokens(T, ckpt.dims.vocab_size, T), _state(module, 4, dtype), tol, T)


@pytest.mark.parametrize("block,max_chunk", [(1, 5), (5, 23), (32, 32)])
def test_sequence_graph_other_block_sizes(ckpt, block, max_chunk):
    """One token per block (no pair terms), a block size that divides nothing, one block per call."""
    step = _step(ckpt)
    seq_cls = type(_sequence(step))
    module = seq_cls(step, all_logits=True, max_chunk=max_chunk, block=block).eval()
    sess = _session(_built(VERSIONS[ckpt.arch.version][2].build_sequence, module))
    for T in sorted({1, block + 1, max_chunk, max_chunk + 1}):
        _compare(sess, module, "tokens", _tokens(T, ckpt.dims.vocab_size, T), _state(module, 5, torch.float32),
                 FP32_TOL, (block, max_chunk, T))


# -- deep models, the export entry points ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", list(VERSIONS))
def test_deep_model_keeps_every_node_within_max_node_io(version):
    """14 layers: the state's split into rows and concat back take the grouped path (arch.base), and so do the
    prompt graph's unrolled block steps (max_chunk 120: 15 of them); both graphs still compute the module."""
    ck = _ckpt(version, n_layer=14, n_embd=64, head_size=32, ffn_dim=128, vocab_size=64)
    step = _step(ck)
    seq = _sequence(step, max_chunk=120)
    graphs = VERSIONS[version][2]
    for module, build, name, tokens in ((step, graphs.build_step, "token", torch.tensor([3])),
                                        (seq, graphs.build_sequence, "tokens", _tokens(120, 64, 1))):
        model = _built(build, module)
        worst = max(len(n.input) + len(n.output) for n in model.graph.node)
        assert worst <= MAX_NODE_IO, (name, worst)
        _compare(_session(model), module, name, tokens, _state(module, 6, torch.float32), FP32_TOL, name)


@pytest.mark.parametrize("version", list(VERSIONS))
def test_export_writes_both_graphs_without_tracing(version, tmp_path, monkeypatch):
    """`rwkv-export onnx builtin:v5-tiny` / `builtin:v6-tiny`'s path (export.export_onnx): model.onnx and
    prefill.onnx written by onnx_graph.py, their weights in one shared data file, with torch tracing made to fail."""
    from rwkv_export.export import export_onnx

    def no_trace(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(torch.onnx, "export", no_trace)
    monkeypatch.setattr(torch.export, "export", no_trace)
    name = {"5.2": "v5-tiny", "6": "v6-tiny"}[version]
    result = export_onnx(f"builtin:{name}", tmp_path / "out", check=False)
    out = result.out
    step_entry, seq_entry = result.manifest["graphs"][:2]
    assert (step_entry["file"], seq_entry["file"]) == ("model.onnx", "prefill.onnx")
    assert step_entry["data_files"] == seq_entry["data_files"] and len(step_entry["data_files"]) == 1
    assert seq_entry["max_chunk"] == 64
    from rwkv_export.sources import Source

    ck = Source(f"builtin:{name}").load()
    step = _step(ck)
    _compare(_session(out / "model.onnx"), step, "token", torch.tensor([9]), _state(step, 7, torch.float32),
             FP32_TOL, "model.onnx")
    seq = _sequence(step)
    _compare(_session(out / "prefill.onnx"), seq, "tokens", _tokens(19, ck.dims.vocab_size, 2),
             _state(seq, 7, torch.float32), FP32_TOL, "prefill.onnx")
