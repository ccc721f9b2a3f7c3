"""The quality gate of TF.js's storage variants and TFLite's fp16 through a *stand-in*, read in chunks, instead of
the variant's own step graph token by token (TF.js in Node: 0.56 s a step at 169M shapes on its pure-JS cpu backend,
2,000 eval tokens ~19 min per variant; ~0.22 s on its wasm backend, which the check now uses: still ~7 min).

Why a stand-in may judge them: a TF.js fp16 or uint8 model is fp32 arithmetic on weights decoded to float32 when
TF.js loads it (targets/tfjs.py); the variant differs from fp32 by its decoded weights alone. The stand-in is the
ONNX fp32 prompt graph of the same module (the arch's onnx_graph builder, written node by node in seconds), each of
whose weights is replaced by the variant file's own weight, decoded as TF.js decodes it (io_utils.decodeWeights):
uint8 `q * scale + min` computed in float64 (a JS number) and stored to float32, float16 converted exactly, float32
and int32 as they are. It is read by onnxruntime as an eval graph (eval_graph.EvalGraphRunner: every token's logits,
chunks of up to 256 tokens, the state fed between chunks) through quality.evaluate_in_chunks with its sequential gate,
against the fp32 side: the same prompt graph with the checkpoint's own fp32 weights (what runtime_ref fp32 computes;
the fp32 file is held to that by its parity gate).

Which TF.js weight an ONNX initializer is: export_tfjs records it in model.json (userDefinedMetadata.rwkv_export.
onnx_weights: the translation's own names, per graph); a model.json written before that gets them from the
translation run again (targets/tfjs.prompt_graph_weights, over the whole fp32 module). Every quantized weight of the
file must be one of the stand-in's (else StandInError: the stand-in would not carry the variant's weights).

How they are written (prepare, write_stand_ins): the prompt graph is built once, node by node, from the
architecture's lazy step module where it has one (each weight prepared from the memory-mapped checkpoint when it is
written, then let go), and each weight goes at once into every stand-in's data file: as it is for the fp32 side, as
each file decodes it for the others (one weight and its decoded copies held at a time, never a module's 0.7 GB at
169M shapes). Decoding is a table lookup per code (every code's value computed once, as element by element).

TFLite's fp16 is stood in for the same way: ai-edge-quantizer's FLOAT_CASTING file keeps each weight matrix in
float16 behind a DEQUANTIZE op, and LiteRT computes in fp32 on the decoded weights (XNNPACK decodes them once, when
it packs them: a step is as fast as fp32's, measured 17.5 / 23.4 ms against 18.4 / 23.6 ms at 169M). TFLiteWeights
reads them from the .tflite's flatbuffer, decoded exactly, FULLY_CONNECTED weights transposed back to the ONNX
[in, out] layout. Link guard measured 1.6e-6 (tiny-pydoc) and 7.8e-6 (169M shapes) against the bound 6e-5, fp16's
own distance from fp32 over the same rows 7.3e-4 and 1.1e-3; one square matrix decoded untransposed, or the fp32
weights left in place, fail it (tests/test_tf_quality.py).

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

TFLite's int8 / int4 (SEQUENTIAL_STEPS) are not stood in for: they run LiteRT's hybrid kernels, which quantize
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
VARIANTS = {"tfjs": ("fp16", "uint8"), "tflite": ("fp16",)}
# Read through their own step graph (LiteRT), token by token as before, but sequentially (the ONNX variants' gate:
# parity.SEQ_LEVELS): TFLite's int8 / int4 are hybrid kernels that quantize activations on the fly, not fp32
# arithmetic on decoded weights, so no fp32 stand-in computes them.
SEQUENTIAL_STEPS = {"tflite": ("int8", "int4")}
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
    applies or the architecture has no ONNX graph builder.

    One pass writes them all (write_stand_ins): the prompt graph is built once, node by node, from the
    architecture's lazy step module where it has one (each weight prepared from the memory-mapped checkpoint as it is
    written, then let go: never the module's 0.7 GB at 169M shapes), each weight going into every stand-in's data
    file at once, as the checkpoint has it (the fp32 side) or as each variant file decodes it."""
    todo = [g for g in graphs if has_stand_in(g)]
    steps = [g for g in graphs if reads_sequentially(g)]
    if not (todo or steps) or ckpt.arch.onnx_graph() is None:
        return {}
    from .memory import give_back_freed_memory
    from .progress import QUIET
    from .targets import onnx_seq

    progress = progress or QUIET
    tmp = Path(tmp)
    out = {}
    give_back_freed_memory()  # what the export and the reference freed, before the stand-ins' weights come
    what = f"with the weights of {', '.join(g['file'] for g in todo)} and " if todo else "of "
    with progress.stage(f"writing the quality stand-ins (ONNX prompt graphs {what}the checkpoint)"):
        sides = [(FP32, None), *((g["file"], g) for g in todo)]
        folders = [tmp / f"stand-in-{i}" for i in range(len(sides))]
        names = _Translated(ckpt, tmp / "graphs")  # only for a model.json without its recorded names
        weights = [None if g is None else _file_weights(root, g, names) for _, g in sides]
        write_stand_ins(_prompt_module(ckpt), list(zip(folders, weights)))
        for (key, graph), folder in zip(sides, folders):
            entry = onnx_seq.graph_entry(folder / PROMPT_FILE, files=[PROMPT_FILE, DATA_FILE],
                                         variant=FP32 if graph is None else graph["variant"])
            out[key] = (str(folder), entry)
    give_back_freed_memory()
    out.update({g["file"]: STEPS for g in steps})
    return out


