"""The RWKV-4 prompt graph written node by node (arch/rwkv4/onnx_graph.build_sequence) against the torch module it
mirrors (RWKV4Sequence), in onnxruntime: every T the scan lays out differently (one block, a full block, one token
past it, many blocks, max_chunk), fresh and random states, all_logits, the embedding outputs, fp16, fp64 and the
chunk guard. test_sequence.py checks the same graph against the step graph and runtime_ref.

The checkpoint is tiny-ffn with layer 0's time_decay spread over -8 .. +3 (decay per token from e^-0.0003 to e^-20),
so the scan meets both extremes in every test.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from rwkv_export.arch.rwkv4.sequence import DEFAULT_MAX_CHUNK
from rwkv_export.arch.rwkv4.step import STATE_NAMES, RWKV4Step, StepOptions
from rwkv_export.arch.rwkv4.synthetic import PRESETS, make_state_dict
from rwkv_export.checkpoint import from_state_dict
from rwkv_export.embed import HIDDEN, HIDDEN_SUM, with_embedding
from rwkv_export.onnx_build import EXTERNAL_MIN_BYTES
from rwkv_export.parity import tolerance_for
from rwkv_export.targets import onnx as onnx_target
from rwkv_export.targets import onnx_seq

from ckpts import state_dict

# fp32 graph vs fp32 module: the same ops in the same order (the scan's combines and every cast as the module has
# them); what differs is onnxruntime's kernels against torch's: GEMM blocking and FMA, LayerNormalization's
# reductions, exp. Measured up to 1.4e-6 of std on this model (att_aa / att_bb), 1.1e-6 for logits; 5e-6 for
# tiny-pydoc's att_pp at T = 255. A wrong index, shift or decay is O(1e-2) or more.
FP32_TOL = 1e-5
# fp64 graph vs fp64 module: the same arithmetic at 1e-16 resolution; what differs is kernel-internal, mostly
# onnxruntime's fp64 LayerNormalization (8e-12 of std on its own against F.layer_norm for inputs of mean 0.5, std
# 0.3). Measured up to 2e-12 here; 1e-9 leaves headroom for other data and still checks the graph's structure a
# thousand times below the fp32 effects above.
FP64_TOL = 1e-9
# fp16 weights and activations (WKV in fp32): both sides round every activation to fp16 (~5e-4 per op), onnxruntime
# and torch in different places inside their kernels (measured up to 5.8e-3 of std, att_bb); the fp16 step graph's
# parity tolerance (0.02) bounds it.
FP16_TOL = tolerance_for("onnx", "fp16").max_rel
DECAY_RANGE = (-8.0, 3.0)
LENGTHS = [1, 2, 7, 8, 9, 19, 64, DEFAULT_MAX_CHUNK]
SEED = 11


def scaled_err(x, ref) -> float:
    """max|x - ref| / std(ref), in fp64 (the parity gate's logits metric); a constant reference (att_bb after one
    token from the fresh state is all ones) is scaled by its magnitude instead."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = ref.std() or np.abs(ref).max()
    return float(np.abs(x - ref).max() / scale)


@pytest.fixture(scope="module")
def ckpt():
    sd = dict(state_dict("tiny-ffn"))
    key = "blocks.0.att.time_decay"
    sd[key] = torch.linspace(*DECAY_RANGE, sd[key].numel()).to(sd[key].dtype)
    return from_state_dict(sd)


def random_state(module, seed: int) -> dict:
    """A state no run of the model produced: any finite att_x / ffn_x / att_aa / att_pp, att_bb > 0."""
    g = torch.Generator().manual_seed(seed)
    L, C = module.dims.n_layer, module.dims.n_embd
    dt = module.layers[0].att_decay.dtype
    s = {n: torch.randn(L, C, generator=g, dtype=dt) for n in STATE_NAMES}
    s["att_bb"] = torch.rand(L, C, generator=g, dtype=dt) * 2 + 0.1
    s["att_pp"] = s["att_pp"] * 5
    return s


