"""Run the official `rwkv` pip package (0.8.32, BlinkDL's ChatRWKV runtime) on RWKV-5.2 / 6.0 checkpoints, in a process
of its own, and save what it computes: the outside oracle of tests/test_runtime_ref_v5_v6.py.

Why a separate process: the package reads RWKV_JIT_ON / RWKV_CUDA_ON (and RWKV_V7_ON, which swaps its RWKV class for
the v7 one) once, at import. Imported in the pytest process, whichever test imported it first would fix those switches
for every later test (the v7 tests need RWKV_V7_ON=1 in theirs). Here they are set before the import and die with
the process.

    python tests/pkg_v56_oracle.py JOBS.json

JOBS.json is a list of {"ckpt": .pth path, "steps": [ids], "prefix": [ids], "prompt": [ids], "out": .pt path}. For
each job the package, with strategy "cpu fp32", runs
  - steps:  the tokens one call each from a fresh state (RNN mode): logits [n, V] and the state after them;
  - prefix: the tokens one call each from a fresh state; the state after them ("used" state);
  - prompt: all tokens in one call (GPT mode), from a fresh state and from the used state: last logits and states.
Its state list (per layer i: 3i att x_prev [C], 3i+1 att_kv [H, N, N] fp32, 3i+2 ffn x_prev [C]) is saved stacked
as {"att_x": [L, C], "att_kv": [L, H, N, N], "ffn_x": [L, C]}, together with the version and head count the package
detected from the keys.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RWKV_JIT_ON"] = "0"  # plain Python functions, no TorchScript
os.environ["RWKV_CUDA_ON"] = "0"  # no custom kernels (CPU anyway)
os.environ.pop("RWKV_V7_ON", None)  # the v4/v5/v6 class, never x070

import torch  # noqa: E402
from rwkv.model import RWKV  # noqa: E402

STATE_KEYS = ("att_x", "att_kv", "ffn_x")


def stacked(state: list, n_layer: int) -> dict:
    """The package's flat 3L list as three stacked tensors; copies, since the package rebinds the list's items."""
    return {k: torch.stack([state[3 * i + j].detach().clone() for i in range(n_layer)])
            for j, k in enumerate(STATE_KEYS)}


def run_job(job: dict) -> dict:
    model = RWKV(model=job["ckpt"], strategy="cpu fp32", verbose=False)
    L = model.args.n_layer
    out = {"version": float(model.version), "n_head": int(model.args.n_head), "n_layer": L}

    state, logits = None, []
    for t in job["steps"]:
        y, state = model.forward([t], state)
        logits.append(y.detach().clone())
    out["step_logits"], out["step_state"] = torch.stack(logits), stacked(state, L)

    state = None
    for t in job["prefix"]:
        _, state = model.forward([t], state)
    out["prefix_state"] = stacked(state, L)

    y, fresh_end = model.forward(list(job["prompt"]), None)
    out["prompt_fresh_logits"], out["prompt_fresh_state"] = y.detach().clone(), stacked(fresh_end, L)
    y, used_end = model.forward(list(job["prompt"]), state)
    out["prompt_used_logits"], out["prompt_used_state"] = y.detach().clone(), stacked(used_end, L)
    return out


def main(jobs_path: str) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    for job in jobs:
        torch.save(run_job(job), job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
