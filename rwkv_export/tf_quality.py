"""The quality gate of TF.js's storage variants through a *stand-in*, read in chunks, instead of the variant's own
step graph token by token in Node (0.56 s a step at 169M shapes on TF.js's pure-JS cpu backend, 2,000 eval tokens
~19 min per variant; ~0.22 s on its wasm backend, which the check now uses: still ~7 min).

Why a stand-in may judge them: a TF.js fp16 or uint8 model is fp32 arithmetic on weights decoded to float32 when
TF.js loads it (targets/tfjs.py); the variant differs from fp32 by its decoded weights alone. The stand-in is the
ONNX fp32 prompt graph of the same module (the arch's onnx_graph builder, written node by node in seconds), each of
whose weights is replaced by the variant file's own weight, decoded as TF.js decodes it (io_utils.decodeWeights):
uint8 `q * scale + min` computed in float64 (a JS number) and stored to float32, float16 converted exactly, float32
and int32 as they are. It is read by onnxruntime as an eval graph (eval_graph.EvalGraphRunner: every token's logits,
chunks of up to 256 tokens, the state fed between chunks) through quality.evaluate_in_chunks with its sequential gate,
against the fp32 side: the same prompt graph with the checkpoint's own fp32 weights (what runtime_ref fp32 computes;
the fp32 file is held to that by its parity gate).

Which TF.js weight an ONNX initializer is: targets/tfjs.prompt_graph_weights runs the translation export_tfjs runs
and returns its names; every quantized weight of the file must be one of the stand-in's (else StandInError: the
stand-in would not carry the variant's weights).

The link guard: the stand-in must compute what the file computes. The first LINK_TOKENS tokens of the eval text
through the real step graph (TF.js in Node, state fed back) against the stand-in's rows for them, as parity measures
(max|Δ| / std of the step graph's logits), within LINK_MAX_REL = 2 x the fp32 parity tolerance of the (target,
version): both sides are fp32 arithmetic on the same float32 weights, each within that tolerance of exact arithmetic
by the parity gates' measure (7.5e-6 of std measured for TF.js's wasm backend at 169M, tolerance 3e-5:
parity.TF_FP32_MAX_REL), so they differ by rounding order only: measured 1.4e-6 (tiny-pydoc) and 3.3e-6 / 3.5e-6
(fp16 / uint8 at 169M shapes, cpu backend; 7.5e-6 / 8.8e-6 on wasm) against the bound 6e-5. A
wrong decode (a uint8 scale 1 % off in one matrix) or the fp32 weights left in place move the logits by up to the
variant's own distance from fp32 (measured over the same 16 rows: fp16 7.4e-4, uint8 4.9e-2 of std on tiny-pydoc),
past the bound (tests/test_tf_quality.py). The report's "stand_in" entry has the measure, its bound, and the
variant's distance from fp32 over the same rows.

The greedy continuation (reported, not gated) is run by the stand-in fed one token a call, from its state after the
prompt: the link guard has shown it computes the step graph's logits.

TFLite's variants (SEQUENTIAL_STEPS) are not stood in for: int8 / int4 run LiteRT's hybrid kernels, which quantize
the activations on the fly (not fp32 arithmetic on decoded weights). Their own step graph is read token by token as
before, but through quality.evaluate_in_chunks (evaluate_steps: a "chunk" is its tokens stepped one after another),
so the sequential gate applies to them as to the ONNX variants, against the same fp32 stand-in: 512 tokens where the
verdict is beyond doubt there, instead of 2,000.

check.py calls prepare() (in the process that has the checkpoint) and evaluate() (in a worker process, from the
prepared folders).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from .errors import RwkvExportError
from .quality import EvalGraphLinkError

# eval tokens stepped through the real step graph for the link guard: 16 steps of TF.js at 169M shapes are ~9 s
LINK_TOKENS = 16
# the link guard's bound as a multiple of the (target, "fp32", version) parity tolerance (module docstring)
LINK_TOL_FACTOR = 2.0
FP32 = "fp32"  # the key of the fp32 side's stand-in in prepare()'s result
VARIANTS = {"tfjs": ("fp16", "uint8")}
# Read through their own step graph (LiteRT), token by token as before, but sequentially (the ONNX variants' gate:
# parity.SEQ_LEVELS): TFLite's int8 / int4 are hybrid kernels that quantize activations on the fly, not fp32
# arithmetic on decoded weights, so no fp32 stand-in computes them; fp16 goes the same way (one path for the target).
SEQUENTIAL_STEPS = {"tflite": ("fp16", "int8", "int4")}
STEPS = "step graph"  # prepare()'s value for such a graph: no stand-in, its step graph read sequentially


class StandInError(RwkvExportError):
    """A stand-in cannot be built for a variant file (a quantized weight it does not carry, a shape that differs)."""


class StandInLinkError(EvalGraphLinkError):
    """The stand-in's logits differ from the variant's step graph by more than fp32 rounding."""


def has_stand_in(graph: dict) -> bool:
    """Whether a step graph entry's quality gate can be read through a stand-in (TF.js fp16 / uint8 step graphs)."""
    return _judged(graph, VARIANTS)


