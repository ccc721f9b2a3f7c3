"""TFLite target: our ONNX graphs written as `step` and `prefill` files (one named signature each; tflite_write.py),
the fp16 / int8 / int4 variants our quantizer derives from them (tflite_quant.py), parity in the LiteRT interpreter
(ai-edge-litert) against runtime_ref in fp64. Tiny synthetic models only. The translator's own tests (op by op
against onnxruntime) are in test_tflite_write.py; the quantizer against ai-edge-quantizer, its oracle, in
test_tflite_quant.py.

Needs the [tflite] extra and, for the oracle and its flatbuffer helpers used here, the [dev] extra's
ai-edge-quantizer (tools/install_edge_extras.sh installs both); without them these tests fail with the install
command.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from rwkv_export import parity
from rwkv_export.checkpoint import from_state_dict
from rwkv_export.errors import MissingExtraError, RwkvExportError
from rwkv_export.manifest import MANIFEST_NAME, new_manifest, read_manifest, write_manifest
from rwkv_export.arch.rwkv4.step import STATE_NAMES, RWKV4Step

from ckpts import state_dict
from test_sequence import SEQ_VS_STEP_TOL, check_prompt_against_steps, logits_err, random_tokens, rel_err, steps

SETUP_HINT = "install the TFLite and dev extras: pip install -e '.[dev,tflite]' (or bash tools/install_edge_extras.sh)"

# The declared gate (parity.TF_FP32_MAX_REL, its reason there): the graph is the same fp32 math (XNNPACK kernels sum
# in a different order), measured ~1.5e-6 on the tiny model, 6.9e-6 at 169M; a wrong equation shows as > 1e-2.
FP32_MAX_REL = 3e-5
GREEDY_TOKENS = 64  # the issue asks for an identical greedy continuation over at least 64 tokens
QUALITY_TOKENS = 96  # teacher-forced tokens over which quantized variants are judged
# Quantized variants vs the fp64 reference, on the tiny random-weight model (measured: fp16 top1 1.0 KL ~1e-7;
# int8 (per tensor) top1 0.96 KL 7.9e-4; int4 top1 0.81 KL 0.085; the same for litert-torch's files). Bounds sit a few times past the measurements so rounding noise
# across machines does not flip them, yet a broken quantization (a wrong scale or layout gives top1 near 1/256 and
# KL of several nats) fails every one.
QUALITY_BOUNDS = {
    "fp16": {"min_top1": 0.98, "max_kl_mean": 1e-4},
    "int8": {"min_top1": 0.9, "max_kl_mean": 1e-2},
    "int4": {"min_top1": 0.6, "max_kl_mean": 0.3},
}
# Bytes a variant saves per weight of the 2-D tensors (matmuls, embedding, head) against fp32, and the share of that
# ideal the step file must realise (measured: fp16 100 %, int8 91 %, int4 98 %; the rest is the scales and the fp32
# vectors). File-size ratios would not do: the graphs themselves are ~0.2 MB, a
# third of a tiny model's file and nothing at 169M shapes.
SAVED_BYTES_PER_WEIGHT = {"fp16": 2.0, "int8": 3.0, "int4": 3.5}
MIN_SAVING_SHARE = 0.8
VARIANTS = ["fp32", "fp16", "int8", "int4"]


def _require_extra():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import ai_edge_quantizer  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{e}: {SETUP_HINT}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread (conversion, references): on a loaded 2-core box two spinning threads make the tiny models'
    work 10-40x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt():
    return from_state_dict(state_dict("tiny"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ckpt):
    _require_extra()
    from rwkv_export.targets.tflite import export_tflite

    out = tmp_path_factory.mktemp("tflite")
    entries = export_tflite(RWKV4Step(ckpt), out, VARIANTS)
    manifest = new_manifest(arch=ckpt.arch, dims=ckpt.dims, source={"kind": "test"}, tokenizer={"kind": "bytes"})
    manifest["graphs"] = entries
    write_manifest(out, manifest)
    return out, read_manifest(out)


@pytest.fixture(scope="module")
def ref(ckpt):
    from runtime_ref import RWKV4

    return RWKV4(ckpt.tensors, dtype=torch.float64)


def _graph(manifest, variant, kind="step"):
    return next(g for g in manifest["graphs"] if g["variant"] == variant and g["kind"] == kind)


def test_files_and_manifest_entries(exported):
    from rwkv_export.targets.tflite import PREFILL_CHUNK, file_name, prefill_file_name

    out, m = exported
    assert [(g["variant"], g["kind"]) for g in m["graphs"]] == [(v, k) for v in VARIANTS for k in ("step", "sequence")]
    listed = {f["file"] for f in m["files"]}
    for g in [g for g in m["graphs"] if g["kind"] == "sequence"]:
        # the prompt graph: its own file's `prefill` signature, a fixed chunk of tokens, the step graph's states
        step = _graph(m, g["variant"])
        assert (g["format"], g["signature"], g["file"]) == ("tflite", "prefill", prefill_file_name(g["variant"]))
        assert g["file"] != step["file"] and g["file"] in listed and (out / g["file"]).is_file()
        assert (g["max_chunk"], g["fixed_chunk"], g["all_logits"]) == (PREFILL_CHUNK, True, False)
        assert [(i["name"], i["role"], i.get("state")) for i in g["inputs"]] == (
            [("tokens", "tokens", None)] + [(s, "state", s) for s in STATE_NAMES])
        assert g["inputs"][0]["dtype"] == "int32" and g["inputs"][0]["shape"] == [PREFILL_CHUNK]
        assert g["inputs"][1:] == step["inputs"][1:] and g["outputs"] == step["outputs"]
    for g in [g for g in m["graphs"] if g["kind"] == "step"]:
        assert g["format"] == "tflite" and g["kind"] == "step" and g["signature"] == "step"
        assert g["file"] == file_name(g["variant"]) and g["file"] in listed and (out / g["file"]).is_file()
        assert [(i["name"], i["role"], i.get("state")) for i in g["inputs"]] == (
            [("token", "token", None)] + [(s, "state", s) for s in STATE_NAMES])
        assert [(o["name"], o["role"], o.get("state")) for o in g["outputs"]] == (
            [("logits", "logits", None)] + [(f"{s}_out", "state", s) for s in STATE_NAMES])
        token = g["inputs"][0]
        assert token["dtype"] == "int32" and token["shape"] == [1]
        L, C, V = m["model"]["n_layer"], m["model"]["n_embd"], m["model"]["vocab_size"]
        assert all(i["dtype"] == "float32" and i["shape"] == [L, C] for i in g["inputs"][1:] + g["outputs"][1:])
        assert g["outputs"][0]["dtype"] == "float32" and g["outputs"][0]["shape"] == [1, V]


def test_signature_names_are_stable(exported):
    """The names clients bind to, read back from each file by the interpreter itself (not from our manifest): each
    file holds its graph's one signature."""
    from ai_edge_litert.interpreter import Interpreter

    out, m = exported
    outputs = sorted(["logits", *(f"{s}_out" for s in STATE_NAMES)])
    want = {"step": {"inputs": sorted(["token", *STATE_NAMES]), "outputs": outputs},
            "prefill": {"inputs": sorted(["tokens", *STATE_NAMES]), "outputs": outputs}}
    for g in m["graphs"]:
        sigs = Interpreter(model_path=str(out / g["file"])).get_signature_list()
        got = {name: {k: sorted(v) for k, v in io.items()} for name, io in sigs.items()}
        assert got == {g["signature"]: want[g["signature"]]}, g["file"]