class Built:
    """A step module's prompt graph in onnxruntime (one thread) next to the torch sequence module it mirrors."""

    def __init__(self, step, path, **kwargs):
        import onnxruntime as ort

        self.path = path
        onnx_seq.export_sequence(step, path, **kwargs)
        self.module = step.arch.sequence_module(step, **kwargs).eval()
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, tokens, state) -> tuple[dict, dict]:
        """(graph outputs, module outputs) by name, both as numpy arrays."""
        feeds = {"tokens": np.asarray(tokens, np.int64), **{n: state[n].numpy() for n in STATE_NAMES}}
        got = dict(zip(self.names, self.session.run(None, feeds)))
        with torch.no_grad():
            want = self.module(torch.tensor(tokens), *(state[n] for n in STATE_NAMES))
        return got, {n: t.numpy() for n, t in zip(self.names, want)}


def tokens_for(T: int, vocab: int) -> list[int]:
    return np.random.default_rng(SEED + T).integers(0, vocab, T).tolist()


def assert_close(got: dict, want: dict, tol: float, T: int) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
        assert np.isfinite(got[name]).all(), name
        assert scaled_err(got[name], want[name]) <= tol, (name, T, scaled_err(got[name], want[name]))


@pytest.fixture(scope="module")
def fp32(ckpt, tmp_path_factory):
    return Built(RWKV4Step(ckpt).eval(), tmp_path_factory.mktemp("fp32") / "prefill.onnx")


@pytest.fixture(scope="module")
def fp64(ckpt, tmp_path_factory):
    step = copy.deepcopy(RWKV4Step(ckpt, StepOptions(rescale_every=2))).double().eval()  # rescale: its Div too
    return Built(step, tmp_path_factory.mktemp("fp64") / "prefill.onnx")


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "random-state"])
@pytest.mark.parametrize("T", LENGTHS)
def test_fp32_graph_equals_the_module(fp32, T, fresh):
    m = fp32.module
    state = m.new_state() if fresh else random_state(m, SEED + T)
    got, want = fp32.run(tokens_for(T, m.dims.vocab_size), state)
    assert got["logits"].shape == (1, m.dims.vocab_size) and got["logits"].dtype == np.float32
    assert_close(got, want, FP32_TOL, T)


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "random-state"])
@pytest.mark.parametrize("T", LENGTHS)
def test_fp64_graph_equals_the_module(fp64, T, fresh):
    m = fp64.module
    state = m.new_state() if fresh else random_state(m, SEED + T)
    state = {n: v.double() for n, v in state.items()}
    got, want = fp64.run(tokens_for(T, m.dims.vocab_size), state)
    assert got["logits"].dtype == np.float64
    assert_close(got, want, FP64_TOL, T)


