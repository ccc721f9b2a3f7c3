"""ONNX target: the step graph written node by node (arch/rwkvN/onnx_graph.py, onnx_build.py; opset >= 18), run in
onnxruntime for parity."""

from __future__ import annotations

import contextlib
from pathlib import Path

NAME = "onnx"
DEFAULT_OPSET = 18
MIN_OPSET = 18  # LayerNormalization is 17; from 18 the Reduce ops and Split take axes and sizes as inputs
# the newest opset onnxruntime (1.32) runs the graphs at (measured 19..24; the graphs use no op changed since 18)
MAX_OPSET = 24
# protobuf cannot hold a message of 2 GiB or more: above this, weights go to an external data file
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2

TOKEN_INPUT = "token"
LOGITS_OUTPUT = "logits"


def state_input_name(state: str) -> str:
    return state


def state_output_name(state: str) -> str:
    return f"{state}_out"


def io_names(module, token_input: str = TOKEN_INPUT) -> tuple[list[str], list[str]]:
    """Graph input and output names of a step or sequence module, from its state spec (the architecture's)."""
    from ..embed import output_names

    states = [t.name for t in module.state_spec]
    return ([token_input, *(state_input_name(s) for s in states)],
            [LOGITS_OUTPUT, *(state_output_name(s) for s in states), *output_names(module)])

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 16: "bfloat16"}


def export_step(module, path: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                store=None) -> list[str]:
    """Write the ONNX graph of a step module (arch.base's contract) to `path`, node by node from its architecture's
    onnx_graph.py (no tracing). Returns the files written (the .onnx and, if used, its external data). `store`: a
    WeightStore (onnx_build.py) that the weights go to, shared with other graphs (the prompt graph); else they go
    to `path`.data when `external_data` (default: only past protobuf's 2 GiB limit), or inside the file."""
    builder = module.arch.onnx_graph()
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is below the minimum {MIN_OPSET}")
    if opset > MAX_OPSET:
        from ..errors import RwkvExportError

        raise RwkvExportError(f"opset {opset} is past the newest this exporter writes; choose an opset in "
                              f"[{MIN_OPSET}, {MAX_OPSET}]")
    if builder is None:
        raise NotImplementedError(f"{module.arch.title} has no onnx_graph.py (arch/base.Architecture.onnx_graph)")
    return write_graph(lambda g: builder.build_step(module, g), module, path, opset, external_data, store,
                       name=f"rwkv{module.arch.version.replace('.', '_')}_step")


def write_graph(build, module, path: Path, opset: int, external_data: bool | None, store, name: str,
                metadata: dict | None = None) -> list[str]:
    """Run `build(graph)` on a new onnx_build.Graph and save it: the one place that decides where weights go."""
    from ..onnx_build import Graph, WeightStore

    path = Path(path)
    if store is None and external_data is None:
        n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        external_data = n_bytes >= EXTERNAL_DATA_THRESHOLD
    own = WeightStore(path.with_name(path.name + ".data")) if store is None and external_data else None
    with own or contextlib.nullcontext():  # its own data file, complete (or removed if empty) before the save
        g = Graph(name, opset, own or store)
        build(g)
    g.metadata.update(metadata or {})
    return g.save(path)


def simplify(path: Path) -> None:
    """Optional graph simplification with onnxslim (constant folding, dead-node removal), in place."""
    try:
        import onnxslim
    except ImportError:
        from ..errors import MissingExtraError

        raise MissingExtraError("onnxslim", "simplify") from None
    import onnx

    model = onnx.load(str(path))
    slim = onnxslim.slim(model)
    onnx.save(slim, str(path))


def io_spec(path: Path) -> tuple[list[dict], list[dict], int | None]:
    """Read the graph's inputs/outputs from the file itself and give each its role in the step contract: the token,
    the logits, and as state every input `NAME` that has an output `NAME_out` (the naming export_step writes)."""
    import onnx

    from ..embed import OUTPUT_ROLES

    model = onnx.load(str(path), load_external_data=False)
    out_names = {v.name for v in model.graph.output}
    states = [v.name for v in model.graph.input if state_output_name(v.name) in out_names]

    def describe(v, state_of):
        shape = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        entry = {"name": v.name, "dtype": _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "unknown"), "shape": shape}
        if v.name in (TOKEN_INPUT,):
            entry["role"] = "token"
        elif v.name == LOGITS_OUTPUT:
            entry["role"] = "logits"
        elif v.name in state_of:
            entry["role"], entry["state"] = "state", state_of[v.name]
        else:
            entry["role"] = OUTPUT_ROLES.get(v.name, "other")
        return entry

    ins = {state_input_name(s): s for s in states}
    outs = {state_output_name(s): s for s in states}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    inputs = [describe(v, ins) for v in model.graph.input]
    outputs = [describe(v, outs) for v in model.graph.output]
    return inputs, outputs, opset


def op_counts(path: Path) -> dict:
    import onnx
    from collections import Counter

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node))
