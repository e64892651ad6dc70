"""What a method is: a score function plus a budget function (kvpress ``presses/`` style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from vlcache_sglang.policy.config import PolicyConfig
    from vlcache_sglang.policy.stats import PolicyStats
    from vlcache_sglang.policy.window import WindowSpec

__all__ = ["Method", "ScoreContext"]


@dataclass(frozen=True)
class ScoreContext:
    """What a score function may look at for one request."""

    cfg: "PolicyConfig"
    stats: "PolicyStats"
    window: "WindowSpec"
    device: torch.device


ScoreFn = Callable[[ScoreContext, int], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A registered compression method.

    Attributes:
        name: registry key.
        score: ``score(ctx, layer) -> [Hkv, m]`` float scores, higher = keep. Layer granularity
            sums them over KV heads; the protected suffix is not ranked.
        default_budget: ``"adaptive"``, ``"uniform"`` or ``"pyramid"`` (``budgets.py``).
        rows: query rows the statistics need: ``"window"``, ``"all"`` or ``"none"``.
        window_mode: ``"last_w"`` when the method fixes its window, else None (config decides).
        default_pool_kernel: pooling kernel when ``cfg.pool_kernel`` is None.
        default_protect_window: whether the window is force-kept when ``cfg.protect_window`` is None.
        identity: the method never drops anything (``full``).
        reference: the paper it follows.
    """

    name: str
    score: ScoreFn
    default_budget: str = "uniform"
    rows: str = "none"
    window_mode: str | None = None
    default_pool_kernel: int = 1
    default_protect_window: bool = False
    identity: bool = False
    reference: str = ""


def window_attention(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """Attention accumulated over the measured window rows, per KV head, ``[Hkv, m]``.

    VL-Cache's ``s[l, j] = sum_{q in P} A_l[q, j]`` (P: post-vision span) and SnapKV's observation
    window score (P: last ``w`` rows; pooling is applied at selection) are this same sum."""
    assert ctx.stats.col is not None
    return ctx.stats.col[layer]
