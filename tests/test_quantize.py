"""Quantized ONNX variants of the trained tiny-pydoc model: ops, head, sizes, quality gates (and that they can fail)."""

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rwkv_export.errors import OutputPathError, ParityToleranceError, RwkvExportError
from rwkv_export.export import export_onnx
from rwkv_export.quality import PPL_GATES, EvalTextError, QualityGateError, check_quality, evaluate_variant, gate_for
from rwkv_export.quantize import DEFAULT_INT4_BLOCK_SIZE, QuantizeError, quantize_int4, quantize_int8, weight_summary
from rwkv_export.runners import OnnxStepRunner
from rwkv_export.shared_data import onnx_bytes
from rwkv_export.arch.rwkv4.train import EVAL_TEXT, MODEL_FILE

EVAL_BYTES = 1500  # eval text per quality check: the paired ppl delta is stable to ~0.1% at this length (measured)
# File size against the size predicted from the fp32 file's weight shapes: protobuf node/attribute overhead and the
# quantizers' padding of K to a whole number of blocks are a few KB on a ~1 MB file.
SIZE_RTOL = 0.03
# A deliberately broken variant: every 4-bit scale off by this factor (the kind of error a wrong divisor or a
# mis-ordered scale tensor gives). It must fail the int4 gate, proving the gate can fail.
CORRUPT_SCALE = 1.3
# Beyond the perplexity gate, a working variant must still mostly agree with fp32 token by token. Measured on this
# model: int8 top-1 >= 0.99 and KL ~1e-4, int4 top-1 ~0.92 and KL ~1e-2; the bounds leave room for other CPUs'
# kernels; a broken variant is at or past them (measured: KL 0.05 with every scale 10% off, 0.34 at 30%).
MIN_TOP1 = 0.8
MAX_KL = 0.05
# The model is a real one: its fp32 perplexity on the eval text (~5.5) is far below a unigram model's (~25).
MAX_FP32_PPL = 10.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "fp32"
    export_onnx(str(MODEL_FILE), out, check=False)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, manifest


@pytest.fixture(scope="module")
def tokens():
    return list(EVAL_TEXT.read_bytes()[:EVAL_BYTES])


def runner(root: Path, manifest: dict, file: str) -> OnnxStepRunner:
    return OnnxStepRunner(root, manifest, {**manifest["graphs"][0], "file": file}, threads=1)


@pytest.fixture(scope="module")
def fp32_runner(exported):
    root, manifest = exported
    return runner(root, manifest, "model.onnx")


@pytest.fixture(scope="module")
def int8(exported):
    root, _ = exported
    return quantize_int8(root / "model.onnx", root / "model_int8.onnx")


@pytest.fixture(scope="module")
def int4(exported):
    root, _ = exported
    return quantize_int4(root / "model.onnx", root / "model_q4.onnx")


