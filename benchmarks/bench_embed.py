"""What a tiny language model's embedding is worth: same-document retrieval on held-out CPython docstrings.

    python benchmarks/bench_embed.py [--work bench_out/embed] [--passages 4] [--min-bytes 160] [--max-bytes 400]
                                     [--reuse]

The trained fixtures (`builtin:tiny-pydoc`, RWKV-4, and `builtin:v7-tiny-pydoc`, RWKV-7: 4 layers, C = 128, bytes)
are exported with `--embedding` (export_onnx; the embedding parity gate runs on three passages) and embed through
their ONNX prompt graphs (rwkv_export.embed.Embedder). The texts: the stdlib modules the trainers held out (corpus.build_corpus: every
EVAL_EVERY-th file, never trained on), each cut at paragraph breaks into passages of min..max bytes, the first
--passages of each module with at least two; a passage found verbatim in the training text is dropped (counted).

Task: for each passage, is its nearest other passage (cosine) from the same module? top-1 accuracy over all passages,
against chance (the fraction of other passages from the same module) and two baselines without a trained model:
byte counts (a bag-of-bytes vector) and the same architecture with random weights (`builtin:tiny`, through
runtime_ref in fp32). Each embedding also "centered" (the corpus mean vector subtracted before the cosine, the usual
fix for a model's anisotropic hidden states). Also the mean cosine to same-module and to other-module passages.
Prints a markdown table (and writes it to --work/bench_embed.md) with the machine and date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TRAINED = ("tiny-pydoc", "v7-tiny-pydoc")
RANDOM = "tiny"  # RWKV-4 with seeded random weights: what the architecture gives before training
POOLS = ("mean", "last", "state")


def passages(n_per_doc: int, min_bytes: int, max_bytes: int) -> tuple[list[str], list[int], list[str], int]:
    """(passages, their module index, module names, passages dropped because the training text has them)."""
    from rwkv_export.corpus import EVAL_EVERY, EVAL_OFFSET, TRAIN_TEXT, read_text_bytes, stdlib_docstrings

    train = read_text_bytes(TRAIN_TEXT).decode("utf-8", errors="ignore")
    texts, labels, names, dropped = [], [], [], 0
    held = [(n, t) for i, (n, t) in enumerate(stdlib_docstrings()) if i % EVAL_EVERY == EVAL_OFFSET]
    for name, doc in held:
        out, cur = [], ""
        for para in doc.split("\n\n"):
            para = para.strip()
            if not para:
                continue
            cur = f"{cur}\n\n{para}" if cur else para
            if len(cur.encode()) >= min_bytes:
                out.append(cur.encode()[:max_bytes].decode("utf-8", errors="ignore"))
                cur = ""
        kept = [p for p in out if p not in train]
        dropped += len(out) - len(kept)
        if len(kept) >= 2:
            names.append(name)
            texts += kept[:n_per_doc]
            labels += [len(names) - 1] * len(kept[:n_per_doc])
    return texts, labels, names, dropped


def retrieval(vectors: np.ndarray, labels: list[int]) -> dict:
    """top-1 same-module accuracy and mean same / other cosines, raw and with the corpus mean subtracted."""
    labels = np.asarray(labels)
    out = {}
    for how, v in (("raw", vectors), ("centered", vectors - vectors.mean(0))):
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        same = labels[:, None] == labels[None, :]
        off = ~np.eye(len(labels), dtype=bool)
        out[how] = {"top1": float((labels[sim.argmax(1)] == labels).mean()),
                    "same": float(sim[same & off].mean()), "other": float(sim[~same].mean())}
    return out


def chance(labels: list[int]) -> float:
    labels = np.asarray(labels)
    return float(np.mean([((labels == lab).sum() - 1) / (len(labels) - 1) for lab in labels]))


def exported(name: str, work: Path, reuse: bool):
    from rwkv_export.embed import Embedder
    from rwkv_export.export import export_onnx

    folder = work / name
    if not (reuse and (folder / "manifest.json").is_file()):
        # the logits gate is `rwkv-export check`'s business; the embeddings used here are gated below
        export_onnx(f"builtin:{name}", folder, force=True, embedding=True, check=False)
    return Embedder(folder, kind="sequence")


def parity(emb, name: str, texts: list[str]) -> str:
    """The embedding parity gate (embed.compare_embedding, fp64 reference) on the first passages: the vectors the
    table is made of are the model's, not an export artifact."""
    import torch

    from rwkv_export.embed import compare_embedding
    from rwkv_export.sources import Source

    ckpt = Source(f"builtin:{name}").load()
    r = compare_embedding(emb, ckpt.arch.reference(ckpt.tensors, torch.float64), texts)
    if not r["passed"]:
        raise SystemExit(f"embedding parity failed for {name}: {r}")
    return (f"{name}: prompt-graph embeddings vs runtime_ref fp64 on {len(texts)} passages: max|Δ|/scale "
            + ", ".join(f"{k} {v:.2g}" for k, v in r["max_rel"].items()) + f" (gate {r['tolerance']:g})")


