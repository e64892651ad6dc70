"""Shared by the policy tests: the registry's method matrix and plans on synthetic statistics."""

from __future__ import annotations

import json
import math

import torch

from vlcache_sglang.policy import (
    CompressionPlan,
    PolicyConfig,
    StatsAccumulator,
    attention_stats,
    available_methods,
    build_plan,
    get_method,
    locate_window,
)

M, L, HQ, HKV, D = 80, 3, 4, 2, 8
SPANS = [(3, 20), (22, 50)]  # two images; post-vision window is [51, 80)
GRANULARITIES = ("layer", "head")


def method_matrix() -> list[tuple[str, str]]:
    """Every method registered now x every granularity."""
    return [(method, gran) for method in available_methods() for gran in GRANULARITIES]


def compressing_methods() -> list[str]:
    """Registered methods that can drop tokens (all but the identity ones)."""
    return [name for name in available_methods() if not get_method(name).identity]


def run_plan(cfg: PolicyConfig, m: int = M, spans=SPANS, seed: int = 0, device: str = "cpu",
             stats_fn=attention_stats) -> CompressionPlan:
    """The plan of ``cfg`` over random q/k statistics of ``L`` layers (``stats_fn``: the statistics
    function handed to the policy, as the backend hands it the kernel dispatch)."""
    g = torch.Generator().manual_seed(seed)
    window = locate_window(m, spans, cfg)
    acc = StatsAccumulator(L, HQ, HKV, m, window, cfg, stats_fn=stats_fn)
    for layer in range(L):
        q = (torch.randn(m, HQ, D, generator=g) * (1 + layer)).to(device)
        k = (torch.randn(m, HKV, D, generator=g) * 2).to(device)
        acc.add(layer, q, torch.arange(m, device=device), k, D ** -0.5)
    return build_plan(acc)


def head_rows(plan: CompressionPlan, layer: int) -> list[torch.Tensor]:
    """What each KV head of ``layer`` keeps (head granularity), else the layer's one set."""
    return list(plan.head_kept[layer]) if plan.head_kept is not None else [plan.kept[layer]]


def check_plan(plan: CompressionPlan, cfg: PolicyConfig, m: int = M) -> None:
    """Shapes, sorted unique in-range positions and the kept recent window, every layer; with head
    granularity ``kept[l]`` is the union of the heads' sets."""
    assert len(plan.kept) == len(plan.budgets) == plan.num_layers
    assert (plan.head_kept is not None) == (cfg.granularity == "head")
    for layer, kept in enumerate(plan.kept):
        rows = head_rows(plan, layer)
        if cfg.granularity == "head":
            assert len(rows) == HKV
            if cfg.head_budget == "uniform":
                assert all(r.shape == (plan.budgets[layer],) for r in rows)
            assert sum(r.numel() for r in rows) == HKV * plan.budgets[layer]
            assert torch.equal(kept, torch.unique(torch.cat(rows)))
        else:
            assert kept.shape == (plan.budgets[layer],)
        assert kept.dtype == torch.int64 and all(r.dtype == torch.int64 for r in rows)
        for row in rows:
            assert torch.all(row[1:] > row[:-1]), "sorted and unique"
            assert 0 <= int(row[0]) and int(row[-1]) < m
            tail = torch.arange(m - plan.protected, m)
            assert torch.isin(tail, row).all(), "recent window kept"


def check_matrix_cell(method: str, granularity: str) -> None:
    """One cell of the method matrix: a valid, deterministic plan at alpha 0.3; alpha 1 keeps all."""
    cfg = PolicyConfig(method=method, granularity=granularity, alpha=0.3, window_size=8)
    plan = run_plan(cfg)
    check_plan(plan, cfg)
    assert plan.method == method and plan.granularity == granularity
    identity = get_method(method).identity
    assert plan.is_identity == identity
    if not identity:
        assert sum(plan.budgets) == round(0.3 * M * L)  # redistribution on by default
        assert plan.protected >= math.ceil(0.1 * 0.3 * M)
        assert abs(plan.kept_ratio - 0.3) < 1 / M
    again = run_plan(cfg)
    assert all(torch.equal(a, b) for a, b in zip(plan.kept, again.kept)), "deterministic"
    assert plan.head_budgets == again.head_budgets
    json.dumps(plan.to_dict())
    # alpha = 1 keeps everything
    full = run_plan(cfg.replace(alpha=1.0))
    assert full.is_identity and all(k.shape[-1] == M for k in full.kept) and full.kept_ratio == 1.0
