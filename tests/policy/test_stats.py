"""Chunked two-pass statistics against a dense float64 oracle, and chunked-prefill accumulation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vlcache_sglang.policy.stats as stats_mod
from vlcache_sglang.policy import (
    PolicyConfig,
    StatsAccumulator,
    attention_stats,
    dense_attention_stats,
    locate_window,
)


def _qk(n_k: int, hq: int, hkv: int, d: int, seed: int, dtype=torch.float64, spread: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_k, hq, d, generator=g, dtype=dtype) * spread
    k = torch.randn(n_k, hkv, d, generator=g, dtype=dtype) * spread
    return q, k


@settings(max_examples=60, deadline=None)
@given(
    n_k=st.integers(1, 40),
    hkv=st.integers(1, 2),
    groups=st.integers(1, 3),
    d=st.integers(2, 8),
    key_chunk=st.integers(1, 9),
    query_chunk=st.integers(1, 9),
    threshold=st.sampled_from([0.0, 0.01, 0.2]),
    data=st.data(),
)
def test_chunked_equals_dense_float64(n_k, hkv, groups, d, key_chunk, query_chunk, threshold, data) -> None:
    hq = hkv * groups
    q, k = _qk(n_k, hq, hkv, d, seed=data.draw(st.integers(0, 10_000)))
    rows = data.draw(st.lists(st.integers(0, n_k - 1), min_size=0, max_size=n_k, unique=True))
    pos = torch.tensor(sorted(rows), dtype=torch.int64)
    got = attention_stats(q[pos], pos, k, 0.4, threshold, key_chunk=key_chunk, query_chunk=query_chunk,
                          dtype=torch.float64)
    ref = dense_attention_stats(q[pos], pos, k, 0.4, threshold)
    torch.testing.assert_close(got.col, ref.col, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.below, ref.below) and torch.equal(got.causal, ref.causal)
    # each measured row's probabilities sum to one
    torch.testing.assert_close(got.col.sum(-1), torch.full((hq,), float(len(rows)), dtype=torch.float64))


def test_float32_accumulation_is_close_and_extreme_logits_are_stable() -> None:
    q, k = _qk(64, 4, 2, 16, seed=1, spread=6.0)  # logits in the hundreds: naive exp overflows
    pos = torch.arange(40, 64)
    ref = dense_attention_stats(q[pos], pos, k, 1.0, 0.01)
    got = attention_stats(q[pos].float(), pos, k.float(), 1.0, 0.01, key_chunk=7)
    assert torch.isfinite(got.col).all()
    torch.testing.assert_close(got.col.double(), ref.col, rtol=1e-4, atol=1e-5)


def test_no_m_by_m_block(monkeypatch) -> None:
    shapes = []
    real = stats_mod._logits

    def spy(*args):
        s, mask = real(*args)
        shapes.append(tuple(s.shape))
        return s, mask

    monkeypatch.setattr(stats_mod, "_logits", spy)
    q, k = _qk(96, 4, 2, 8, seed=2)
    attention_stats(q, torch.arange(96), k, 0.3, key_chunk=16, query_chunk=8)
    assert shapes and all(s[-1] <= 16 and s[-2] <= 8 for s in shapes)
    # causal skipping: a query chunk never visits key chunks beyond its last row. Query chunk i
    # (rows 8i..8i+7) visits key chunks 0..(8i+7)//16, 42 blocks in all instead of the full grid's
    # 12 x 6 = 72, and each block is visited by two passes: exactly 84 calls (144 without skipping)
    visited = sum((8 * i + 7) // 16 + 1 for i in range(96 // 8))
    assert visited == 42
    assert len(shapes) == 2 * visited


def test_chunked_prefill_accumulates_exactly() -> None:
    m, n_layers, hq, hkv, d = 48, 2, 4, 2, 8
    cfg = PolicyConfig(stats_dtype="float64", key_chunk=5, query_chunk=3)
    window = locate_window(m, [(4, 30)], cfg)
    q, k = _qk(m, hq, hkv, d, seed=3)
    one = StatsAccumulator(n_layers, hq, hkv, m, window, cfg)
    many = StatsAccumulator(n_layers, hq, hkv, m, window, cfg)
    for layer in range(n_layers):
        one.add(layer, q, torch.arange(m), k, 0.35)
        for a, b in [(0, 20), (20, 37), (37, 48)]:  # prefill chunks: keys so far only
            many.add(layer, q[a:b], torch.arange(a, b), k[:b], 0.35)
    for name in ("col", "below", "causal"):
        torch.testing.assert_close(getattr(many.stats, name), getattr(one.stats, name), rtol=1e-12, atol=1e-12)
    assert many.stats.rows_seen == [window.length] * n_layers and many.stats.complete
    # and both equal the dense oracle reduced over GQA groups
    ref = dense_attention_stats(q[window.start:], torch.arange(window.start, m), k, 0.35, 0.01)
    torch.testing.assert_close(one.stats.col[0], ref.col.view(hkv, 2, m).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one.stats.head_sparsity()[0], ref.below.double() / ref.causal.double())


@pytest.mark.parametrize("method, window_end", [("vlcache", None), ("vlcache", 34), ("h2o", None),
                                                ("streamingllm", None)])  # window rows, all rows, none
def test_first_position_gives_the_same_statistics_as_positions(method, window_end) -> None:
    """``add(..., q_positions=<int>)`` (what the backend passes: the chunk's first position, so the
    needed rows are chosen on the host, no device sync per layer) equals passing the positions,
    chunk by chunk, with chunks before, across and inside the window."""
    m, n_layers, hq, hkv, d = 48, 2, 4, 2, 8
    cfg = PolicyConfig(method=method, stats_dtype="float64", window_size=9)
    window = locate_window(m, [(4, 30)], cfg)
    if window_end is not None:  # a window that ends inside a chunk
        window = dataclasses.replace(window, end=window_end)
    q, k = _qk(m, hq, hkv, d, seed=8)
    by_tensor = StatsAccumulator(n_layers, hq, hkv, m, window, cfg)
    by_first = StatsAccumulator(n_layers, hq, hkv, m, window, cfg)
    chunks = [(0, 20), (20, 33), (33, 35), (35, 48)]
    for layer in range(n_layers):
        for a, b in chunks:
            by_tensor.add(layer, q[a:b], torch.arange(a, b), k[:b], 0.35)
            by_first.add(layer, q[a:b], a, k[:b], 0.35)
            lo, hi = by_first.needed_span(a, b - a)
            assert hi - lo == int(by_first.needed_rows(torch.arange(a, b)).sum())
    assert by_first.stats.rows_seen == by_tensor.stats.rows_seen
    if by_tensor.stats.col is None:
        assert by_first.stats.col is None and method == "streamingllm"
        return
    for name in ("col", "below", "causal"):
        torch.testing.assert_close(getattr(by_first.stats, name), getattr(by_tensor.stats, name), rtol=0, atol=0)


def test_rows_used_per_method() -> None:
    m = 30
    q, k = _qk(m, 2, 1, 4, seed=4)
    for method, rows in [("vlcache", 10), ("snapkv", 8), ("h2o", 30), ("streamingllm", 0), ("random", 0), ("full", 0)]:
        cfg = PolicyConfig(method=method, window_size=8)
        acc = StatsAccumulator(1, 2, 1, m, locate_window(m, [(0, 19)], cfg), cfg)
        acc.add(0, q, torch.arange(m), k, 0.5)
        assert acc.stats.rows_seen == [rows], method
        assert (acc.stats.col is None) == (rows == 0) and acc.needs_attention == (rows > 0)


def test_bad_inputs() -> None:
    cfg = PolicyConfig()
    acc = StatsAccumulator(1, 4, 2, 10, locate_window(10, [(0, 3)], cfg), cfg)
    q, k = _qk(10, 4, 2, 4, seed=5)
    with pytest.raises(ValueError, match="causal keys must be present"):
        acc.add(0, q[8:], torch.arange(8, 10), k[:5], 0.5)
    with pytest.raises(ValueError, match="KV heads"):
        acc.add(0, q, torch.arange(10), k[:, :1], 0.5)
    with pytest.raises(ValueError, match="layer_id"):
        acc.add(3, q, torch.arange(10), k, 0.5)
    with pytest.raises(ValueError, match="multiple"):
        StatsAccumulator(1, 3, 2, 10, locate_window(10, [(0, 3)], cfg), cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    q, k = _qk(300, 8, 2, 32, seed=6, dtype=torch.float32)
    pos = torch.arange(250, 300)
    cpu = attention_stats(q[pos], pos, k, 0.2, key_chunk=64)
    gpu = attention_stats(q[pos].cuda(), pos.cuda(), k.cuda(), 0.2, key_chunk=64)
    torch.testing.assert_close(gpu.col.cpu(), cpu.col, rtol=1e-4, atol=1e-6)
    assert (gpu.below.cpu() - cpu.below).abs().max() <= 2
