"""The recent window per layer (VL-Cache's rule) against the shared one (issue: a shared window
starves sparse layers).

Reproduction through the public API: float64 q, k of 2 layers, 4 query / 2 KV heads, 1000
positions, head dim 16; layer 1's queries and key 5 aligned on one axis (q = 30 e0, the other
keys scaled by 0.01, k[5] = 30 e0), post-vision window from 900, alpha 0.1. Layer 1 is nearly
all-sparse, so it lands on the budget floor (10 = clip_min m) and the shared recent window
(ceil(0.1 * 0.1 * 1000) = 10) fills it: key 5, the one key its queries attend to, is dropped.
The paper's rule keeps max(1, floor(0.1 k_l)) recent tokens inside each layer's own budget, and
key 5 is kept."""
from __future__ import annotations

import pytest
import torch

from vlcache_sglang.policy import PolicyConfig, StatsAccumulator, build_plan, locate_window
from vlcache_sglang.policy.plan import layer_recent

M, L, HQ, HKV, D, WINDOW_START = 1000, 2, 4, 2, 16, 900


def plan(recent_window: str):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(L, M, HQ, D, generator=g, dtype=torch.float64)
    k = torch.randn(L, M, HKV, D, generator=g, dtype=torch.float64)
    e0 = torch.zeros(D, dtype=torch.float64)
    e0[0] = 30.0
    q[1] = e0
    k[1] *= 0.01
    k[1, 5] = e0
    cfg = PolicyConfig(alpha=0.1, recent_window=recent_window, stats_dtype="float64")
    window = locate_window(M, [(0, WINDOW_START - 1)], cfg)
    assert (window.start, window.end) == (WINDOW_START, M)
    acc = StatsAccumulator(L, HQ, HKV, M, window, cfg)
    rows = torch.arange(WINDOW_START, M)
    for layer in range(L):
        acc.add(layer, q[layer, WINDOW_START:], rows, k[layer], D ** -0.5)
    return build_plan(acc)


def test_shared_window_starves_the_sparse_layer():
    p = plan("shared")
    assert p.budgets == [190, 10] and p.protected == 10
    assert 5 not in p.kept[1].tolist()  # layer 1 keeps only its 10 most recent tokens
    assert p.kept[1].tolist() == list(range(990, 1000))


def test_per_layer_window_keeps_the_key_the_sparse_layer_attends_to():
    p = plan("per_layer")
    assert p.budgets == [190, 10]
    assert 5 in p.kept[1].tolist()
    assert p.kept[1][-1].item() == M - 1  # its one recent token (max(1, floor(0.1 * 10)))
    assert [len(k) for k in p.kept] == p.budgets
    assert p.kept[0][-19:].tolist() == list(range(M - 19, M))  # floor(0.1 * 190) recent in layer 0


@pytest.mark.parametrize("budget,share,expected", [(10, 0.1, 1), (190, 0.1, 19), (5, 0.1, 1), (100, 0.0, 0),
                                                   (3, 0.9, 2)])
def test_layer_recent_is_a_share_of_the_layers_own_budget(budget, share, expected):
    cfg = PolicyConfig(alpha=0.1, recent_share=share, recent_window="per_layer")
    assert layer_recent(budget, 0, cfg) == expected
    assert layer_recent(budget, 4, cfg) == min(budget, max(4, expected))  # a force-kept window stays
    assert layer_recent(budget, 7, PolicyConfig(alpha=0.1, recent_share=share)) == 7  # shared: the suffix


def test_unknown_rule_is_refused():
    from vlcache_sglang.policy import PolicyConfigError

    with pytest.raises(PolicyConfigError, match="recent_window"):
        PolicyConfig(recent_window="both")