def reference_vectors(name: str, texts: list[str]) -> dict:
    import torch

    from rwkv_export.embed import reference_embedding
    from rwkv_export.sources import Source

    ckpt = Source(f"builtin:{name}").load()
    ref = ckpt.arch.reference(ckpt.tensors, torch.float32)
    order = [t.name for t in ckpt.arch.state(ckpt.dims)]
    embs = [reference_embedding(ref, list(t.encode()), order) for t in texts]
    return {p: np.stack([e.pooled(p) for e in embs]) for p in POOLS}


def main(argv=None) -> None:
    import torch

    from bench_v7 import machine, stamp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench_out" / "embed")
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--min-bytes", type=int, default=160)
    ap.add_argument("--max-bytes", type=int, default=400)
    ap.add_argument("--reuse", action="store_true", help="reuse exports already in --work")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    a.work.mkdir(parents=True, exist_ok=True)
    texts, labels, names, dropped = passages(a.passages, a.min_bytes, a.max_bytes)
    rows, checks = [], []

    def row(what, vectors):
        r = retrieval(vectors, labels)
        rows.append(f"| {what} | {r['raw']['top1']:.3f} | {r['centered']['top1']:.3f} | "
                    f"{r['raw']['same']:.3f} / {r['raw']['other']:.3f} | "
                    f"{r['centered']['same']:.3f} / {r['centered']['other']:.3f} |")

    for name in TRAINED:
        emb = exported(name, a.work, a.reuse)
        checks.append(parity(emb, name, texts[:3]))
        version = emb.manifest["model"]["rwkv_version"]
        vecs = [emb.embed(t) for t in texts]
        for pool in POOLS:
            row(f"`builtin:{name}` (RWKV-{version}, trained), {pool}", np.stack([v.pooled(pool) for v in vecs]))
    ref = reference_vectors(RANDOM, texts)
    for pool in POOLS:
        row(f"`builtin:{RANDOM}` (RWKV-4, random weights, runtime_ref), {pool}", ref[pool])
    counts = np.stack([np.bincount(np.frombuffer(t.encode(), np.uint8), minlength=256) for t in texts]).astype(float)
    row("bag of bytes (counts, no model)", counts)
    lines = [
        f"Same-module retrieval: {len(texts)} passages ({a.min_bytes}-{a.max_bytes} bytes, <= {a.passages} per "
        f"module) from {len(names)} held-out stdlib modules ({', '.join(names)}); {dropped} passages dropped as "
        f"present in the training text. Chance top-1 = {chance(labels):.3f}.",
        "",
        "| embedding | top-1 | top-1 centered | cos same / other | centered cos same / other |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *checks,
        f"machine: {machine()}",
        stamp("run"),
    ]
    text = "\n".join(lines)
    print(text)
    (a.work / "bench_embed.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
