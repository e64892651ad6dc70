"""Budget functions: VL-Cache's adaptive split (with and without redistribution), uniform, pyramid."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache_sglang.policy import (
    BudgetContext,
    PolicyConfig,
    adaptive_budgets,
    finalize_budgets,
    fit_total,
    pyramid_budgets,
    uniform_budgets,
)


def _ctx(m, n_layers, sparsity=None, **cfg) -> BudgetContext:
    sp = None if sparsity is None else torch.tensor(sparsity, dtype=torch.float64)
    return BudgetContext(m, n_layers, PolicyConfig(**cfg), sp)


def test_adaptive_matches_the_paper_formula_without_redistribution() -> None:
    gamma = [0.7, 0.99, 0.9, 0.8]
    cfg = PolicyConfig(alpha=0.1, redistribute=False, recent_share=0.0)
    raw = adaptive_budgets(BudgetContext(1000, 4, cfg, torch.tensor(gamma)))
    budgets, _ = finalize_budgets(raw, 1000, cfg, protected=0)
    d = [1 - g for g in gamma]
    beta = [min(1.0, max(0.01, di / sum(d) * 0.1 * 4)) for di in d]
    assert budgets == [math.floor(b * 1000 + 0.5) for b in beta]
    assert budgets[0] > budgets[3] > budgets[2] > budgets[1] == 10  # clip_min = 1% of m


@settings(max_examples=80, deadline=None)
@given(
    gamma=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    m=st.integers(1, 3000),
    alpha=st.floats(0.01, 1.0),
    clip_min=st.sampled_from([0.0, 0.01, 0.05]),
    clip_max=st.sampled_from([1.0, 0.5, 0.3]),
    recent_share=st.sampled_from([0.0, 0.1, 0.3]),
    redistribute=st.booleans(),
)
def test_clip_bounds_and_exact_total(gamma, m, alpha, clip_min, clip_max, recent_share, redistribute) -> None:
    alpha = min(max(alpha, clip_min), clip_max)
    cfg = PolicyConfig(alpha=alpha, clip_min=clip_min, clip_max=clip_max, recent_share=recent_share,
                       redistribute=redistribute)
    n_layers = len(gamma)
    protected = min(m, math.ceil(recent_share * alpha * m - 1e-9))
    raw = adaptive_budgets(BudgetContext(m, n_layers, cfg, torch.tensor(gamma, dtype=torch.float64)))
    budgets, notes = finalize_budgets(raw, m, cfg, protected)
    lo = max(1, protected, math.ceil(clip_min * m - 1e-9))
    hi = max(lo, min(m, math.floor(clip_max * m + 1e-9)))
    assert all(lo <= b <= hi for b in budgets)
    if redistribute:
        target = round(alpha * m * n_layers)
        if n_layers * lo <= target <= n_layers * hi:
            assert sum(budgets) == target and not notes
            assert abs(sum(budgets) / n_layers - alpha * m) <= 1.0  # within one token per layer
        else:
            assert sum(budgets) == (n_layers * lo if target < n_layers * lo else n_layers * hi) and notes


def test_redistribution_moves_what_clipping_cuts() -> None:
    # layer 0 is dense and would take 4 * 0.3 / (1 + 3*0.1) ~ 92% of m: clipped at 50%, the rest
    # goes to the others in proportion to their density.
    k = fit_total([1.0, 0.1, 0.1, 0.1], total=1200, lo=10, hi=500)
    assert k[0] == 500 and sum(k) == 1200 and max(k[1:]) - min(k[1:]) <= 1
    assert fit_total([0.0, 0.0], total=7, lo=1, hi=10) in ([4, 3], [3, 4])
    assert fit_total([5.0, 1.0], total=100, lo=1, hi=10) == [10, 10]  # clamped to L * hi


def test_fully_sparse_layers_split_uniformly() -> None:
    raw = adaptive_budgets(_ctx(100, 4, [1.0, 1.0, 1.0, 1.0], alpha=0.2))
    assert raw == [20.0] * 4


def test_uniform_floor_like_kvpress() -> None:
    assert uniform_budgets(_ctx(201, 3, alpha=0.25)) == [50.0] * 3
    assert uniform_budgets(_ctx(3, 2, alpha=0.1)) == [1.0, 1.0]


def test_pyramid_follows_kvpress_formula() -> None:
    assert pyramid_budgets(_ctx(200, 4, alpha=0.25, window_size=16, pyramid_beta=2.0)) == [75.0, 58.0, 42.0, 25.0]
    # infeasible shape (min < window) falls back to round(alpha m) everywhere
    assert pyramid_budgets(_ctx(200, 4, alpha=0.25, window_size=16, pyramid_beta=20.0)) == [50.0] * 4
    # mean stays alpha * m; decreasing in depth
    b = pyramid_budgets(_ctx(4000, 8, alpha=0.2, window_size=32, pyramid_beta=10.0))
    assert b == sorted(b, reverse=True) and abs(sum(b) / 8 - 800) <= 1
