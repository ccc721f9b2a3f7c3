"""The TFLite target's own quantizer (targets/tflite_quant.py) against ai-edge-quantizer, the oracle it replaced
(tflite._oracle_quantize_file: the same recipes, tflite._recipe), on the same fp32 files: for every variant the same
graph, tensor for tensor (type, shape, quantization parameters, the bytes of every buffer), and the same outputs in
LiteRT's interpreter, bit for bit. Models: the trained tiny-pydoc (RWKV-4) and the synthetic RWKV-7 tiny preset,
whose narrow LoRA factors (ranks 16 and 8) take int4's int8-channelwise fallback, and those of RWKV-5.2 and 6 (constant
BATCH_MATMUL operands, which int8 alone quantizes); step and prompt files each. One departure, on purpose and listed
(DEPARTS_FROM_ORACLE): the constant left operands of BATCH_MATMUL that the oracle's int8 quantizes into a file LiteRT
cannot run stay float32 in ours.

Needs the [dev] extra's ai-edge-quantizer (the oracle) beside the [tflite] extra.
"""

from __future__ import annotations

import numpy as np
import pytest

from rwkv_export.errors import RwkvExportError

VARIANTS = ["fp16", "int8", "int4"]
# the synthetic tiny presets of RWKV-5.2 / 6 too: RWKV-6's token-shift LoRA (a constant right BATCH_MATMUL operand,
# step and prompt graphs) is quantized by int8 alone; their prompt graphs' constant left operands by the oracle only
MODELS = ["tiny-pydoc", "v5.2-tiny", "v6-tiny", "v7-tiny"]
GRAPHS = ["step", "prefill"]
# Our one departure from the oracle (tflite_quant's module docstring): ai-edge-quantizer's int8 of these files
# quantizes a constant LEFT operand of BATCH_MATMUL (the RWKV-5.2 / 6 prompt graphs' 0/1 scatter and block-sum
# matrices), which LiteRT's kernel refuses at prepare time (it takes float32 x int8, not int8 x float32); ours keeps
# those operands float32. Listed exactly: in these files, and only these, exactly those tensors differ (float32 and
# the fp32 file's bytes in ours), the oracle's file fails at its first invoke and ours runs.
DEPARTS_FROM_ORACLE = {("v5.2-tiny", "prefill", "int8"), ("v6-tiny", "prefill", "int8")}
STEPS = 4  # tokens fed one by one through the step signature (the state carried), logits compared after each


def _require_oracle():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
        import ai_edge_quantizer  # noqa: F401
    except ImportError as e:
        pytest.fail(f"{e}: the oracle needs the dev and tflite extras (pip install -e '.[dev,tflite]')")


@pytest.fixture(scope="module")
def fp32_files(tmp_path_factory, one_torch_thread):
    """model -> {signature: its fp32 .tflite}, written once by the target's own writer."""
    _require_oracle()
    from rwkv_export.arch import get
    from rwkv_export.checkpoint import from_state_dict
    from rwkv_export.sources import Source
    from rwkv_export.targets.tflite import write_fp32

    out = {}
    for name in MODELS:
        if name == "tiny-pydoc":
            ck = Source("builtin:tiny-pydoc").load()
        else:
            arch = get(name[1:].split("-")[0])
            ck = from_state_dict(arch.fake_state_dict("tiny"))
        d = tmp_path_factory.mktemp(f"tflite-q-{name}")
        out[name] = write_fp32(ck.arch.step_module(ck), d)
    return out


@pytest.fixture(scope="module")
def pairs(fp32_files):
    """(model, graph, variant) -> (ours, the oracle's) files, each made once."""
    from rwkv_export.targets.tflite import _oracle_quantize_file, quantize_file

    made = {}

    def get(model, graph, variant):
        key = (model, graph, variant)
        if key not in made:
            src = fp32_files[model][graph]
            ours, oracle = (src.with_name(f"{p}_{graph}_{variant}.tflite") for p in ("ours", "oracle"))
            quantize_file(src, variant, ours)
            _oracle_quantize_file(src, variant, oracle)
            made[key] = ours, oracle
        return made[key]

    return get