def weight_shapes(path: Path):
    """(matmul weight shapes, embedding shape) of the fp32 export, read from the file."""
    model = onnx.load(str(path))
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    mm = [inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    token = model.graph.input[0].name
    emb = next(inits[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input[1] == token)
    return mm, emb


def test_int8_default_is_int7_matmulinteger_with_head_and_embedding(exported, int8):
    root, _ = exported
    path = root / "model_int8.onnx"
    s = weight_summary(path)
    mm, (V, C) = weight_shapes(root / "model.onnx")
    assert int8["method"] == "dynamic-int7" and int8["bits"] == 8 and int8["options"]["per_channel"] is True
    assert s["ops"].get("MatMulInteger") == len(mm) and "MatMul" not in s["ops"]
    assert s["fp32_matmul_weights"] == 0
    assert s["head"] == "int8 MatMulInteger" and int8["head_quantized"]
    assert s["embedding"] == "int8 DequantizeLinear" and int8["embedding"] == s["embedding"]
    # int7: every MatMulInteger weight within [-64, 64], so uint8 x int8 pair sums fit int16 and AVX2 kernels
    # (vpmaddubsw saturates) compute exactly what onnxruntime-web's wasm kernels compute
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for n in (n for n in model.graph.node if n.op_type == "MatMulInteger"):
        w = numpy_helper.to_array(inits[n.input[1]])
        assert w.dtype == np.int8 and w.min() >= -64 and w.max() <= 64, n.name
    # int8 weights + per-column (scale fp32, zero point int8); embedding int8 + a scale per row
    fp32_size = onnx_bytes(root / "model.onnx")
    weights = sum(k * n for k, n in mm)
    expected = fp32_size - 4 * (weights + V * C) + weights + sum(5 * n for _, n in mm) + V * C + 4 * V
    assert int8["size"] == onnx_bytes(path)  # the graph and the external-data file it writes, as the source has one
    assert abs(int8["size"] - expected) <= SIZE_RTOL * expected, (int8["size"], expected)


def test_int4_is_matmulnbits_with_head(exported, int4):
    root, _ = exported
    path = root / "model_q4.onnx"
    mm, (V, C) = weight_shapes(root / "model.onnx")
    model = onnx.load(str(path))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(mm) and not any(n.op_type == "MatMul" for n in model.graph.node)
    for n in nbits:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == int4["options"]["block_size"] == DEFAULT_INT4_BLOCK_SIZE
    assert weight_summary(path)["head"] == "int4 MatMulNBits" and int4["head_quantized"]
    assert int4["embedding"] == "int8 DequantizeLinear" and int4["options"]["embedding_bits"] == 8  # the default
    # per block: block/2 bytes of nibbles, an fp32 scale, a 4-bit zero point; the embedding int8 + a scale per row
    fp32_size = onnx_bytes(root / "model.onnx")
    weights = sum(k * n for k, n in mm)
    expected = (fp32_size - 4 * (weights + V * C) + weights * (0.5 + 4.5 / DEFAULT_INT4_BLOCK_SIZE)
                + V * C + 4 * V)
    assert abs(int4["size"] - expected) <= SIZE_RTOL * expected, (int4["size"], expected)


def test_int4_embedding_option(exported, int4):
    root, _ = exported
    info = quantize_int4(root / "model.onnx", root / "model_q4e.onnx", include_embedding=True)
    assert info["embedding"] == "int4 GatherBlockQuantized"
    _, (V, C) = weight_shapes(root / "model.onnx")
    assert info["options"]["embedding_bits"] == 4
    saved = int4["size"] - info["size"]  # the table went from 1 byte (+ a row scale) to ~0.54 bytes per value
    expected = V * C * (1 - (0.5 + 4.5 / DEFAULT_INT4_BLOCK_SIZE)) + 4 * V
    assert abs(saved - expected) <= SIZE_RTOL * int4["size"], (saved, expected)


def test_quality_gates_pass(exported, int8, int4, fp32_runner, tokens):
    root, manifest = exported
    for file, kind in (("model_int8.onnx", "int8"), ("model_q4.onnx", "int4")):
        rep = evaluate_variant(runner(root, manifest, file), fp32_runner, tokens)
        rep = check_quality(rep, kind)
        assert rep["passed"] and rep["ppl_delta"] <= PPL_GATES[kind]
        assert rep["top1_agreement"] >= MIN_TOP1 and rep["kl"] <= MAX_KL
        assert rep["ppl_fp32"] < MAX_FP32_PPL


@pytest.mark.parametrize("options", [{"method": "dynamic-uint8"}, {"method": "matmul-nbits"}, {"method": "qdq"}])
def test_other_int8_methods_pass_the_gate(exported, fp32_runner, tokens, options):
    root, manifest = exported
    file = f"model_int8_{options['method']}.onnx"
    info = quantize_int8(root / "model.onnx", root / file, **options)
    s = weight_summary(root / file)
    mm, _ = weight_shapes(root / "model.onnx")
    assert info["head_quantized"] and s["fp32_matmul_weights"] == 0
    if options["method"] == "matmul-nbits":
        assert s["ops"]["MatMulNBits"] == len(mm) and s["head"] == "int8 MatMulNBits"
    elif options["method"] == "dynamic-uint8":
        assert s["ops"]["MatMulInteger"] == len(mm) and s["head"] == "uint8 MatMulInteger"
    else:  # one DequantizeLinear per weight, plus the embedding row's
        assert s["ops"]["DequantizeLinear"] == len(mm) + 1 and s["head"] == "int8 DequantizeLinear"
    rep = check_quality(evaluate_variant(runner(root, manifest, file), fp32_runner, tokens[:600]), "int8")
    assert rep["passed"]


def test_broken_quantization_fails_the_gate(exported, int4, fp32_runner, tokens):
    """Corrupt every 4-bit scale by a constant factor: the variant still runs, and the gate must catch it."""
    root, manifest = exported
    model = onnx.load(str(root / "model_q4.onnx"))
    scales = {n.input[2] for n in model.graph.node if n.op_type == "MatMulNBits"}
    for t in model.graph.initializer:
        if t.name in scales:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(CORRUPT_SCALE), t.name))
    onnx.save(model, str(root / "model_q4_broken.onnx"))
    rep = evaluate_variant(runner(root, manifest, "model_q4_broken.onnx"), fp32_runner, tokens)
    assert math.isfinite(rep["ppl"])
    with pytest.raises(QualityGateError, match="past the 5% gate") as e:
        check_quality(rep, "int4")
    assert isinstance(e.value, ParityToleranceError) and "\n" not in str(e.value)


