"""RWKV-7 ("x070", Goose) in plain PyTorch: the reference runner (parity oracle) for RWKV-7 exports.

Readable first, fast never: one file, no JIT, no environment switches, no custom kernels, nothing imported from
rwkv_export (an oracle must not share code with what it checks). The module tree mirrors BlinkDL's checkpoint keys
(`blocks.3.att.w0`, `blocks.0.ln0.weight`, ...), so a checkpoint loads with a strict `load_state_dict` and
`state_dict()` writes the same layout back. Nothing is folded: LN0 is applied to the embedding row at run time.

One token, per layer (C channels, H heads of N; x = LN1 output, x_prev the previous token's):
    xx = x_prev - x;  x_? = x + xx * x_?               for ? in r, w, k, v, a, g
    r = x_r Wr;  k = x_k Wk;  v = x_v Wv
    w = exp(-e^-0.5 * sigmoid(w0 + tanh(x_w w1) w2))   per-channel decay in (0.545, 1)
    a = sigmoid(a0 + (x_a a1) a2)                      in-context learning rate
    g = sigmoid(x_g g1) g2                             output gate
    kk = normalize_per_head(k * k_k);  k = k * (1 + (a - 1) * k_a)
    layer 0: v_first = v;  else v = v + (v_first - v) * sigmoid(v0 + (x_v v1) v2)
    S = S diag(w) - (S kk)(kk * a)^T + v k^T           per head; S is [value, key]
    y = S r;  y = GroupNorm_H(y, eps 64e-5) + sum_per_head(r * k * r_k) * v
    out = (y * g) Wo
FFN: out = relu((x + (x_prev - x) * x_k) Wk)^2 Wv (no receptance gate).
v_first (layer 0's v) crosses the layers of one token; it is not state.

Two ways to run the same model:
- `step`: RNN mode, one token, the equations above matrix-vector.
- `forward_seq`: GPT mode, T tokens, every linear layer matrix-matrix over [T, C]; only the WKV delta-rule
  recurrence is a loop over t. Differentiable: no in-place op touches a tensor in the graph.
Both take a state and return a new one; the input state is never modified.

State (see STATE_KEYS_V7): att_x [L, C], att_kv [L, H, N, N] indexed (head, value, key) exactly as the `rwkv` pip
package's x070 state[3*i+1], ffn_x [L, C]; fresh is all zeros; it lives in the reference's dtype.
Weights are held with requires_grad=False (this is an oracle); a trainer calls `model.requires_grad_(True)`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STATE_KEYS_V7 = ("att_x", "att_kv", "ffn_x")
"""Per layer: time-mix token shift (LN1 output of the previous token) [C], the WKV matrix [H, N(value), N(key)],
channel-mix token shift (LN2 output of the previous token) [C]."""

SUPPORTED_DTYPES = (torch.float32, torch.float64)
GROUPNORM_EPS = 64e-5  # ln_x: RWKV-LM's x070 trainer and the pip package both use 64e-5 (not torch's 1e-5)
DECAY_SCALE = math.exp(-0.5)  # w = exp(-e^-0.5 * sigmoid(.)); the pip package writes it rounded, 0.606531
REFUSED_KEYS = {".ffn.s_emb": "RWKV-7 'DeepEmbed'", ".ffn.s0": "RWKV-7 'DeepEmbed'", ".ffn.enn": "RWKV-8"}


@dataclass(frozen=True)
class RWKV7Config:
    n_layer: int
    n_embd: int  # C
    n_head: int  # H, read from att.r_k [H, N]
    head_size: int  # N
    ffn_dim: int  # F, read from ffn.key.weight
    vocab_size: int  # V
    d_decay: int  # LoRA ranks, read from w1 / a1 / v1 / g1: they differ with model size
    d_aaa: int
    d_mv: int  # 0 for a one-layer model without layer-0 v LoRA
    d_gate: int
    layer0_v_lora: bool = False  # the file carries blocks.0.att.v0/v1/v2 (unused: layer 0 sets v_first = v)

    @classmethod
    def from_state_dict(cls, sd: dict) -> "RWKV7Config":
        """Read every dimension from the tensor shapes of a BlinkDL RWKV-7 state dict."""
        for key in sd:
            for suffix, what in REFUSED_KEYS.items():
                if suffix in key:
                    raise ValueError(f"{key!r}: this is an {what} checkpoint, not plain RWKV-7 (x070)")
        for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.a1", "blocks.0.att.g1",
                    "blocks.0.ffn.key.weight"):
            if key not in sd:
                raise ValueError(f"not an RWKV-7 checkpoint: missing {key!r}")
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
        vocab_size, n_embd = sd["emb.weight"].shape
        n_head, head_size = sd["blocks.0.att.r_k"].shape
        v1 = sd.get("blocks.1.att.v1", sd.get("blocks.0.att.v1"))
        return cls(
            n_layer=max(layers) + 1,
            n_embd=n_embd,
            n_head=n_head,
            head_size=head_size,
            ffn_dim=sd["blocks.0.ffn.key.weight"].shape[0],
            vocab_size=vocab_size,
            d_decay=sd["blocks.0.att.w1"].shape[1],
            d_aaa=sd["blocks.0.att.a1"].shape[1],
            d_mv=0 if v1 is None else v1.shape[1],
            d_gate=sd["blocks.0.att.g1"].shape[1],
            layer0_v_lora="blocks.0.att.v0" in sd,
        )


def expected_shapes(cfg: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every key of an RWKV-7 checkpoint with its shape."""
    L, C, H, N, Fd, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.ffn_dim, cfg.vocab_size
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(L):
        p = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.ln_x.weight", "att.ln_x.bias"):
            shapes[p + name] = (C,)
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            shapes[p + "att." + name] = (1, 1, C)
        loras = [("w", cfg.d_decay), ("a", cfg.d_aaa), ("g", cfg.d_gate)]
        if i > 0 or cfg.layer0_v_lora:
            loras.append(("v", cfg.d_mv))
            shapes[p + "att.v0"] = (1, 1, C)
        for name, d in loras:
            shapes[p + f"att.{name}1"] = (C, d)
            shapes[p + f"att.{name}2"] = (d, C)
        shapes[p + "att.r_k"] = (H, N)
        for name in ("receptance", "key", "value", "output"):
            shapes[p + "att." + name + ".weight"] = (C, C)
        shapes[p + "ffn.x_k"] = (1, 1, C)
        shapes[p + "ffn.key.weight"] = (Fd, C)
        shapes[p + "ffn.value.weight"] = (C, Fd)
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def check_state_dict(sd: dict, cfg: RWKV7Config) -> None:
    """Raise ValueError unless `sd` has exactly the RWKV-7 keys with the shapes `cfg` implies."""
    if cfg.n_head * cfg.head_size != cfg.n_embd:
        raise ValueError(f"att.r_k says {cfg.n_head} heads of {cfg.head_size}, but n_embd is {cfg.n_embd}")
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"RWKV-7 checkpoint keys differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise ValueError(f"{key}: shape {tuple(sd[key].shape)}, expected {shape} for {cfg}")


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))



