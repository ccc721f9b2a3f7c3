"""Write a TFLite flatbuffer from one of our ONNX graphs, op by op (builtin ops only): the fp32 step and prompt files
of the TFLite target, without a converter.

Why: litert-torch (torch.export -> StableHLO -> TFLite) took 265 of the 291 s of a 169M export and most of its
4.55 GB (issue 19). Our ONNX graphs (arch/rwkvN/onnx_graph.py) are written node by node in milliseconds and hold a
few dozen op types; each has a TFLite builtin or a short sequence of them, so the graph is translated here as
targets/tfjs.py translates it for TF.js. The schema is ai-edge-litert's (schema_py_generated's object API); the
weights are read from the ONNX external-data file straight into the flatbuffer being built, one at a time.

What a TFLite file needs that the ONNX graph does not say, and how it is given:
- Static shapes. The caller fixes every input's shape (the prompt graph's T: its fixed chunk); from there every
  value's shape is known, and every value computed from shapes and constants alone (the prompt graphs' T, block and
  index arithmetic: Size, Range, Div, Mod, Expand of constants, the chunk guard's comparison) is folded here, in
  numpy, into a constant. What is left are the ops on activations.
- int32 for every integer (TFLite kernels index with int32; TF.js has no int64): the token inputs are int32, an int64
  constant is stored as int32 (one that does not fit is an error).
- Layouts: ONNX's MatMul x @ W with a constant [in, out] W is FULLY_CONNECTED with the weight stored [out, in]
  (transposed as it is copied; the layout ai-edge-quantizer and XNNPACK expect); Gather of rows of a constant table
  by a 1-D index tensor is EMBEDDING_LOOKUP (which ai-edge-quantizer quantizes); LayerNormalization is the sequence
  MEAN, SQUARED_DIFFERENCE, MEAN, ADD eps, RSQRT, SUB, MUL, MUL, ADD (what TFLite's converter writes for it).
- Names: signature `signature` over the ONNX input/output names; the subgraph's tensors `<signature>_<name>` (inputs)
  and `<signature>_<name>_output` (outputs), the names litert-torch gave them, which tfjs-tflite clients bind to
  (it has no signature API). Signature entries in name order, as litert-torch wrote them.
- Size: a flatbuffer addresses at most 2 GB. A model whose weights fit (with INLINE_LIMIT's margin) has them inside
  the flatbuffer, readable by every TFLite runtime; a larger one (RWKV-4 1.5B: 6 GB in fp32) is written in the
  layout TFLite added for that: the flatbuffer of the graph, then each weight after it at an offset its Buffer
  names (LiteRT reads it; tfjs-tflite's older build and a 2 GB wasm heap could not open such a model anyway).

An ONNX op with no translation here is a one-line error naming it (and its node).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import RwkvExportError

BUFFER_ALIGN = 16  # weights inside the flatbuffer: what TFLite's converter aligns them to (SIMD loads)
OFFSET_ALIGN = 64  # weights after the flatbuffer (the > 2 GB layout)
INLINE_LIMIT = 2**31 - 2**24  # a flatbuffer addresses 2 GB; keep a margin for the graph itself
STREAM_BYTES = 16 * 2**20  # a weight is copied into the file in pieces of about this size
FOLD_MAX_BYTES = 64 * 2**20  # a folded constant larger than this is an error (none of ours is near it)
_INT32 = (-(2**31), 2**31 - 1)

# op -> version written in its OperatorCode: the version litert-torch's files carry for the same op (FULLY_CONNECTED
# 5: keep_num_dims), else 1 (BROADCAST_TO's first builtin version is 2). A runtime registers kernels by (op, version).
_VERSIONS = {"FULLY_CONNECTED": 5, "BROADCAST_TO": 2}

_NP_TO_TFL = {"float32": "FLOAT32", "float16": "FLOAT16", "int32": "INT32", "bool": "BOOL", "int8": "INT8",
              "uint8": "UINT8"}
_ONNX_NP = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


# -- values -----------------------------------------------------------------------------------------------------------
class _Const:
    """A constant: an array in memory, or a weight in the ONNX external-data file (read when it is needed: as it is
    copied into the flatbuffer, or when an op on constants folds it)."""

    def __init__(self, array=None, *, file=None, offset=0, shape=(), dtype="float32", name=None):
        self._array, self.file, self.offset, self.name = array, file, offset, name
        self.shape = tuple(array.shape) if array is not None else tuple(int(d) for d in shape)
        self.dtype = array.dtype.name if array is not None else dtype

    @property
    def external(self) -> bool:
        return self._array is None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def get(self) -> np.ndarray:
        if self._array is not None:
            return self._array
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            a = np.fromfile(f, dtype=self.dtype, count=int(np.prod(self.shape, dtype=np.int64)))
        return a.reshape(self.shape)


class FileRange:
    """Bytes that lie in a file already (a weight of an output written before: the step file's, which the prompt
    file of the same model holds too), copied into the output by the kernel (os.copy_file_range: no read into this
    process, no second transpose or quantization of the same weight), with ordinary reads and writes where the
    platform or file system has no such copy."""

    def __init__(self, path: Path, offset: int, nbytes: int, name: str):
        self.path, self.offset, self.name, self._nbytes = Path(path), int(offset), name, int(nbytes)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def write_to(self, f) -> None:
        f.flush()
        start = f.tell()
        with open(self.path, "rb") as src:
            done = _copy_range(src, f, self.offset, start, self._nbytes)
        if done != self._nbytes:
            raise RwkvExportError(f"{self.path.name} ends before weight {self.name}")
        f.seek(start + done)


def _copy_range(src, f, src_offset: int, dst_offset: int, n: int) -> int:
    """Copy n bytes of file `src` at src_offset into file `f` at dst_offset (f flushed, its position left for the
    caller to set); returns the bytes copied (fewer: src ended)."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                k = os.copy_file_range(src.fileno(), f.fileno(), n - done, src_offset + done, dst_offset + done)
                if not k:
                    return done
                done += k
            return done
        except OSError:  # no such copy between these files (file system, kernel): the same bytes by reads
            pass
    buf = bytearray(min(n - done, STREAM_BYTES) or 1)
    src.seek(src_offset + done)
    f.seek(dst_offset + done)
    while done < n:
        k = src.readinto(memoryview(buf)[:min(len(buf), n - done)])
        if not k:
            break
        f.write(memoryview(buf)[:k])
        done += k
    f.flush()
    return done


