"""RWKV-4 in plain PyTorch: the reference runner (parity oracle) every export is checked against.

Readable first, fast never: one file, no JIT, no environment switches, no custom kernels. The module tree mirrors
BlinkDL's checkpoint keys (`blocks.3.att.time_decay`, `blocks.0.ln0.weight`, ...), so a checkpoint loads with a
strict `load_state_dict` and `state_dict()` writes the same layout back.

Two ways to run the same model:
- `step`: RNN mode, one token, the "One token" equations written out literally, matrix-vector.
- `forward_seq`: GPT mode, T tokens, every linear layer matrix-matrix over [T, C]; only the WKV recurrence is a
  (numerically stable, elementwise) loop over t. It is differentiable: no in-place op touches a tensor in the graph.
Both take a state and return a new one; the input state is never modified.

State: a dict of five [n_layer, n_embd] tensors (see STATE_KEYS). Fresh: zeros, except att_pp = -1e30.
Weights are held with requires_grad=False (this is an oracle); a trainer calls `model.requires_grad_(True)`.

Memory: the embedding and the blocks' matrices (three quarters of the bytes) are held as the checkpoint gives them,
the very tensors (bf16, fp16 or fp32: each exact in fp32 and fp64), and cast to the compute dtype where they are used
(`Linear`; the embedding casts only the rows it looks up). The results are the same bits as with every weight stored
in the compute dtype (the same values in the same layout reach the same kernels). The head and the vectors are cast
once, at load: every call uses the whole head, and a fresh [V, C] tensor per step costs more in page faults than the
cast itself (the head's copy is the size each call would need anyway). An fp64 model of a 339 MB bf16 checkpoint
(169M shapes) holds 0.31 GB instead of 1.35 GB; the casts make a step 1.45x slower (fp64 100 -> 145 ms, fp32 61 -> 88
ms at those shapes, 1 thread, an idle Xeon); in GPT mode each matrix is cast once per call, not per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STATE_KEYS = ("att_x", "att_aa", "att_bb", "att_pp", "ffn_x")
"""Per layer: time-mix token shift (LN1 output of the previous token), WKV numerator, WKV denominator, WKV running
max exponent, channel-mix token shift (LN2 output of the previous token)."""

PP_INIT = -1e30  # "minus infinity" for the running max exponent; finite in fp32 and fp64
SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class RWKV4Config:
    n_layer: int
    n_embd: int  # C
    ffn_dim: int  # F, read from ffn.key.weight: not always 4*C
    vocab_size: int  # V

    @classmethod
    def from_state_dict(cls, sd: dict) -> "RWKV4Config":
        """Read L, C, F, V from the tensor shapes of a BlinkDL RWKV-4 state dict."""
        for key in ("emb.weight", "blocks.0.ffn.key.weight"):
            if key not in sd:
                raise ValueError(f"not an RWKV-4 checkpoint: missing {key!r}")
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        vocab_size, n_embd = sd["emb.weight"].shape
        return cls(
            n_layer=max(layers) + 1,
            n_embd=n_embd,
            ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0],
            vocab_size=vocab_size,
        )


def expected_shapes(cfg: RWKV4Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-4 checkpoint with its shape."""
    L, C, Fd, V = cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.vocab_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(L):
        p = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.time_decay", "att.time_first"):
            shapes[p + name] = (C,)
        for name in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
            shapes[p + name] = (1, 1, C)
        for name in ("att.key", "att.value", "att.receptance", "att.output", "ffn.receptance"):
            shapes[p + name + ".weight"] = (C, C)
        shapes[p + "ffn.key.weight"] = (Fd, C)
        shapes[p + "ffn.value.weight"] = (C, Fd)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def check_state_dict(sd: dict, cfg: RWKV4Config) -> None:
    """Raise ValueError unless `sd` has exactly the RWKV-4 keys with the shapes `cfg` implies."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"RWKV-4 checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{key}: shape {tuple(sd[key].shape)}, expected {shape} for {cfg}")


def _mix(x: torch.Tensor, prev: torch.Tensor, mix: nn.Parameter) -> torch.Tensor:
    """Token shift: x*mix + prev*(1-mix), with mix stored as [1, 1, C]."""
    m = mix.view(-1)
    return x * m + prev * (1 - m)


class Linear(nn.Linear):
    """nn.Linear whose weight stays in the checkpoint's dtype and is cast to the input's dtype per call (a no-op when
    they are the same, as in training): see "Memory" in the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class TimeMix(nn.Module):
    """The attention-like half of a block ("att" in checkpoints): token shift, r/k/v, the WKV recurrence."""

    def __init__(self, C: int):
        super().__init__()
        self.time_decay = nn.Parameter(torch.empty(C))  # raw; the decay used is w = -exp(time_decay)
        self.time_first = nn.Parameter(torch.empty(C))  # u, the current token's bonus, used as is
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)

    def step(self, xx, sx, aa, bb, pp):
        """One token. xx = LN1(x) [C]; returns (output [C], (sx', aa', bb', pp'))."""
        w, u = -torch.exp(self.time_decay), self.time_first
        xk = _mix(xx, sx, self.time_mix_k)
        xv = _mix(xx, sx, self.time_mix_v)
        xr = _mix(xx, sx, self.time_mix_r)
        r = torch.sigmoid(self.receptance(xr))
        k = self.key(xk)
        v = self.value(xv)

        ww = u + k
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        wkv = (e1 * aa + e2 * v) / (e1 * bb + e2)

        ww = pp + w
        p = torch.maximum(ww, k)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(k - p)
        new_aa = e1 * aa + e2 * v
        new_bb = e1 * bb + e2

        return self.output(r * wkv), (xx, new_aa, new_bb, p)

    def forward_seq(self, xx, sx, aa, bb, pp):
        """T tokens. xx = LN1(x) [T, C]; returns (output [T, C], (sx', aa', bb', pp'))."""
        w, u = -torch.exp(self.time_decay), self.time_first
        prev = torch.cat([sx.unsqueeze(0), xx[:-1]])  # x_{t-1}; the state's for t = 0
        xk = _mix(xx, prev, self.time_mix_k)
        xv = _mix(xx, prev, self.time_mix_v)
        xr = _mix(xx, prev, self.time_mix_r)
        r = torch.sigmoid(self.receptance(xr))  # [T, C] @ [C, C]
        k = self.key(xk)
        v = self.value(xv)

        # wkv_t = (sum_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u+k_t} v_t) / (same without v), carried as (aa, bb) scaled
        # by e^{-pp} so that no exponent overflows; out of place so autograd can differentiate through it.
        wkv = []
        for t in range(xx.shape[0]):
            kt, vt = k[t], v[t]
            ww = u + kt
            p = torch.maximum(pp, ww)
            e1 = torch.exp(pp - p)
            e2 = torch.exp(ww - p)
            wkv.append((e1 * aa + e2 * vt) / (e1 * bb + e2))

            ww = pp + w
            p = torch.maximum(ww, kt)
            e1 = torch.exp(ww - p)
            e2 = torch.exp(kt - p)
            aa = e1 * aa + e2 * vt
            bb = e1 * bb + e2
            pp = p

        return self.output(r * torch.stack(wkv)), (xx[-1], aa, bb, pp)