PROMPT_FILE = "prefill.onnx"
DATA_FILE = "prefill.onnx.data"


def _prompt_module(ckpt):
    """The fp32 step module the stand-ins' prompt graph is written from: lazy where the architecture has one (as
    export._graph_module: the same weights, byte for byte), else whole."""
    if ckpt.arch.lazy_step:
        return ckpt.arch.step_module(ckpt, "fp32", lazy=True)
    return ckpt.arch.step_module(ckpt, "fp32")


def write_stand_ins(module, sides: list[tuple[Path, "TFJSWeights | TFLiteWeights | None"]]) -> None:
    """The module's ONNX prompt graph (PROMPT_FILE) into each folder of `sides`, with its weights in the data file
    beside it (DATA_FILE): the module's own where the side's weights are None (the fp32 side), else each initializer
    the file has (its weight_name) as the file decodes it, the rest (a prompt graph's own constants that a model.json
    written without its prompt graph lacks) the module's. The graph is built once; the data files have one layout
    (a substitute has the initializer's shape and dtype), so one .onnx serves every folder. Every quantized weight
    of each file must be carried (StandInError)."""
    import shutil

    from .targets import onnx_seq

    folders = [Path(f) for f, _ in sides]
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
    with _StandInStore([(f / DATA_FILE, w) for f, w in sides]) as store:
        onnx_seq.export_sequence(module, folders[0] / PROMPT_FILE, store=store)
    for _, w in sides:
        if w is not None:
            missing = w.quantized() - w.used
            if missing:
                raise StandInError(f"{w.file}: quantized weights the stand-in does not carry: "
                                   f"{', '.join(sorted(missing)[:5])}")
    for f in folders[1:]:
        shutil.copyfile(folders[0] / PROMPT_FILE, f / PROMPT_FILE)


class _StandInStore:
    """onnx_build.WeightStore's interface over one data file per stand-in, written in step: each weight the graph
    places goes into every file at the same offset (64-byte aligned, as a WeightStore), as it is or as that side's
    file decodes it (`substitute`), and is then let go. Shares a name placed twice, as a WeightStore."""

    def __init__(self, sinks: list[tuple[Path, "TFJSWeights | TFLiteWeights | None"]]):
        self.path = Path(DATA_FILE)  # the external-data location the graph's initializers name
        self.placed: dict[str, tuple[int, int, tuple, int]] = {}
        self._weights = [w for _, w in sinks]
        self._files = [open(p, "wb") for p, _ in sinks]
        self._offset = 0

    def place(self, name: str, a: np.ndarray) -> tuple[int, int]:
        from .onnx_build import ALIGN, onnx_dtype, stored_already

        done = stored_already(self.placed, name, a)
        if done is not None:
            return done
        pad = -self._offset % ALIGN
        off = self._offset + pad
        for f, w in zip(self._files, self._weights):
            b = a if w is None else w.substitute(name, a)
            f.write(b"\0" * pad)
            f.write(np.ascontiguousarray(b).data)
            del b
        self.placed[name] = (off, int(a.nbytes), tuple(a.shape), onnx_dtype(a.dtype))
        self._offset = off + int(a.nbytes)
        return off, int(a.nbytes)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Translated:
    """For a model.json written before its weight names were recorded (targets/tfjs.WEIGHT_NAMES): the names by the
    very translation export_tfjs runs (targets/tfjs.prompt_graph_weights, over the whole fp32 module), made once on
    first use: (ONNX initializer -> TF.js weight of the prompt graph, the TF.js names of the step graph's weights)."""

    def __init__(self, ckpt, tmp: Path):
        self.ckpt, self.tmp, self._names = ckpt, Path(tmp), None

    def __call__(self) -> tuple[dict[str, str], set[str]]:
        if self._names is None:
            from .embed import step_module
            from .targets import tfjs

            self.tmp.mkdir(parents=True, exist_ok=True)
            _, store, names, step_weights = tfjs.prompt_graph_weights(step_module(self.ckpt, "fp32"), self.tmp)
            del store
            self._names = (names, step_weights)
        return self._names