def test_files_open_in_runtimes_without_signatures_or_offsets(exported):
    """What tfjs-tflite's TFLite build (the browser runtime, tests/test_web_runtimes.py) needs of a file, checked on
    the flatbuffer itself: one subgraph (its model runner runs the first and has no signature API), every weight
    inside the flatbuffer (it reads a buffer addressed by offset, ai-edge-quantizer's layout, as a tensor without
    data), and int8 weights with one scale per tensor (it computes per-channel dynamic-range matmuls as zeros)."""
    from ai_edge_litert import schema_py_generated as schema

    out, m = exported
    for g in m["graphs"]:
        model = schema.Model.GetRootAs((out / g["file"]).read_bytes(), 0)
        assert model.SubgraphsLength() == 1 and model.SignatureDefs(0).SubgraphIndex() == 0, g["file"]
        assert all(model.Buffers(i).Offset() == 0 for i in range(model.BuffersLength())), g["file"]
        if g["variant"] == "int8":
            sg = model.Subgraphs(0)
            int8 = [sg.Tensors(i) for i in range(sg.TensorsLength()) if sg.Tensors(i).Type() == schema.TensorType.INT8]
            assert int8 and all(t.Quantization().ScaleLength() == 1 for t in int8), g["file"]


def test_quantized_files_are_smaller(exported, ckpt):
    out, m = exported
    size = {g["variant"]: (out / g["file"]).stat().st_size for g in m["graphs"] if g["kind"] == "step"}
    weights = sum(t.numel() for t in ckpt.tensors.values() if t.dim() == 2)
    for v, per_weight in SAVED_BYTES_PER_WEIGHT.items():
        assert size["fp32"] - size[v] >= MIN_SAVING_SHARE * per_weight * weights, (v, size, weights)
    assert size["int4"] < size["int8"] < size["fp16"] < size["fp32"]


