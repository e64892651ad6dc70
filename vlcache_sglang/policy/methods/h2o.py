"""H2O (Zhang et al., NeurIPS 2023, arXiv 2306.14048): attention accumulated over all queries.

Score: ``sum_q A[q, j]`` over every prompt row (heavy hitters). With ``cfg.h2o_normalize`` it is
divided by the number of queries that see key ``j`` (``m - j``), kvpress
``ObservedAttentionPress``'s mean attention.
"""

from __future__ import annotations

import torch

from vlcache_sglang.policy.methods.base import Method, ScoreContext


def score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """Accumulated attention per KV head, ``[Hkv, m]``."""
    assert ctx.stats.col is not None
    s = ctx.stats.col[layer]
    if ctx.cfg.h2o_normalize:
        m = s.shape[-1]
        s = s / torch.arange(m, 0, -1, device=s.device, dtype=s.dtype)
    return s


METHOD = Method(
    name="h2o",
    score=score,
    default_budget="uniform",
    rows="all",
    reference="H2O, Zhang et al., NeurIPS 2023 (arXiv 2306.14048)",
)
