"""Top-k selection with a protected recent suffix and deterministic ties (VL-Cache Sec. 4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["pool_scores", "select_kept", "select_kept_adaptive"]


def pool_scores(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D average pooling over keys, stride 1, zero padding ``kernel // 2`` counted in the mean.

    This is SnapKV's (and kvpress's) ``avg_pool1d(..., padding=kernel // 2)`` smoothing.
    ``scores`` is ``[..., n]``; ``kernel == 1`` returns it unchanged.
    """
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    out = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out.reshape(shape)


def select_kept(scores: torch.Tensor, budget: int, protected: int, pool_kernel: int = 1) -> torch.Tensor:
    """Kept positions: the ``protected`` last tokens plus the best ``budget - protected`` others.

    Args:
        scores: ``[m]`` or ``[H, m]`` scores, higher = keep. Positions ``>= m - protected`` are
            not ranked (always kept); pooling applies to the ranked prefix only, as SnapKV pools
            the scores of the keys before its observation window.
        budget: tokens to keep (per row), clamped to ``[protected, m]``.
        protected: length of the always-kept suffix.
        pool_kernel: odd pooling kernel (1: none).

    Returns:
        int64 ``[k]`` or ``[H, k]`` sorted ascending. Ties keep the lower position
        (stable sort), NaN scores rank last.
    """
    m = scores.shape[-1]
    protected = min(max(protected, 0), m)
    budget = min(max(budget, protected), m)
    n_cand, n_pick = m - protected, budget - protected
    dev = scores.device
    lead = scores.shape[:-1]
    tail = torch.arange(n_cand, m, device=dev, dtype=torch.int64).expand(*lead, protected)
    if n_pick == 0:
        return tail.clone()
    cand = pool_scores(scores[..., :n_cand], pool_kernel)
    cand = torch.where(torch.isnan(cand), torch.full_like(cand, -math.inf), cand)
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices[..., :n_pick]
    picked = torch.sort(order, dim=-1).values.to(torch.int64)
    return torch.cat([picked, tail], dim=-1)


def select_kept_adaptive(scores: torch.Tensor, budget: int, protected: int, floor: float,
                         pool_kernel: int = 1) -> list[torch.Tensor]:
    """Per-KV-head kept positions with an adaptive split of the layer's budget (Ada-KV, Feng et
    al. 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", Alg. 1 with
    its safeguard).

    The layer keeps ``H * budget`` positions in all. Every head keeps the ``protected`` suffix
    and its own best ``f = ceil(floor * (budget - protected))`` ranked positions; the other
    ``H * (budget - protected - f)`` picks go to the highest remaining scores of *all* heads
    (one top-k over the flattened ``[H, m - protected]`` candidates), so heads whose attention
    mass is concentrated on few keys give budget to heads that spread it. ``floor = 1`` is
    :func:`select_kept` per head.

    Args:
        scores: ``[H, m]`` scores of the layer's KV heads, higher = keep (comparable across
            heads: each is attention mass of the head's query group).
        budget, protected, pool_kernel: as in :func:`select_kept` (per head).
        floor: the share of each head's ranked picks it keeps whatever the others score, in [0, 1].

    Returns:
        ``H`` int64 tensors, sorted ascending, of lengths that sum to ``H * budget`` (clamped).
    """
    h, m = scores.shape
    protected = min(max(protected, 0), m)
    budget = min(max(budget, protected), m)
    n_cand, n_pick = m - protected, budget - protected
    dev = scores.device
    tail = torch.arange(n_cand, m, device=dev, dtype=torch.int64)
    if n_pick == 0:
        return [tail.clone() for _ in range(h)]
    cand = pool_scores(scores[:, :n_cand], pool_kernel)
    cand = torch.where(torch.isnan(cand), torch.full_like(cand, -math.inf), cand)
    order = torch.sort(cand, dim=-1, descending=True, stable=True).indices  # [H, n_cand], best first
    f = min(n_pick, math.ceil(floor * n_pick - 1e-9))
    chosen = torch.zeros(h, n_cand, dtype=torch.bool, device=dev)
    chosen.scatter_(1, order[:, :f], True)
    rest = h * (n_pick - f)
    if rest:  # the joint top-k over what the floors left; ties: lower head, then lower position
        flat = cand.masked_fill(chosen, -math.inf).flatten()
        free = (~chosen).flatten()
        ranked = torch.sort(flat, descending=True, stable=True).indices
        ranked = ranked[free[ranked]][:rest]
        chosen.view(-1)[ranked] = True
    return [torch.cat([torch.nonzero(chosen[i]).flatten().to(torch.int64), tail]) for i in range(h)]
