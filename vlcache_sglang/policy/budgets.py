"""Per-layer token budgets: VL-Cache's sparsity-adaptive split, uniform, PyramidKV's pyramid.

A budget function returns real-valued per-layer targets (tokens, mean about ``alpha * m``);
:func:`finalize_budgets` then applies the clip bounds and the recent-window floor, either
rounding each layer on its own (the paper: what clipping cuts or adds is lost) or, with
``redistribute``, water-filling so that the kept total is exactly ``round(alpha * m * L)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    from vlcache_sglang.policy.config import PolicyConfig

__all__ = [
    "BudgetContext",
    "BUDGET_FUNCTIONS",
    "adaptive_budgets",
    "finalize_budgets",
    "fit_total",
    "pyramid_budgets",
    "uniform_budgets",
]


@dataclass(frozen=True)
class BudgetContext:
    """What a budget function may look at."""

    prompt_len: int
    num_layers: int
    cfg: "PolicyConfig"
    layer_sparsity: torch.Tensor | None  # [L] gamma[l], None for stats-free methods


def uniform_budgets(ctx: BudgetContext) -> list[float]:
    """``floor(alpha * m)`` tokens in every layer (kvpress ``compute_n_kept`` convention)."""
    k = max(1, math.floor(ctx.cfg.alpha * ctx.prompt_len + 1e-9))
    return [float(k)] * ctx.num_layers


def adaptive_budgets(ctx: BudgetContext) -> list[float]:
    """VL-Cache Sec. 2: ``beta[l] * m`` with ``beta[l] = d[l] / Z * alpha * L`` before clipping.

    ``d[l] = 1 - gamma[l]`` (layer density), ``Z = sum_l d[l]``. Clipping to
    ``[clip_min, clip_max]`` happens in :func:`finalize_budgets`. All-zero densities fall back
    to a uniform split.
    """
    if ctx.layer_sparsity is None:
        raise ValueError("adaptive budgets need layer sparsity statistics")
    d = (1.0 - ctx.layer_sparsity.double().cpu()).clamp_min(0.0).tolist()
    z = sum(d)
    n_layers, m, alpha = ctx.num_layers, ctx.prompt_len, ctx.cfg.alpha
    if z <= 0.0:
        return [alpha * m] * n_layers
    return [di / z * alpha * n_layers * m for di in d]


def pyramid_budgets(ctx: BudgetContext) -> list[float]:
    """PyramidKV (Cai et al. 2024) as in kvpress ``PyramidKVPress.get_layer_budget``.

    With window ``w`` and ``C = w + alpha * m``: ``min = (C - w) / beta``,
    ``max = 2 (C - w) - min`` (capped at ``m - w``, moving ``min`` to keep the sum), then
    ``k[l] = round(max - l * (max - min) / (L - 1))``: the mean is ``alpha * m``. If the shape
    is infeasible (``not m >= max >= min >= w``) every layer gets ``round(alpha * m)``.
    """
    m, n_layers, cfg = ctx.prompt_len, ctx.num_layers, ctx.cfg
    w, beta = min(cfg.window_size, m), cfg.pyramid_beta
    cap = w + m * cfg.alpha
    min_num = (cap - w) / beta
    max_num = (cap - w) * 2 - min_num
    if max_num >= m - w:
        max_num = m - w
        min_num = (cap - w) * 2 - max_num
    if not (m >= max_num >= min_num >= w):
        return [float(max(1, round(m * cfg.alpha)))] * n_layers
    steps = (max_num - min_num) / (n_layers - 1) if n_layers > 1 else 0.0
    return [float(round(max_num - layer * steps)) for layer in range(n_layers)]


BUDGET_FUNCTIONS: dict[str, Callable[[BudgetContext], list[float]]] = {
    "adaptive": adaptive_budgets,
    "uniform": uniform_budgets,
    "pyramid": pyramid_budgets,
}


def fit_total(weights: Sequence[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers ``k[l]`` in ``[lo, hi]`` summing to ``total`` (clamped to ``[L lo, L hi]``).

    Water-filling: find ``c`` with ``sum_l clip(c * w[l], lo, hi) = total`` (bisection on a
    monotone piecewise-linear function), floor, then hand the remaining units to the largest
    fractional parts (ties: lower layer first). So what clipping cuts from one layer goes to
    the unclipped layers in proportion to their weights.
    """
    n = len(weights)
    if n == 0:
        return []
    if lo > hi:
        raise ValueError(f"lo={lo} > hi={hi}")
    total = min(max(int(total), n * lo), n * hi)
    w = [max(0.0, float(x)) if math.isfinite(float(x)) else 0.0 for x in weights]
    top = max(w)
    w = [1.0] * n if top <= 0.0 else [x + 1e-12 * top for x in w]  # zero weights still reach hi

    def filled(c: float) -> float:
        return sum(min(hi, max(lo, c * x)) for x in w)

    c_lo, c_hi = 0.0, hi / min(w) + 1.0
    for _ in range(200):
        mid = 0.5 * (c_lo + c_hi)
        if filled(mid) < total:
            c_lo = mid
        else:
            c_hi = mid
    x = [min(hi, max(lo, c_hi * xi)) for xi in w]
    k = [min(hi, max(lo, math.floor(xi))) for xi in x]
    order = sorted(range(n), key=lambda i: (-(x[i] - k[i]), i))
    deficit = total - sum(k)
    while deficit > 0:
        for i in order:
            if deficit > 0 and k[i] < hi:
                k[i] += 1
                deficit -= 1
    while deficit < 0:
        for i in reversed(order):
            if deficit < 0 and k[i] > lo:
                k[i] -= 1
                deficit += 1
    return k


def finalize_budgets(raw: Sequence[float], prompt_len: int, cfg: "PolicyConfig",
                     protected: int) -> tuple[list[int], list[str]]:
    """Clip, floor at the protected suffix and round ``raw`` targets; returns (budgets, notes).

    Per-layer bounds in tokens: ``lo = max(1, protected, ceil(clip_min m))``,
    ``hi = max(lo, min(m, floor(clip_max m)))``. Without ``redistribute`` each layer is
    ``clamp(round(raw[l]), lo, hi)`` (VL-Cache's clip; the total may drift from alpha). With it,
    :func:`fit_total` makes the sum exactly ``round(alpha m L)`` when that is within bounds.
    """
    m, n_layers = prompt_len, len(raw)
    lo = max(1, protected, math.ceil(cfg.clip_min * m - 1e-9))
    hi = max(lo, min(m, math.floor(cfg.clip_max * m + 1e-9)))
    notes: list[str] = []
    if not cfg.redistribute:
        return [min(hi, max(lo, math.floor(r + 0.5))) for r in raw], notes
    target = round(cfg.alpha * m * n_layers)
    if target < n_layers * lo:
        notes.append(f"target {target} tokens is below the per-layer floor {lo} x {n_layers} layers "
                     "(recent window or clip_min): kept more")
    elif target > n_layers * hi:
        notes.append(f"target {target} tokens exceeds the per-layer cap {hi} x {n_layers} layers: kept less")
    return fit_total(raw, target, lo, hi), notes