class _Tensor:
    """A value computed at run time: its TFLite tensor index, static shape and numpy dtype name."""

    def __init__(self, index: int, shape, dtype: str):
        self.index, self.shape, self.dtype = index, tuple(int(d) for d in shape), dtype


# -- the flatbuffer ---------------------------------------------------------------------------------------------------
class _Weight:
    """A Buffer whose bytes go into the file, not into memory: packing reserves its (aligned) place in the
    flatbuffer without writing it, and write_to() streams it there from its source afterwards (a FULLY_CONNECTED
    weight transposed on the way). In the > 2 GB layout it is a Buffer with an offset and size only."""

    def __init__(self, const: _Const, transpose: bool = False):
        self.const, self.transpose = const, transpose
        self.offset = self.size = 0  # set for the > 2 GB layout
        self.from_end = None  # where packing placed the bytes: their distance from the builder's end
        self.file_offset = None  # where write_tflite put them in the file (a later file may copy them: FileRange)

    @property
    def nbytes(self) -> int:
        return self.const.nbytes

    def write_to(self, f) -> None:
        c = self.const
        if hasattr(c, "write_to"):  # bytes made as they are written (a quantized weight: tflite_quant.py)
            c.write_to(f)
        elif self.transpose:  # [in, out] -> [out, in], in blocks of rows of the result (one copy of the weight held)
            a = c.get()
            rows = max(1, STREAM_BYTES // max(1, a.shape[0] * a.itemsize))
            for j in range(0, a.shape[1], rows):
                f.write(np.ascontiguousarray(a[:, j:j + rows].T).data)
        elif not c.external:
            f.write(np.ascontiguousarray(c.get()).reshape(-1).view(np.uint8).data)
        else:
            FileRange(c.file, c.offset, self.nbytes, c.name).write_to(f)

    def Pack(self, builder):
        schema = _schema()
        n = self.nbytes
        vec = None
        if not self.size:
            builder.StartVector(1, n, BUFFER_ALIGN)
            builder.head -= n  # left unwritten: write_tflite streams the weight into this place of the file
            self.from_end = len(builder.Bytes) - builder.head
            vec = builder.EndVector()
        schema.BufferStart(builder)
        if vec is not None:
            schema.BufferAddData(builder, vec)
        schema.BufferAddOffset(builder, self.offset)
        schema.BufferAddSize(builder, self.size)
        return schema.BufferEnd(builder)


class _Model:
    """One subgraph under construction: tensors, operators, operator codes, buffers (buffer 0: the empty one every
    activation points at)."""

    def __init__(self):
        schema = _schema()
        self.schema = schema
        self.tensors: list = []
        self.operators: list = []
        self.opcodes: dict[str, int] = {}
        self.codes: list = []
        self.buffers: list = [schema.BufferT()]
        self.weights: list[_Weight] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, int] = {}

    def unique(self, name: str) -> str:
        base, i = name, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def tensor(self, name: str, shape, dtype: str, buffer: int = 0) -> int:
        t = self.schema.TensorT()
        t.name = self.unique(name)
        t.shape = np.asarray(shape, np.int32)
        t.type = getattr(self.schema.TensorType, _NP_TO_TFL[dtype])
        t.buffer = buffer
        t.hasRank = True
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, c: _Const, hint: str, transpose: bool = False) -> int:
        """The tensor holding constant `c` (one per constant and layout: a weight read by two ops is stored once)."""
        key = (id(c), transpose)
        if key in self._consts:
            return self._consts[key]
        if c.dtype == "int64":
            a = c.get()
            if a.size and (a.max() > _INT32[1] or a.min() < _INT32[0]):
                raise RwkvExportError(f"constant {hint} does not fit int32, which TFLite indexes with")
            c2 = _Const(a.astype(np.int32), name=c.name)
        elif c.dtype in _NP_TO_TFL:
            c2 = c
        else:
            raise RwkvExportError(f"constant {hint} has dtype {c.dtype}; the TFLite writer stores float32, float16, "
                                  "int32 (int64) and bool")
        shape = c2.shape[::-1] if transpose else c2.shape
        w = _Weight(c2, transpose)
        self.buffers.append(w)
        self.weights.append(w)
        idx = self.tensor(c.name or hint, shape, c2.dtype, buffer=len(self.buffers) - 1)
        self._consts[key] = idx
        return idx

    def array(self, a, hint: str) -> int:
        return self.const(_Const(np.asarray(a)), hint)

    def op(self, name: str, inputs: list[int], outputs: list[int], options=None) -> None:
        schema = self.schema
        if name not in self.opcodes:
            code = getattr(schema.BuiltinOperator, name)
            oc = schema.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
            oc.version = _VERSIONS.get(name, 1)
            self.opcodes[name] = len(self.codes)
            self.codes.append(oc)
        o = schema.OperatorT()
        o.opcodeIndex = self.opcodes[name]
        o.inputs = np.asarray(inputs, np.int32)
        o.outputs = np.asarray(outputs, np.int32)
        if options is not None:
            o.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self.operators.append(o)

    def model(self, signature: str, inputs: dict[str, int], outputs: dict[str, int], description: str):
        schema = self.schema
        sg = schema.SubGraphT()
        sg.tensors, sg.operators = self.tensors, self.operators
        sg.inputs = np.asarray(list(inputs.values()), np.int32)
        sg.outputs = np.asarray(list(outputs.values()), np.int32)
        sg.name = "main"
        sd = schema.SignatureDefT()
        sd.signatureKey, sd.subgraphIndex = signature, 0

        def maps(d):
            out = []
            for k in sorted(d):
                m = schema.TensorMapT()
                m.name, m.tensorIndex = k, d[k]
                out.append(m)
            return out

        sd.inputs, sd.outputs = maps(inputs), maps(outputs)
        m = schema.ModelT()
        m.version, m.description = 3, description
        m.operatorCodes, m.subgraphs, m.buffers, m.signatureDefs = self.codes, [sg], self.buffers, [sd]
        return m


