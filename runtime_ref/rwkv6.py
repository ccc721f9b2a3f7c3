"""RWKV-6.0 ("Finch") in plain PyTorch: the reference runner (parity oracle) for v6 exports.

Readable first, fast never: one file, no JIT, no environment switches, no custom kernels, nothing imported from
rwkv_export (nor from runtime_ref.rwkv5: each reference reads on its own). The module tree mirrors BlinkDL's
checkpoint keys (`blocks.3.att.time_maa_w1`, `blocks.3.att.ln_x.weight`, ...), so a checkpoint loads with a strict
`load_state_dict` and `state_dict()` writes the same layout back.

The equations, per block, for one token (x = LN1 output, x_prev the previous token's; H heads of N channels):
    d = x_prev - x
    m_w, m_k, m_v, m_r, m_g = tanh((x + d * maa_x) @ maa_w1) @ maa_w2     (5-way LoRA; w1 [C, 5 Dm], w2 [5, Dm, C])
    x_? = x + d * (maa_? + m_?)                                  for ? in w, k, v, r, g   (data-dependent shift)
    r, k, v = W_r x_r, W_k x_k, W_v x_v   (each [H, N]);   g = silu(W_g x_g)
    w = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2))   [H, N], per key channel and per token
    u = time_faaaa [H, N];   a = k ⊗ v   [H, key, value]
    y = r @ (u * a + S)                                         S' = a + w * S
    out = W_o (GroupNorm_H(y, eps 64e-5) * g)
FFN: d = x_prev - x; out = sigmoid(W_r (x + d * maa_r)) * W_v relu(W_k (x + d * maa_k))^2.
Compared with v5.2: the shift is x + d * maa (v5: x * mix + x_prev * (1 - mix), i.e. maa = 1 - mix), the mixes and
the decay depend on the data, and the decay is stored [1, 1, C] instead of [H, N]. GroupNorm eps 64e-5 is what both
BlinkDL's v6 training code (1e-5 * head_size_divisor**2) and the `rwkv` pip package use.

Two ways to run the same model:
- `step`: RNN mode, one token, the equations above literally.
- `forward_seq`: GPT mode, T tokens: every linear layer (LoRAs included) matrix-matrix over [T, C]; only the WKV
  recurrence is a loop over t. Differentiable: no in-place op touches a tensor in the graph.
Both take a state and return a new one; the input state is never modified.

State: {"att_x": [L, C], "att_kv": [L, H, N, N], "ffn_x": [L, C]}, fresh = zeros; att_kv indexed (head, key, value)
as ChatRWKV's / the pip package's v6 state (its list item 3*i+1), in this model's dtype (the package keeps fp32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STATE_KEYS = ("att_x", "att_kv", "ffn_x")
"""Per layer: time-mix token shift (LN1 output of the previous token), the WKV matrix per head (key, value),
channel-mix token shift (LN2 output of the previous token)."""

GROUPNORM_EPS = 64e-5  # ln_x, as in rwkv 0.8.32's att_one_v6_0 / att_seq_v6_0 and RWKV-LM's RWKV_Tmix_x060
N_MIX = 5  # the time_maa LoRA's outputs, in this order: w, k, v, r, g
SUPPORTED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class RWKV6Config:
    n_layer: int
    n_embd: int  # C
    n_head: int  # H, read from att.time_faaaa
    head_size: int  # N = C / H (64 in every release)
    ffn_dim: int  # F, read from ffn.key.weight (int(3.5 C) // 32 * 32 by default, never assumed)
    vocab_size: int  # V
    mix_lora: int  # Dm, read from att.time_maa_w2 (32; 64 in the 7B)
    decay_lora: int  # Dd, read from att.time_decay_w1 (64; 128 in the 7B)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "RWKV6Config":
        """Read the dimensions from the tensor shapes of a BlinkDL RWKV-6.0 state dict."""
        for key in ("emb.weight", "blocks.0.att.time_maa_x", "blocks.0.att.time_maa_w2", "blocks.0.att.time_decay_w1",
                    "blocks.0.att.time_faaaa", "blocks.0.ffn.key.weight"):
            if key not in sd:
                raise ValueError(f"not an RWKV-6.0 checkpoint: missing {key!r}")
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        vocab_size, n_embd = sd["emb.weight"].shape
        faaaa, maa_w2 = sd["blocks.0.att.time_faaaa"], sd["blocks.0.att.time_maa_w2"]
        if faaaa.dim() != 2 or maa_w2.dim() != 3:
            raise ValueError(f"time_faaaa {tuple(faaaa.shape)} / time_maa_w2 {tuple(maa_w2.shape)}: expected "
                             f"[H, N] / [5, Dm, C]")
        n_head, head_size = faaaa.shape
        return cls(n_layer=max(layers) + 1, n_embd=n_embd, n_head=n_head, head_size=head_size,
                   ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0], vocab_size=vocab_size,
                   mix_lora=maa_w2.shape[1], decay_lora=sd["blocks.0.att.time_decay_w1"].shape[1])


def expected_shapes(cfg: RWKV6Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-6.0 checkpoint with its shape."""
    L, C, H, N, Fd, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(L):
        p = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.ln_x.weight", "att.ln_x.bias"):
            shapes[p + name] = (C,)
        for name in ("x", "w", "k", "v", "r", "g"):
            shapes[p + "att.time_maa_" + name] = (1, 1, C)
        shapes[p + "att.time_maa_w1"] = (C, N_MIX * cfg.mix_lora)
        shapes[p + "att.time_maa_w2"] = (N_MIX, cfg.mix_lora, C)
        shapes[p + "att.time_decay"] = (1, 1, C)
        shapes[p + "att.time_decay_w1"] = (C, cfg.decay_lora)
        shapes[p + "att.time_decay_w2"] = (cfg.decay_lora, C)
        shapes[p + "att.time_faaaa"] = (H, N)
        for name in ("att.receptance", "att.key", "att.value", "att.gate", "att.output", "ffn.receptance"):
            shapes[p + name + ".weight"] = (C, C)
        shapes[p + "ffn.time_maa_k"] = (1, 1, C)
        shapes[p + "ffn.time_maa_r"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (Fd, C)
        shapes[p + "ffn.value.weight"] = (C, Fd)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def check_state_dict(sd: dict, cfg: RWKV6Config) -> None:
    """Raise ValueError unless `sd` has exactly the RWKV-6.0 keys with the shapes `cfg` implies."""
    if cfg.n_head * cfg.head_size != cfg.n_embd:
        raise ValueError(f"time_faaaa gives H * N = {cfg.n_head} * {cfg.head_size} != n_embd {cfg.n_embd}")
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"RWKV-6.0 checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{key}: shape {tuple(sd[key].shape)}, expected {shape} for {cfg}")