class Linear(nn.Linear):
    """nn.Linear whose weight stays in the checkpoint's dtype and is cast to the input's dtype per call (a no-op when
    they are the same, as in training): see "Memory" below `_held`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

class TimeMix(nn.Module):
    """The attention-like half of a block ("att"): token shift, r/w/k/v/a/g, the WKV delta rule, GroupNorm, gate."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.H, self.N = layer_id, H, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, _param(1, 1, C))
        self.w1, self.w2 = _param(C, cfg.d_decay), _param(cfg.d_decay, C)
        self.a1, self.a2 = _param(C, cfg.d_aaa), _param(cfg.d_aaa, C)
        if layer_id > 0 or cfg.layer0_v_lora:  # layer 0 holds them only if the file does; it never uses them
            self.v0, self.v1, self.v2 = _param(1, 1, C), _param(C, cfg.d_mv), _param(cfg.d_mv, C)
        self.g1, self.g2 = _param(C, cfg.d_gate), _param(cfg.d_gate, C)
        self.r_k = _param(H, N)
        self.receptance = Linear(C, C, bias=False)
        self.key = Linear(C, C, bias=False)
        self.value = Linear(C, C, bias=False)
        self.output = Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUPNORM_EPS)

    def _inputs(self, x, prev, v_first):
        """x, prev: [..., C] (one token or T tokens). Returns r, w, k, v, kk, a, g (each [..., C]) and v_first."""
        xx = prev - x
        mixes = (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g)
        xr, xw, xk, xv, xa, xg = (x + xx * m.view(-1) for m in mixes)
        r = self.receptance(xr)
        w = torch.exp(-DECAY_SCALE * torch.sigmoid(self.w0.view(-1) + torch.tanh(xw @ self.w1) @ self.w2))
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0.view(-1) + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        heads = k.shape[:-1] + (self.H, self.N)
        kk = F.normalize((k * self.k_k.view(-1)).view(heads), dim=-1, p=2.0).view(k.shape)
        k = k * (1 + (a - 1) * self.k_a.view(-1))
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0.view(-1) + (xv @ self.v1) @ self.v2)
        return r, w, k, v, kk, a, g, v_first

    def _wkv(self, S, r, w, k, v, kk, a):
        """One token of the delta rule, per head. S [H, N(value), N(key)]; the rest [C]. Returns (y [C], S')."""
        H, N = self.H, self.N
        r, w, k, v, kk, a = (t.view(H, N) for t in (r, w, k, v, kk, a))
        S_kk = (S @ kk.unsqueeze(-1)).squeeze(-1)  # [H, N(value)]
        S = S * w.unsqueeze(1) - S_kk.unsqueeze(-1) * (kk * a).unsqueeze(1) + v.unsqueeze(-1) * k.unsqueeze(1)
        y = (S @ r.unsqueeze(-1)).squeeze(-1)
        return y.reshape(H * N), S

    def _out(self, y, r, k, v, g):
        """GroupNorm over heads, the r·k bonus, the gate and the output projection. All [..., C]."""
        C, heads = y.shape[-1], y.shape[:-1] + (self.H, self.N)
        y = self.ln_x(y.reshape(-1, C)).view(y.shape)
        bonus = (r * k * self.r_k.view(-1)).view(heads).sum(dim=-1, keepdim=True) * v.view(heads)
        return self.output((y + bonus.view(y.shape)) * g)

    def step(self, x, x_prev, S, v_first):
        """One token. x = LN1 output [C]. Returns (output [C], (x, S'), v_first)."""
        r, w, k, v, kk, a, g, v_first = self._inputs(x, x_prev, v_first)
        y, S = self._wkv(S, r, w, k, v, kk, a)
        return self._out(y, r, k, v, g), (x, S), v_first

    def forward_seq(self, x, x_prev, S, v_first):
        """T tokens. x = LN1 output [T, C], v_first [T, C] (layer 0 makes it). Returns (out, (x[-1], S'), v_first)."""
        prev = torch.cat([x_prev.unsqueeze(0), x[:-1]])  # x_{t-1}; the state's for t = 0
        r, w, k, v, kk, a, g, v_first = self._inputs(x, prev, v_first)  # [T, C] @ [C, *]
        ys = []
        for t in range(x.shape[0]):  # the recurrence: out of place, so autograd can go through it
            y, S = self._wkv(S, r[t], w[t], k[t], v[t], kk[t], a[t])
            ys.append(y)
        return self._out(torch.stack(ys), r, k, v, g), (x[-1], S), v_first


