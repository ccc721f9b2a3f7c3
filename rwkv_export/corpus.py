"""The tiny-pydoc corpus and what every tiny-pydoc trainer shares, whatever the RWKV version.

- Corpus: the docstrings of the top-level stdlib modules (`Lib/*.py`, read with `ast`, nothing imported), in sorted
  file order. Every EVAL_EVERY-th file is held out for evaluation, so the eval text is never trained on. Both slices
  are committed (`data/tiny-pydoc-train.txt.gz`, `data/tiny-pydoc-eval.txt`); `write_corpus` regenerates them.
- Byte loading (`read_text_bytes`, gzip or plain), the unigram baselines a trained model is judged against, and
  `eval_loss`: next-byte NLL of any runtime_ref model (`new_state()` + `forward_seq(tokens, state, all_logits)`)
  reading a text as one stream.
- The trainers' common plumbing: the learning-rate schedule, the output checks and the safetensors writer.

Used by rwkv_export.arch.rwkv4.train (tiny-pydoc) and rwkv_export.arch.rwkv7.train (tiny-pydoc-v7).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

from .errors import RwkvExportError

DATA_DIR = Path(__file__).parent / "data"
TRAIN_TEXT = DATA_DIR / "tiny-pydoc-train.txt.gz"
EVAL_TEXT = DATA_DIR / "tiny-pydoc-eval.txt"

VOCAB = 256  # bytes
EVAL_EVERY = 16  # every 16th stdlib file (sorted) is held out: ~10 modules, never trained on
EVAL_OFFSET = 5  # which residue of the file index is held out
EVAL_MAX_BYTES = 24_000  # eval slice cap: enough for a stable perplexity, small enough for fast step-graph tests
TRAIN_MAX_BYTES = 600_000  # train slice cap (~3 passes over it at the default settings)


class TrainError(RwkvExportError):
    """The trainer was given settings or text it cannot use."""


# -- corpus ---------------------------------------------------------------------------------------------------------


def stdlib_docstrings() -> list[tuple[str, str]]:
    """(file name, its docstrings joined) for every top-level stdlib module, in sorted order. Imports nothing."""
    import ast
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(lib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):  # pragma: no cover - the stdlib parses
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    docs.append(doc.strip())
        if docs:
            out.append((path.name, "\n\n".join(docs) + "\n\n"))
    return out


def build_corpus() -> tuple[str, str]:
    """(train text, eval text): whole files go to one side only, so no docstring is in both."""
    train, held = [], []
    for i, (_, text) in enumerate(stdlib_docstrings()):
        (held if i % EVAL_EVERY == EVAL_OFFSET else train).append(text)
    return _cap("".join(train), TRAIN_MAX_BYTES), _cap("".join(held), EVAL_MAX_BYTES)


def _cap(text: str, max_bytes: int) -> str:
    data = text.encode("utf-8")[:max_bytes]
    return data.decode("utf-8", errors="ignore")  # never end inside a multi-byte character


def write_corpus(train_path: Path = TRAIN_TEXT, eval_path: Path = EVAL_TEXT) -> tuple[int, int]:
    from .outdir import staged_file

    train, held = build_corpus()
    with staged_file(train_path) as tmp:
        with open(tmp, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:  # reproducible
            gz.write(train.encode("utf-8"))
    with staged_file(eval_path) as tmp:
        tmp.write_bytes(held.encode("utf-8"))
    return len(train.encode("utf-8")), len(held.encode("utf-8"))


def read_text_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"text file not found: {path}")
    data = path.read_bytes()
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise TrainError(f"cannot read {path.name} as gzip: {e}") from None
    return data


# -- baselines and eval -----------------------------------------------------------------------------------------------


def unigram_ppl(train: bytes, held: bytes) -> float:
    """Perplexity per byte on `held` of the add-one-smoothed byte frequencies of `train`."""
    import numpy as np

    counts = np.bincount(np.frombuffer(train, dtype=np.uint8), minlength=VOCAB).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    ids = np.frombuffer(held, dtype=np.uint8)
    return float(np.exp(-logp[ids].mean()))


def unigram_entropy_ppl(text: bytes) -> float:
    """exp(entropy) of the text's own byte frequencies: no model that ignores context can do better on it."""
    import numpy as np

    counts = np.bincount(np.frombuffer(text, dtype=np.uint8), minlength=VOCAB).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def eval_loss(model, data: bytes, chunk: int = 256) -> float:
    """Mean next-byte NLL (nats) over `data` read as one stream from a fresh state (the model's forward_seq, GPT
    mode). `model` is any runtime_ref model: RWKV4 and RWKV7 share `new_state()` and `forward_seq`."""
    import torch
    import torch.nn.functional as F

    ids = torch.tensor(list(data), dtype=torch.long)
    state = model.new_state()
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, chunk):
            x = ids[start : start + chunk]
            y = ids[start + 1 : start + chunk + 1]
            x = x[: len(y)]
            logits, state = model.forward_seq(x, state, all_logits=True)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    return total / n


# -- trainer plumbing -------------------------------------------------------------------------------------------------


def lr_at(cfg, step: int) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from cfg.lr down to cfg.lr_final at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * t))


def check_out(out: Path) -> None:
    """Refuse an output path the trainer could not write, before minutes of training rather than after."""
    if not out.parent.is_dir():
        raise TrainError(f"output folder does not exist: {out.parent}")
    if out.suffix != ".safetensors":
        raise TrainError(f"output must be a .safetensors file, got {out.name}")


def save(sd: dict, out: Path, metadata: dict, *, canonical: bool = False) -> None:
    """Write `sd` as safetensors with `metadata` (values stringified), atomically.

    safetensors (0.8) writes the metadata entries in a per-process random (hash) order, so the same tensors and
    metadata give different file bytes from run to run. canonical=True writes the same header with its keys sorted
    instead (`canonical_safetensors`): the same tensors and metadata always give the same bytes.
    """
    from safetensors.torch import save, save_file

    from .outdir import staged_file

    out = Path(out)
    check_out(out)
    meta = {k: str(v) for k, v in metadata.items()}
    with staged_file(out) as tmp:
        if canonical:
            tmp.write_bytes(canonical_safetensors(save(sd, metadata=meta)))
        else:
            save_file(sd, str(tmp), metadata=meta)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header re-written with sorted keys (compact, space-padded to a
    multiple of 8 bytes as safetensors pads it). Every tensor keeps its data_offsets, so the data part is unchanged."""
    import json
    import struct

    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]