def _load(path):
    from ai_edge_litert import schema_py_generated as schema

    return schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)


def _differences(a, b, where: str, out: list, limit: int = 20) -> list[str]:
    """Every field of two flatbuffer object trees (ModelT) that differs: values, arrays (dtype, shape, bytes),
    lists of tables by position."""
    if len(out) >= limit:
        return out
    if hasattr(a, "__dict__") or hasattr(b, "__dict__"):
        if type(a) is not type(b):
            out.append(f"{where}: {type(a).__name__} vs {type(b).__name__}")
            return out
        for k in sorted(set(vars(a)) | set(vars(b))):
            _differences(getattr(a, k, None), getattr(b, k, None), f"{where}.{k}", out, limit)
    elif isinstance(a, list) or isinstance(b, list) or (
            isinstance(a, np.ndarray) and a.dtype == object):
        if a is None or b is None or len(a) != len(b):
            out.append(f"{where}: {None if a is None else len(a)} vs {None if b is None else len(b)} entries")
            return out
        for i, (x, y) in enumerate(zip(a, b)):
            _differences(x, y, f"{where}[{i}]", out, limit)
    elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a), np.asarray(b)
        if a is None or b is None or x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(f"{where}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
    elif a != b:
        out.append(f"{where}: {a!r} vs {b!r}")
    return out


def _constant_left_operands(model) -> list[int]:
    """The tensors that are a constant float32 input 0 of some BATCH_MATMUL (which LiteRT's kernel runs in float32
    only)."""
    from ai_edge_litert import schema_py_generated as schema

    sg = model.subgraphs[0]
    out = set()
    for op in sg.operators:
        if model.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.BATCH_MATMUL:
            t = sg.tensors[op.inputs[0]]
            b = model.buffers[t.buffer]
            if t.type == schema.TensorType.FLOAT32 and b.data is not None and len(b.data):
                out.add(int(op.inputs[0]))
    return sorted(out)


def _types(model) -> dict[str, int]:
    """TensorType name -> how many tensors of it."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    counts: dict[str, int] = {}
    for t in model.subgraphs[0].tensors:
        counts[names[t.type]] = counts.get(names[t.type], 0) + 1
    return counts


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("model", MODELS)
def test_same_file_as_ai_edge_quantizer(fp32_files, pairs, model, graph, variant):
    """Every tensor (type, shape, name, quantization: scales, zero points, quantized_dimension, blockwise scales
    tensor and block size), operator, operator code, signature and buffer's bytes equal: bit-identical weights; in the
    files of DEPARTS_FROM_ORACLE all but the constant left operands of BATCH_MATMUL, float32 in ours."""
    from ai_edge_litert import schema_py_generated as schema

    ours_path, oracle_path = pairs(model, graph, variant)
    ours, oracle = _load(ours_path), _load(oracle_path)
    fp32 = _load(fp32_files[model][graph])
    left = _constant_left_operands(fp32)
    assert ((model, graph, variant) in DEPARTS_FROM_ORACLE) == (variant == "int8" and bool(left)), left
    if (model, graph, variant) in DEPARTS_FROM_ORACLE:
        # the oracle's file as it would be with those operands left float32: each tensor and its buffer from the fp32
        # file (the oracle's int8 of them checked first: the departure is real); everything else still compared
        for i in left:
            t, f = oracle.subgraphs[0].tensors[i], fp32.subgraphs[0].tensors[i]
            assert t.type == schema.TensorType.INT8 and f.type == schema.TensorType.FLOAT32, t.name
            t.type, t.quantization = f.type, f.quantization
            oracle.buffers[t.buffer].data = fp32.buffers[f.buffer].data
    diffs = _differences(ours, oracle, "model", [])
    assert not diffs, "\n".join(diffs)
    # not vacuous: the weights really are quantized as the variant says (the comparison above would pass on two
    # unquantized copies too)
    types = _types(ours)
    want = {"fp16": "FLOAT16", "int8": "INT8", "int4": "INT4"}[variant]
    assert types.get(want, 0) >= 10, types
    if variant == "fp16":
        codes = [ours.operatorCodes[o.opcodeIndex].builtinCode for o in ours.subgraphs[0].operators]
        assert codes.count(schema.BuiltinOperator.DEQUANTIZE) == types["FLOAT16"]
    if variant == "int4":  # v7 tiny's LoRA factors of input 16 / 8: int8 per channel, no int4 blocks
        assert (types.get("INT8", 0) > 0) == (model == "v7-tiny"), types


def _run(path, graph: str, tokens: list[int]) -> list[np.ndarray]:
    """The logits of `tokens` (step: one by one, the state carried; prefill: as one chunk, then its last logits)."""
    from ai_edge_litert.interpreter import Interpreter

    from rwkv_export.targets.tflite import PREFILL_CHUNK, state_output_name

    runner = Interpreter(model_path=str(path), num_threads=1).get_signature_runner(graph)
    ins = runner.get_input_details()
    token_name = "tokens" if graph == "prefill" else "token"
    state = {k: np.full(d["shape"], 0.25, d["dtype"]) for k, d in ins.items() if k != token_name}
    chunks = [tokens[:PREFILL_CHUNK]] if graph == "prefill" else [[t] for t in tokens]
    logits = []
    for chunk in chunks:
        out = runner(**{token_name: np.asarray(chunk, np.int32)}, **state)
        logits.append(out["logits"])
        state = {k: out[state_output_name(k)] for k in state}
    return logits


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("graph", GRAPHS)
@pytest.mark.parametrize("model", MODELS)
def test_same_outputs_as_ai_edge_quantizer(pairs, model, graph, variant):
    """Both files in LiteRT's interpreter: the same logits, bit for bit (the same weights and graph run the same
    kernels), and not the fp32 file's (the variant is quantized); in DEPARTS_FROM_ORACLE's files ours runs and the
    oracle's fails to prepare its BATCH_MATMUL (tests/test_tflite.py gates those prompt graphs' parity)."""
    from rwkv_export.targets.tflite import PREFILL_CHUNK

    ours, oracle = pairs(model, graph, variant)
    tokens = [(37 * i + 11) % 200 for i in range(STEPS if graph == "step" else PREFILL_CHUNK)]
    a = _run(ours, graph, tokens)
    if (model, graph, variant) in DEPARTS_FROM_ORACLE:  # the oracle's file fails where ours runs
        with pytest.raises(RuntimeError, match="BATCH_MATMUL"):
            _run(oracle, graph, tokens)
    else:
        b = _run(oracle, graph, tokens)
        assert all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))
    assert all(np.isfinite(x).all() for x in a)
    fp32 = _run(ours.with_name("model.tflite" if graph == "step" else "prefill.tflite"), graph, tokens)
    assert not np.array_equal(a[-1], fp32[-1])


@pytest.mark.parametrize("case", ["not tflite", "empty", "truncated", "unknown variant", "fp32", "missing"])
def test_bad_input_is_a_one_line_error(fp32_files, tmp_path, case):
    from rwkv_export.targets.tflite import quantize_file

    src = fp32_files["v7-tiny"]["step"]
    variant = "int8"
    bad = tmp_path / "bad.tflite"
    if case == "not tflite":
        bad.write_bytes(b"this is no flatbuffer at all, but long enough to be read as one" * 4)
    elif case == "empty":
        bad.write_bytes(b"")
    elif case == "truncated":
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    elif case == "missing":
        bad = tmp_path / "nothing.tflite"
    else:
        bad, variant = src, ("int3" if case == "unknown variant" else "fp32")
    with pytest.raises(RwkvExportError) as e:
        quantize_file(bad, variant, tmp_path / "out.tflite")
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    assert not (tmp_path / "out.tflite").exists()


def test_export_needs_no_ai_edge_quantizer(fp32_files, tmp_path, monkeypatch):
    """ai-edge-quantizer is the tests' oracle only: blocked, check_quantizer passes and every variant is written."""
    import sys

    from rwkv_export.targets.tflite import check_quantizer, quantize_file

    for mod in [m for m in sys.modules if m == "ai_edge_quantizer" or m.startswith("ai_edge_quantizer.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)  # makes `import ai_edge_quantizer` raise ImportError
    check_quantizer(VARIANTS)
    for variant in VARIANTS:
        quantize_file(fp32_files["v7-tiny"]["step"], variant, tmp_path / f"model_{variant}.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"model_{v}.tflite" for v in VARIANTS)


@pytest.mark.parametrize("model", ["tiny-pydoc", "v6-tiny"])
def test_prompt_file_reuses_the_step_files_weights(fp32_files, tmp_path, model, monkeypatch):
    """With a Reuse shared by the step and prompt files (what derive_variants does), the prompt file of every variant
    is the same bytes as without it, while its weights come from the step file's output (copied, not quantized
    again); a weight whose float32 bytes differ from the step file's, under the same name and shape, is quantized
    afresh (matched by its bytes, not by its name)."""
    from rwkv_export.targets import tflite_quant, tflite_write
    from rwkv_export.targets.tflite_quant import Reuse, quantize_file

    step, prefill = fp32_files[model]["step"], fp32_files[model]["prefill"]
    # the altered copy: one element of the prompt file's first weight that the step file also has set to 4 max|w|
    # (every variant's bytes of that weight change: its fp16 value, its int8 / int4 scales)
    graph, spans = tflite_quant._read_model(prefill.read_bytes(), prefill)
    from ai_edge_litert import schema_py_generated as schema

    step_names = {t.name for t in _load(step).subgraphs[0].tensors}
    plan = tflite_quant._plan(graph, schema, "int8")
    w = next(graph.subgraphs[0].tensors[i] for _, i, _ in plan if graph.subgraphs[0].tensors[i].name in step_names)
    data = bytearray(prefill.read_bytes())
    off = spans[w.buffer][0]
    biggest = np.abs(np.frombuffer(data, np.float32, spans[w.buffer][1] // 4, off)).max()
    data[off:off + 4] = np.float32(4 * biggest).tobytes()
    altered = tmp_path / "altered_prefill.tflite"
    altered.write_bytes(bytes(data))

    copied = []
    write_to = tflite_write.FileRange.write_to
    monkeypatch.setattr(tflite_write.FileRange, "write_to", lambda self, f: (
        copied.append((self.path.name, self.name)), write_to(self, f)))
    for variant in VARIANTS:
        reuse = Reuse()
        quantize_file(step, variant, tmp_path / f"step_{variant}.tflite", reuse=reuse)
        for src, tag in ((prefill, "prefill"), (altered, "altered")):
            copied.clear()
            quantize_file(src, variant, tmp_path / f"{tag}_{variant}.tflite", reuse=reuse)
            reused = [name for file, name in copied if file == f"step_{variant}.tflite"]  # from the step output
            quantize_file(src, variant, tmp_path / f"{tag}_{variant}_alone.tflite")
            assert (tmp_path / f"{tag}_{variant}.tflite").read_bytes() == (
                tmp_path / f"{tag}_{variant}_alone.tflite").read_bytes(), (variant, tag)
            n_weights = len(tflite_quant._plan(_load(src), schema, variant))
            if tag == "altered":  # not vacuous: the altered weight's bytes differ from the prompt file's
                assert (tmp_path / f"altered_{variant}.tflite").read_bytes() != (
                    tmp_path / f"prefill_{variant}.tflite").read_bytes()
            if tag == "prefill":  # every weight of the prompt file is one of the step file's
                assert len(reused) == n_weights, (variant, len(reused), n_weights)
            else:
                assert w.name.decode() not in reused and len(reused) == n_weights - 1, (variant, reused)
