"""Where a model comes from: a checkpoint file, or a built-in model made on the spot (no download).

A source is written as a path, or as `builtin:NAME` (see BUILTINS). The manifest records the source so that
`rwkv-export check DIR` can rebuild the reference without being told the checkpoint again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import Checkpoint, from_state_dict, load_checkpoint
from .errors import CheckpointError
from .progress import QUIET, Progress
from .tokenizer import sha256_file

BUILTIN_PREFIX = "builtin:"
DATA_DIR = Path(__file__).parent / "data"
# name -> (RWKV version, a synthetic preset of that version or a bundled checkpoint file under data/, seed,
# description)
BUILTINS: dict[str, tuple[str, str, int, str]] = {
    "tiny-pydoc": ("4", "tiny-pydoc.safetensors", 0, "RWKV-4, 4 layers, C=128, bytes; TRAINED on CPython's "
                   "docstrings (bf16, 1.9 MB, ships with the package): it writes Python-doc-like text"),
    "tiny": ("4", "tiny", 0, "RWKV-4, 2 layers, C=64, byte-level vocab 256, seeded synthetic weights (bf16)"),
    "tiny-ffn": ("4", "tiny-ffn", 0, "RWKV-4, 3 layers, C=48, ffn 160 (not 4*C), vocab 300, synthetic (bf16)"),
    "169m-synthetic": ("4", "169m", 0, "the exact RWKV-4-Pile-169M shapes (12 x 768, vocab 50277), synthetic (bf16)"),
    "v5-tiny": ("5.2", "tiny", 0, "RWKV-5.2, 2 layers, C=128 (2 heads of 64), byte-level vocab 256, synthetic (bf16)"),
    "v6-tiny": ("6", "tiny", 0, "RWKV-6, 2 layers, C=128 (2 heads of 64), byte-level vocab 256, synthetic (bf16)"),
    "v7-tiny-pydoc": ("7", "tiny-pydoc-v7.safetensors", 0, "RWKV-7, 4 layers, C=128 (2 heads of 64), bytes; TRAINED "
                      "on CPython's docstrings like tiny-pydoc (bf16, 1.9 MB, ships with the package)"),
    "v7-tiny": ("7", "tiny", 0, "RWKV-7, 2 layers, C=128 (2 heads of 64), byte-level vocab 256, synthetic (bf16)"),
    "v7-0.1b-synthetic": ("7", "0.1b", 0, "the exact RWKV-7 G1 0.1B shapes (12 x 768, head 64, vocab 65536, World "
                          "tokenizer), synthetic (bf16)"),
}


@dataclass
class Source:
    spec: str  # as given: a path or builtin:NAME

    @property
    def builtin(self) -> str | None:
        return self.spec[len(BUILTIN_PREFIX) :] if self.spec.startswith(BUILTIN_PREFIX) else None

    def load(self, progress: Progress = QUIET) -> Checkpoint:
        name = self.builtin
        if name is not None:
            if name not in BUILTINS:
                raise CheckpointError(f"unknown built-in model '{name}'; choose from: {', '.join(BUILTINS)}")
            from .synthetic import make_state_dict

            version, preset, seed, _ = BUILTINS[name]
            if preset.endswith(".safetensors"):
                with progress.stage(f"loading built-in model '{name}'"):
                    return load_checkpoint(DATA_DIR / preset, progress=progress)
            with progress.stage(f"making built-in model '{name}'"):
                sd = make_state_dict(version, preset, seed)
            return from_state_dict(sd, progress=progress)
        with progress.stage(f"loading {self.spec}"):
            return load_checkpoint(self.spec, progress=progress)

    def manifest_entry(self, ckpt: Checkpoint) -> dict:
        if self.builtin is not None:
            return {"builtin": self.builtin, "dtype": ckpt.source_dtype}
        p = Path(self.spec)
        return {"file": p.name, "path": str(p.resolve()), "size": p.stat().st_size, "sha256": sha256_file(p),
                "dtype": ckpt.source_dtype}


def source_from_manifest(entry: dict, override: str | None = None) -> Source:
    """The source to rebuild the reference from: --checkpoint if given, else what the manifest recorded."""
    if override is not None:
        return Source(str(override))
    if "builtin" in entry:
        return Source(BUILTIN_PREFIX + entry["builtin"])
    path = Path(entry.get("path", ""))
    if not path.is_file():
        raise CheckpointError(
            f"the checkpoint this folder was exported from is not at {path}; pass --checkpoint PATH"
        )
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(f"{path} changed since export (sha256 differs); pass --checkpoint PATH explicitly")
    return Source(str(path))
