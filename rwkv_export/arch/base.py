"""The architecture seam: what one RWKV version tells the rest of the toolchain, and nothing more.

One `Architecture` subclass per RWKV version (arch/rwkv4, arch/rwkv5, ...), registered in arch/__init__.py. It
declares, as data where it can:
- `version`, `title` and `markers`: the checkpoint keys (suffixes of `blocks.0.*`) that identify it;
- `dims(sd)`: the dimensions read from the tensors, and `expected_shapes(dims)`: the strict tensor mapping (every
  tensor of the file is expected with its shape, or listed in `ignored`; anything else is an error naming it);
- `state(dims)`: the typed state spec, one `StateTensor` per graph state input/output, in graph I/O order;
- `step_module(ckpt, variant)` / `sequence_module(step, ...)`: the torch modules that hold the prepared weights and
  define the graphs (torch only imported when called); `onnx_graph()`: the module that writes their ONNX graphs node
  by node from those weights (TFLite converts the torch modules themselves); `reference(tensors, dtype)`: the independent runtime_ref runner (the parity oracle);
- `presets` / `fake_state_dict(preset, seed)`: synthetic checkpoints with the real key layout, for tests and
  `builtin:` models.

Module contract for a step module: `forward(token [1] int64, *state) -> (logits [1, V] fp32, *state)` with the
state in `state(dims)` order, attributes `arch` (its Architecture), `dims` and `state_spec`, methods `new_state()` (name -> fp32 tensor) and
`example_inputs()`. A sequence module: `forward(tokens [T] int64, *state)`, same outputs (the last token's logits),
attribute `max_chunk`, `example_inputs(n_tokens)`. A reference: `new_state()`, `step(token, state) -> (logits [V],
state)`, `forward_seq(tokens, state, all_logits=False)`, `vocab_size`.

This module is torch-free (the CLI, the manifest and `serve` use it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..errors import CheckpointError

FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of the step graph: its graph input is `name`, its output `name + "_out"`."""

    name: str
    shape: tuple[int, ...]
    init: float
    dtype: str
    doc: str

    def manifest_entry(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "init": self.init, "doc": self.doc}


@dataclass(frozen=True)
class ModelDims:
    """Dimensions read from a checkpoint's tensors. n_head / head_size are None for RWKV-4 (no heads); `lora` holds
    the low-rank widths of v6/v7 by name (e.g. {"decay": 64}), read from the tensors, never assumed."""

    n_layer: int
    n_embd: int
    ffn_dim: int
    vocab_size: int
    n_head: int | None = None
    head_size: int | None = None
    lora: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict:
        d: dict[str, Any] = {"n_layer": self.n_layer, "n_embd": self.n_embd, "ffn_dim": self.ffn_dim,
                             "vocab_size": self.vocab_size}
        if self.n_head is not None:
            d["n_head"], d["head_size"] = self.n_head, self.head_size
        if self.lora:
            d["lora"] = dict(self.lora)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelDims":
        return cls(n_layer=int(d["n_layer"]), n_embd=int(d["n_embd"]), ffn_dim=int(d["ffn_dim"]),
                   vocab_size=int(d["vocab_size"]), n_head=d.get("n_head"), head_size=d.get("head_size"),
                   lora=tuple(sorted((str(k), int(v)) for k, v in (d.get("lora") or {}).items())))


@dataclass
class Checkpoint:
    """A validated checkpoint: its architecture, dimensions and tensors (in the file's dtype)."""

    arch: "Architecture"
    dims: ModelDims
    tensors: dict  # name -> torch.Tensor
    source_dtype: str
    path: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.arch.version