def reads_sequentially(graph: dict) -> bool:
    """Whether a step graph entry's quality gate reads its own step graph sequentially (TFLite's variants)."""
    return _judged(graph, SEQUENTIAL_STEPS)


def _judged(graph: dict, table: dict) -> bool:
    from .embed import has_embedding

    return (graph.get("kind") == "step" and graph.get("variant") in table.get(graph.get("format"), ())
            and not has_embedding(graph))


def prepare(root: Path, manifest: dict, ckpt, graphs: list[dict], tmp: Path, progress=None) -> dict:
    """Write the stand-ins of those of `graphs` that has_stand_in into `tmp`, and the fp32 side's: {FP32 or a graph's
    file: (folder, its ONNX prompt graph entry)}, picklable (worker processes open them); a graph that
    reads_sequentially gets STEPS (its own step graph, read sequentially against the fp32 stand-in). {} where none
    applies or the architecture has no ONNX graph builder."""
    todo = [g for g in graphs if has_stand_in(g)]
    steps = [g for g in graphs if reads_sequentially(g)]
    if not (todo or steps) or ckpt.arch.onnx_graph() is None:
        return {}
    from .embed import step_module
    from .progress import QUIET
    from .targets import onnx_seq, tfjs

    from .check import _give_back_freed_memory

    progress = progress or QUIET
    tmp = Path(tmp)
    out = {}
    _give_back_freed_memory()  # what the export and the reference freed, before the module's 0.7 GB (169M) comes
    what = f"with the weights of {', '.join(g['file'] for g in todo)} and " if todo else "of "
    with progress.stage(f"writing the quality stand-ins (ONNX prompt graphs {what}the checkpoint)"):
        module = step_module(ckpt, "fp32")
        (tmp / "graphs").mkdir(parents=True, exist_ok=True)
        path, store, names, step_weights = tfjs.prompt_graph_weights(module, tmp / "graphs")
        for key, graph in [(FP32, None), *((g["file"], g) for g in todo)]:
            folder = tmp / f"stand-in-{len(out)}"
            folder.mkdir()
            weights = None if graph is None else TFJSWeights(Path(root) / graph["file"])
            write_stand_in(path, store, names, weights, folder / "prefill.onnx", step_weights)
            entry = onnx_seq.graph_entry(folder / "prefill.onnx", files=["prefill.onnx", DATA_FILE],
                                         variant=FP32 if graph is None else graph["variant"])
            out[key] = (str(folder), entry)
        del module, store
    _give_back_freed_memory()
    out.update({g["file"]: STEPS for g in steps})
    return out


DATA_FILE = "prefill.onnx.data"