class TFLiteWeights:
    """The float16 weights of a TFLite file (ai-edge-quantizer's FLOAT_CASTING: each a float16 constant that a
    DEQUANTIZE op turns into the float32 tensor its consumer reads), decoded as LiteRT decodes them (float16 to
    float32 is exact) and laid out as the ONNX prompt graph's initializer of the same name: FULLY_CONNECTED keeps its
    weight [out, in] (targets/tflite_write.py transposes ONNX's [in, out] MatMul weight), EMBEDDING_LOOKUP its table
    as it is. A float16 constant read any other way is an error (the stand-in would not know its layout). The
    flatbuffer's tables are read in place (memory-mapped); each weight's bytes are read from the file when it is
    substituted (never the mapped file's pages of every weight)."""

    def __init__(self, path: Path):
        import mmap

        self.folder, self.file = Path(path).parent, Path(path).name
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            # name -> (file offset, bytes, TFLite shape, transposed)
            self.tensors: dict[str, tuple[int, int, tuple, bool]] = _float16_weights(m, self.file)
        self.used: set[str] = set()

    def quantized(self) -> set[str]:
        return set(self.tensors)

    def substitute(self, onnx_name: str, a: np.ndarray) -> np.ndarray:
        """The prompt graph's initializer `onnx_name` (the module's `a`) as the file's float16 weight of that name
        decodes, in a's layout; `a` itself where the file keeps it in float32 (vectors, the fp32 file's own)."""
        if onnx_name not in self.tensors:
            return a
        offset, nbytes, shape, transposed = self.tensors[onnx_name]
        want = shape[::-1] if transposed else shape
        if want != tuple(a.shape) or a.dtype != np.float32 or nbytes != 2 * a.size:
            raise StandInError(f"weight {onnx_name} is {list(want)} float16 in {self.file}, {list(a.shape)} "
                               f"{a.dtype} in the prompt graph of the checkpoint: not this model's file")
        self.used.add(onnx_name)
        codes = np.empty(a.size, dtype=np.uint16)
        with open(self.folder / self.file, "rb") as f:
            f.seek(offset)
            if f.readinto(codes) != nbytes:
                raise StandInError(f"{self.file} ends inside its weight {onnx_name}")
        if not transposed:
            return _decoded(codes, _float16_table()).reshape(shape)
        rows, cols = shape  # [out, in] in the file, [in, out] in the stand-in: TRANSPOSE_ROWS rows decoded at a
        codes = codes.reshape(rows, cols)  # time and written as columns (a block that stays in cache)
        out = np.empty((cols, rows), dtype=np.float32)
        for i in range(0, rows, TRANSPOSE_ROWS):
            out[:, i:i + TRANSPOSE_ROWS] = _decoded(codes[i:i + TRANSPOSE_ROWS], _float16_table()).reshape(-1, cols).T
        return out