def _pack(model, size_hint: int):
    """(builder memory, head): the finished flatbuffer is memory[head:], the weights' places in it still unwritten.
    The memory is an anonymous mapping of size_hint bytes (enough for the graph and every weight): pages that are
    never written (the weights') are never allocated, so packing costs the graph's bytes, not the model's."""
    import mmap

    import flatbuffers

    b = flatbuffers.Builder(0)
    b.Bytes, b.head = mmap.mmap(-1, size_hint), size_hint
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    return b.Bytes, b.Head()


# -- ONNX -> TFLite ---------------------------------------------------------------------------------------------------
def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _ints(c: _Const) -> list[int]:
    return [int(v) for v in c.get().reshape(-1)]


class _Translation:
    """One ONNX graph into one _Model. `shapes`: the static shape of every graph input; `dtypes`: the TFLite-side
    dtype of an input where it differs from the graph's (int64 tokens -> int32)."""

    def __init__(self, model, base_dir: Path | None, signature: str, shapes: dict[str, list]):
        from onnx import numpy_helper

        self.onnx, self.signature = model, signature
        self.m = _Model()
        self.values: dict[str, _Const | _Tensor] = {}
        for init in model.graph.initializer:
            dims = tuple(int(d) for d in init.dims)
            dtype = _ONNX_NP.get(init.data_type)
            if dtype is None:
                raise RwkvExportError(f"initializer {init.name} has ONNX dtype {init.data_type}; not handled")
            if init.data_location == 1:  # external
                ext = {e.key: e.value for e in init.external_data}
                if base_dir is None:
                    raise RwkvExportError(f"initializer {init.name} is external data, and no folder was given")
                self.values[init.name] = _Const(file=Path(base_dir) / ext["location"], offset=int(ext.get("offset", 0)),
                                                shape=dims, dtype=dtype, name=init.name)
            else:
                self.values[init.name] = _Const(numpy_helper.to_array(init), name=init.name)
        self.inputs: dict[str, int] = {}
        for v in model.graph.input:
            if v.name in self.values:
                continue
            if v.name not in shapes:
                raise RwkvExportError(f"no static shape given for graph input {v.name}")
            dtype = _ONNX_NP[v.type.tensor_type.elem_type]
            dtype = "int32" if dtype == "int64" else dtype
            idx = self.m.tensor(f"{signature}_{v.name}", shapes[v.name], dtype)
            self.values[v.name] = _Tensor(idx, shapes[v.name], dtype)
            self.inputs[v.name] = idx

    # -- helpers ------------------------------------------------------------------------------------------------
    def idx(self, v, hint: str) -> int:
        return v.index if isinstance(v, _Tensor) else self.m.const(v, hint)

    def out(self, name: str, shape, dtype: str) -> _Tensor:
        t = _Tensor(self.m.tensor(name, shape, dtype), shape, dtype)
        return t

    def emit(self, op: str, ins: list, name: str, shape, dtype: str, options=None) -> _Tensor:
        t = self.out(name, shape, dtype)
        self.m.op(op, [self.idx(v, f"{name}/in{i}") if v is not None else -1 for i, v in enumerate(ins)], [t.index],
                  options)
        return t

    def options(self, kind: str, **fields):
        o = getattr(self.m.schema, kind + "T")()
        for k, v in fields.items():
            setattr(o, k, v)
        return o

    # -- the graph ------------------------------------------------------------------------------------------------
    def run(self) -> "object":
        """Translate every node; return the ModelT."""
        for node in self.onnx.graph.node:
            ins = [self.values[n] if n else None for n in node.input]
            for n, v in zip(node.input, ins):
                if n and v is None:
                    raise RwkvExportError(f"ONNX value {n} is read before it is computed (node {node.name})")
            consts = all(v is None or isinstance(v, _Const) for v in ins)
            if node.op_type in ("Shape", "Size") or (consts and node.op_type != "Constant"):
                outs = self.fold(node, ins)
            elif node.op_type == "Constant":
                from onnx import numpy_helper

                outs = [_Const(numpy_helper.to_array(_attrs(node)["value"]))]
            else:
                outs = self.translate(node, ins)
            if len(outs) != len(node.output):
                raise RwkvExportError(f"ONNX op {node.op_type} (node {node.name}): {len(outs)} outputs translated, "
                                      f"{len(node.output)} in the graph")
            for name, v in zip(node.output, outs):
                if name:
                    self.values[name] = v
        outputs = {}
        for v in self.onnx.graph.output:
            val = self.values[v.name]
            want = f"{self.signature}_{v.name}_output"
            if isinstance(val, _Tensor) and val.index not in outputs.values() and val.index not in self.inputs.values():
                t = self.m.tensors[val.index]
                self.m._names.discard(t.name)
                t.name = self.m.unique(want)
                outputs[v.name] = val.index
            else:  # a constant, an input or a value already output: a copy under the output's name
                shape = val.shape
                t = self.emit("RESHAPE", [val, _Const(np.asarray(shape, np.int32))], want, shape, _tfl_dtype(val),
                              self.options("ReshapeOptions", newShape=list(shape)))
                outputs[v.name] = t.index
        desc = "rwkv-export (ONNX graph -> TFLite)"
        return self.m.model(self.signature, self.inputs, outputs, desc)

    # -- folding ----------------------------------------------------------------------------------------------------
    def fold(self, node, ins) -> list[_Const]:
        """An op on constants (and Shape/Size of any value: shapes are static) evaluated here."""
        op, a = node.op_type, _attrs(node)
        if op == "Shape":
            shape = np.asarray(ins[0].shape, np.int64)
            return [_Const(shape[a.get("start", 0):a.get("end", len(shape))])]
        if op == "Size":
            return [_Const(np.asarray(int(np.prod(ins[0].shape, dtype=np.int64)), np.int64))]
        arrays = [v.get() if v is not None else None for v in ins]
        res = _evaluate(node, arrays, a)
        for r in res:
            if r.nbytes > FOLD_MAX_BYTES:
                raise RwkvExportError(f"ONNX op {op} (node {node.name}) on constants gives {r.nbytes} bytes; "
                                      "too large to fold")
        # np.ascontiguousarray would make a 0-d result 1-d
        return [_Const(np.asarray(r) if np.asarray(r).flags.c_contiguous else np.asarray(r).copy()) for r in res]

    # -- ops on run-time values -----------------------------------------------------------------------------------
    def translate(self, node, ins) -> list:
        op, a, name = node.op_type, _attrs(node), node.output[0]
        x = ins[0]
        binary = {"Add": "ADD", "Sub": "SUB", "Mul": "MUL", "Div": "DIV", "Greater": "GREATER", "Less": "LESS",
                  "Equal": "EQUAL", "And": "LOGICAL_AND"}
        unary = {"Exp": "EXP", "Sigmoid": "LOGISTIC", "Relu": "RELU", "Tanh": "TANH", "Neg": "NEG", "Sqrt": "SQRT",
                 "Abs": "ABS"}
        if op in binary:
            b = ins[1]
            shape = np.broadcast_shapes(x.shape, b.shape)
            if op == "Add":  # x + 0 (the prompt graphs' chunk guard, folded: no NaN at a fixed chunk)
                for keep, zero in ((x, b), (b, x)):
                    if isinstance(zero, _Const) and tuple(shape) == keep.shape and not np.any(zero.get()):
                        return [keep]
            dt = "bool" if op in ("Greater", "Less", "Equal", "And") else _tfl_dtype(x)
            if op == "Div" and _tfl_dtype(x) != "float32":
                raise RwkvExportError(f"integer Div (node {node.name}) on run-time values has no TFLite translation "
                                      "here (ONNX truncates, TFLite's FLOOR_DIV floors)")
            opts = {"ADD": "AddOptions", "SUB": "SubOptions", "MUL": "MulOptions", "DIV": "DivOptions"}.get(binary[op])
            return [self.emit(binary[op], [x, b], name, shape, dt, self.options(opts) if opts else None)]
        if op in unary:
            return [self.emit(unary[op], [x], name, x.shape, _tfl_dtype(x))]
        if op == "Mod":
            if a.get("fmod", 0) or _tfl_dtype(x) != "int32":
                raise RwkvExportError(f"Mod (node {node.name}) on run-time values: only integer floor modulo is "
                                      "handled")
            return [self.emit("FLOOR_MOD", [x, ins[1]], name, np.broadcast_shapes(x.shape, ins[1].shape), "int32")]
        if op in ("Max", "Min"):
            tfl = "MAXIMUM" if op == "Max" else "MINIMUM"
            res = x
            for i, other in enumerate(ins[1:]):
                last = i == len(ins) - 2
                res = self.emit(tfl, [res, other], name if last else f"{name}/{i}",
                                np.broadcast_shapes(res.shape, other.shape), _tfl_dtype(x))
            return [res]
        if op == "Clip":
            lo, hi = (list(ins) + [None, None])[1:3]
            res = x
            if lo is not None:
                res = self.emit("MAXIMUM", [res, lo], name if hi is None else f"{name}/min", x.shape, _tfl_dtype(x))
            if hi is not None:
                res = self.emit("MINIMUM", [res, hi], name, x.shape, _tfl_dtype(x))
            return [res]
        if op == "Where":
            shape = np.broadcast_shapes(*(v.shape for v in ins))
            return [self.emit("SELECT_V2", ins, name, shape, _tfl_dtype(ins[1]))]
        if op == "Cast":
            to = _ONNX_NP[a["to"]]
            to = "int32" if to == "int64" else to
            if to == _tfl_dtype(x):
                return [x]
            opts = self.options("CastOptions", inDataType=getattr(self.m.schema.TensorType, _NP_TO_TFL[x.dtype]),
                                outDataType=getattr(self.m.schema.TensorType, _NP_TO_TFL[to]))
            return [self.emit("CAST", [x], name, x.shape, to, opts)]
        if op == "Identity":
            return [x]
        if op == "MatMul":
            return [self._matmul(node, x, ins[1], name)]
        if op == "LayerNormalization":
            return [self._layer_norm(node, ins, a, name)]
        if op == "Gather":
            return [self._gather(node, x, ins[1], int(a.get("axis", 0)), name)]
        if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
            shape = _static_shape(node, x.shape, ins, a)
            return [self.emit("RESHAPE", [x, _Const(np.asarray(shape, np.int32))], name, shape, _tfl_dtype(x),
                              self.options("ReshapeOptions", newShape=list(shape)))]
        if op == "Slice":
            return [self._slice(node, x, ins, name)]
        if op == "Split":
            return self._split(node, x, ins, a)
        if op == "Concat":
            axis = int(a["axis"]) % len(x.shape)
            shape = list(x.shape)
            shape[axis] = sum(v.shape[axis] for v in ins)
            return [self.emit("CONCATENATION", list(ins), name, shape, _tfl_dtype(x),
                              self.options("ConcatenationOptions", axis=axis))]
        if op == "Transpose":
            perm = list(a.get("perm") or range(len(x.shape) - 1, -1, -1))
            return [self.emit("TRANSPOSE", [x, _Const(np.asarray(perm, np.int32))], name,
                              [x.shape[p] for p in perm], _tfl_dtype(x))]
        if op == "Expand":
            target = _ints(self._const_operand(node, ins[1], "shape"))
            shape = np.broadcast_shapes(x.shape, tuple(target))
            if tuple(shape) == x.shape:
                return [x]
            return [self.emit("BROADCAST_TO", [x, _Const(np.asarray(shape, np.int32))], name, shape, _tfl_dtype(x))]
        if op in ("ReduceSum", "ReduceL2", "ReduceMean"):
            return [self._reduce(node, x, ins, a, name)]
        if op == "CumSum":
            axis = _ints(self._const_operand(node, ins[1], "axis"))[0] % len(x.shape)
            return [self.emit("CUMSUM", [x, _Const(np.asarray(axis, np.int32))], name, x.shape, _tfl_dtype(x),
                              self.options("CumsumOptions", exclusive=bool(a.get("exclusive", 0)),
                                           reverse=bool(a.get("reverse", 0))))]
        raise RwkvExportError(f"ONNX op {op} (node {node.name}) has no TFLite translation in this writer")

    def _const_operand(self, node, v, what: str) -> _Const:
        if not isinstance(v, _Const):
            raise RwkvExportError(f"{node.op_type} (node {node.name}): its {what} is computed at run time; only a "
                                  "constant (or a value of the static shapes) is handled")
        return v

    def _matmul(self, node, x, w, name):
        if len(x.shape) < 2 or len(w.shape) < 2:
            raise RwkvExportError(f"MatMul (node {node.name}) on ranks {len(x.shape)}x{len(w.shape)}: only matmuls "
                                  "of rank >= 2 are handled")
        if isinstance(w, _Const) and len(w.shape) == 2 and _tfl_dtype(x) == "float32":
            # FULLY_CONNECTED over the last dim, weight [out, in]; rank > 2 inputs as [rows, in] and back
            k, n = w.shape
            lead = x.shape[:-1]
            flat = x
            if len(x.shape) > 2:
                rows = int(np.prod(lead))
                flat = self.emit("RESHAPE", [x, _Const(np.asarray([rows, k], np.int32))], f"{name}/rows", [rows, k],
                                 "float32", self.options("ReshapeOptions", newShape=[rows, k]))
            t = self.out(name if flat is x else f"{name}/fc", [flat.shape[0], n], "float32")
            self.m.op("FULLY_CONNECTED", [flat.index, self.m.const(w, f"{name}/weight", transpose=True), -1],
                      [t.index], self.options("FullyConnectedOptions", keepNumDims=False))
            if flat is x:
                return t
            shape = [*lead, n]
            return self.emit("RESHAPE", [t, _Const(np.asarray(shape, np.int32))], name, shape, "float32",
                             self.options("ReshapeOptions", newShape=shape))
        # batched: leading dims broadcast (ONNX and TFLite's BATCH_MATMUL alike)
        batch = np.broadcast_shapes(x.shape[:-2], w.shape[:-2])
        if x.shape[-1] != w.shape[-2]:
            raise RwkvExportError(f"MatMul (node {node.name}): shapes {x.shape} and {w.shape} do not multiply")
        return self.emit("BATCH_MATMUL", [x, w], name, [*batch, x.shape[-2], w.shape[-1]], "float32",
                         self.options("BatchMatMulOptions", adjX=False, adjY=False))

    def _layer_norm(self, node, ins, a, name):
        x = ins[0]
        rank = len(x.shape)
        axis = int(a.get("axis", -1)) % rank
        axes = _Const(np.arange(axis, rank, dtype=np.int32))
        keep = self.options("ReducerOptions", keepDims=True)
        red = [*x.shape[:axis], *([1] * (rank - axis))]
        mean = self.emit("MEAN", [x, axes], f"{name}/mean", red, "float32", keep)
        sq = self.emit("SQUARED_DIFFERENCE", [x, mean], f"{name}/sq", x.shape, "float32")
        var = self.emit("MEAN", [sq, axes], f"{name}/var", red, "float32", self.options("ReducerOptions",
                                                                                        keepDims=True))
        eps = _Const(np.asarray(a.get("epsilon", 1e-5), np.float32))
        veps = self.emit("ADD", [var, eps], f"{name}/var_eps", red, "float32", self.options("AddOptions"))
        rstd = self.emit("RSQRT", [veps], f"{name}/rstd", red, "float32")
        d = self.emit("SUB", [x, mean], f"{name}/centered", x.shape, "float32", self.options("SubOptions"))
        scale, bias = (list(ins) + [None, None])[1:3]
        last = bias is None and scale is None
        y = self.emit("MUL", [d, rstd], name if last else f"{name}/normed", x.shape, "float32",
                      self.options("MulOptions"))
        if scale is not None:
            y = self.emit("MUL", [y, scale], name if bias is None else f"{name}/scaled", x.shape, "float32",
                          self.options("MulOptions"))
        if bias is not None:
            y = self.emit("ADD", [y, bias], name, x.shape, "float32", self.options("AddOptions"))
        return y

    def _gather(self, node, data, indices, axis, name):
        axis %= len(data.shape)
        shape = [*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]]
        if isinstance(data, _Const) and axis == 0 and len(indices.shape) == 1 and len(data.shape) >= 2 and isinstance(
                indices, _Tensor):
            return self.emit("EMBEDDING_LOOKUP", [indices, data], name, shape, _tfl_dtype(data))
        if isinstance(indices, _Const):  # negative indices count from the end in ONNX
            ix = indices.get().astype(np.int64)
            indices = _Const(np.where(ix < 0, ix + data.shape[axis], ix).astype(np.int32))
        return self.emit("GATHER", [data, indices], name, shape, _tfl_dtype(data),
                         self.options("GatherOptions", axis=axis, batchDims=0))

    def _slice(self, node, x, ins, name):
        ins = list(ins) + [None] * (5 - len(ins))
        starts, ends = (_ints(self._const_operand(node, v, w)) for v, w in ((ins[1], "starts"), (ins[2], "ends")))
        axes = _ints(self._const_operand(node, ins[3], "axes")) if ins[3] is not None else list(range(len(starts)))
        steps = _ints(self._const_operand(node, ins[4], "steps")) if ins[4] is not None else [1] * len(starts)
        rank = len(x.shape)
        begin, end, stride = [0] * rank, list(x.shape), [1] * rank
        for s, e, ax, st in zip(starts, ends, axes, steps):
            ax %= rank
            begin[ax], end[ax], stride[ax] = slice(s, e, st).indices(x.shape[ax])
        shape = [len(range(b, e, s)) for b, e, s in zip(begin, end, stride)]
        if all(s == 1 for s in stride):
            return self.emit("SLICE", [x, _Const(np.asarray(begin, np.int32)), _Const(np.asarray(shape, np.int32))],
                             name, shape, _tfl_dtype(x))
        if any(s < 0 for s in stride):
            raise RwkvExportError(f"Slice (node {node.name}) with a negative step is not handled")
        return self.emit("STRIDED_SLICE", [x, _Const(np.asarray(begin, np.int32)), _Const(np.asarray(end, np.int32)),
                                           _Const(np.asarray(stride, np.int32))], name, shape, _tfl_dtype(x),
                         self.options("StridedSliceOptions"))

    def _split(self, node, x, ins, a):
        axis = int(a.get("axis", 0)) % len(x.shape)
        n = len(node.output)
        if len(ins) > 1 and ins[1] is not None:
            sizes = _ints(self._const_operand(node, ins[1], "split sizes"))
        else:
            size = -(-x.shape[axis] // n)
            sizes = [min(size, x.shape[axis] - i * size) for i in range(n)]
        if sum(sizes) != x.shape[axis] or len(sizes) != n:
            raise RwkvExportError(f"Split (node {node.name}): sizes {sizes} do not split dim {x.shape[axis]} in {n}")
        outs = []
        for o, s in zip(node.output, sizes):
            shape = list(x.shape)
            shape[axis] = s
            outs.append(self.out(o or f"{node.name}/unused", shape, _tfl_dtype(x)))
        self.m.op("SPLIT_V", [x.index, self.m.array(np.asarray(sizes, np.int32), f"{node.name}/sizes"),
                              self.m.array(np.asarray(axis, np.int32), f"{node.name}/axis")],
                  [t.index for t in outs], self.options("SplitVOptions", numSplits=n))
        return outs

    def _reduce(self, node, x, ins, a, name):
        if len(ins) > 1 and ins[1] is not None:
            axes = _ints(self._const_operand(node, ins[1], "axes"))
        else:
            axes = list(a.get("axes", []))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(len(x.shape)))
        rank = len(x.shape)
        axes = sorted(ax % rank for ax in axes)
        keep = bool(a.get("keepdims", 1))
        shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else [
            d for i, d in enumerate(x.shape) if i not in axes]
        ax = _Const(np.asarray(axes, np.int32))
        opts = self.options("ReducerOptions", keepDims=keep)
        if node.op_type == "ReduceMean":
            return self.emit("MEAN", [x, ax], name, shape, "float32", opts)
        if node.op_type == "ReduceSum":
            return self.emit("SUM", [x, ax], name, shape, _tfl_dtype(x), opts)
        sq = self.emit("MUL", [x, x], f"{name}/sq", x.shape, "float32", self.options("MulOptions"))
        s = self.emit("SUM", [sq, ax], f"{name}/sum_sq", shape, "float32", opts)
        return self.emit("SQRT", [s], name, shape, "float32")