def test_gate_table():
    assert gate_for("fp16") < gate_for("int8") < gate_for("int4")
    assert gate_for("int8-matmul-nbits") == gate_for("int8")
    with pytest.raises(KeyError):
        gate_for("int3")
    rep = {"ppl": 10.0, "ppl_fp32": 10.0, "ppl_delta": PPL_GATES["int8"], "kl": 0.0, "top1_agreement": 1.0,
           "tokens": 10}
    assert check_quality(rep, "int8")["passed"]  # at the gate passes
    with pytest.raises(QualityGateError):
        check_quality({**rep, "ppl_delta": PPL_GATES["int8"] * 1.01}, "int8")


def test_bad_inputs_are_one_line_errors(tmp_path, exported, int4):
    root, _ = exported
    cases = [
        (lambda: quantize_int8(tmp_path / "missing.onnx", tmp_path / "o.onnx"), QuantizeError, "not found"),
        (lambda: quantize_int4(tmp_path, tmp_path / "o.onnx"), QuantizeError, "not a file"),
        (lambda: quantize_int8(garbage, tmp_path / "o.onnx"), QuantizeError, "cannot read"),
        (lambda: quantize_int8(root / "model_q4.onnx", tmp_path / "o.onnx"), QuantizeError, "nothing to quantize"),
        (lambda: quantize_int8(root / "model.onnx", tmp_path / "o.onnx", method="int7"), QuantizeError, "int7"),
        (lambda: quantize_int4(root / "model.onnx", tmp_path / "o.onnx", block_size=48), QuantizeError, "power of"),
        (lambda: quantize_int4(root / "model.onnx", tmp_path / "o.onnx", block_size=4096), QuantizeError, "larger"),
        (lambda: quantize_int4(root / "model.onnx", tmp_path / "o.onnx", accuracy_level=9), QuantizeError, "accur"),
        (lambda: quantize_int8(root / "model.onnx", tmp_path / "no" / "o.onnx"), OutputPathError, "does not exist"),
    ]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    for call, err, match in cases:
        with pytest.raises(err, match=match) as e:
            call()
        assert isinstance(e.value, RwkvExportError) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.onnx"]  # nothing written, no partial files


def test_output_is_replaced_atomically(exported, tmp_path):
    root, _ = exported
    dst = tmp_path / "q.onnx"
    dst.write_bytes(b"old")
    with pytest.raises(QuantizeError):
        quantize_int4(root / "model.onnx", dst, block_size=4096)
    assert dst.read_bytes() == b"old"  # a failure leaves what was there
    info = quantize_int4(root / "model.onnx", dst, block_size=64)
    assert onnx_bytes(dst) == info["size"] and info["options"]["block_size"] == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx", "q.onnx.data"]  # the source has external data