class Architecture:
    """One RWKV version. Subclasses fill in the class attributes and the methods below."""

    version: ClassVar[str]  # "4", "5.2", "6", "7": the manifest's model.rwkv_version
    title: ClassVar[str]  # "RWKV-4"
    # key suffixes (after "blocks.N.") that together identify this version; the registry checks newest first
    markers: ClassVar[tuple[str, ...]]
    # tensors that may appear and are deliberately unused (a reviewed list, never a silent skip)
    ignored: ClassVar[tuple[str, ...]] = ()
    # one line for the manifest's state section
    state_layout: ClassVar[str]
    # synthetic presets: name -> config object understood by fake_state_dict
    presets: ClassVar[dict]
    # the manifest tokenizer kind a checkpoint of this vocab size gets by default (see tokenizer.resolve_tokenizer)
    world_vocab: ClassVar[bool] = False
    # step_module(..., lazy=True) gives a module whose weights are made when its `prepared(name)` asks (arch/rwkv4/
    # step.py): what the ONNX graphs are written from, so that no full copy of the prepared weights is ever held
    lazy_step: ClassVar[bool] = False

    # -- identification and mapping (torch-free except where tensors are read) --------------------------------------

    def matches(self, keys: set[str]) -> bool:
        return all(any(k.endswith("." + m) for k in keys) for m in self.markers)

    def dims(self, sd: dict) -> ModelDims:
        raise NotImplementedError

    def expected_shapes(self, dims: ModelDims) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def state(self, dims: ModelDims) -> list[StateTensor]:
        raise NotImplementedError

    def validate(self, sd: dict, check_finite: bool = True, progress: Callable | None = None) -> ModelDims:
        """Strict mapping: every tensor expected or ignored, every shape right, float dtypes only, finite values."""
        from . import foreign_key_hint

        dims = self.dims(sd)
        expected = self.expected_shapes(dims)
        for key in expected:
            if key not in sd:
                raise CheckpointError(f"missing tensor '{key}' ({self.title}, {dims.n_layer} layers)")
        for key in sd:
            if key not in expected and not any(key.endswith(s) for s in self.ignored):
                raise CheckpointError(f"unexpected tensor '{key}': not part of {self.title}'s layout (cannot map it)"
                                      + foreign_key_hint(key, self))
        items = list(expected.items())
        for key, shape in (progress(items, desc="checking tensors") if progress else items):
            t = sd[key]
            if tuple(t.shape) != shape:
                raise CheckpointError(f"tensor '{key}' has shape {list(t.shape)}, expected {list(shape)}")
            dt = str(t.dtype).removeprefix("torch.")
            if dt not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor '{key}' has dtype {dt}, expected one of {', '.join(FLOAT_DTYPES)}")
            if check_finite:
                import torch

                # finite iff its least and greatest values are (min and max propagate NaN): one pass, no bool
                # tensor the size of the weights (torch.isfinite(t).all(): 0.94 s of CPU for a 169M bf16
                # checkpoint, aminmax 0.07 s)
                if t.numel() and not all(bool(torch.isfinite(v)) for v in torch.aminmax(t)):
                    raise CheckpointError(f"tensor '{key}' contains NaN or Inf")
        return dims

    # -- models (torch imported inside) ------------------------------------------------------------------------------

    def step_module(self, ckpt: Checkpoint, variant: str = "fp32"):
        raise NotImplementedError

    def sequence_module(self, step, *, all_logits: bool = False, max_chunk: int | None = None):
        raise NotImplementedError

    def reference(self, tensors: dict, dtype=None):
        raise NotImplementedError

    def onnx_graph(self):
        """The module that writes this version's ONNX graphs node by node (arch/rwkvN/onnx_graph.py, onnx_build.py
        says why): `build_step(step_module, graph)` and `build_sequence(sequence_module, graph)`, each mirroring its
        torch module's forward and taking the weights from its parameters. None: not written (yet)."""
        import importlib

        pkg = type(self).__module__
        pkg = f"{pkg.rsplit('.', 1)[0]}.{getattr(self, '_pkg', pkg.rsplit('.', 1)[1])}"
        try:
            return importlib.import_module(f"{pkg}.onnx_graph")
        except ModuleNotFoundError as e:
            if e.name != f"{pkg}.onnx_graph":
                raise
            return None

    def fake_state_dict(self, preset: str, seed: int = 0) -> dict:
        raise NotImplementedError

    # -- variant facts -------------------------------------------------------------------------------------------------

    def fp16_info(self) -> dict:
        """What the fp16 variant does differently (recorded in the manifest's quantization entry)."""
        return {"method": "fp16", "state_dtype": "float32"}


def require(sd: dict, key: str):
    if key not in sd:
        raise CheckpointError(f"missing tensor '{key}'")
    return sd[key]


def layer_count(sd: dict) -> int:
    """The number of layers, from the `blocks.N.*` keys; a gap is an error naming the first missing layer."""
    import re

    ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not ids:
        raise CheckpointError("no 'blocks.N.*' tensors: not an RWKV checkpoint")
    L = max(ids) + 1
    missing = sorted(set(range(L)) - ids)
    if missing:
        raise CheckpointError(f"missing all tensors of layer {missing[0]} ('blocks.{missing[0]}.*')")
    return L


def shape_of(sd: dict, key: str, rank: int, what: str) -> tuple[int, ...]:
    """The shape of a tensor that dimensions are read from, with a one-line error if it is absent or of wrong rank."""
    t = require(sd, key)
    if t.dim() != rank:
        raise CheckpointError(f"tensor '{key}' has shape {list(t.shape)}, expected {what}")
    return tuple(int(s) for s in t.shape)


# -- graph limits ------------------------------------------------------------------------------------------------------

# onnxruntime-web's WebGPU EP binds each input and output of a node as a storage buffer, at most 16 per shader (one
# of them its uniforms), so no node may have more than MAX_NODE_IO inputs + outputs ("Too many storage buffers in
# shader" at the first run otherwise). The per-layer state is split and concatenated in one node where that fits
# (up to 13 layers: the graphs are what they were before this limit), else in groups of GROUP.
MAX_NODE_IO = 15
GROUP = 8


def cat_grouped(ts, dim: int = 0):
    """torch.cat(ts, dim) in one Concat if it fits MAX_NODE_IO, else as a concat of concats of GROUP tensors each."""
    import torch

    ts = list(ts)
    while len(ts) + 1 > MAX_NODE_IO:
        ts = [torch.cat(ts[i:i + GROUP], dim) if len(ts) - i > 1 else ts[i] for i in range(0, len(ts), GROUP)]
    return torch.cat(ts, dim)


def split_grouped(x, dim: int = 0) -> tuple:
    """x.split(1, dim) in one Split if it fits MAX_NODE_IO (the data and the split sizes in, a row out each), else
    as a split into at most GROUP parts, each split further."""
    n = x.shape[dim]
    if n + 2 <= MAX_NODE_IO:
        return x.split(1, dim)
    return tuple(row for part in x.split(-(-n // GROUP), dim) for row in split_grouped(part, dim))