class ChannelMix(nn.Module):
    """The feed-forward half of a block ("ffn"): token shift, squared-ReLU MLP (no receptance in v7)."""

    def __init__(self, C: int, Fd: int):
        super().__init__()
        self.x_k = _param(1, 1, C)
        self.key = Linear(C, Fd, bias=False)
        self.value = Linear(Fd, C, bias=False)

    def _mlp(self, x, prev):
        return self.value(torch.relu(self.key(x + (prev - x) * self.x_k.view(-1))) ** 2)

    def step(self, x, x_prev):
        """One token. x = LN2 output [C]; returns (output [C], x)."""
        return self._mlp(x, x_prev), x

    def forward_seq(self, x, x_prev):
        """T tokens. x = LN2 output [T, C]; returns (output [T, C], x[-1])."""
        return self._mlp(x, torch.cat([x_prev.unsqueeze(0), x[:-1]])), x[-1]


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C = cfg.n_embd
        self.ln0 = nn.LayerNorm(C) if layer_id == 0 else None  # applied to the embedding, block 0 only
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(C, cfg.ffn_dim)

    def run(self, x, v_first, att_x, att_kv, ffn_x, seq: bool):
        att = self.att.forward_seq if seq else self.att.step
        out, (att_x, att_kv), v_first = att(self.ln1(x), att_x, att_kv, v_first)
        x = x + out
        out, ffn_x = (self.ffn.forward_seq if seq else self.ffn.step)(self.ln2(x), ffn_x)
        return x + out, v_first, (att_x, att_kv, ffn_x)


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


class RWKV7(nn.Module):
    """RWKV-7 language model built from a BlinkDL x070 state dict, computing in `dtype` (fp32 or fp64)."""

    def __init__(self, state_dict: dict, dtype: torch.dtype = torch.float32):
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
        cfg = RWKV7Config.from_state_dict(state_dict)
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
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> "RWKV7":
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
        """A fresh state: all zeros, in the model's dtype."""
        kw = dict(dtype=self.dtype, device=self.emb.weight.device)
        return {k: torch.zeros(shape, **kw) for k, shape in self.state_shapes().items()}

    def _check_state(self, state: dict) -> None:
        if set(state) != set(STATE_KEYS_V7):
            raise ValueError(f"state keys {sorted(state)}, expected {list(STATE_KEYS_V7)}")
        for k, shape in self.state_shapes().items():
            if tuple(state[k].shape) != shape:
                raise ValueError(f"state[{k!r}]: shape {tuple(state[k].shape)}, expected {shape}")

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")

    # -- running -------------------------------------------------------------------------------------------------------

    def _run(self, x, state: dict, seq: bool):
        v_first = torch.zeros_like(x)  # set by layer 0 before any layer reads it
        new = {k: [] for k in STATE_KEYS_V7}
        for i, block in enumerate(self.blocks):
            x, v_first, layer_state = block.run(x, v_first, *(state[k][i] for k in STATE_KEYS_V7), seq=seq)
            for k, s in zip(STATE_KEYS_V7, layer_state):
                new[k].append(s)
        return x, {k: torch.stack(v) for k, v in new.items()}

    def step(self, token: int, state: dict) -> tuple[torch.Tensor, dict]:
        """RNN mode: one token. Returns (logits [V], new state); `state` is left as it was."""
        self._check_state(state)
        token = int(token)
        self._check_tokens(torch.tensor([token]))
        x, new = self._run(self.blocks[0].ln0(self.emb.weight[token].to(self.dtype)), state, seq=False)
        return self.head(self.ln_out(x)), new

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
        x, new = self._run(self.blocks[0].ln0(self.emb(tokens).to(self.dtype)), state, seq=True)  # x [T, C]
        return self.ln_out(x), new

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
