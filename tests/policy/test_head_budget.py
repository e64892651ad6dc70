"""Per-KV-head budgets: ``head_budget="uniform"`` (``k_l`` per head) and ``"adaptive"`` (Ada-KV's
split of the layer's ``H * k_l`` by the heads' own scores, with a floor per head)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.policy.plan_helper import HKV, L, M, check_plan, compressing_methods, run_plan
from vlcache_sglang.policy import PolicyConfig, PolicyConfigError
from vlcache_sglang.policy.selection import select_kept, select_kept_adaptive


def test_floor_one_is_the_uniform_per_head_selection():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 50, generator=g)
    adaptive = select_kept_adaptive(scores, 12, 3, floor=1.0)
    assert [a.tolist() for a in adaptive] == select_kept(scores, 12, 3).tolist()


def test_concentrated_heads_give_budget_to_spread_heads():
    """Head 0 puts its mass on 2 keys, head 1 spreads it over 20: with a floor of 0.2 of the 10
    ranked picks, head 0 keeps its 2 peaks and its floor, head 1 takes the rest."""
    m, budget, protected = 40, 12, 2
    scores = torch.zeros(2, m)
    scores[0, [5, 9]] = 0.5
    scores[1, 10:30] = 0.05
    heads = select_kept_adaptive(scores, budget, protected, floor=0.2)
    n_pick = budget - protected
    assert sum(h.numel() for h in heads) == 2 * budget  # the layer's total is kept
    assert heads[0].numel() == protected + math.ceil(0.2 * n_pick)  # head 0 is left at its floor
    assert {5, 9} <= set(heads[0].tolist())
    assert heads[1].numel() == 2 * budget - heads[0].numel()
    assert set(range(10, 28)) <= set(heads[1].tolist())  # its spread keys, best first (ties: lower)
    for h in heads:
        assert h[-protected:].tolist() == [m - 2, m - 1]  # every head keeps the protected suffix
        assert torch.all(h[1:] > h[:-1])


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5])
@pytest.mark.parametrize("seed", range(4))
def test_adaptive_keeps_the_layer_total_the_floor_and_the_best_scores(floor, seed):
    g = torch.Generator().manual_seed(seed)
    h, m, budget, protected = 4, 60, 15, 3
    scores = torch.rand(h, m, generator=g) ** 4
    heads = select_kept_adaptive(scores, budget, protected, floor)
    n_pick = budget - protected
    f = math.ceil(floor * n_pick - 1e-9)
    assert sum(x.numel() for x in heads) == h * budget
    ranked = m - protected
    for i, x in enumerate(heads):
        assert x.numel() >= protected + f
        own = x[x < ranked]
        assert set(scores[i, :ranked].argsort(descending=True)[:f].tolist()) <= set(own.tolist())
    # beyond the floors, every kept score beats every dropped one (one joint top-k)
    chosen = torch.zeros(h, ranked, dtype=torch.bool)
    for i, x in enumerate(heads):
        chosen[i, x[x < ranked]] = True
    floors = torch.zeros_like(chosen)
    for i in range(h):
        floors[i, scores[i, :ranked].argsort(descending=True, stable=True)[:f]] = True
    extra = scores[:, :ranked][chosen & ~floors]
    dropped = scores[:, :ranked][~chosen]
    if extra.numel() and dropped.numel():
        assert float(extra.min()) >= float(dropped.max())


@pytest.mark.parametrize("method", compressing_methods())
def test_adaptive_plans_of_every_method_are_valid(method):
    cfg = PolicyConfig(method=method, granularity="head", head_budget="adaptive", alpha=0.3, window_size=8)
    plan = run_plan(cfg)
    check_plan(plan, cfg)
    assert plan.head_budgets is not None and len(plan.head_budgets) == L
    assert all(len(b) == HKV for b in plan.head_budgets)


def test_held_ratio_counts_each_heads_cells_and_the_union_holds_more():
    cfg = PolicyConfig(granularity="head", head_budget="adaptive", alpha=0.2, window_size=8)
    plan = run_plan(cfg)
    cells = sum(sum(b) for b in plan.head_budgets)
    assert plan.held_ratio == cells / (L * HKV * M)
    union = sum(k.numel() for k in plan.kept) / (L * M)
    assert plan.held_ratio < union  # the heads disagree: layer cells would hold more
    layer = run_plan(cfg.replace(granularity="layer"))
    assert layer.head_kept is None and layer.held_ratio == layer.kept_ratio
    d = plan.to_dict()
    assert d["held_ratio"] == plan.held_ratio and d["head_budgets"] == plan.head_budgets


def test_identity_head_plans_keep_every_position_in_every_head():
    plan = run_plan(PolicyConfig(granularity="head", alpha=1.0))
    assert plan.is_identity and plan.held_ratio == 1.0
    assert all(h.tolist() == list(range(M)) for heads in plan.head_kept for h in heads)


@pytest.mark.parametrize("field,value,match", [("head_budget", "ada", "head_budget"), ("head_floor", 1.5, "head_floor"),
                                               ("head_floor", -0.1, "head_floor")])
def test_bad_head_budget_settings_are_refused_by_name(field, value, match):
    with pytest.raises(PolicyConfigError, match=match):
        PolicyConfig(granularity="head", **{field: value})
    assert PolicyConfig.from_dict({"granularity": "head", "head_budget": "adaptive", "head_floor": 0.3}).head_floor == 0.3
