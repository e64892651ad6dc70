"""Plans for every method x granularity: the shared matrix, identity cases and properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.policy.plan_helper import (
    D,
    HKV,
    HQ,
    L,
    M,
    SPANS,
    check_matrix_cell,
    compressing_methods,
    head_rows,
    method_matrix,
    run_plan,
)
from vlcache_sglang.policy import (
    PolicyConfig,
    PolicyError,
    PolicyStats,
    StatsAccumulator,
    available_methods,
    build_plan,
    get_method,
    keep_everything,
    locate_window,
    protected_suffix,
    select_kept,
)

MATRIX = method_matrix()


@pytest.mark.parametrize(("method", "granularity"), MATRIX)
def test_method_matrix(method: str, granularity: str) -> None:
    assert set(m for m, _ in MATRIX) == set(available_methods())
    check_matrix_cell(method, granularity)


def test_snapkv_and_pyramidkv_force_keep_their_window() -> None:
    for method in ("snapkv", "pyramidkv"):
        plan = run_plan(PolicyConfig(method=method, alpha=0.3, window_size=12))
        assert plan.protected == 12 and plan.window.mode == "last_w"
    pyr = run_plan(PolicyConfig(method="pyramidkv", alpha=0.5, window_size=8, pyramid_beta=4.0, redistribute=False))
    assert pyr.budgets == sorted(pyr.budgets, reverse=True) and pyr.budgets[0] > pyr.budgets[-1]


def test_streamingllm_keeps_sinks_and_recent() -> None:
    plan = run_plan(PolicyConfig(method="streamingllm", alpha=0.25, n_sink=4, redistribute=False))
    assert torch.equal(plan.kept[0], torch.cat([torch.arange(4), torch.arange(M - 16, M)]))


def test_random_depends_on_seed_only() -> None:
    a = run_plan(PolicyConfig(method="random", alpha=0.3, seed=1))
    b = run_plan(PolicyConfig(method="random", alpha=0.3, seed=1), seed=9)  # other q/k
    c = run_plan(PolicyConfig(method="random", alpha=0.3, seed=2))
    assert all(torch.equal(x, y) for x, y in zip(a.kept, b.kept))
    assert not all(torch.equal(x, y) for x, y in zip(a.kept, c.kept))


def test_vlcache_budgets_follow_sparsity() -> None:
    cfg = PolicyConfig(alpha=0.3)
    plan = run_plan(cfg)
    window = locate_window(M, SPANS, cfg)
    acc = StatsAccumulator(L, HQ, HKV, M, window, cfg)
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        acc.add(layer, torch.randn(M, HQ, D, generator=g) * (1 + layer), torch.arange(M),
                torch.randn(M, HKV, D, generator=g) * 2, D ** -0.5)
    density = 1 - acc.stats.layer_sparsity()
    order = torch.argsort(density, descending=True).tolist()
    assert [plan.budgets[i] for i in order] == sorted(plan.budgets, reverse=True)


@pytest.mark.parametrize(
    ("cfg", "m", "spans", "why"),
    [
        (PolicyConfig(), M, [], "text-only"),
        (PolicyConfig(method="full"), M, SPANS, "method 'full'"),
        (PolicyConfig(min_prompt_len=100), M, SPANS, "min_prompt_len"),
        (PolicyConfig(alpha=0.9, recent_share=1.0), 3, [(0, 0)], "covers the prompt"),  # prompt within the recent window
    ],
)
def test_identity_cases(cfg, m, spans, why) -> None:
    plan = run_plan(cfg, m=m, spans=spans)
    assert plan.is_identity and any(why in n for n in plan.notes), plan.notes
    assert all(torch.equal(k, torch.arange(m)) for k in plan.kept)


def test_text_only_last_w_compresses() -> None:
    plan = run_plan(PolicyConfig(text_only="last_w", window_size=10, alpha=0.2), spans=[])
    assert not plan.is_identity and plan.window.fell_back and plan.window.length == 10


def test_incomplete_statistics() -> None:
    cfg = PolicyConfig(alpha=0.3)
    window = locate_window(M, SPANS, cfg)
    acc = StatsAccumulator(L, HQ, HKV, M, window, cfg)
    acc.add(0, torch.randn(M, HQ, D), torch.arange(M), torch.randn(M, HKV, D), 0.3)
    with pytest.raises(PolicyError, match="incomplete statistics"):
        build_plan(acc)
    plan = build_plan(acc, allow_incomplete=True)
    assert any("incomplete" in n for n in plan.notes)


def test_ties_keep_lower_positions() -> None:
    scores = torch.zeros(2, 10)
    assert torch.equal(select_kept(scores, 5, 2), torch.tensor([[0, 1, 2, 8, 9]] * 2))
    scores = torch.tensor([1.0, 3.0, 3.0, 1.0, 3.0, float("nan"), 0.0, 0.0])
    assert select_kept(scores, 4, 1).tolist() == [1, 2, 4, 7]
    assert select_kept(scores, 8, 0).tolist() == list(range(8))


def test_kept_mask() -> None:
    plan = run_plan(PolicyConfig(alpha=0.3, granularity="head"))
    mask = plan.head_mask(1)
    assert mask.shape == (HKV, M) and mask.sum(-1).tolist() == [plan.budgets[1]] * HKV
    assert torch.equal(plan.kept_mask(1), mask.any(0))


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(compressing_methods()),
    granularity=st.sampled_from(["layer", "head"]),
    m=st.integers(1, 300),
    n_layers=st.integers(1, 6),
    alpha=st.floats(0.01, 1.0),
    recent_share=st.sampled_from([0.0, 0.1, 0.5]),
    tie_scores=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_plan_properties(method, granularity, m, n_layers, alpha, recent_share, tie_scores, seed) -> None:
    """Synthetic statistics: budgets exact, clip bounds hold, recent window kept, ties deterministic."""
    cfg = PolicyConfig(method=method, granularity=granularity, alpha=alpha, recent_share=recent_share,
                       text_only="last_w", window_size=16)
    window = locate_window(m, [(0, m // 2)] if m > 1 else [], cfg)
    g = torch.Generator().manual_seed(seed)
    col = torch.zeros(n_layers, HKV, m) if tie_scores else torch.rand(n_layers, HKV, m, generator=g)
    causal = torch.full((n_layers, HQ), 1000, dtype=torch.int64)
    below = torch.randint(0, 1000, (n_layers, HQ), generator=g)
    rows = get_method(method).rows
    expected = {"none": 0, "all": m, "window": window.length}[rows] if window.compress else 0
    stats = PolicyStats(m, n_layers, HQ, HKV, window, rows if window.compress else "none",
                        None if rows == "none" else col, None if rows == "none" else below,
                        None if rows == "none" else causal, [expected] * n_layers)
    plan = build_plan(stats, cfg)
    protected = protected_suffix(m, window, cfg)
    lo = max(1, protected, math.ceil(cfg.clip_min * m - 1e-9))
    target = round(alpha * m * n_layers)
    if plan.is_identity:
        # identity only where nothing can be dropped: alpha 1, no compression window, a floor that
        # covers the prompt, or a total budget that rounds up to every token of every layer
        assert alpha >= 1.0 or not window.compress or lo >= m or target >= m * n_layers, (alpha, m, lo, target)
        assert plan.budgets == [m] * n_layers
        return
    assert all(lo <= b <= m for b in plan.budgets)
    if n_layers * lo <= target:
        assert sum(plan.budgets) == target
        assert abs(sum(plan.budgets) / n_layers - alpha * m) <= 1.0
    for layer in range(plan.num_layers):
        for row in head_rows(plan, layer):
            assert row.numel() == plan.budgets[layer]
            assert torch.isin(torch.arange(m - plan.protected, m), row).all()
            if tie_scores and method in ("vlcache", "h2o") and not cfg.h2o_normalize:
                n_pick = plan.budgets[layer] - plan.protected
                assert torch.equal(row[:n_pick], torch.arange(n_pick)), "ties: lower positions win"
    again = build_plan(stats, cfg)
    assert all(torch.equal(a, b) for a, b in zip(plan.kept, again.kept))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["vlcache", "h2o", "streamingllm", "random"])
def test_cuda_plan_matches_cpu(method: str) -> None:
    from vlcache_sglang.kernels.dispatch import attention_stats_auto  # what the backend hands the policy on CUDA

    cfg = PolicyConfig(method=method, alpha=0.3, stats_dtype="float64")
    cpu, gpu = run_plan(cfg), run_plan(cfg, device="cuda", stats_fn=attention_stats_auto)
    assert gpu.kept[0].device.type == "cuda" and gpu.budgets == cpu.budgets
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.kept, gpu.kept))


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_keep_everything_keeps_every_position_and_is_not_an_identity(granularity: str) -> None:
    plan = run_plan(PolicyConfig(method="vlcache", alpha=0.2, granularity=granularity))
    assert not plan.is_identity and plan.kept_ratio < 0.5
    kept = keep_everything(plan, "resumed")
    assert not kept.is_identity and kept.notes == [*plan.notes, "resumed"]
    assert kept.kept_ratio == 1.0 and kept.held_ratio == 1.0 and kept.budgets == [M] * L and kept.protected == M
    assert all(torch.equal(k, torch.arange(M)) for k in kept.kept)
    assert (kept.head_kept is None) == (granularity == "layer")
    if kept.head_kept is not None:
        assert all(torch.equal(h, torch.arange(M)) for heads in kept.head_kept for h in heads)
    assert plan.kept_ratio < 0.5  # the plan it came from is unchanged