@pytest.mark.parametrize("max_chunk", [1, 3, 7, 15, 63])
def test_every_scan_layout_equals_the_module(ckpt, tmp_path, max_chunk):
    """Smaller max_chunk: blocks of 2 and 4 positions, no level 2 (G = 1), and level 2 with fewer steps."""
    step = copy.deepcopy(RWKV4Step(ckpt)).double().eval()
    built = Built(step, tmp_path / "prefill.onnx", max_chunk=max_chunk)
    assert onnx_seq.graph_meta(built.path)["max_chunk"] == max_chunk
    for T in sorted({1, min(2, max_chunk), max_chunk // 2 + 1, max_chunk}):
        state = {n: v.double() for n, v in random_state(built.module, SEED + T).items()}
        assert_close(*built.run(tokens_for(T, step.dims.vocab_size), state), FP64_TOL, T)


@pytest.mark.parametrize("embedding", [False, True], ids=["plain", "embedding"])
def test_all_logits_and_embedding_outputs(ckpt, tmp_path, embedding):
    for all_logits in (False, True):
        step = RWKV4Step(ckpt).eval()
        if embedding:
            with_embedding(step)
        built = Built(step, tmp_path / f"prefill_{all_logits}.onnx", all_logits=all_logits)
        assert built.names == ["logits", *(f"{n}_out" for n in STATE_NAMES),
                               *((HIDDEN, HIDDEN_SUM) if embedding else ())]
        V, C = step.dims.vocab_size, step.dims.n_embd
        for T in (1, 9, 64):
            got, want = built.run(tokens_for(T, V), random_state(step, SEED + T))
            assert got["logits"].shape == ((T, V) if all_logits else (1, V))
            if embedding:
                assert got[HIDDEN].shape == got[HIDDEN_SUM].shape == (1, C)
            assert_close(got, want, FP32_TOL, T)


def test_fp16_variant_follows_its_module(ckpt, tmp_path):
    # rescale every 2 layers (the fp16 variant's is 6, past this model's 3 layers) so its Div nodes are in the graph
    step = RWKV4Step(ckpt, StepOptions(rescale_every=2, dtype="float16")).eval()
    built = Built(step, tmp_path / "prefill.onnx", all_logits=True)
    for T in (1, 19, 64):
        got, want = built.run(tokens_for(T, step.dims.vocab_size), step.new_state())
        assert got["logits"].dtype == np.float32  # I/O in fp32 whatever the variant
        assert_close(got, want, FP16_TOL, T)


def test_over_long_call_answers_nan(ckpt, tmp_path):
    """One token past max_chunk: NaN logits and hidden outputs (the chunk guard), as the module answers."""
    step = with_embedding(RWKV4Step(ckpt).eval())
    built = Built(step, tmp_path / "prefill.onnx", max_chunk=15)
    for T, nan in ((15, False), (16, True), (40, True)):
        got, want = built.run(tokens_for(T, step.dims.vocab_size), step.new_state())
        for name in ("logits", HIDDEN, HIDDEN_SUM):
            assert bool(np.isnan(got[name]).all()) == nan and bool(np.isnan(want[name]).all()) == nan, (T, name)
            assert nan or np.isfinite(got[name]).all()


def test_contract_and_shared_weights(fp32, ckpt, tmp_path):
    """I/O names, dtypes and shapes (T dynamic, named onnx_seq.SEQ_DIM); the weights are the step graph's, by name."""
    model = onnx.load(str(fp32.path))
    L, C = fp32.module.dims.n_layer, fp32.module.dims.n_embd

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ins = {v.name: dims(v) for v in model.graph.input}
    assert ins == {"tokens": [onnx_seq.SEQ_DIM], **{n: [L, C] for n in STATE_NAMES}}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    outs = {v.name: dims(v) for v in model.graph.output}
    assert outs == {"logits": [1, fp32.module.dims.vocab_size], **{f"{n}_out": [L, C] for n in STATE_NAMES}}
    step = RWKV4Step(ckpt)
    onnx_target.export_step(step, tmp_path / "model.onnx")
    params = {n for n, _ in step.named_parameters()}
    step_inits = {t.name for t in onnx.load(str(tmp_path / "model.onnx")).graph.initializer} & params
    prompt_inits = {t.name: t for t in model.graph.initializer if t.name in params}
    assert set(prompt_inits) == step_inits == params
    for name, t in prompt_inits.items():
        assert np.array_equal(onnx.numpy_helper.to_array(t), dict(step.named_parameters())[name].numpy()), name


def test_data_file_holds_only_weights(tmp_path):
    """With external data (the file the step and prompt graphs share), only the module's parameters go there: no
    constant of the graph's own, whose name (const_N) a graph beside it may give to another tensor. C = 256, so that
    a [.., C] constant would pass onnx_build.EXTERNAL_MIN_BYTES."""
    micro = make_state_dict(replace(PRESETS["tiny"], n_layer=1, n_embd=256, ffn_dim=256, vocab_size=16), SEED)
    step = RWKV4Step(from_state_dict(micro))
    onnx_seq.export_sequence(step, tmp_path / "prefill.onnx", external_data=True)
    inits = onnx.load(str(tmp_path / "prefill.onnx"), load_external_data=False).graph.initializer
    external = {t.name for t in inits if t.data_location == onnx.TensorProto.EXTERNAL}
    assert external == {n for n, p in step.named_parameters() if p.numel() * p.element_size() >= EXTERNAL_MIN_BYTES}
