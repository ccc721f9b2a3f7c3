"""Build ONNX graphs directly, node by node: the small toolkit every architecture's `onnx_graph.py` writes with.

Why not trace: torch.onnx's dynamo exporter took 9 s for the 4-layer tiny step graph and 49 s for its prompt graph
(torch.export, decompositions, then onnxscript's rewriter over every node), 138 s and 800-980 s at 169M shapes on the
2-core machine (issue 19). A graph is a few hundred nodes that we know exactly: writing them takes milliseconds, and
the node list is the one we chose (no exporter passes to undo). The weights still come from the architecture's torch
step module (its parameters are the prepared tensors: LN0 folded in, matrices transposed, fp16 rescaled), so the
module stays the one place where weights are prepared, and each `onnx_graph.py` mirrors its module's `forward`.

- `Graph.param(name, tensor)` adds a weight (a torch tensor or numpy array, or a function that makes one) as an
  initializer named as the module's parameter; with a `WeightStore` it is written to the external-data file at once
  (streamed: no copy of the model is held), and a second graph adding the same name reuses the bytes already written
  (the step and prompt graphs of a variant share one data file from the start; a function is then not called).
- `Graph.const(value, dtype)` adds a small constant (cached, so equal constants are one initializer).
- `Graph.op(op_type, *inputs, **attrs)` appends a node and returns its output name(s); `Graph.output` names a value
  as a graph output.
- `Graph.split_rows` / `concat_rows`: the per-layer state split into [1, ...] rows and concatenated back, in nodes of
  at most MAX_NODE_IO inputs + outputs (arch.base says why), as `split_grouped` / `cat_grouped` do in torch.

This module imports onnx and numpy, never torch (a torch tensor is converted where it is given).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .arch.base import GROUP, MAX_NODE_IO

# initializers of at least this many bytes go to the external-data file when the graph has a WeightStore
EXTERNAL_MIN_BYTES = 1024
ALIGN = 64  # every tensor starts at a multiple of 64 bytes in the data file (as shared_data.ALIGN)

_NP_TO_ONNX = {np.dtype("float32"): 1, np.dtype("uint8"): 2, np.dtype("int8"): 3, np.dtype("int32"): 6,
               np.dtype("int64"): 7, np.dtype("bool"): 9, np.dtype("float16"): 10, np.dtype("float64"): 11}
DTYPES = {"float32": 1, "float16": 10, "float64": 11, "int64": 7, "int32": 6, "bool": 9, "uint8": 2, "int8": 3}


def onnx_dtype(dtype) -> int:
    """An ONNX TensorProto element type from a numpy dtype, a torch dtype or a name ("float32")."""
    name = str(dtype).removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name]
    return _NP_TO_ONNX[np.dtype(dtype)]


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any float dtype; bf16 goes through fp32) or an array as a C-contiguous numpy array."""
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t)
    t = t.detach()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return np.ascontiguousarray(t.cpu().numpy())


def stored_already(placed: dict, name: str, a: np.ndarray) -> tuple[int, int] | None:
    """A weight store's (offset, length) of `name` where it is stored already (same shape and dtype as `a`; else a
    ValueError), or None: a weight shared by two graphs is written once."""
    if name not in placed:
        return None
    off, length, dims, dt = placed[name]
    if (dims, dt) != (tuple(a.shape), onnx_dtype(a.dtype)):
        raise ValueError(f"weight '{name}' stored twice with different shapes or dtypes")
    return off, length


