"""Label-free fidelity of a compressed cache against the full cache (no reference answer needed).

* token agreement: position-wise equality of the greedy outputs, over the longer of the two;
* KL divergence ``KL(P_full || P_plan)`` of the next-token distributions at the first decode step
  after compression (the first step that reads the cropped cache; the token before it comes from
  the prefill logits, which compression does not touch).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def token_agreement(full: Sequence[int], other: Sequence[int]) -> float:
    """``#{i: full[i] == other[i]} / max(len(full), len(other))``; 1.0 iff the outputs are equal."""
    n = max(len(full), len(other))
    if n == 0:
        return 1.0
    return sum(a == b for a, b in zip(full, other)) / n


def next_token_kl(full_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """``KL(softmax(full) || softmax(other))`` in nats, computed in float64."""
    if full_logits.shape != other_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(full_logits.shape)} vs {tuple(other_logits.shape)}")
    lp = torch.log_softmax(full_logits.double(), -1)
    lq = torch.log_softmax(other_logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0))
