"""Statistics when each KV head holds its own keys (a prefix compressed per head, head cells).

The oracle is the materialised float64 attention in which query head ``h`` may attend only to the
keys its KV head holds (and causally); it is written here, apart from the accumulator.
"""
from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.policy import PolicyConfig, StatsAccumulator, locate_window


def _masked_oracle(q, q_pos, k, present, scale, threshold):
    """col ``[Hkv, m]`` (summed over each GQA group), below and causal ``[Hq]``."""
    n_q, hq, _ = q.shape
    hkv, m = present.shape
    g = hq // hkv
    s = torch.einsum("qhd,khd->hqk", q.double(), k.double().repeat_interleave(g, dim=1)) * scale
    causal = torch.arange(m)[None, :] <= q_pos[:, None]  # [n_q, m]
    allowed = causal[None] & present.repeat_interleave(g, 0)[:, None, :]  # [Hq, n_q, m]
    a = torch.softmax(s.masked_fill(~allowed, -math.inf), dim=-1)
    below = ((a < threshold * a.amax(-1, keepdim=True)) & allowed).sum((1, 2))
    return a.sum(1).view(hkv, g, m).sum(1), below, allowed.sum((1, 2))


def _setup(m=40, hq=4, hkv=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(m, hq, d, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(m, hkv, d, generator=gen, dtype=torch.float64) * 2
    cfg = PolicyConfig(stats_dtype="float64", key_chunk=5, query_chunk=3)
    return q, k, cfg


@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.2])
def test_each_head_attends_over_its_own_keys(threshold) -> None:
    m, hq, hkv = 40, 4, 2
    q, k, cfg = _setup(m, hq, hkv)
    cfg = PolicyConfig(stats_dtype="float64", key_chunk=5, query_chunk=3, sparsity_threshold=threshold)
    protected = 24  # positions below came from the tree, compressed per head; the rest are new rows
    gen = torch.Generator().manual_seed(7)
    present = torch.ones(hkv, m, dtype=torch.bool)
    present[:, :protected] = torch.rand(hkv, protected, generator=gen) < 0.5
    present[0, 3] = True
    present[1, 3] = False  # heads differ
    window = locate_window(m, [(2, 20)], cfg)
    acc = StatsAccumulator(1, hq, hkv, m, window, cfg, first_row=protected)
    new = torch.arange(protected, m)
    keys = [k[present[h], h] for h in range(hkv)]
    positions = [torch.nonzero(present[h]).flatten() for h in range(hkv)]
    acc.add_per_head(0, q[new], new, keys, positions, 0.35)
    rows = new[(new >= window.start) & (new < window.end)]
    col, below, causal = _masked_oracle(q[rows], rows, k, present, 0.35, threshold)
    torch.testing.assert_close(acc.stats.col[0], col, rtol=1e-12, atol=1e-12)
    assert torch.equal(acc.stats.below[0], below) and torch.equal(acc.stats.causal[0], causal)
    assert acc.stats.rows_seen == [rows.numel()]  # one count per row, not per head
    assert float(acc.stats.col[0][~present].abs().sum()) == 0.0  # absent keys get no attention


def test_all_keys_present_equals_add() -> None:
    m, hq, hkv = 36, 6, 2
    q, k, cfg = _setup(m, hq, hkv, seed=2)
    window = locate_window(m, [(1, 22)], cfg)
    whole = StatsAccumulator(2, hq, hkv, m, window, cfg)
    heads = StatsAccumulator(2, hq, hkv, m, window, cfg)
    for layer in range(2):
        for a, b in [(0, 17), (17, 36)]:  # prefill chunks: keys so far
            whole.add(layer, q[a:b], torch.arange(a, b), k[:b], 0.3)
            heads.add_per_head(layer, q[a:b], torch.arange(a, b), [k[:b, h] for h in range(hkv)], [None] * hkv, 0.3)
    for name in ("col", "below", "causal"):
        torch.testing.assert_close(getattr(heads.stats, name), getattr(whole.stats, name), rtol=1e-12, atol=1e-12)
    assert heads.stats.rows_seen == whole.stats.rows_seen and heads.stats.complete


def test_per_head_inputs_are_checked() -> None:
    q, k, cfg = _setup()
    acc = StatsAccumulator(1, 4, 2, 40, locate_window(40, [(2, 20)], cfg), cfg)
    with pytest.raises(ValueError, match="2 KV heads"):
        acc.add_per_head(0, q, torch.arange(40), [k[:, 0]], [None], 0.3)
    with pytest.raises(ValueError, match="query heads"):
        acc.add_per_head(0, q[:, :2], torch.arange(40), [k[:, 0], k[:, 1]], [None, None], 0.3)
