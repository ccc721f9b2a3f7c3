"""Train a tiny byte-level RWKV-7 (x070) on CPython's own docstrings: tiny-pydoc's RWKV-7 twin (tiny-pydoc-v7).

The same text, the same held-out eval slice and the same baselines as the RWKV-4 tiny-pydoc (rwkv_export.corpus),
so that RWKV-7 quantization quality gates also measure a model that has learned something.

- Model: x070 in BlinkDL's key layout (rwkv_export.arch.rwkv7.synthetic's), initialised from
  `synthetic.make_state_dict` (RWKV-LM's x070 recipe) with the head scaled down to start near uniform.
- Math: `runtime_ref.RWKV7` in fp32 with autograd, GPT mode. `batched_forward` runs the reference's own modules
  (LayerNorms, `TimeMix._inputs` / `_out`, `ChannelMix._mlp`, embedding and head) on [B, T, C]; only the token shift
  and the WKV delta-rule recurrence are written here, batched over the streams and computed a chunk of CHUNK tokens
  at a time (`wkv_chunked`, the exact algebra of the recurrence, derived below) instead of one token at a time: the
  per-token loop would cost minutes per pass on two cores. Tests check `batched_forward` against
  `RWKV7.forward_seq` per stream (logits and state).
- Training: truncated BPTT as tiny-pydoc: BATCH contiguous streams, each step reads the next CTX bytes of every
  stream from the state the previous step left (detached). Adam with warmup and cosine decay, seeded, one thread.
- Output: bf16 safetensors in the x070 layout, training settings and losses in the metadata. It loads with
  `runtime_ref.RWKV7.from_checkpoint` and `rwkv_export.checkpoint.load_checkpoint`.

    python -m rwkv_export.arch.rwkv7.train --out rwkv_export/data/tiny-pydoc-v7.safetensors --steps 120 --seed 0

WKV a chunk at a time. Per head, with X = S^T ([key, value]), the reference's token update is
    X_t = diag(w_t) X_{t-1} + b_t u_t + k_t v_t^T,   u_t = -kk_t^T X_{t-1},   b_t = kk_t * a_t,   y_t = X_t^T r_t.
Inside a chunk that starts from X_0, with G_t = w_1 * ... * w_t (per key channel, G_0 = 1), unrolling gives
    X_t = diag(G_t) X_0 + sum_{s<=t} diag(G_t / G_s) (b_s u_s + k_s v_s^T),
so the rows u_t solve one unit lower-triangular system, (I - tril(A B^T, -1)) U = A X_0 + tril(A K^T, -1) V, where
A = -kk * G_{t-1}, B = b / G, K = k / G (rows t of [L, N] matrices); then Y = R X_0 + tril(R B^T) U + tril(R K^T) V
with R = r * G, and the chunk's last state is X_L = diag(G_L) X_0 + (b G_L / G)^T U + (k G_L / G)^T V.
w > 0.545 always (w = exp(-e^-0.5 sigmoid(.))), so over CHUNK = 16 tokens 1 / G stays below 2e4: fp32 is ample.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...corpus import (
    DATA_DIR,
    EVAL_TEXT,
    TRAIN_TEXT,
    VOCAB,
    TrainError,
    check_out,
    eval_loss,
    lr_at,
    read_text_bytes,
    save,
    unigram_ppl,
)
from ...errors import RwkvExportError

MODEL_FILE = DATA_DIR / "tiny-pydoc-v7.safetensors"
STATE_KEYS = ("att_x", "att_kv", "ffn_x")  # runtime_ref.rwkv7.STATE_KEYS_V7


@dataclass(frozen=True)
class TrainConfig:
    n_layer: int = 4
    n_embd: int = 128
    head_size: int = 64  # the released head size: 2 heads at n_embd 128
    ffn_dim: int = 512
    d_decay: int = 16  # LoRA ranks (synthetic's "tiny" preset)
    d_aaa: int = 16
    d_mv: int = 8
    d_gate: int = 32
    ctx: int = 64  # bytes per stream per step (truncated BPTT window)
    batch: int = 64  # parallel streams
    steps: int = 120  # 491,520 bytes seen: ~0.8 of a pass, ~4 CPU minutes
    lr: float = 4e-3  # peak Adam learning rate
    lr_final: float = 4e-4  # cosine decay floor
    warmup: int = 10
    grad_clip: float = 1.0
    chunk: int = 16  # WKV chunk length (only rounding depends on it)
    seed: int = 0
    threads: int = 1  # small ops: a second thread costs more in synchronisation than it gains


# -- model ------------------------------------------------------------------------------------------------------------


def synthetic_config(cfg: TrainConfig):
    from .synthetic import SyntheticConfig7

    return SyntheticConfig7(n_layer=cfg.n_layer, n_embd=cfg.n_embd, head_size=cfg.head_size, ffn_dim=cfg.ffn_dim,
                            vocab_size=VOCAB, d_decay=cfg.d_decay, d_aaa=cfg.d_aaa, d_mv=cfg.d_mv,
                            d_gate=cfg.d_gate, dtype="float32")


def init_state_dict(cfg: TrainConfig) -> dict:
    """Initial weights in BlinkDL's x070 layout: the synthetic init (RWKV-LM's x070 recipe), head gain 1."""
    import torch

    from .synthetic import make_state_dict

    try:
        sd = make_state_dict(synthetic_config(cfg), cfg.seed)
    except ValueError as e:  # n_embd not a multiple of head_size
        raise TrainError(str(e)) from None
    sd["head.weight"] = sd["head.weight"] / 3.0  # synthetic uses gain 3 for a spread of logits; start near uniform
    return {k: v.to(torch.float32).clone() for k, v in sd.items()}


def new_batched_state(model, batch: int) -> dict:
    s = model.new_state()
    return {k: v.unsqueeze(0).expand(batch, *v.shape).clone() for k, v in s.items()}


def _shift(x, prev):
    """x_{t-1} for every t of x [B, T, C]; `prev` [B, C] (the state's) for t = 0."""
    import torch

    return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1)


