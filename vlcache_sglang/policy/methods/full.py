"""Full cache: keep everything (the identity plan)."""

from __future__ import annotations

import torch

from vlcache_sglang.policy.methods.base import Method, ScoreContext


def score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """Never called for selection (the plan is the identity); all-ones ``[Hkv, m]``."""
    return torch.ones(ctx.stats.num_kv_heads, ctx.stats.prompt_len, device=ctx.device)


METHOD = Method(name="full", score=score, default_budget="uniform", rows="none", identity=True,
                reference="no compression")