class WeightStore:
    """One external-data file, written as weights are added; shared by the graphs that use it (by name)."""

    def __init__(self, path: Path, durable: bool = True):
        """durable=False: a scratch file, read back and deleted within the run (tflite.write_fp32's), not synced to
        disk on close (an fsync would write its 0.68 GB at 169M out to the disk, then delete it)."""
        self.path, self.durable = Path(path), durable
        self._f = open(self.path, "wb")
        self.placed: dict[str, tuple[int, int, tuple, int]] = {}  # name -> (offset, length, dims, onnx dtype)

    def place(self, name: str, a: np.ndarray) -> tuple[int, int]:
        """Write `a` (unless `name` is already stored, with the same dtype and shape) and return (offset, length)."""
        done = stored_already(self.placed, name, a)
        if done is not None:
            return done
        off = self._f.tell()
        pad = -off % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            off += pad
        self._f.write(np.ascontiguousarray(a).data)  # the array's own buffer: no bytes copy of a 150 MB matrix
        self.placed[name] = (off, a.nbytes, tuple(a.shape), onnx_dtype(a.dtype))
        return off, a.nbytes

    def close(self) -> None:
        """Flush and close the file; a store nothing was placed in removes its (empty) file: no graph names it."""
        if not self._f.closed:
            self._f.flush()
            if self.durable:
                os.fsync(self._f.fileno())
            self._f.close()
            if not self.placed:
                self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Graph:
    """One ONNX graph under construction (see the module docstring)."""

    def __init__(self, name: str, opset: int, store: WeightStore | None = None):
        from onnx import helper

        self.name, self.opset, self.store = name, opset, store
        self.nodes: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.initializers: list = []
        self._inits: dict[str, object] = {}
        self._consts: dict[tuple, str] = {}
        self._n = 0
        self.domains: dict[str, int] = {"": opset}
        self.metadata: dict[str, str] = {}
        self._helper = helper

    # -- names ------------------------------------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    # -- graph I/O --------------------------------------------------------------------------------------------------
    def input(self, name: str, dtype, shape: Sequence) -> str:
        self.inputs.append(self._helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def output(self, value: str, name: str, dtype, shape: Sequence) -> str:
        """Make `value` the graph output `name`: the node that produced it is renamed (no Identity), unless the value
        is a graph input, an initializer or already an output."""
        producer = next((n for n in reversed(self.nodes) if value in n.output), None)
        taken = {o.name for o in self.outputs}
        if producer is None or value in taken or value == name:
            if value != name:
                self.nodes.append(self._helper.make_node("Identity", [value], [name], name=f"out_{name}"))
        else:
            for n in self.nodes:
                for i, v in enumerate(n.input):
                    if v == value:
                        n.input[i] = name
                for i, v in enumerate(n.output):
                    if v == value:
                        n.output[i] = name
        self.outputs.append(self._helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    # -- initializers -----------------------------------------------------------------------------------------------
    def param(self, name: str, tensor, dtype=None) -> str:
        """A weight initializer named `name` (a module parameter's name), optionally cast to `dtype` first. `tensor`
        may be a function that makes it (onnx_graph's `_params`): called unless the store holds `name` already."""
        if name in self._inits:
            return name
        if callable(tensor) and self.store is not None and name in self.store.placed:
            off, length, dims, dt = self.store.placed[name]
            self._register(self._external(self._proto(name, dt, dims), off, length))
            return name
        a = to_numpy(tensor() if callable(tensor) else tensor)
        if dtype is not None:
            a = a.astype(np.dtype(str(dtype).removeprefix("torch.")), copy=False)
        self._add_init(name, a)
        return name

    def _add_init(self, name: str, a: np.ndarray, external: bool = True) -> None:
        """external=False keeps the bytes in the graph: constants are named per graph (const_N), and the store
        shares by name, so a constant must never go to a store another graph reads."""
        t = self._proto(name, onnx_dtype(a.dtype), a.shape)
        if external and self.store is not None and a.nbytes >= EXTERNAL_MIN_BYTES:
            self._external(t, *self.store.place(name, a))
        else:
            t.raw_data = a.tobytes()
        self._register(t)

    @staticmethod
    def _proto(name: str, data_type: int, dims):
        from onnx import TensorProto

        t = TensorProto()
        t.name = name
        t.data_type = data_type
        t.dims.extend(dims)
        return t

    def _external(self, t, off: int, length: int):
        """Point initializer `t` at its bytes in the store's data file."""
        from onnx import TensorProto

        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.store.path.name), ("offset", str(off)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v
        return t

    def _register(self, t) -> None:
        self._inits[t.name] = t
        self.initializers.append(t)

    def const(self, value, dtype="float32") -> str:
        """A small constant (scalar or list) as an initializer; equal constants share one."""
        a = np.asarray(value, dtype=np.dtype(str(dtype).removeprefix("torch.")))
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self._add_init(name, a, external=False)
            self._consts[key] = name
        return self._consts[key]

    def ints(self, *values) -> str:
        """An int64 1-D constant (shapes, axes, split sizes)."""
        return self.const(list(values), "int64")

    # -- nodes ------------------------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, outputs: int | Sequence[str] = 1, domain: str = "", **attrs):
        """Append a node. `inputs` are value names ("" for an omitted optional input); `outputs` a count or the
        names to give. Returns the output name, or a tuple of them when there is more than one."""
        self._n += 1
        names = [f"{op_type}_{self._n}_{i}" if outputs != 1 else f"{op_type}_{self._n}" for i in range(outputs)] \
            if isinstance(outputs, int) else list(outputs)
        self.nodes.append(self._helper.make_node(op_type, list(inputs), names, name=f"{op_type}_{self._n}",
                                                 domain=domain or None, **attrs))
        return names[0] if len(names) == 1 else tuple(names)

    def cast(self, x: str, from_dtype, to_dtype) -> str:
        """A Cast node, or `x` itself when the dtypes are the same (no node, as the torch modules' `_to`)."""
        if onnx_dtype(from_dtype) == onnx_dtype(to_dtype):
            return x
        return self.op("Cast", x, to=onnx_dtype(to_dtype))

    def split_rows(self, x: str, n: int, axis: int = 0) -> list[str]:
        """x split into its n rows along `axis` (each keeps the axis, size 1), in nodes within MAX_NODE_IO."""
        if n == 1:
            return [x]
        if n + 2 <= MAX_NODE_IO:
            return list(self.op("Split", x, self.ints(*([1] * n)), outputs=n, axis=axis))
        size = -(-n // GROUP)
        sizes = [min(size, n - i) for i in range(0, n, size)]
        parts = self.op("Split", x, self.ints(*sizes), outputs=len(sizes), axis=axis)
        parts = [parts] if isinstance(parts, str) else list(parts)
        return [row for part, s in zip(parts, sizes) for row in self.split_rows(part, s, axis)]

    def concat_rows(self, xs: Sequence[str], axis: int = 0) -> str:
        """Concat of `xs` along `axis`, grouped as arch.base.cat_grouped so that no node passes MAX_NODE_IO."""
        xs = list(xs)
        if len(xs) == 1:
            return xs[0]
        while len(xs) + 1 > MAX_NODE_IO:
            xs = [self.op("Concat", *xs[i:i + GROUP], axis=axis) if len(xs) - i > 1 else xs[i]
                  for i in range(0, len(xs), GROUP)]
        return self.op("Concat", *xs, axis=axis)

    # -- the model --------------------------------------------------------------------------------------------------
    def model(self, producer: str = "rwkv-export"):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        model = helper.make_model(graph, opset_imports=opsets, producer_name=producer,
                                  ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        for k, v in self.metadata.items():
            p = model.metadata_props.add()
            p.key, p.value = k, v
        return model

    def save(self, path: Path) -> list[str]:
        """Write the .onnx file (its external data is already in the store's file). Returns [file, data file?]."""
        import onnx

        path = Path(path)
        onnx.save(self.model(), str(path))
        files = [path.name]
        if self.store is not None and any(t.data_location == 1 for t in self.initializers):
            files.append(self.store.path.name)
        return files
