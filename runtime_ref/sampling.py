"""Sampling from logits: temperature, nucleus (top-p) and the seed's min-p rule, in fp64.

Order (all filters see the untempered distribution, so temperature never changes *which* tokens may be drawn,
only how the mass is shared among them):
  1. probs = softmax(logits)
  2. min-p: p_max = max(probs); drop every token with prob < min_p_ratio * p_max ** min_p_power (the most likely
     token is always kept); renormalise.  min_p_ratio = 0 disables it.
  3. top-p: keep the smallest set of most likely tokens whose mass is >= top_p; renormalise.  top_p = 1 disables it.
  4. temperature: probs ** (1 / temperature), renormalise.
  5. draw one token with torch.multinomial(generator=...).
temperature = 0 skips all of this and returns argmax(logits).
"""

from __future__ import annotations

import torch


def sampling_probs(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_p_ratio: float = 0.02,
    min_p_power: float = 2.0,
) -> torch.Tensor:
    """The fp64 distribution [V] that `sample_logits` draws from (steps 1-4 above); temperature must be > 0."""
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 here (0 means argmax in sample_logits), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if min_p_ratio < 0:
        raise ValueError(f"min_p_ratio must be >= 0, got {min_p_ratio}")

    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    best = int(torch.argmax(probs))

    if min_p_ratio > 0:
        threshold = min_p_ratio * float(probs[best]) ** min_p_power
        keep = probs >= threshold
        keep[best] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()

    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
        keep_sorted = mass_before < top_p  # a token is needed while the mass before it is still short of top_p
        keep = torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()

    if temperature != 1:
        probs = (probs / probs.max()) ** (1.0 / temperature)  # the max becomes 1: no underflow to an all-zero sum
        probs = probs / probs.sum()
    return probs


def sample_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_p_ratio: float = 0.02,
    min_p_power: float = 2.0,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id from logits [V] (rule in the module docstring); deterministic for a seeded generator."""
    if temperature == 0:
        if logits.dim() != 1:
            raise ValueError(f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
        return int(torch.argmax(logits))
    probs = sampling_probs(logits, temperature, top_p, min_p_ratio, min_p_power)
    return int(torch.multinomial(probs, 1, generator=generator))