class FixedRunner:
    """A fake step runner: logits log(p) from a fixed distribution; from step `switch_at` on, tokens 0 and 1 swap
    probabilities. The state counts steps, so a continuation from a saved state keeps counting."""

    def __init__(self, p, switch_at=None):
        self.p, self.switch_at = np.asarray(p, dtype=np.float64), switch_at

    def new_state(self):
        return {"n": 0}

    def step(self, token, state):
        n = state["n"] + 1
        p = self.p.copy()
        if self.switch_at is not None and n >= self.switch_at:
            p[[0, 1]] = p[[1, 0]]
        return np.log(p).reshape(1, -1).astype(np.float32), {"n": n}


def test_evaluate_variant_metrics_by_hand():
    pf = np.array([0.5, 0.2, 0.2, 0.1])
    pv = np.array([0.4, 0.3, 0.2, 0.1])
    tokens = [0, 1, 2, 3, 0, 0, 1, 2, 0, 3, 1, 0]
    prompt = 4
    switch = prompt + 3  # the variant's argmax moves to token 1 from its 7th step on
    rep = evaluate_variant(FixedRunner(pv, switch_at=switch), FixedRunner(pf), tokens, prompt_len=prompt, n_greedy=8)
    nxt = np.array(tokens[1:])
    pv_steps = np.array([pv if s < switch else pv[[1, 0, 2, 3]] for s in range(1, len(tokens))])
    assert rep["tokens"] == len(tokens) - 1
    assert rep["ppl_fp32"] == pytest.approx(np.exp(-np.log(pf[nxt]).mean()), rel=1e-6)
    assert rep["ppl"] == pytest.approx(np.exp(-np.log(pv_steps[np.arange(len(nxt)), nxt]).mean()), rel=1e-6)
    assert rep["ppl_delta"] == pytest.approx(rep["ppl"] / rep["ppl_fp32"] - 1, rel=1e-9)
    kl = np.array([np.sum(pf * np.log(pf / q)) for q in pv_steps]).mean()
    assert rep["kl"] == pytest.approx(kl, rel=1e-5)
    assert rep["top1_agreement"] == pytest.approx((switch - 1) / (len(tokens) - 1))
    # greedy from the state after the prompt (step 4): steps 4, 5, 6 agree, step 7 (the switch) differs
    assert rep["greedy_match"] == switch - prompt
    same = evaluate_variant(FixedRunner(pf), FixedRunner(pf), tokens, prompt_len=prompt, n_greedy=8)
    assert same["kl"] == pytest.approx(0, abs=1e-7) and same["greedy_match"] == 8 and same["ppl_delta"] == 0


def test_eval_tokens_with_the_byte_tokenizer():
    from rwkv_export.quality import eval_tokens
    from rwkv_export.tokenizer import ByteTokenizer

    assert eval_tokens(ByteTokenizer().encode, 300) == list(EVAL_TEXT.read_bytes()[:300])
    with pytest.raises(EvalTextError):
        evaluate_variant(FixedRunner([0.5, 0.5]), FixedRunner([0.5, 0.5]), [1])