def _tfl_dtype(v) -> str:
    return "int32" if v.dtype == "int64" else v.dtype


def _static_shape(node, shape, ins, a) -> list[int]:
    """The output shape of a Reshape / Squeeze / Unsqueeze / Flatten of a value of static `shape`."""
    op = node.op_type
    size = int(np.prod(shape, dtype=np.int64))
    if op == "Reshape":
        if not isinstance(ins[1], _Const):
            raise RwkvExportError(f"Reshape (node {node.name}): the shape is computed at run time")
        target = _ints(ins[1])
        if not a.get("allowzero", 0):
            target = [shape[i] if d == 0 else d for i, d in enumerate(target)]
        if -1 in target:
            known = int(np.prod([d for d in target if d != -1], dtype=np.int64))
            target[target.index(-1)] = size // known if known else 0
        out = target
    elif op == "Flatten":
        axis = int(a.get("axis", 1)) % (len(shape) + 1)
        out = [int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64))]
    else:
        axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(a.get("axes", []))
        if op == "Squeeze":
            axes = [ax % len(shape) for ax in axes] if axes else [i for i, d in enumerate(shape) if d == 1]
            out = [d for i, d in enumerate(shape) if i not in axes]
        else:
            rank = len(shape) + len(axes)
            axes = sorted(ax % rank for ax in axes)
            it = iter(shape)
            out = [1 if i in axes else next(it) for i in range(rank)]
    if int(np.prod(out, dtype=np.int64)) != size:
        raise RwkvExportError(f"{op} (node {node.name}): shape {list(shape)} cannot become {out}")
    return [int(d) for d in out]