class TFJSWeights:
    """The weights of a TF.js model.json, read from its shards and decoded to the values TF.js computes with."""

    def __init__(self, model_json: Path):
        from .errors import ManifestError

        try:
            model = json.loads(Path(model_json).read_text())
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot read {model_json}: {e}") from None
        self.folder = Path(model_json).parent
        self.specs: dict[str, tuple[dict, list[str], int]] = {}  # name -> (spec, shard paths, byte offset)
        for group in model.get("weightsManifest", []):
            offset = 0
            for spec in group["weights"]:
                self.specs[spec["name"]] = (spec, group["paths"], offset)
                offset += _nbytes(spec)
        self.used: set[str] = set()

    def quantized(self) -> set[str]:
        return {n for n, (spec, _, _) in self.specs.items() if spec.get("quantization")}

    def _bytes(self, paths: list[str], offset: int, n: int) -> bytes:
        out, pos = [], 0
        for p in paths:
            size = (self.folder / p).stat().st_size
            if pos + size > offset and n > 0:
                start = max(0, offset - pos)
                with open(self.folder / p, "rb") as f:
                    f.seek(start)
                    chunk = f.read(min(n, size - start))
                out.append(chunk)
                offset, n = offset + len(chunk), n - len(chunk)
            pos += size
        if n > 0:
            raise StandInError(f"the shards of {self.folder.name} end before their weights do")
        return b"".join(out)

    def array(self, name: str) -> np.ndarray:
        """The weight `name` as TF.js holds it after loading (float32, or int32 / bool)."""
        if name not in self.specs:
            raise StandInError(f"{self.folder.name}/model.json has no weight {name}")
        spec, paths, offset = self.specs[name]
        self.used.add(name)
        raw = self._bytes(paths, offset, _nbytes(spec))
        shape = [int(d) for d in spec["shape"]]
        q = spec.get("quantization")
        if not q:
            return np.frombuffer(raw, dtype=np.dtype(spec["dtype"]) if spec["dtype"] != "bool" else np.bool_
                                 ).reshape(shape)
        if q["dtype"] == "float16":
            return np.frombuffer(raw, dtype=np.float16).astype(np.float32).reshape(shape)
        if q["dtype"] == "uint8":  # io_utils.decodeWeights: v * scale + min in a JS number, stored to a Float32Array
            codes = np.frombuffer(raw, dtype=np.uint8).astype(np.float64)
            return (codes * float(q["scale"]) + float(q["min"])).astype(np.float32).reshape(shape)
        raise StandInError(f"weight {name} is stored as {q['dtype']}, which the stand-in does not decode")


def _nbytes(spec: dict) -> int:
    n = int(np.prod([int(d) for d in spec["shape"]], dtype=np.int64))
    q = spec.get("quantization")
    if q:
        return n * {"uint8": 1, "uint16": 2, "float16": 2}[q["dtype"]]
    return n * {"float32": 4, "int32": 4, "bool": 1}[spec["dtype"]]