def _shift(x: torch.Tensor, d: torch.Tensor, maa: torch.Tensor) -> torch.Tensor:
    """v6 token shift: x + (x_prev - x) * maa, with d = x_prev - x and maa [C] or [..., C]."""
    return x + d * maa



class Linear(nn.Linear):
    """nn.Linear whose weight stays in the checkpoint's dtype and is cast to the input's dtype per call (a no-op when
    they are the same, as in training): see "Memory" below `_held`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

class TimeMix(nn.Module):
    """The attention-like half ("att"): data-dependent shift, r/k/v/g, data-dependent decay, WKV, ln_x, gate."""

    def __init__(self, cfg: RWKV6Config):
        super().__init__()
        C, H, N, Dm, Dd = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.mix_lora, cfg.decay_lora
        self.H, self.N = H, N
        self.time_maa_x = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_g = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, N_MIX * Dm))
        self.time_maa_w2 = nn.Parameter(torch.empty(N_MIX, Dm, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))  # raw base exponent; w = exp(-exp(base + lora))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, Dd))
        self.time_decay_w2 = nn.Parameter(torch.empty(Dd, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))  # u, the current token's bonus, used as is
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.gate = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def _project(self, xx, prev):
        """r, k, v, w as [..., H, N] and the gate silu(g) as [..., C], for xx and prev of shape [..., C]."""
        d = prev - xx
        lead, Dm = xx.shape[:-1], self.time_maa_w2.shape[1]
        h = torch.tanh(_shift(xx, d, self.time_maa_x.view(-1)) @ self.time_maa_w1).view(lead + (N_MIX, Dm))
        m = torch.einsum("...fd,fdc->f...c", h, self.time_maa_w2)  # [5, ..., C]: slice f of h times w2[f]
        mw, mk, mv, mr, mg = m.unbind(0)
        heads = lead + (self.H, self.N)
        xw = _shift(xx, d, self.time_maa_w.view(-1) + mw)
        r = self.receptance(_shift(xx, d, self.time_maa_r.view(-1) + mr)).view(heads)
        k = self.key(_shift(xx, d, self.time_maa_k.view(-1) + mk)).view(heads)
        v = self.value(_shift(xx, d, self.time_maa_v.view(-1) + mv)).view(heads)
        g = F.silu(self.gate(_shift(xx, d, self.time_maa_g.view(-1) + mg)))
        decay = self.time_decay.view(-1) + torch.tanh(xw @ self.time_decay_w1) @ self.time_decay_w2
        w = torch.exp(-torch.exp(decay)).view(heads)
        return r, k, v, w, g

    def _wkv(self, r, k, v, w, s):
        """One token of the recurrence: r, k, v, w [H, N], s [H, N(key), N(value)] -> (y [H, N], s')."""
        u = self.time_faaaa.unsqueeze(-1)  # [H, N, 1]: scales key rows, as w does
        a = k.unsqueeze(-1) * v.unsqueeze(-2)  # k ⊗ v: [H, key, value]
        y = (r.unsqueeze(-2) @ (u * a + s)).squeeze(-2)  # [H, 1, key] @ [H, key, value]
        return y, a + w.unsqueeze(-1) * s

    def _out(self, y, g):
        """GroupNorm over the H heads, gate, output projection; y [T, H, N] or [H, N]."""
        shape = y.shape[:-2] + (self.H * self.N,)
        y = self.ln_x(y.reshape(-1, self.H * self.N)).view(shape)  # GroupNorm wants [batch, C]
        return self.output(y * g)

    def step(self, xx, sx, s):
        """One token. xx = LN1(x) [C]; returns (output [C], (sx', s'))."""
        r, k, v, w, g = self._project(xx, sx)
        y, s = self._wkv(r, k, v, w, s)
        return self._out(y, g), (xx, s)

    def forward_seq(self, xx, sx, s):
        """T tokens. xx = LN1(x) [T, C]; returns (output [T, C], (sx', s'))."""
        prev = torch.cat([sx.unsqueeze(0), xx[:-1]])  # x_{t-1}; the state's for t = 0
        r, k, v, w, g = self._project(xx, prev)  # all matrix-matrix over [T, C]
        ys = []
        for t in range(xx.shape[0]):
            y, s = self._wkv(r[t], k[t], v[t], w[t], s)
            ys.append(y)
        return self._out(torch.stack(ys), g), (xx[-1], s)


class ChannelMix(nn.Module):
    """The feed-forward half ("ffn"): v6 token shift, squared-ReLU MLP gated by sigmoid(r)."""

    def __init__(self, C: int, Fd: int):
        super().__init__()
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = Linear(C, Fd, bias=False)
        self.receptance = Linear(C, C, bias=False)
        self.value = Linear(Fd, C, bias=False)

    def _mlp(self, xx, prev):
        d = prev - xx
        xk = _shift(xx, d, self.time_maa_k.view(-1))
        xr = _shift(xx, d, self.time_maa_r.view(-1))
        return torch.sigmoid(self.receptance(xr)) * self.value(torch.relu(self.key(xk)) ** 2)

    def step(self, xx, fx):
        """One token. xx = LN2(x) [C]; returns (output [C], fx')."""
        return self._mlp(xx, fx), xx

    def forward_seq(self, xx, fx):
        """T tokens. xx = LN2(x) [T, C]; returns (output [T, C], fx')."""
        prev = torch.cat([fx.unsqueeze(0), xx[:-1]])
        return self._mlp(xx, prev), xx[-1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV6Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.ln0 = nn.LayerNorm(C) if layer_id == 0 else None  # applied to the embedding, block 0 only
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg)
        self.ffn = ChannelMix(C, cfg.ffn_dim)

    def step(self, x, sx, s, fx):
        out, (sx, s) = self.att.step(self.ln1(x), sx, s)
        x = x + out
        out, fx = self.ffn.step(self.ln2(x), fx)
        return x + out, (sx, s, fx)

    def forward_seq(self, x, sx, s, fx):
        out, (sx, s) = self.att.forward_seq(self.ln1(x), sx, s)
        x = x + out
        out, fx = self.ffn.forward_seq(self.ln2(x), fx)
        return x + out, (sx, s, fx)


def _held(t: torch.Tensor, dtype: torch.dtype, per_use: bool) -> torch.Tensor:
    """How the model holds a checkpoint tensor.

    Memory: the embedding and the blocks' linear weights (nearly all the bytes) are held as the checkpoint gives them,
    the very tensors (bf16, fp16 or fp32: each exact in fp32 and fp64), and cast to the compute dtype where they are
    used (`Linear`; the embedding casts only the rows it looks up): the same values in the same layout reach the same
    kernels, so the results are the same bits as with every weight stored in `dtype`. The head and every other tensor
    are cast once, here: every call uses the whole head, and a fresh [V, C] tensor per step costs more in page faults
    than the cast itself. An fp64 model of a bf16 checkpoint so holds its head in fp64 and no copy of the rest."""
    if per_use and t.element_size() <= torch.finfo(dtype).bits // 8:
        return t.to(device="cpu")
    return t.to(device="cpu", dtype=dtype, copy=True)


class RWKV6(nn.Module):
    """RWKV-6.0 language model built from a BlinkDL state dict, computing in `dtype` (fp32 or fp64)."""

    def __init__(self, state_dict: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        cfg = RWKV6Config.from_state_dict(state_dict)
        check_state_dict(state_dict, cfg)
        self.config = cfg
        with torch.device("meta"):  # no init work: every tensor comes from the checkpoint
            # _weight: no random init to skip (on meta, Embedding's normal_ imports torch._dynamo: 10 s loaded)
            self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd, _weight=torch.empty(cfg.vocab_size, cfg.n_embd))
            self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.ln_out = nn.LayerNorm(cfg.n_embd)
            self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # held in `dtype`: see `_held`
        per_use = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, (Linear, nn.Embedding))}
        self.load_state_dict({k: _held(v, dtype, k in per_use) for k, v in state_dict.items()}, strict=True,
                             assign=True)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "RWKV6":
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
    def n_head(self) -> int:
        return self.config.n_head

    @property
    def head_size(self) -> int:
        return self.config.head_size

    @property
    def ffn_dim(self) -> int:
        return self.config.ffn_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the vectors; the matrices may be narrower: see `_held`)."""
        return self.ln_out.weight.dtype

    # -- state ---------------------------------------------------------------------------------------------------------

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        L, C, H, N = self.n_layer, self.n_embd, self.n_head, self.head_size
        return {"att_x": (L, C), "att_kv": (L, H, N, N), "ffn_x": (L, C)}

    def new_state(self) -> dict[str, torch.Tensor]:
        """A fresh state: all zeros (no token seen yet)."""
        kw = dict(dtype=self.dtype, device=self.emb.weight.device)
        return {k: torch.zeros(shape, **kw) for k, shape in self.state_shapes().items()}

    def _check_state(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            raise ValueError(f"state keys {sorted(state) if isinstance(state, dict) else type(state)}, "
                             f"expected {list(STATE_KEYS)}")
        for k, shape in self.state_shapes().items():
            if tuple(state[k].shape) != shape:
                raise ValueError(f"state[{k!r}]: shape {tuple(state[k].shape)}, expected {shape}")
            if state[k].dtype != self.dtype:
                raise ValueError(f"state[{k!r}]: dtype {state[k].dtype}, expected {self.dtype}")

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