def wkv_chunked(S, r, w, k, v, kk, a, n_head: int, chunk: int = 16):
    """The RWKV-7 delta rule over T tokens for B streams, a chunk at a time (see the module docstring).

    S [B, H, N(value), N(key)] (the reference's att_kv layout); r, w, k, v, kk, a [B, T, C] as TimeMix._inputs
    returns them. Returns (y [B, T, C] before ln_x, S' [B, H, N, N]). Equal to T steps of `TimeMix._wkv`.
    """
    import torch

    B, T, C = r.shape
    H, N = n_head, C // n_head

    def heads(t):  # [B, T, C] -> [B*H, T, N]
        return t.view(B, T, H, N).transpose(1, 2).reshape(B * H, T, N)

    r, w, k, v, kk, a = (heads(t) for t in (r, w, k, v, kk, a))
    X = S.reshape(B * H, N, N).transpose(1, 2)  # [BH, N(key), N(value)]
    ys = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(t0 + chunk, T))
        L = sl.stop - sl.start
        lw = torch.log(w[:, sl])
        cum = torch.cumsum(lw, dim=1)  # log G_t, t = 1..L
        g_in, g_ex = torch.exp(cum), torch.exp(cum - lw)  # G_t, G_{t-1}
        inv = torch.exp(-cum)  # 1 / G_t
        to_end = torch.exp(cum[:, -1:] - cum)  # G_L / G_t
        kk_c = kk[:, sl]
        b = kk_c * a[:, sl]
        A = -kk_c * g_ex
        Bm, K, R = b * inv, k[:, sl] * inv, r[:, sl] * g_in
        V = v[:, sl]
        ones = torch.ones(L, L, dtype=r.dtype)
        strict, incl = torch.tril(ones, -1), torch.tril(ones)
        M_ab = (A @ Bm.transpose(1, 2)) * strict
        M_ak = (A @ K.transpose(1, 2)) * strict
        eye = torch.eye(L, dtype=r.dtype)
        U = torch.linalg.solve_triangular(eye - M_ab, A @ X + M_ak @ V, upper=False, unitriangular=True)
        ys.append(R @ X + ((R @ Bm.transpose(1, 2)) * incl) @ U + ((R @ K.transpose(1, 2)) * incl) @ V)
        X = (g_in[:, -1:].transpose(1, 2) * X + (b * to_end).transpose(1, 2) @ U
             + (k[:, sl] * to_end).transpose(1, 2) @ V)
    y = torch.cat(ys, dim=1).view(B, H, T, N).transpose(1, 2).reshape(B, T, C)
    return y, X.transpose(1, 2).reshape(B, H, N, N)