def write_stand_in(prompt: Path, store, names: dict[str, str], weights: TFJSWeights | None, out: Path,
                   step_weights: set[str] | None = None) -> None:
    """The prompt graph `prompt` (weightless; its weights in `store`) with its weights in the data file beside `out`:
    each initializer TF.js has (`names`) as `weights` decodes it (None: the module's own, the fp32 side), the rest
    (shape constants) as they are. Every quantized weight of `weights` must be carried. A weight of the prompt graph
    alone (not in `step_weights`: stored exactly in every variant) that the file lacks (a model.json written without
    its prompt graph) is the module's own."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(prompt), load_external_data=False)
    offset = 0
    with open(out.parent / DATA_FILE, "wb") as f:
        for t in model.graph.initializer:
            a = store.array(t)
            if a is None:
                continue  # stored in the proto itself
            prompt_only = step_weights is not None and names.get(t.name) not in step_weights
            if weights is not None and t.name in names and not (prompt_only and names[t.name] not in weights.specs):
                b = weights.array(names[t.name])
                if tuple(b.shape) != tuple(a.shape):
                    raise StandInError(f"weight {names[t.name]} is {list(b.shape)} in the file, {list(a.shape)} in "
                                       f"the prompt graph of the checkpoint: not this model's file")
                a = b.astype(a.dtype) if a.dtype != b.dtype else b  # TF.js's int32 for ONNX's int64 tables
            a = np.ascontiguousarray(a)
            if helper.tensor_dtype_to_np_dtype(t.data_type) != a.dtype:
                raise StandInError(f"initializer {t.name}: {a.dtype} for an ONNX {t.data_type}")
            pad = -offset % 64
            f.write(b"\0" * pad)
            offset += pad
            f.write(a.tobytes())
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", DATA_FILE), ("offset", str(offset)), ("length", str(a.nbytes))):
                t.external_data.add(key=k, value=v)
            offset += a.nbytes
    if weights is not None:
        missing = weights.quantized() - weights.used
        if missing:
            raise StandInError(f"{weights.folder.name}: quantized weights the stand-in does not carry: "
                               f"{', '.join(sorted(missing)[:5])}")
    onnx.save(model, str(out))


class _Steps:
    """An eval-graph runner fed one token a call, as a step runner (new_state / step)."""

    def __init__(self, runner):
        self.runner = runner

    def new_state(self):
        return self.runner.new_state()

    def step(self, token: int, state):
        logits, state = self.runner.logits_seq([int(token)], state)
        return logits.reshape(1, -1), state


def open_baseline(manifest: dict, stand_in, threads: int = 1):
    """The fp32 side's eval-graph runner (eval_graph.EvalGraphRunner) and, for the greedy continuation, the same
    runner as a step runner."""
    from .eval_graph import EvalGraphRunner

    folder, entry = stand_in
    runner = EvalGraphRunner(folder, manifest, entry, threads=threads)
    return runner, _Steps(runner)


def evaluate(root: Path, manifest: dict, graph: dict, stand_in, base, *, gate=None, resume=None, threads: int = 1,
             link_tokens: int = LINK_TOKENS):
    """quality.evaluate_in_chunks of the variant `graph` through its stand-in (module docstring), sequentially with
    `gate`; a quality.Pending where the baseline must read on (call again with resume=it), else the report, whose
    "stand_in" entry is the link guard's (StandInLinkError where it fails)."""
    from .eval_graph import EvalGraphRunner
    from .parity import tolerance_for
    from .quality import Pending, evaluate_in_chunks

    if stand_in == STEPS:
        return evaluate_steps(root, manifest, graph, base, gate=gate, resume=resume, threads=threads)
    folder, entry = stand_in
    runner = EvalGraphRunner(folder, manifest, entry, threads=threads)
    try:
        report = evaluate_in_chunks(lambda: contextlib.nullcontext(_Steps(runner)),
                                    lambda: contextlib.nullcontext(runner), base, gate=gate, resume=resume)
        if isinstance(report, Pending):
            return report
        k = min(link_tokens, len(base.tokens))
        head = np.asarray(runner.logits_seq(base.tokens[:k], runner.new_state())[0], dtype=np.float64)
    finally:
        runner.close()
    tol = tolerance_for(graph["format"], "fp32", manifest["model"].get("rwkv_version")).max_rel
    link = link_guard(root, manifest, graph, head, base, LINK_TOL_FACTOR * tol, threads)
    report["read_by"] = f"stand-in (ONNX eval graph with the weights of {graph['file']})"
    report["stand_in"] = link
    # quality.format_quality prints report["link"]: "vs the step graph" is this guard's (the real step graph, as
    # max|Δ|/std against its bound), "one token a call" the stand-in's own chunked rows against it fed one token a
    # call (evaluate_in_chunks' guard, whose step measure here was the stand-in against itself)
    chunked = report["link"]
    report["link"] = {"step": link["max_rel"], "max_step": link["bound"], "tokens": link["tokens"],
                      "measure": "step: max|Δ|/std of the real step graph's logits (tf_quality.link_guard)",
                      "chunk": chunked["chunk"], "max_chunk": chunked["max_chunk"],
                      "chunk_tokens": chunked["chunk_tokens"]}
    return report


