"""Run the `rwkv` pip package's RWKV-7 (`RWKV_x070`, strategy "cpu fp32") on checkpoints; write logits and states.

Run as a separate process by tests/test_runtime_ref_v7.py: the package picks its RWKV-7 class and its switches from
environment variables read at import time (RWKV_V7_ON=1 swaps `rwkv.model.RWKV` for `RWKV_x070`), and the RWKV-4
tests import the same package without RWKV_V7_ON in the pytest process.

    python tests/pkg_v7_oracle.py job.json out.npz

job.json: {"models": {name: "/path/model.pth", ...}, "steps": [ids], "seq": [ids], "prefix": [ids]}. For each
model name, out.npz holds (T = len(steps) or len(seq), V vocab, L layers):
    {name}/step_logits [T, V]    `steps` fed one token per call (RNN mode) from a fresh state
    {name}/step_{key}            the state after them
    {name}/seq_logits [T, V]     `seq` in one call (its sequence mode, full_output=True) from a fresh state
    {name}/seq_{key}
    {name}/used_logits [T, V]    `prefix` one token at a time, then `seq` in one call from that state
    {name}/used_{key}
with key in att_x [L, C], att_kv [L, H, N, N], ffn_x [L, C]: the package's state list is [att x_prev, att kv,
ffn x_prev] per layer (state[3*i + j]); its kv matrix is indexed (head, value, key) (`S @ r`, `v ⊗ k`), and is
stacked here as is, so it is compared with runtime_ref's att_kv without a transpose.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["RWKV_V7_ON"] = "1"  # all three before the import: the package reads them there
os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

import numpy as np  # noqa: E402
import torch  # noqa: E402

KEYS = ("att_x", "att_kv", "ffn_x")


def stack_state(state: list, n_layer: int) -> dict[str, np.ndarray]:
    return {k: torch.stack([state[3 * i + j] for i in range(n_layer)]).float().numpy() for j, k in enumerate(KEYS)}


def main(job_path: str, out_path: str) -> None:
    from rwkv.model import RWKV, RWKV_x070

    assert RWKV is RWKV_x070, "RWKV_V7_ON was not seen by the package"
    job = json.load(open(job_path))
    torch.set_num_threads(1)  # deterministic sums; the models are tiny
    out: dict[str, np.ndarray] = {}
    for name, path in job["models"].items():
        assert path.endswith(".pth")
        model = RWKV_x070(path[: -len(".pth")], "cpu fp32")  # it appends ".pth" itself
        L = model.n_layer

        state, logits = None, []
        for t in job["steps"]:
            y, state = model.forward(t, state)  # an int: forward_one
            logits.append(y)
        out[f"{name}/step_logits"] = torch.stack(logits).float().numpy()
        out.update({f"{name}/step_{k}": v for k, v in stack_state(state, L).items()})

        y, state = model.forward(list(job["seq"]), None, full_output=True)  # a list of > 1 ids: forward_seq
        out[f"{name}/seq_logits"] = y.float().numpy()
        out.update({f"{name}/seq_{k}": v for k, v in stack_state(state, L).items()})

        state = None
        for t in job["prefix"]:
            _, state = model.forward(t, state)
        y, state = model.forward(list(job["seq"]), list(state), full_output=True)
        out[f"{name}/used_logits"] = y.float().numpy()
        out.update({f"{name}/used_{k}": v for k, v in stack_state(state, L).items()})
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
