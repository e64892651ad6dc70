"""SnapKV (Li et al., 2024, arXiv 2404.14469): last-w observation window, pooled, per head.

Score: attention of the last ``w`` queries summed over the window rows and over each KV head's
query group, then 1-D average pooling (kernel 5) over the keys before the window. The window
itself is force-kept and counts in the budget (as in kvpress ``SnapKVPress``).
"""

from __future__ import annotations

import torch

from vlcache_sglang.policy.methods.base import Method, ScoreContext


def score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """Window attention per KV head, ``[Hkv, m]`` (pooling is applied at selection)."""
    assert ctx.stats.col is not None
    return ctx.stats.col[layer]


METHOD = Method(
    name="snapkv",
    score=score,
    default_budget="uniform",
    rows="window",
    window_mode="last_w",
    default_pool_kernel=5,
    default_protect_window=True,
    reference="SnapKV, Li et al., 2024 (arXiv 2404.14469)",
)