def link_guard(root: Path, manifest: dict, graph: dict, head: np.ndarray, base, bound: float,
               threads: int = 1) -> dict:
    """`head` (the stand-in's logits after each of the eval text's first len(head) tokens) against the step graph run
    token by token over them: max|Δ| / std(step logits) within `bound`, or StandInLinkError."""
    from .check import make_runner

    k = len(head)
    runner = make_runner(Path(root), manifest, graph, threads=threads)
    try:
        state, steps = runner.new_state(), []
        for t in base.tokens[:k]:
            lv, state = runner.step(t, state)
            steps.append(np.asarray(lv, dtype=np.float64).reshape(-1))
    finally:
        if hasattr(runner, "close"):
            runner.close()
    steps = np.array(steps)
    std = float(steps.std()) or 1.0
    rel = float(np.abs(head - steps).max() / std)
    fp32 = np.asarray(base.block(0, k), dtype=np.float64)
    link = {"tokens": k, "max_rel": rel, "bound": bound, "variant_vs_fp32": float(np.abs(steps - fp32).max() / std),
            "reason": f"{LINK_TOL_FACTOR:g} x the fp32 parity tolerance: the same float32 weights in fp32 on both "
                      "sides, rounding order apart"}
    if not rel <= bound:
        raise StandInLinkError(
            f"{graph['format']}/{graph['variant']}: the stand-in's logits differ from the step graph's over the first "
            f"{k} eval tokens by {rel:.3g} of their std, past {bound:.3g} (fp32 rounding; the variant is "
            f"{link['variant_vs_fp32']:.3g} from fp32): it does not compute what {graph['file']} does")
    return link


def evaluate_steps(root: Path, manifest: dict, graph: dict, base, *, gate=None, resume=None, threads: int = 1):
    """quality.evaluate_in_chunks over the variant's own step graph token by token (a "chunk" is its tokens stepped
    one after another, the state fed back: what evaluate_against reads, row for row), so that the sequential gate
    (parity.SEQ_LEVELS) applies: a verdict beyond doubt at 512 tokens stops there, as for the ONNX variants. Its
    link guard (quality.guard_link) then compares the step graph with itself: the rows it re-reads from a fresh
    state (its first LINK_TOKENS tokens) are the recorded ones, not stepped again."""
    from .check import make_runner
    from .quality import Pending, evaluate_in_chunks

    runner = _Recorded(make_runner(Path(root), manifest, graph, threads=threads))
    try:
        report = evaluate_in_chunks(lambda: contextlib.nullcontext(runner),
                                    lambda: contextlib.nullcontext(_StepsAsChunks(runner)), base, gate=gate,
                                    resume=resume)
    finally:
        if hasattr(runner.runner, "close"):
            runner.runner.close()
    if not isinstance(report, Pending):
        # evaluate_in_chunks' link guard and chunk size say nothing here (the step graph against itself)
        report.pop("link", None)
        report.pop("chunk", None)
        report["read_by"] = "step graph, token by token"
    return report


class _StepsAsChunks:
    """A step runner as an eval-graph runner: logits_seq steps its tokens one by one (rows [T, V], the state after)."""

    max_chunk = 256

    def __init__(self, runner):
        self.runner = runner

    def new_state(self):
        return self.runner.new_state()

    def logits_seq(self, tokens, state):
        rows = []
        for t in tokens:
            lv, state = self.runner.step(int(t), state)
            rows.append(np.asarray(lv).reshape(-1))
        return np.stack(rows), state


class _Recorded:
    """A step runner that records its logits and states along the first `keep` tokens from a fresh state and hands
    them back when the same tokens are stepped from a fresh state again (the same graph, the same inputs)."""

    _FRESH = ("fresh",)

    def __init__(self, runner, keep: int = 32):
        self.runner, self.keep, self._seen = runner, keep, {}

    def new_state(self):
        return {"__path__": ()} | self.runner.new_state()

    def step(self, token: int, state: dict):
        path = state.get("__path__")
        inner = {k: v for k, v in state.items() if k != "__path__"}
        key = None if path is None or len(path) >= self.keep else (*path, int(token))
        if key is not None and key in self._seen:
            logits, new = self._seen[key]
        else:
            logits, new = self.runner.step(int(token), inner)
            if key is not None:
                self._seen[key] = (logits, new)
        return logits, ({"__path__": key} | new if key is not None else new)