def test_fp32_parity_and_greedy_continuation(exported, ref):
    from rwkv_export.tf_runners import TFLiteStepRunner

    out, m = exported
    assert parity.tolerance_for("tflite", "fp32").max_rel == FP32_MAX_REL  # the declared gate is this bound
    runner = TFLiteStepRunner(out, m, _graph(m, "fp32"))
    report = parity.compare(runner, ref, target="tflite", variant="fp32", n_greedy=GREEDY_TOKENS)
    assert report["max_rel"] <= FP32_MAX_REL, parity.format_report(report)
    assert report["top1_agreement"] == 1.0 and report["tokens"] >= 64
    assert report["greedy_identical"] and report["greedy_tokens"] == GREEDY_TOKENS, parity.format_report(report)
    parity.gate(report)


@pytest.mark.parametrize("variant", ["fp16", "int8", "int4"])
def test_quantized_quality(exported, ref, variant):
    from rwkv_export.tf_runners import TFLiteStepRunner, quality

    out, m = exported
    runner = TFLiteStepRunner(out, m, _graph(m, variant))
    q = quality(runner, ref, parity.parity_tokens(m["model"]["vocab_size"], QUALITY_TOKENS))
    b = QUALITY_BOUNDS[variant]
    assert q["top1_agreement"] >= b["min_top1"] and q["kl_mean"] <= b["max_kl_mean"], (variant, q)


@pytest.fixture(scope="module")
def prompt_runners(exported):
    from rwkv_export.tf_runners import TFLiteSequenceRunner, TFLiteStepRunner

    out, m = exported
    return TFLiteStepRunner(out, m, _graph(m, "fp32")), TFLiteSequenceRunner(out, m, _graph(m, "fp32", "sequence"))


@pytest.mark.parametrize("used_state", [False, True], ids=["fresh", "used"])
@pytest.mark.parametrize("T", [1, 2, 7, 16, 64, 1000])
def test_prompt_graph_equals_step_graph(prompt_runners, ref, T, used_state):
    """The prompt runner (whole chunks of 16 through `prefill`, the tail through `step`) against T steps of the step
    graph and against runtime_ref in fp64, from a fresh and a used state. Below 16 tokens only the tail path runs;
    16, 64 and 1000 (62 chunks + 8 steps) go through `prefill`. The checks and tolerances of the ONNX prompt graph
    (test_sequence.check_prompt_against_steps: same equations, another summation order; the step graph's state
    drifts per token), and the TFLite fp32 gate against fp64."""
    check_prompt_against_steps(*prompt_runners, ref, T, used_state, FP32_MAX_REL)


