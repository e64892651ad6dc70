"""Random baseline: uniform scores from a generator seeded by ``cfg.seed`` and the layer."""

from __future__ import annotations

import torch

from vlcache_sglang.policy.methods.base import Method, ScoreContext


def score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """``[Hkv, m]`` uniform scores, drawn on CPU (same on every device) and moved."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(ctx.cfg.seed * 1_000_003 + layer)
    s = torch.rand(ctx.stats.num_kv_heads, ctx.stats.prompt_len, generator=gen, dtype=torch.float64)
    return s.to(ctx.device)


METHOD = Method(name="random", score=score, default_budget="uniform", rows="none",
                reference="random eviction baseline")