def _float16_weights(data, file: str) -> dict[str, tuple[int, int, tuple, bool]]:
    """TFLiteWeights.tensors from a model's flatbuffer `data` (the step graph: subgraph 0): each float16 constant
    that a DEQUANTIZE reads, with where its bytes are in the file and whether its reader transposes it."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
             for i in range(model.OperatorCodesLength())]
    from .targets.tflite_quant import buffer_span, op_names

    names = op_names(schema)
    sg = model.Subgraphs(0)
    ops = [(names.get(codes[op.OpcodeIndex()], "?"), [op.Inputs(j) for j in range(op.InputsLength())],
            [op.Outputs(j) for j in range(op.OutputsLength())]) for op in (sg.Operators(i)
                                                                           for i in range(sg.OperatorsLength()))]
    readers: dict[int, set[tuple[str, int]]] = {}  # tensor -> (op, input position) of each op reading it
    for name, ins, _ in ops:
        for pos, t in enumerate(ins):
            readers.setdefault(t, set()).add((name, pos))
    half = {}
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        if t.Type() == schema.TensorType.FLOAT16:
            half[i] = t
    out = {}
    for name, ins, outs in ops:
        if name != "DEQUANTIZE" or ins[0] not in half:
            continue
        t = half.pop(ins[0])
        label = t.Name().decode()
        uses = readers.get(outs[0], set())
        if uses and uses <= {("FULLY_CONNECTED", 1)}:
            transposed = True
        elif uses and uses <= {("EMBEDDING_LOOKUP", 1), ("GATHER", 0)}:
            transposed = False
        else:
            raise StandInError(f"{file}: float16 weight {label} is read by "
                               f"{', '.join(sorted(f'{o} input {p}' for o, p in uses)) or 'nothing'}, whose layout "
                               "the stand-in does not know")
        offset, nbytes = buffer_span(model, t.Buffer())
        out[label] = (int(offset), int(nbytes), tuple(int(t.Shape(j)) for j in range(t.ShapeLength())), transposed)
    if half:
        raise StandInError(f"{file}: float16 tensors no DEQUANTIZE reads: "
                           f"{', '.join(sorted(t.Name().decode() for t in half.values())[:5])}")
    return out


def _file_weights(root: Path, graph: dict, translated: "_Translated"):
    """The decoded weights of a variant file a stand-in carries (TFJSWeights or TFLiteWeights)."""
    if graph["format"] == "tflite":
        return TFLiteWeights(Path(root) / graph["file"])
    return TFJSWeights(Path(root) / graph["file"], translated)


class TFJSWeights:
    """The weights of a TF.js model.json, read from its shards and decoded to the values TF.js computes with."""

    def __init__(self, model_json: Path, translated: "_Translated | None" = None):
        from .errors import ManifestError
        from .targets.tfjs import PREFILL, WEIGHT_NAMES

        try:
            model = json.loads(Path(model_json).read_text())
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot read {model_json}: {e}") from None
        self.folder = Path(model_json).parent
        self.file = self.folder.name
        self.specs: dict[str, tuple[dict, list[str], int]] = {}  # name -> (spec, shard paths, byte offset)
        for group in model.get("weightsManifest", []):
            offset = 0
            for spec in group["weights"]:
                self.specs[spec["name"]] = (spec, group["paths"], offset)
                offset += _nbytes(spec)
        self.used: set[str] = set()
        self._sizes: dict[str, int] = {}
        # ONNX initializer -> TF.js weight (targets/tfjs.py records it): the prompt graph's, or where the file has
        # none (written without it), the step graph's, whose weights the prompt graph shares by name
        recorded = model.get("userDefinedMetadata", {}).get("rwkv_export", {}).get(WEIGHT_NAMES)
        self.names: dict[str, str] | None = None
        if recorded is not None:
            self.names = dict(recorded.get(PREFILL, recorded.get("step", {})))
        self._translated = translated

    def weight_name(self, onnx_name: str) -> str | None:
        """The TF.js weight of the prompt graph's initializer `onnx_name`, or None where the file has none (the
        initializer is then the module's own)."""
        if self.names is None:
            if self._translated is None:
                raise StandInError(f"{self.folder.name}/model.json does not record its weights' ONNX names "
                                   "(userDefinedMetadata.rwkv_export.onnx_weights)")
            names, step_weights = self._translated()
            tf = names.get(onnx_name)
            # a weight of the prompt graph alone (stored exactly in every variant) that the file lacks (a model.json
            # written without its prompt graph) is the module's own
            return None if tf is None or (tf not in step_weights and tf not in self.specs) else tf
        return self.names.get(onnx_name)

    def substitute(self, onnx_name: str, a: np.ndarray) -> np.ndarray:
        """The prompt graph's initializer `onnx_name` (the module's `a`) as this file has it, decoded, in a's dtype
        (TF.js's int32 for ONNX's int64 tables); `a` itself where the file has no such weight."""
        tf = self.weight_name(onnx_name)
        if tf is None:
            return a
        b = self.array(tf)
        if tuple(b.shape) != tuple(a.shape):
            raise StandInError(f"weight {tf} is {list(b.shape)} in the file, {list(a.shape)} in the prompt graph of "
                               f"the checkpoint: not this model's file")
        return b.astype(a.dtype) if b.dtype != a.dtype else b

    def quantized(self) -> set[str]:
        return {n for n, (spec, _, _) in self.specs.items() if spec.get("quantization")}

    def _size(self, path: str) -> int:
        if path not in self._sizes:
            self._sizes[path] = (self.folder / path).stat().st_size
        return self._sizes[path]

    def _bytes(self, paths: list[str], offset: int, n: int) -> np.ndarray:
        """n bytes from `offset` of the concatenation of the shards `paths`, read into one uint8 array."""
        out = np.empty(n, dtype=np.uint8)
        view, done, pos = memoryview(out), 0, 0
        for p in paths:
            size = self._size(p)
            if done < n and pos + size > offset + done:
                start = offset + done - pos
                with open(self.folder / p, "rb") as f:
                    f.seek(start)
                    done += f.readinto(view[done:done + min(n - done, size - start)])
            pos += size
        if done < n:
            raise StandInError(f"the shards of {self.folder.name} end before their weights do")
        return out

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
            return raw.view(np.dtype(spec["dtype"]) if spec["dtype"] != "bool" else np.bool_).reshape(shape)
        if q["dtype"] == "float16":
            return _decoded(raw.view(np.uint16), _float16_table()).reshape(shape)
        if q["dtype"] == "uint8":  # io_utils.decodeWeights: v * scale + min in a JS number, stored to a Float32Array
            table = (np.arange(256, dtype=np.float64) * float(q["scale"]) + float(q["min"])).astype(np.float32)
            return _decoded(raw, table).reshape(shape)
        raise StandInError(f"weight {name} is stored as {q['dtype']}, which the stand-in does not decode")