def test_prompt_graph_is_used_for_whole_chunks(prompt_runners, monkeypatch):
    """64 tokens are 4 calls of `prefill` and no step; 21 are one call and 5 steps (counted, not assumed)."""
    _, seq_runner = prompt_runners
    calls = {"prefill": 0, "step": 0}
    prefill, step = seq_runner.runner, seq_runner.step_runner.runner

    def counting(kind, fn):
        def run(**feeds):
            calls[kind] += 1
            return fn(**feeds)
        return run

    monkeypatch.setattr(seq_runner, "runner", counting("prefill", prefill))
    monkeypatch.setattr(seq_runner.step_runner, "runner", counting("step", step))
    seq_runner.forward(list(range(64)), seq_runner.new_state())
    assert calls == {"prefill": 4, "step": 0}
    seq_runner.forward(list(range(21)), seq_runner.new_state())
    assert calls == {"prefill": 5, "step": 5}


def test_prompt_runner_one_interpreter_at_a_time(exported, prompt_runners):
    """one_interpreter (what a check opens): the prompt graph's interpreter is closed before the step graph's opens
    for a tail, and the other way round, so one file's weights are held at a time; the logits and states are the
    very bytes of the runner that keeps both open (same files, same kernels, same order of calls)."""
    import numpy as np

    from rwkv_export.tf_runners import TFLiteSequenceRunner

    out, m = exported
    both = prompt_runners[1]
    one = TFLiteSequenceRunner(out, m, _graph(m, "fp32", "sequence"), one_interpreter=True)
    assert one.runner is not None and one._step is None  # the step graph is opened only for a tail
    s_both, s_one = both.new_state(), one.new_state()
    for tokens, holds in [(list(range(21)), "step"), (list(range(40, 56)), "prefill"), (list(range(3)), "step"),
                          (list(range(100, 133)), "step")]:
        l_both, s_both = both.forward(tokens, s_both)
        l_one, s_one = one.forward(tokens, s_one)
        assert (one.runner is None, one._step is None) == ((True, False) if holds == "step" else (False, True))
        assert np.array_equal(l_both, l_one) and all(np.array_equal(s_both[k], s_one[k]) for k in s_both)
    one.close()
    assert one.runner is None and one._step is None


def test_prompt_runner_rejects_bad_tokens(prompt_runners):
    _, seq_runner = prompt_runners
    with pytest.raises(RwkvExportError, match="outside the vocabulary"):
        seq_runner.forward([1, 10**6], seq_runner.new_state())
    with pytest.raises(RwkvExportError, match="non-empty"):
        seq_runner.forward([], seq_runner.new_state())


def test_state_is_carried_not_ignored(exported):
    """The same token from two different states must give different logits (the state inputs are wired)."""
    from rwkv_export.tf_runners import TFLiteStepRunner

    out, m = exported
    r = TFLiteStepRunner(out, m, _graph(m, "fp32"))
    fresh = r.new_state()
    _, after = r.step(7, fresh)
    a, _ = r.step(3, fresh)
    b, _ = r.step(3, after)
    assert not np.allclose(a, b)
    assert not np.array_equal(after["att_pp"], fresh["att_pp"])


def test_unknown_variant_is_a_one_line_error(tmp_path, ckpt):
    from rwkv_export.targets.tflite import export_tflite

    with pytest.raises(RwkvExportError, match="unknown tflite variant.*int3.*fp32, fp16, int8, int4") as e:
        export_tflite(RWKV4Step(ckpt), tmp_path, ["fp32", "int3"])
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_int4_needs_dims_divisible_by_block(tmp_path):
    from rwkv_export.targets.tflite import export_tflite

    odd = from_state_dict(state_dict("tiny-ffn"))  # n_embd 48
    with pytest.raises(RwkvExportError, match="n_embd=48, not divisible by 32") as e:
        export_tflite(RWKV4Step(odd), tmp_path, ["int4"])
    assert "\n" not in str(e.value)


