"""int8 of the RWKV versions whose graphs hold more than 2-D weights: RWKV-6's mix LoRA maa_w2 [5, Dm, C] is applied
as one batched MatMul ([5, T, Dm] @ [5, Dm, C]). The dynamic int8 formats used to give it a scale per column over all
five slices ([C]), which onnxruntime refuses when the graph runs ("b zero point is not valid"); it is now quantized
slice by slice ([5, 1, C] scales: quantize._dynamic_param_dims). Here the whole command runs: export, both gates of
both graphs, then text decoded through the int8 step and prompt graphs. int4 (MatMulNBits keeps the narrow LoRA
factors fp32) goes through the same command: its quality gate, on the share of information lost for a model that has
not learned the eval text (quality.judge_quality), passes a correct file of this random-weight model."""

import onnx
from onnx import numpy_helper

from rwkv_export.export import export_onnx
from rwkv_export.generate import generate, open_model
from rwkv_export.manifest import read_manifest
from rwkv_export.quantize import DEFAULT_INT8_METHOD


def test_v6_int8_and_int4_pass_their_gates_and_decode(tmp_path):
    out = tmp_path / "v6"
    export_onnx("builtin:v6-tiny", out, quant=["int8", "int4"], tokenizer="bytes")  # check=True: raises on a failed gate
    manifest = read_manifest(out)
    graphs = {(g["kind"], g["variant"]): g for g in manifest["graphs"]}
    step, prompt = graphs[("step", "int8")], graphs[("sequence", "int8")]
    assert step["parity"]["passed"] and prompt["parity"]["passed"] and step["quality"]["passed"]
    int4 = graphs[("step", "int4")]["quality"]
    assert int4["passed"] and int4["gated_on"] == "info_loss"
    assert step["quantization"]["method"] == DEFAULT_INT8_METHOD  # dynamic-int7: the format that failed
    model = onnx.load(str(out / step["file"]))
    scales = {t.name: tuple(t.dims) for t in model.graph.initializer if t.name.endswith("maa_w2_scale")}
    assert scales and all(dims[:2] == (5, 1) for dims in scales.values())  # one scale per column of each slice
    assert all((numpy_helper.to_array(t) > 0).all() for t in model.graph.initializer if t.name in scales)
    runner, tokenizer = open_model(str(out), variant="int8")
    assert runner.prompt is not None  # the prompt goes through the int8 prompt graph, the tokens through the step
    stats = generate(runner, tokenizer, "def main():\n    ", max_tokens=24, stop_at_eos=False)
    assert len(stats.token_ids) == 24 and all(0 <= t < manifest["model"]["vocab_size"] for t in stats.token_ids)
