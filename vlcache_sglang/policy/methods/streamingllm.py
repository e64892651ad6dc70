"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks plus recent tokens.

Score: the ``n_sink`` first positions rank above everything, then more recent is better, so
the top ``k`` are the sinks and the last ``k - n_sink`` tokens. No statistics needed.
"""

from __future__ import annotations

import torch

from vlcache_sglang.policy.methods.base import Method, ScoreContext


def score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """``[Hkv, m]``: position ``j`` for non-sinks, ``m + 1`` for sinks."""
    m, h = ctx.stats.prompt_len, ctx.stats.num_kv_heads
    s = torch.arange(m, device=ctx.device, dtype=torch.float64)
    s[: ctx.cfg.n_sink] = m + 1
    return s.expand(h, m)


METHOD = Method(
    name="streamingllm",
    score=score,
    default_budget="uniform",
    rows="none",
    reference="StreamingLLM, Xiao et al., ICLR 2024 (arXiv 2309.17453)",
)