def test_web_backends_follow_what_runs_where():
    """The manifest's per-variant `backends` (the web demo picks a variant per backend from it), as measured in
    onnxruntime-web 1.30 (quantize.py says where): DynamicQuantizeMatMul has no WebGPU kernel, MatMulNBits has no fast
    wasm kernel, fp16 needs shader-f16 on WebGPU; an unmeasured formulation claims no backend."""
    from rwkv_export.quantize import web_backends

    assert web_backends("fp32") == ["wasm", "webgpu"]
    assert web_backends("fp16", {"rescale_every": 6}) == ["wasm", "webgpu-f16"]
    assert web_backends("int8", {"method": "dynamic-int7"}) == ["wasm"]
    assert web_backends("int8", {"method": "dynamic-uint8"}) == ["wasm"]
    assert web_backends("int8", {"method": "matmul-nbits"}) == ["webgpu"]
    assert web_backends("int4", {"method": "matmul-nbits"}) == ["webgpu"]
    assert web_backends("int8", {"method": "qdq"}) == []
    # webgpu-native (web_demo/rt_webgpu.js): RWKV-4 only; int8 dynamic-int7 and int4 with int8 embedding rows
    assert web_backends("fp32", None, "4") == ["wasm", "webgpu", "webgpu-native"]
    assert web_backends("fp16", {"method": "fp16", "rescale_every": 6}, "4") == ["wasm", "webgpu-f16", "webgpu-native"]
    assert web_backends("int8", {"bits": 8, "method": "dynamic-int7"}, "4") == ["wasm", "webgpu-native"]
    assert web_backends("int8", {"bits": 8, "method": "dynamic-uint8"}, "4") == ["wasm"]
    assert web_backends("int4", {"bits": 4, "method": "matmul-nbits", "options": {"embedding_bits": 8}}, "4") == [
        "webgpu", "webgpu-native"]
    assert web_backends("int4", {"bits": 4, "method": "matmul-nbits", "options": {"embedding_bits": 4}}, "4") == [
        "webgpu"]
    assert web_backends("fp32", None, "7") == ["wasm", "webgpu"]


# A tiny RWKV-7 with a large vocab: like the 0.1B model (65536 x 768), most of the fp32 bytes are the embedding and
# the head, which is what decided int4's embedding (an fp32 table made int4 larger than int8: 283 vs 194 MB)
BIG_VOCAB_V7 = dict(n_layer=1, n_embd=128, head_size=64, ffn_dim=256, vocab_size=8192,
                    d_decay=16, d_aaa=16, d_mv=8, d_gate=16)


def test_int4_is_the_smallest_variant_at_a_large_vocab(tmp_path):
    from rwkv_export.checkpoint import from_state_dict
    from rwkv_export.synthetic import make_state_dict
    from rwkv_export.targets import onnx as onnx_target

    ckpt = from_state_dict(make_state_dict("7", "tiny", **BIG_VOCAB_V7))
    out = tmp_path  # the step graph alone (an 8192-token vocab has no bundled tokenizer for a folder's manifest)
    onnx_target.export_step(ckpt.arch.step_module(ckpt, "fp32"), out / "model.onnx")
    int8 = quantize_int8(out / "model.onnx", out / "model_int8.onnx")
    int4 = quantize_int4(out / "model.onnx", out / "model_q4.onnx")
    int4e = quantize_int4(out / "model.onnx", out / "model_q4e.onnx", include_embedding=True)
    assert int4e["size"] < int4["size"] < int8["size"] < onnx_bytes(out / "model.onnx"), (int4e, int4, int8)


@pytest.fixture(scope="module")
def v7_exported(tmp_path_factory):
    from rwkv_export.arch.rwkv7.train import MODEL_FILE as V7_MODEL_FILE

    out = tmp_path_factory.mktemp("quant_v7") / "fp32"
    export_onnx(str(V7_MODEL_FILE), out, check=False, prefill=False)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("kind, options", [("int4", {}), ("int4", {"include_embedding": True}), ("int8", {})])
def test_v7_quality_gates_pass(v7_exported, tokens, kind, options):
    """The trained RWKV-7 fixture: int4 with its default int8 embedding rows (and with a 4-bit one) and int8 pass."""
    root, manifest = v7_exported
    file = f"model_{kind}_{len(options)}.onnx"
    quantize = quantize_int4 if kind == "int4" else quantize_int8
    info = quantize(root / "model.onnx", root / file, **options)
    assert info["embedding"] == ("int4 GatherBlockQuantized" if options else "int8 DequantizeLinear")
    rep = check_quality(evaluate_variant(runner(root, manifest, file), runner(root, manifest, "model.onnx"), tokens),
                        kind)
    assert rep["passed"] and rep["top1_agreement"] >= MIN_TOP1 and rep["kl"] <= MAX_KL
    assert rep["ppl_fp32"] < MAX_FP32_PPL