def _evaluate(node, x: list, a: dict) -> list[np.ndarray]:
    """numpy semantics of the ONNX ops our graphs apply to constants (opset 18)."""
    op = node.op_type
    if op in ("Add", "Sub", "Mul"):
        return [{"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](x[0], x[1]).astype(x[0].dtype)]
    if op == "Div":
        if np.issubdtype(x[0].dtype, np.integer):  # ONNX truncates toward zero
            q = np.abs(x[0]) // np.abs(x[1]) * np.sign(x[0]) * np.sign(x[1])
            return [q.astype(x[0].dtype)]
        return [(x[0] / x[1]).astype(x[0].dtype)]
    if op == "Mod":
        return [(np.fmod if a.get("fmod", 0) else np.mod)(x[0], x[1]).astype(x[0].dtype)]
    if op in ("Max", "Min"):
        f = np.maximum if op == "Max" else np.minimum
        r = x[0]
        for y in x[1:]:
            r = f(r, y)
        return [r]
    if op in ("Greater", "Less", "Equal"):
        return [{"Greater": np.greater, "Less": np.less, "Equal": np.equal}[op](x[0], x[1])]
    if op == "And":
        return [np.logical_and(x[0], x[1])]
    if op == "Where":
        return [np.where(x[0], x[1], x[2])]
    unary = {"Exp": np.exp, "Neg": np.negative, "Sqrt": np.sqrt, "Abs": np.abs, "Tanh": np.tanh,
             "Relu": lambda v: np.maximum(v, 0), "Sigmoid": lambda v: 1 / (1 + np.exp(-v))}
    if op in unary:
        return [unary[op](x[0]).astype(x[0].dtype)]
    if op == "Cast":
        return [x[0].astype(_ONNX_NP[a["to"]])]
    if op == "Identity":
        return [x[0]]
    if op == "Clip":
        lo, hi = (x + [None, None])[1:3]
        r = x[0]
        if lo is not None:
            r = np.maximum(r, lo)
        if hi is not None:
            r = np.minimum(r, hi)
        return [r]
    if op == "Concat":
        return [np.concatenate(x, axis=int(a["axis"]))]
    if op == "Split":
        axis = int(a.get("axis", 0))
        n = len(node.output)
        sizes = [int(s) for s in x[1].reshape(-1)] if len(x) > 1 and x[1] is not None else None
        if sizes is None:
            size = -(-x[0].shape[axis] // n)
            sizes = [min(size, x[0].shape[axis] - i * size) for i in range(n)]
        return np.split(x[0], np.cumsum(sizes)[:-1], axis=axis)
    if op == "Gather":
        return [np.take(x[0], x[1].astype(np.int64), axis=int(a.get("axis", 0)))]
    if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        consts = [_Const(v) if v is not None else None for v in x]
        return [x[0].reshape(_static_shape(node, x[0].shape, consts, a))]
    if op == "Slice":
        starts, ends = x[1].reshape(-1), x[2].reshape(-1)
        axes = x[3].reshape(-1) if len(x) > 3 and x[3] is not None else range(len(starts))
        steps = x[4].reshape(-1) if len(x) > 4 and x[4] is not None else [1] * len(starts)
        idx = [slice(None)] * x[0].ndim
        for s, e, ax, st in zip(starts, ends, axes, steps):
            idx[int(ax)] = slice(*slice(int(s), int(e), int(st)).indices(x[0].shape[int(ax)]))
        return [x[0][tuple(idx)]]
    if op == "Transpose":
        return [np.transpose(x[0], a.get("perm"))]
    if op == "Expand":
        shape = np.broadcast_shapes(x[0].shape, tuple(int(d) for d in x[1].reshape(-1)))
        return [np.broadcast_to(x[0], shape).copy()]
    if op == "Range":
        return [np.arange(x[0].item(), x[1].item(), x[2].item(), dtype=x[0].dtype)]
    if op == "ConstantOfShape":
        from onnx import numpy_helper

        value = numpy_helper.to_array(a["value"]).reshape(()) if "value" in a else np.float32(0)
        return [np.full(tuple(int(d) for d in x[0].reshape(-1)), value, dtype=value.dtype)]
    if op in ("ReduceSum", "ReduceL2", "ReduceMean"):
        axes = tuple(int(v) for v in x[1].reshape(-1)) if len(x) > 1 and x[1] is not None else tuple(
            a.get("axes", ()))
        if not axes and a.get("noop_with_empty_axes", 0):
            return [x[0]]
        axes = axes or None
        keep = bool(a.get("keepdims", 1))
        if op == "ReduceSum":
            return [np.sum(x[0], axis=axes, keepdims=keep).astype(x[0].dtype)]
        if op == "ReduceMean":
            return [np.mean(x[0], axis=axes, keepdims=keep).astype(x[0].dtype)]
        return [np.sqrt(np.sum(x[0] * x[0], axis=axes, keepdims=keep)).astype(x[0].dtype)]
    if op == "CumSum":
        axis = int(x[1].reshape(-1)[0])
        v = np.flip(x[0], axis) if a.get("reverse", 0) else x[0]
        r = np.cumsum(v, axis=axis).astype(x[0].dtype)
        if a.get("exclusive", 0):
            r = r - v
        return [np.flip(r, axis) if a.get("reverse", 0) else r]
    if op == "MatMul":
        return [np.matmul(x[0], x[1])]
    if op == "LayerNormalization":
        axis = int(a.get("axis", -1)) % x[0].ndim
        axes = tuple(range(axis, x[0].ndim))
        mean = x[0].mean(axis=axes, keepdims=True)
        var = ((x[0] - mean) ** 2).mean(axis=axes, keepdims=True)
        y = (x[0] - mean) / np.sqrt(var + a.get("epsilon", 1e-5))
        if len(x) > 1 and x[1] is not None:
            y = y * x[1]
        if len(x) > 2 and x[2] is not None:
            y = y + x[2]
        return [y.astype(x[0].dtype)]
    raise RwkvExportError(f"ONNX op {op} (node {node.name}) has no TFLite translation in this writer")


# -- entry points -----------------------------------------------------------------------------------------------------
def translate(model, base_dir: Path | None, signature: str, shapes: dict[str, list]):
    """An ONNX ModelProto (its external data in `base_dir`) -> the TFLite ModelT of one subgraph and one signature
    `signature`. `shapes`: the static shape of every graph input. Weights are not read here but when the model is
    written (write_tflite)."""
    return _Translation(model, base_dir, signature, shapes).run()


def write_tflite(model, path: Path, *, inline_limit: int = INLINE_LIMIT) -> int:
    """Write a ModelT from translate() to `path`, each weight streamed from its source (the ONNX data file) into its
    place in the file: in memory at a time, the graph's flatbuffer and at most one weight (a transposed one). Returns
    the file's size. Weights of inline_limit bytes and more in all go after the flatbuffer (see the module
    docstring)."""
    path = Path(path)
    weights = [b for b in model.buffers if isinstance(b, _Weight)]
    total = sum(w.nbytes for w in weights)
    graph_hint = (1 << 20) + 1024 * sum(len(sg.tensors) + len(sg.operators) for sg in model.subgraphs)
    if total + BUFFER_ALIGN * len(weights) + graph_hint < inline_limit:
        for w in weights:
            w.offset = w.size = 0
        data, head = _pack(model, total + 2 * BUFFER_ALIGN * len(weights) + graph_hint)
        end = len(data)
        places = sorted((end - w.from_end, w) for w in weights)
        with open(path, "wb") as f:
            pos = head
            for start, w in places:  # the graph's bytes up to the next weight, then the weight
                f.write(memoryview(data)[pos:start])
                w.file_offset = start - head
                w.write_to(f)
                pos = start + w.nbytes
                if f.tell() != pos - head:
                    raise RwkvExportError(f"weight {w.const.name} did not fill its place in {path.name}")
            f.write(memoryview(data)[pos:end])
            size = f.tell()
        data.close()
        return size
    # > 2 GB: offsets into the file after the flatbuffer. Packed twice: with placeholder offsets (every offset and
    # size stored, so the flatbuffer's length does not depend on their values), then with the real ones.
    for w in weights:
        w.offset, w.size = 2**40, max(1, w.nbytes)
    data, head = _pack(model, graph_hint)
    start = -(-(len(data) - head) // OFFSET_ALIGN) * OFFSET_ALIGN
    data.close()
    pos = start
    for w in weights:
        w.offset, w.size = pos, max(1, w.nbytes)
        pos = -(-(pos + w.nbytes) // OFFSET_ALIGN) * OFFSET_ALIGN
    data, head = _pack(model, graph_hint)
    if len(data) - head > start:
        raise RwkvExportError("the graph's flatbuffer grew between its two packings")
    with open(path, "wb") as f:
        f.write(memoryview(data)[head:])
        data.close()
        for w in weights:
            f.write(b"\0" * (w.offset - f.tell()))
            w.file_offset = w.offset
            w.write_to(f)
    return os.path.getsize(path)


def inline_file(src: Path, dst: Path, *, inline_limit: int = INLINE_LIMIT) -> int:
    """Rewrite the .tflite `src`, whose weights lie after its flatbuffer at offsets (ai-edge-quantizer's layout), as
    `dst` with every weight inside the flatbuffer (the layout every runtime reads: tflite.quantize_file says why),
    each weight streamed from `src` into its place (the graph is read, the weights are not). Returns dst's size."""
    import mmap

    schema = _schema()
    src = Path(src)
    with open(src, "rb") as f:
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            root = schema.Model.GetRootAs(m, 0)
            starts = [root.Buffers(i).Offset() for i in range(root.BuffersLength())]
            del root
        # the flatbuffer is what lies before the first weight: read that alone (the graph, not the weights)
        head = f.read(min([o for o in starts if o > 1], default=os.path.getsize(src)))
    model = schema.ModelT.InitFromPackedBuf(head, 0)
    for i, b in enumerate(model.buffers):
        if b.offset > 1 and b.size:
            model.buffers[i] = _Weight(_Const(file=src, offset=b.offset, shape=(b.size,), dtype="uint8",
                                              name=f"buffer {i}"))
        elif b.data is not None and not len(b.data):
            b.data = None
    return write_tflite(model, dst, inline_limit=inline_limit)