class ChannelMix(nn.Module):
    """The feed-forward half of a block ("ffn" in checkpoints): token shift, squared-ReLU MLP gated by r."""

    def __init__(self, C: int, Fd: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, Fd, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(Fd, C, bias=False)

    def _mlp(self, xx, prev):
        xk = _mix(xx, prev, self.time_mix_k)
        xr = _mix(xx, prev, self.time_mix_r)
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2)

    def step(self, xx, fx):
        """One token. xx = LN2(x) [C]; returns (output [C], fx')."""
        return self._mlp(xx, fx), xx

    def forward_seq(self, xx, fx):
        """T tokens. xx = LN2(x) [T, C]; returns (output [T, C], fx')."""
        prev = torch.cat([fx.unsqueeze(0), xx[:-1]])
        return self._mlp(xx, prev), xx[-1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV4Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.ln0 = nn.LayerNorm(C) if layer_id == 0 else None  # applied to the embedding, block 0 only
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(C)
        self.ffn = ChannelMix(C, cfg.ffn_dim)

    def step(self, x, sx, aa, bb, pp, fx):
        out, (sx, aa, bb, pp) = self.att.step(self.ln1(x), sx, aa, bb, pp)
        x = x + out
        out, fx = self.ffn.step(self.ln2(x), fx)
        return x + out, (sx, aa, bb, pp, fx)

    def forward_seq(self, x, sx, aa, bb, pp, fx):
        out, (sx, aa, bb, pp) = self.att.forward_seq(self.ln1(x), sx, aa, bb, pp)
        x = x + out
        out, fx = self.ffn.forward_seq(self.ln2(x), fx)
        return x + out, (sx, aa, bb, pp, fx)


def _held(t: torch.Tensor, dtype: torch.dtype, per_use: bool) -> torch.Tensor:
    """How the model holds a checkpoint tensor ("Memory" in the module docstring): one cast per use, if its dtype is
    exact in `dtype`, as it is (the same tensor); anything else as a copy in `dtype` (an fp64 matrix in an fp32 model
    is rounded here, once)."""
    if per_use and t.element_size() <= torch.finfo(dtype).bits // 8:
        return t.to(device="cpu")
    return t.to(device="cpu", dtype=dtype, copy=True)


class RWKV4(nn.Module):
    """RWKV-4 language model built from a BlinkDL state dict, computing in `dtype` (fp32 or fp64)."""

    def __init__(self, state_dict: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        cfg = RWKV4Config.from_state_dict(state_dict)
        check_state_dict(state_dict, cfg)
        self.config = cfg
        with torch.device("meta"):  # no init work: every tensor comes from the checkpoint
            # _weight: no random init to skip (on meta, Embedding's normal_ imports torch._dynamo: 10 s loaded)
            self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.ln_out = nn.LayerNorm(cfg.n_embd)
            self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # held in `dtype`: "Memory" above
        per_use = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, (Linear, nn.Embedding))}
        self.load_state_dict({k: _held(v, dtype, k in per_use) for k, v in state_dict.items()}, strict=True,
                             assign=True)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "RWKV4":
        """Load a `.pth` (BlinkDL torch.save) or `.safetensors` checkpoint stored in bf16, fp16 or fp32."""
        path = Path(path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        elif path.suffix == ".pth":
            sd = torch.load(str(path), weights_only=True, map_location="cpu", mmap=True)
        else:
            raise ValueError(f"{path}: expected a .pth or .safetensors checkpoint")
        return cls(sd, dtype=dtype)

    # -- shape and dtype -------------------------------------------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def n_embd(self) -> int:
        return self.config.n_embd

    @property
    def ffn_dim(self) -> int:
        return self.config.ffn_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the vectors; the matrices may be narrower)."""
        return self.ln_out.weight.dtype

    # -- state ---------------------------------------------------------------------------------------------------------

    def new_state(self) -> dict[str, torch.Tensor]:
        """A fresh state: zeros, and att_pp = -1e30 (no token seen yet)."""
        shape, kw = (self.n_layer, self.n_embd), dict(dtype=self.dtype, device=self.emb.weight.device)
        state = {k: torch.zeros(shape, **kw) for k in STATE_KEYS}
        state["att_pp"] = torch.full(shape, PP_INIT, **kw)
        return state

    def _check_state(self, state: dict) -> None:
        if set(state) != set(STATE_KEYS):
            raise ValueError(f"state keys {sorted(state)}, expected {list(STATE_KEYS)}")
        for k in STATE_KEYS:
            if tuple(state[k].shape) != (self.n_layer, self.n_embd):
                raise ValueError(f"state[{k!r}]: shape {tuple(state[k].shape)}, expected {(self.n_layer, self.n_embd)}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")

    # -- running -------------------------------------------------------------------------------------------------------

    def step(self, token: int, state: dict) -> tuple[torch.Tensor, dict]:
        """RNN mode: one token. Returns (logits [V], new state); `state` is left as it was."""
        self._check_state(state)
        token = int(token)
        self._check_tokens(torch.tensor([token]))
        x = self.blocks[0].ln0(self.emb.weight[token].to(self.dtype))
        new = {k: [] for k in STATE_KEYS}
        for i, block in enumerate(self.blocks):
            x, layer_state = block.step(x, *(state[k][i] for k in STATE_KEYS))
            for k, s in zip(STATE_KEYS, layer_state):
                new[k].append(s)
        logits = self.head(self.ln_out(x))
        return logits, {k: torch.stack(v) for k, v in new.items()}

    def forward_seq(self, tokens, state: dict, all_logits: bool = False) -> tuple[torch.Tensor, dict]:
        """GPT mode: T >= 1 tokens (list[int] or 1-D LongTensor) from `state`.

        Returns (logits, new state): logits [V] of the last token, or [T, V] with all_logits=True. Equal to T calls
        of `step` up to rounding; differentiable.
        """
        hidden, new = self.hidden_seq(tokens, state)
        return self.head(hidden if all_logits else hidden[-1]), new

    def hidden_seq(self, tokens, state: dict) -> tuple[torch.Tensor, dict]:
        """forward_seq without the head: (the final hidden state after ln_out of every token [T, C], new state).
        The oracle of the exported graphs' embedding outputs (rwkv_export.embed)."""
        self._check_state(state)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.emb.weight.device)
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be 1-D with at least one token, got shape {tuple(tokens.shape)}")
        self._check_tokens(tokens)
        x = self.blocks[0].ln0(self.emb(tokens).to(self.dtype))  # [T, C]
        new = {k: [] for k in STATE_KEYS}
        for i, block in enumerate(self.blocks):
            x, layer_state = block.forward_seq(x, *(state[k][i] for k in STATE_KEYS))
            for k, s in zip(STATE_KEYS, layer_state):
                new[k].append(s)
        return self.ln_out(x), {k: torch.stack(v) for k, v in new.items()}

    def forward(self, tokens, state: dict, all_logits: bool = False) -> tuple[torch.Tensor, dict]:
        """`model(tokens, state)` is `forward_seq` (for trainers and torch.func)."""
        return self.forward_seq(tokens, state, all_logits=all_logits)

    @torch.no_grad()
    def greedy(self, prompt_tokens, n: int, state: dict | None = None) -> tuple[list[int], dict]:
        """Feed the prompt (GPT mode), then take n argmax steps.

        Returns (the n generated tokens, the state after the prompt and all n generated tokens), so generation can
        go on from the returned state by feeding the next token.
        """
        state = self.new_state() if state is None else state
        logits, state = self.forward_seq(prompt_tokens, state)
        out: list[int] = []
        for _ in range(n):
            out.append(int(torch.argmax(logits)))
            logits, state = self.step(out[-1], state)
        return out, state
