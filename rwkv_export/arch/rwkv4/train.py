"""Train a tiny byte-level RWKV-4 on CPython's own docstrings: a real (if small) model for quantization quality tests.

Random weights say nothing about what quantization does to a language model; this trainer makes one that has
actually learned something, in a few minutes on two CPU cores, from text every machine has.

- Corpus: the docstrings of the top-level stdlib modules (`Lib/*.py`, read with `ast`, nothing imported), in sorted
  file order. Every EVAL_EVERY-th file is held out for evaluation, so the eval text is never trained on. Both slices
  are committed (`data/tiny-pydoc-train.txt.gz`, `data/tiny-pydoc-eval.txt`); `--write-corpus` regenerates them.
  The corpus, byte loading, baselines, eval and file writing live in `rwkv_export.corpus` (shared with the RWKV-7
  trainer, rwkv_export.arch.rwkv7.train) and are re-exported here.
- Model and math: `runtime_ref.RWKV4` in fp32 with autograd, GPT mode. The blocks' `forward_seq` (the same code
  `RWKV4.forward_seq` runs) is vmapped over a batch of streams: `RWKV4.forward_seq` itself cannot be vmapped because
  its token range check reads a tensor value. Tests check the batched path against `RWKV4.forward_seq`.
- Training: truncated BPTT. The train text is cut into BATCH contiguous streams; each step reads the next CTX bytes
  of every stream, starting from the state the previous step left (detached), so the model learns to use a carried
  state exactly as the exported step graph does.
- Output: BlinkDL's key layout, stored in bf16 (as released checkpoints are), as safetensors, with the training
  settings and losses in the file's metadata. It loads through `rwkv_export.checkpoint.load_checkpoint`.

    python -m rwkv_export.arch.rwkv4.train --out rwkv_export/data/tiny-pydoc.safetensors --steps 150 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...corpus import (  # noqa: F401 - the corpus, its paths and the shared plumbing, re-exported from here
    DATA_DIR,
    EVAL_EVERY,
    EVAL_MAX_BYTES,
    EVAL_OFFSET,
    EVAL_TEXT,
    TRAIN_MAX_BYTES,
    TRAIN_TEXT,
    VOCAB,
    TrainError,
    build_corpus,
    check_out,
    eval_loss,
    lr_at,
    read_text_bytes,
    save,
    stdlib_docstrings,
    unigram_entropy_ppl,
    unigram_ppl,
    write_corpus,
)
from ...errors import RwkvExportError

MODEL_FILE = DATA_DIR / "tiny-pydoc.safetensors"

STATE_KEYS = ("att_x", "att_aa", "att_bb", "att_pp", "ffn_x")


@dataclass(frozen=True)
class TrainConfig:
    n_layer: int = 4
    n_embd: int = 128
    ffn_dim: int = 512
    ctx: int = 64  # bytes per stream per step (truncated BPTT window)
    batch: int = 96  # parallel streams
    steps: int = 150
    lr: float = 4e-3  # peak Adam learning rate (tiny models take large rates)
    lr_final: float = 4e-4  # cosine decay floor
    warmup: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # small ops: a second thread costs more in synchronisation than it gains


# -- model ------------------------------------------------------------------------------------------------------------


def init_state_dict(cfg: TrainConfig) -> dict:
    """Initial weights in BlinkDL's layout: the synthetic init (BlinkDL's decay/bonus/mix recipe), head gain 1."""
    import torch

    from .synthetic import SyntheticConfig, make_state_dict

    sd = make_state_dict(SyntheticConfig(cfg.n_layer, cfg.n_embd, cfg.ffn_dim, VOCAB, dtype="float32"), cfg.seed)
    sd["head.weight"] = sd["head.weight"] / 3.0  # synthetic uses gain 3 for a spread of logits; start near uniform
    return {k: v.to(torch.float32).clone() for k, v in sd.items()}


def new_batched_state(model, batch: int) -> dict:
    s = model.new_state()
    return {k: v.unsqueeze(0).expand(batch, *v.shape).clone() for k, v in s.items()}


def batched_forward(model, tokens, state: dict):
    """GPT mode over a batch: tokens [B, T], state of [B, L, C] -> (logits [B, T, V], new state of [B, L, C]).

    Runs runtime_ref's own `Block.forward_seq` per layer, vmapped over the batch; embedding/LN0 and LN_out/head are
    the model's own modules applied to [B, T, C].
    """
    import torch

    x = model.blocks[0].ln0(model.emb(tokens))
    new = {k: [] for k in STATE_KEYS}
    for i, block in enumerate(model.blocks):
        x, layer_state = torch.func.vmap(block.forward_seq)(x, *(state[k][:, i] for k in STATE_KEYS))
        for k, s in zip(STATE_KEYS, layer_state):
            new[k].append(s)
    logits = model.head(model.ln_out(x))
    return logits, {k: torch.stack(v, dim=1) for k, v in new.items()}


def train(cfg: TrainConfig, train_data: bytes, *, log=None, init: dict | None = None):
    """Train from `init` (default: init_state_dict(cfg)) on `train_data`. Returns (model, per-step losses)."""
    import torch

    if cfg.steps < 1 or cfg.batch < 1 or cfg.ctx < 2:
        raise TrainError(f"steps, batch must be >= 1 and ctx >= 2 (got {cfg.steps}, {cfg.batch}, {cfg.ctx})")
    stream_len = len(train_data) // cfg.batch
    if stream_len < cfg.ctx + 1:
        raise TrainError(f"train text of {len(train_data)} bytes is too short for {cfg.batch} streams of {cfg.ctx}")
    torch.manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train_loop(cfg, train_data, stream_len, init, log)
    finally:
        torch.set_num_threads(threads)


def _train_loop(cfg: TrainConfig, train_data: bytes, stream_len: int, init: dict | None, log):
    import torch
    import torch.nn.functional as F

    from runtime_ref import RWKV4

    # fp32 copies: the reference holds a matrix as it is given (cast per use), and training updates it in place
    init = init_state_dict(cfg) if init is None else {k: v.to(torch.float32, copy=True) for k, v in init.items()}
    model = RWKV4(init, dtype=torch.float32)
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8)
    data = torch.tensor(list(train_data[: stream_len * cfg.batch]), dtype=torch.long).view(cfg.batch, stream_len)
    # streams start at seeded random offsets inside their segment so that step 0 is not always each segment's start
    g = torch.Generator().manual_seed(cfg.seed)
    pos = torch.randint(0, stream_len - cfg.ctx - 1, (cfg.batch,), generator=g)
    state = new_batched_state(model, cfg.batch)
    losses = []
    for step in range(cfg.steps):
        wrap = pos + cfg.ctx + 1 > stream_len
        if bool(wrap.any()):  # a stream that reached its segment's end starts over from a fresh state
            pos = torch.where(wrap, torch.zeros_like(pos), pos)
            fresh = new_batched_state(model, cfg.batch)
            state = {k: torch.where(wrap.view(-1, 1, 1), fresh[k], state[k]) for k in STATE_KEYS}
        idx = pos.view(-1, 1) + torch.arange(cfg.ctx + 1).view(1, -1)
        window = torch.gather(data, 1, idx)
        logits, state = batched_forward(model, window[:, :-1], state)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), window[:, 1:].reshape(-1))
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        state = {k: v.detach() for k, v in state.items()}
        pos = pos + cfg.ctx
        losses.append(float(loss.detach()))
        if log:
            log(step, losses[-1])
    model.requires_grad_(False)
    model.eval()
    return model, losses


def to_checkpoint(model, dtype: str = "bfloat16") -> dict:
    """The model's weights in BlinkDL's key layout (runtime_ref's module tree mirrors it), in `dtype`."""
    import torch

    return {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_export.arch.rwkv4.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=MODEL_FILE, help="checkpoint to write (.safetensors)")
    p.add_argument("--train-text", type=Path, default=TRAIN_TEXT)
    p.add_argument("--eval-text", type=Path, default=EVAL_TEXT)
    p.add_argument("--write-corpus", action="store_true", help="regenerate the committed text slices and exit")
    d = TrainConfig()
    for field, default in asdict(d).items():
        p.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    a = p.parse_args(argv)
    try:
        if a.write_corpus:
            n_train, n_eval = write_corpus(a.train_text, a.eval_text)
            print(f"wrote {a.train_text} ({n_train} bytes of text) and {a.eval_text} ({n_eval} bytes)")
            return 0
        cfg = TrainConfig(**{f: getattr(a, f) for f in asdict(d)})
        check_out(a.out)  # before minutes of training, not after
        train_data, eval_data = read_text_bytes(a.train_text), read_text_bytes(a.eval_text)
        t0 = time.perf_counter()

        def log(step, loss):
            if step % 10 == 0 or step == cfg.steps - 1:
                print(f"step {step:4d}  loss {loss:.3f}  {time.perf_counter() - t0:6.1f} s", file=sys.stderr, flush=True)

        model, losses = train(cfg, train_data, log=log)
        seconds = time.perf_counter() - t0
        sd = to_checkpoint(model)
        from runtime_ref import RWKV4

        saved = RWKV4(sd)  # evaluate what is written (bf16 weights), not the fp32 training copy
        ev = eval_loss(saved, eval_data)
        tail = losses[-10:]
        result = {
            "train_loss_last10": round(sum(tail) / len(tail), 4),
            "eval_loss": round(ev, 4),
            "eval_ppl_per_byte": round(math.exp(ev), 3),
            "eval_bits_per_byte": round(ev / math.log(2), 3),
            "unigram_ppl_eval": round(unigram_ppl(train_data, eval_data), 3),
            "train_bytes_seen": cfg.steps * cfg.batch * cfg.ctx,
        }
        # no timing in the file: the same command writes the same bytes
        save(sd, a.out, {"format": "pt", "trainer": "rwkv_export.train", "config": json.dumps(asdict(cfg)),
                         "result": json.dumps(result), "dtype": "bfloat16"})
        print(json.dumps({**result, "train_seconds": round(seconds, 1)}))
        return 0
    except RwkvExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