# codes decoded this many at a time (the index conversion's temporary is 8 bytes a code)
DECODE_BLOCK = 1 << 20
# rows of a weight decoded at a time where the stand-in's layout is its transpose (TFLiteWeights): measured 0.11 s for
# the 169M head (50277 x 768) against 0.24 s decoding into transposed blocks and 1.0 s for a whole transposed copy
TRANSPOSE_ROWS = 256
_FLOAT16 = []


def _float16_table() -> np.ndarray:
    """float32 of every float16 bit pattern (exact: float16 is a subset of float32)."""
    if not _FLOAT16:
        _FLOAT16.append(np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32))
    return _FLOAT16[0]


def _decoded(codes: np.ndarray, table: np.ndarray) -> np.ndarray:
    """table[codes], a block at a time: each code's value computed once, in the table (the same float64 or exact
    arithmetic per value as decoding element by element, ~20x faster at 169M shapes and no float64 copy)."""
    out = np.empty(codes.size, dtype=table.dtype)
    flat = codes.reshape(-1)
    for i in range(0, flat.size, DECODE_BLOCK):
        np.take(table, flat[i:i + DECODE_BLOCK], out=out[i:i + DECODE_BLOCK])
    return out


def _nbytes(spec: dict) -> int:
    n = int(np.prod([int(d) for d in spec["shape"]], dtype=np.int64))
    q = spec.get("quantization")
    if q:
        return n * {"uint8": 1, "uint16": 2, "float16": 2}[q["dtype"]]
    return n * {"float32": 4, "int32": 4, "bool": 1}[spec["dtype"]]


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
             link_tokens: int = LINK_TOKENS, steps: np.ndarray | None = None):
    """quality.evaluate_in_chunks of the variant `graph` through its stand-in (module docstring), sequentially with
    `gate`; a quality.Pending where the baseline must read on (call again with resume=it), else the report, whose
    "stand_in" entry is the link guard's (StandInLinkError where it fails). `steps`: the step graph's logits over the
    guard's tokens already (link_steps, from the parity session), else link_guard runs them in a session of its own."""
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
    link = link_guard(root, manifest, graph, head, base, LINK_TOL_FACTOR * tol, threads, steps=steps)
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


def link_steps(runner, base, k: int = LINK_TOKENS) -> np.ndarray:
    """The step graph's logits [k, V] (float64) after each of the eval text's first k tokens, from a fresh state:
    the link guard's side of the step graph. A step graph's job runs them in its parity session (check._graph_job),
    which saves the guard a session of its own (a TF.js Node process: start, weight decoding and XNNPACK's weight
    packing, ~2.2 s CPU at 169M; a LiteRT interpreter) for the same numbers: a step depends on its inputs alone."""
    state, steps = runner.new_state(), []
    for t in base.tokens[:min(k, len(base.tokens))]:
        lv, state = runner.step(t, state)
        steps.append(np.asarray(lv, dtype=np.float64).reshape(-1))
    return np.array(steps)


def link_guard(root: Path, manifest: dict, graph: dict, head: np.ndarray, base, bound: float,
               threads: int = 1, steps: np.ndarray | None = None) -> dict:
    """`head` (the stand-in's logits after each of the eval text's first len(head) tokens) against the step graph run
    token by token over them (`steps`, link_steps' rows, where the caller ran them; else run here): max|Δ| /
    std(step logits) within `bound`, or StandInLinkError."""
    from .check import make_runner

    k = len(head)
    if steps is None or len(steps) != k:
        runner = make_runner(Path(root), manifest, graph, threads=threads)
        try:
            steps = link_steps(runner, base, k)
        finally:
            if hasattr(runner, "close"):
                runner.close()
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
