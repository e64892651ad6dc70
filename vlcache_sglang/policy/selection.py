"""Top-k selection with a protected recent suffix and deterministic ties (VL-Cache Sec. 4)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["pool_scores", "select_kept"]


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
