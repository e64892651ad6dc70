"""VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317): post-vision attention + sparsity budgets.

Score (Sec. 3): ``s[l, j] = sum_{q in P} A_l[q, j]``, summed over query heads (per KV head
under head granularity); visual and text keys compete in one ranking. Budget (Sec. 2):
``beta[l] = clip((1 - gamma[l]) / Z * alpha * L, clip_min, clip_max)``.
"""

from __future__ import annotations

import torch

from vlcache_sglang.policy.methods.base import Method, ScoreContext


def score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """Accumulated post-vision attention per KV head, ``[Hkv, m]``."""
    assert ctx.stats.col is not None
    return ctx.stats.col[layer]


METHOD = Method(
    name="vlcache",
    score=score,
    default_budget="adaptive",
    rows="window",
    reference="VL-Cache, Tu et al., ICLR 2025 (arXiv 2410.23317)",
)