def test_export_needs_no_litert_torch(tmp_path, ckpt, monkeypatch):
    """The export path never imports litert-torch (the files are written from our ONNX graphs, the variants by our
    quantizer, tflite_quant.py): blocked, the export still writes every file."""
    from rwkv_export.targets.tflite import export_tflite

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # makes `import litert_torch` raise ImportError
    entries = export_tflite(RWKV4Step(ckpt), tmp_path, ["fp32", "int8"])
    files = ["model.tflite", "prefill.tflite", "model_int8.tflite", "prefill_int8.tflite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary files left behind
    assert [e["file"] for e in entries] == files


def test_missing_litert_is_an_actionable_error(tmp_path, ckpt, monkeypatch):
    from rwkv_export.targets.tflite import export_tflite

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    with pytest.raises(MissingExtraError, match=r"ai-edge-litert.*rwkv-export\[tflite\]"):
        export_tflite(RWKV4Step(ckpt), tmp_path, ["fp32"])
    assert list(tmp_path.iterdir()) == []


def test_manifest_round_trips_as_json(exported):
    out, m = exported
    assert json.loads((out / MANIFEST_NAME).read_text())["graphs"] == m["graphs"]



# -- RWKV-5.2, RWKV-6, RWKV-7: the same file contract over the heads' rank-4 WKV state ------------------------------
# One tiny synthetic model per version (the `tiny` preset of each: 2 layers, C = 128 as 2 heads of 64), converted once
# per version (module-scoped), with int8 and int4 beside fp32: int4 must leave the LoRA matmuls narrower than a block
# (v7 tiny's ranks 16 and 8) to int8, int8's prompt graph must run (v5.2 / 6: the constant left operands of its
# BATCH_MATMULs kept float32, tflite_quant.py says why), and the prompt signature's WKV (v5/v6: blocks of 8 unrolled,
# v7: the chunk's exact delta-rule solve) must agree with T steps.
HEAD_VERSIONS = ["5.2", "6", "7"]
HEAD_VARIANTS = ["fp32", "int8", "int4"]
# The prompt signature against T steps of the step signature, both fp32 in LiteRT: the chunked WKV sums in another
# order. Measured (T = 16 and 64, fresh and used state; logits max|d|/std, states max|d|/max|ref|): <= 8.5e-7 (v5.2),
# 1.3e-6 (v6), 1.3e-6 (v7) against the steps, and <= 1.3e-6 / 2.3e-6 / 1.5e-6 against the fp64 reference. The bound
# is the ONNX prompt graph's (test_sequence.SEQ_VS_STEP_TOL), for the states too: unlike RWKV-4's att_pp (a running
# sum of decays, which drifts per token), the WKV matrix is multiplied by w < 1 every token, and the error after 101
# tokens (used state, T = 64) is no larger than after 16.
HEAD_SEQ_VS_STEP_TOL = SEQ_VS_STEP_TOL
# int4 (dynamic range, blocks of 32; LoRA factors narrower than a block in int8) against the fp64 reference on the
# random-weight tiny models, 96 tokens: measured top-1 0.70 / 0.73 / 0.79 and KL 0.108 / 0.102 / 0.126 (v5.2 / v6 /
# v7). A broken scale or layout gives top-1 near 1/256 and KL of nats.
HEAD_INT4_BOUNDS = {"min_top1": 0.5, "max_kl_mean": 0.5}
# int8's prompt graph (one scale per tensor) against the fp64 reference (parity.compare_sequence, 64 tokens in 2
# calls): its gate reports the logits of a quantized variant and gates shapes and finiteness only, so the error is
# bounded here too. Measured max|Δ|/std 0.069 / 0.064 / 0.079 and state effect 0.022 / 0.024 / 0.027 (v5.2 / v6 / v7),
# against 0.090 / 0.20 / 0.10 for the int8 step graphs' own parity runs; 0.3 sits past all of them, while a scatter or
# block-sum matrix gone wrong mixes the WKV state's blocks and moves the logits by about their std.
HEAD_INT8_PROMPT_MAX_REL = 0.3


@pytest.fixture(scope="module", params=HEAD_VERSIONS, ids=lambda v: f"v{v}")
def heads(request, tmp_path_factory):
    """(version, checkpoint, export folder, manifest, fp64 reference) of one version's tiny model, converted once."""
    import time

    from rwkv_export.arch import get
    from rwkv_export.targets.tflite import export_tflite

    _require_extra()
    arch = get(request.param)
    ck = from_state_dict(arch.fake_state_dict("tiny"))
    out = tmp_path_factory.mktemp(f"tflite-v{request.param}")
    t0 = time.perf_counter()
    entries = export_tflite(arch.step_module(ck), out, HEAD_VARIANTS)
    print(f"\nRWKV-{request.param} tiny: fp32 files + variants {time.perf_counter() - t0:.1f} s")
    manifest = new_manifest(arch=ck.arch, dims=ck.dims, source={"kind": "test"}, tokenizer={"kind": "bytes"})
    manifest["graphs"] = entries
    write_manifest(out, manifest)
    return request.param, ck, out, read_manifest(out), arch.reference(ck.tensors, torch.float64)


def test_heads_manifest_io_is_read_from_the_file(heads):
    """Every graph's I/O, read back from the file by the interpreter: the state spec's names in its order, att_kv
    rank 4 ([L, H, N, N]), float32 state and logits, int32 token(s)."""
    from ai_edge_litert.interpreter import Interpreter

    from rwkv_export.targets.tflite import PREFILL_CHUNK

    version, ck, out, m, _ = heads
    spec = ck.arch.state(ck.dims)
    d = ck.dims
    assert m["model"]["rwkv_version"] == version
    assert [(t.name, t.shape) for t in spec] == [("att_x", (d.n_layer, d.n_embd)),
                                                 ("att_kv", (d.n_layer, d.n_head, d.head_size, d.head_size)),
                                                 ("ffn_x", (d.n_layer, d.n_embd))]
    assert [(g["variant"], g["kind"]) for g in m["graphs"]] == [(v, k) for v in HEAD_VARIANTS
                                                                for k in ("step", "sequence")]
    for g in m["graphs"]:
        token = ("tokens", "tokens", [PREFILL_CHUNK]) if g["kind"] == "sequence" else ("token", "token", [1])
        assert [(i["name"], i["role"]) for i in g["inputs"]] == [token[:2]] + [(t.name, "state") for t in spec]
        assert [(o["name"], o["role"]) for o in g["outputs"]] == (
            [("logits", "logits")] + [(f"{t.name}_out", "state") for t in spec])
        assert g["inputs"][0]["dtype"] == "int32" and g["inputs"][0]["shape"] == token[2]
        for io in (g["inputs"][1:], g["outputs"][1:]):
            assert [(e["shape"], e["dtype"]) for e in io] == [(list(t.shape), "float32") for t in spec]
        assert g["outputs"][0]["shape"] == [1, d.vocab_size] and g["outputs"][0]["dtype"] == "float32"
        # the interpreter's own view of the signature (not our manifest)
        sig = Interpreter(model_path=str(out / g["file"])).get_signature_runner(g["signature"])
        ins = {k: [int(x) for x in v["shape"]] for k, v in sig.get_input_details().items()}
        assert ins["att_kv"] == [d.n_layer, d.n_head, d.head_size, d.head_size]
        assert {k: [int(x) for x in v["shape"]] for k, v in sig.get_output_details().items()}["att_kv_out"] == (
            ins["att_kv"])


def test_heads_fp32_parity_and_greedy_continuation(heads):
    from rwkv_export.tf_runners import TFLiteStepRunner

    version, _, out, m, ref = heads
    runner = TFLiteStepRunner(out, m, _graph(m, "fp32"))
    report = parity.compare(runner, ref, target="tflite", variant="fp32", n_greedy=GREEDY_TOKENS)
    print(f"\nRWKV-{version} tflite fp32: {parity.format_report(report)}")
    assert report["max_rel"] <= FP32_MAX_REL, parity.format_report(report)
    assert report["top1_agreement"] == 1.0 and report["tokens"] >= 64
    assert report["greedy_identical"] and report["greedy_tokens"] == GREEDY_TOKENS, parity.format_report(report)
    parity.gate(report)


def test_heads_int4_keeps_narrow_lora_matmuls_in_int8(heads):
    """int4 quantizes in blocks of 32 along a matmul's input: v7 tiny's LoRA up-projections (inputs 16 and 8) cannot
    be, and get int8 channelwise instead of failing the export; the rest is int4."""
    from rwkv_export.tf_runners import TFLiteStepRunner, quality
    from rwkv_export.targets.tflite import unblockable_scopes

    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fu

    version, ck, out, m, ref = heads
    fp32 = (out / _graph(m, "fp32")["file"]).read_bytes()
    scopes = set(unblockable_scopes(fp32))
    narrow = sum(1 for k, n in ck.dims.lora if n % 32)  # LoRA ranks that are no multiple of the block
    assert bool(scopes) == bool(narrow), (version, ck.dims.lora)
    # the weight type of every weight op of the int4 step file, by whether its input fits the blocks
    q = fu.read_model(bytearray((out / _graph(m, "int4")["file"]).read_bytes()))
    types = set()
    for sg in q.subgraphs:
        for op in sg.operators:
            if fu.TFL_OP_CODE_TO_NAME.get(q.operatorCodes[op.opcodeIndex].builtinCode) in (
                    fu.TFL_OP_TO_BLOCKWISE_WEIGHT_QUANTIZED_DIM):
                types.add((fu.get_op_scope(op, sg.tensors) in scopes,
                           fu.TENSOR_CODE_TO_TYPE[sg.tensors[op.inputs[1]].type]))
    assert types == ({(False, "INT4"), (True, "INT8")} if scopes else {(False, "INT4")}), (version, types)
    runner = TFLiteStepRunner(out, m, _graph(m, "int4"))
    q = quality(runner, ref, parity.parity_tokens(m["model"]["vocab_size"], QUALITY_TOKENS))
    print(f"\nRWKV-{version} tflite int4 vs fp64 reference: {q}")
    b = HEAD_INT4_BOUNDS
    assert q["top1_agreement"] >= b["min_top1"] and q["kl_mean"] <= b["max_kl_mean"], (version, q)


def _check_heads_prompt(step_runner, seq_runner, ref, names, T: int, used_state: bool) -> dict:
    """test_sequence.check_prompt_against_steps for the v5+ state names: the prompt runner against T steps of the step
    signature (HEAD_SEQ_VS_STEP_TOL) and against runtime_ref's fp64 forward_seq (the fp32 gate), from a fresh or a
    used state (37 tokens fed first). Returns the errors measured."""
    vocab = ref.vocab_size
    state, ref_state = step_runner.new_state(), ref.new_state()
    if used_state:
        warmup = random_tokens(37, vocab, 8)
        _, state = steps(step_runner, warmup, state)
        _, ref_state = ref.forward_seq(warmup, ref_state)
    before = {k: v.copy() for k, v in state.items()}
    tokens = random_tokens(T, vocab, 7 + T)
    step_logits, step_state = steps(step_runner, tokens, state)
    logits, new_state = seq_runner.forward(tokens, state)
    assert logits.shape == step_logits.shape == (1, vocab) and logits.dtype == np.float32
    assert all(np.array_equal(before[k], state[k]) for k in state)  # the caller's state is left as it was
    assert np.isfinite(logits).all() and all(np.isfinite(v).all() for v in new_state.values())
    assert int(logits.argmax()) == int(step_logits.argmax())
    ref_logits, ref_state = ref.forward_seq(tokens, ref_state)
    err = {"vs_steps": max([logits_err(logits, step_logits)] + [rel_err(new_state[n], step_state[n]) for n in names]),
           "vs_ref": max([logits_err(logits, ref_logits[None].numpy())]
                         + [rel_err(new_state[n], ref_state[n].numpy()) for n in names])}
    for n in names:
        assert new_state[n].shape == step_state[n].shape == tuple(ref_state[n].shape), n
    assert err["vs_steps"] <= HEAD_SEQ_VS_STEP_TOL and err["vs_ref"] <= FP32_MAX_REL, err
    return err


@pytest.fixture(scope="module")
def heads_prompt_runners(heads):
    from rwkv_export.tf_runners import TFLiteSequenceRunner, TFLiteStepRunner

    _, _, out, m, _ = heads
    return TFLiteStepRunner(out, m, _graph(m, "fp32")), TFLiteSequenceRunner(out, m, _graph(m, "fp32", "sequence"))


@pytest.mark.parametrize("used_state", [False, True], ids=["fresh", "used"])
@pytest.mark.parametrize("T", [1, 2, 7, 16, 64])
def test_heads_prompt_graph_equals_step_graph(heads, heads_prompt_runners, T, used_state):
    """The prompt runner (whole chunks of 16 through `prefill`, the tail through `step`) against T steps and against
    runtime_ref in fp64, from a fresh and a used state: 16 and 64 go through `prefill` (64: four calls, the WKV
    state handed from call to call), fewer tokens through `step` only."""
    version, ck, _, _, ref = heads
    names = [t.name for t in ck.arch.state(ck.dims)]
    err = _check_heads_prompt(*heads_prompt_runners, ref, names, T, used_state)
    print(f"\nRWKV-{version} prefill T={T} {'used' if used_state else 'fresh'}: {err}")


def test_heads_int8_prompt_graph_runs_and_passes_the_gate(heads):
    """int8's prompt file opens and runs in LiteRT (ai-edge-quantizer's int8 of the v5.2 / 6 prompt graphs quantized
    the constant left operands of BATCH_MATMUL, which LiteRT's kernel refuses at its first invoke; tflite_quant.py
    keeps them float32) and passes the check's gate (parity.compare_sequence), its error bounded as
    HEAD_INT8_PROMPT_MAX_REL says."""
    from ai_edge_litert import schema_py_generated as schema

    from rwkv_export.tf_runners import TFLiteSequenceRunner

    version, _, out, m, ref = heads
    g = _graph(m, "int8", "sequence")
    model = schema.ModelT.InitFromPackedBuf((out / g["file"]).read_bytes(), 0)
    sg = model.subgraphs[0]
    bmm = [op for op in sg.operators if model.operatorCodes[op.opcodeIndex].builtinCode == (
        schema.BuiltinOperator.BATCH_MATMUL)]
    left = {int(op.inputs[0]) for op in bmm if model.buffers[sg.tensors[op.inputs[0]].buffer].data is not None}
    assert bool(left) == (version in ("5.2", "6")), (version, left)  # the operands this is about are there
    assert all(sg.tensors[i].type == schema.TensorType.FLOAT32 for i in left)
    report = parity.compare_sequence(TFLiteSequenceRunner(out, m, g), ref, target="tflite", variant="int8")
    print(f"\nRWKV-{version} tflite int8 prompt graph: {parity.format_report(report)}")
    assert report["passed"], parity.format_report(report)
    parity.gate(report)
    assert max(report["max_rel"], report["state_effect_rel"]) <= HEAD_INT8_PROMPT_MAX_REL, parity.format_report(report)


def test_file_that_cannot_run_is_a_one_line_error_at_export(tmp_path, monkeypatch):
    """A variant file LiteRT cannot prepare fails the export with one line naming it, not a folder holding it: the
    oracle's int8 of the RWKV-5.2 prompt graph (ai-edge-quantizer quantizes its constant left BATCH_MATMUL operands,
    which LiteRT's kernel refuses) written in place of ours."""
    from rwkv_export.arch import get
    from rwkv_export.errors import GraphFileError
    from rwkv_export.targets import tflite

    _require_extra()
    arch = get("5.2")
    ck = from_state_dict(arch.fake_state_dict("tiny"))
    monkeypatch.setattr(tflite, "quantize_file", lambda src, variant, out, reuse=None: (
        tflite._oracle_quantize_file(src, variant, out)))
    with pytest.raises(GraphFileError, match=r"prefill_int8\.tflite would not run.*'prefill'.*BATCH_MATMUL") as e:
        tflite.export_tflite(arch.step_module(ck), tmp_path, ["int8"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "prefill_int8.tflite").exists()