def batched_forward(model, tokens, state: dict, chunk: int = 16):
    """GPT mode over a batch: tokens [B, T], state of [B, L, ...] -> (logits [B, T, V], new state of [B, L, ...]).

    Every projection, LoRA, norm and gate is the reference's own code (runtime_ref.rwkv7's TimeMix._inputs and
    _out, ChannelMix._mlp, the LayerNorms) applied to [B, T, C]; the WKV recurrence is `wkv_chunked`.
    """
    import torch

    x = model.blocks[0].ln0(model.emb(tokens))
    v_first = None  # layer 0 sets it
    new = {k: [] for k in STATE_KEYS}
    for i, block in enumerate(model.blocks):
        att = block.att
        xa = block.ln1(x)
        r, w, k, v, kk, a, g, v_first = att._inputs(xa, _shift(xa, state["att_x"][:, i]), v_first)
        y, S = wkv_chunked(state["att_kv"][:, i], r, w, k, v, kk, a, att.H, chunk)
        x = x + att._out(y, r, k, v, g)
        xf = block.ln2(x)
        x = x + block.ffn._mlp(xf, _shift(xf, state["ffn_x"][:, i]))
        for key, s in zip(STATE_KEYS, (xa[:, -1], S, xf[:, -1])):
            new[key].append(s)
    logits = model.head(model.ln_out(x))
    return logits, {k: torch.stack(v, dim=1) for k, v in new.items()}


# -- training ---------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, train_data: bytes, *, log=None, init: dict | None = None):
    """Train from `init` (default: init_state_dict(cfg)) on `train_data`. Returns (model, per-step losses)."""
    import torch

    if cfg.steps < 1 or cfg.batch < 1 or cfg.ctx < 2 or cfg.chunk < 1:
        raise TrainError(f"steps, batch, chunk must be >= 1 and ctx >= 2 "
                         f"(got {cfg.steps}, {cfg.batch}, {cfg.chunk}, {cfg.ctx})")
    stream_len = len(train_data) // cfg.batch
    if stream_len < cfg.ctx + 2:
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

    from runtime_ref.rwkv7 import RWKV7

    # fp32 copies: the reference holds a matrix as it is given (cast per use), and training updates it in place
    init = init_state_dict(cfg) if init is None else {k: v.to(torch.float32, copy=True) for k, v in init.items()}
    model = RWKV7(init, dtype=torch.float32)
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
            state = {k: torch.where(wrap.view(-1, *[1] * (v.dim() - 1)), fresh[k], v) for k, v in state.items()}
        idx = pos.view(-1, 1) + torch.arange(cfg.ctx + 1).view(1, -1)
        window = torch.gather(data, 1, idx)
        logits, state = batched_forward(model, window[:, :-1], state, cfg.chunk)
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
    """The model's weights in BlinkDL's x070 key layout (runtime_ref's module tree mirrors it), in `dtype`."""
    import torch

    return {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()}


def _with_threads(n: int, fn, *args):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rwkv_export.arch.rwkv7.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=MODEL_FILE, help="checkpoint to write (.safetensors)")
    p.add_argument("--train-text", type=Path, default=TRAIN_TEXT)
    p.add_argument("--eval-text", type=Path, default=EVAL_TEXT)
    d = TrainConfig()
    for field, default in asdict(d).items():
        p.add_argument("--" + field.replace("_", "-"), type=type(default), default=default)
    a = p.parse_args(argv)
    try:
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
        from runtime_ref.rwkv7 import RWKV7

        saved = RWKV7(sd)  # evaluate what is written (bf16 weights) with the reference's own GPT mode
        ev = _with_threads(cfg.threads, eval_loss, saved, eval_data)  # one thread: same rounding, same metadata
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
        save(sd, a.out, {"format": "pt", "trainer": "rwkv_export.arch.rwkv7.train", "arch": "x070",
                         "config": json.dumps(asdict(cfg)), "result": json.dumps(result), "dtype": "bfloat16"},
             canonical=True)
        print(json.dumps({**result, "train_seconds": round(seconds, 1)}))
        return 0
    except RwkvExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
