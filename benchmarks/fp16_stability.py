"""fp16 stability on the 169M shapes: run N tokens (default 1000) through an export folder's fp16 step graph, state
fed back, and fail if any logit or state value is NaN/Inf. Also reports the largest |logit| and |state| seen, and the
fp16 logits' max|Δ|/std against the fp32 graph of the same folder over the run.

    python benchmarks/fp16_stability.py DIR [--tokens 1000]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--tokens", type=int, default=1000)
    args = ap.parse_args()
    from rwkv_export.manifest import find_graph, read_manifest
    from rwkv_export.runners import OnnxStepRunner

    man = read_manifest(args.folder, verify_files=False)
    r16 = OnnxStepRunner(args.folder, man, find_graph(man, "fp16"))
    r32 = OnnxStepRunner(args.folder, man, find_graph(man, "fp32"))
    s16, s32 = r16.new_state(), r32.new_state()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, man["model"]["vocab_size"], size=args.tokens)
    max_logit = max_state = max_rel = 0.0
    agree = 0
    for i, t in enumerate(tokens):
        l16, s16 = r16.step(int(t), s16)
        l32, s32 = r32.step(int(t), s32)
        if not (np.isfinite(l16).all() and all(np.isfinite(v).all() for v in s16.values())):
            print(f"FAIL: NaN/Inf at token {i}")
            sys.exit(1)
        max_logit = max(max_logit, float(np.abs(l16).max()))
        max_state = max(max_state, max(float(np.abs(v[..., :]).max()) for k, v in s16.items() if k != "att_pp"))
        max_rel = max(max_rel, float(np.abs(l16 - l32).max() / l32.std()))
        agree += int(l16.argmax() == l32.argmax())
    print(f"fp16 over {args.tokens} tokens: all finite; max|logit| {max_logit:.1f}; max|state| (excl. att_pp) "
          f"{max_state:.3g}; max|Δ|/std vs fp32 {max_rel:.3g}; top-1 agreement {agree / args.tokens:.3f}")


if __name__ == "__main__":
    main()
