"""Triton statistics kernel against the torch reference and the float64 oracle.

On a CPU-only machine the kernel runs under Triton's interpreter (small shapes); with CUDA the
same cases run compiled, plus large shapes (``gpu`` marker). Every output and intermediate buffer
is poisoned (NaN / sentinel) before each launch, so an element no program writes fails the test.
"""
from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.kernels.attention_stats import (
    BatchedStats,
    attention_stats_batched,
    attention_stats_batched_torch,
    plan_stats,
)
from vlcache_sglang.policy.stats import dense_attention_stats

HAS_CUDA = torch.cuda.is_available()


def make_batch(reqs, hq, hkv, d, dtype, device, seed=0, spread=1.5, extra_rows=17):
    """``reqs``: list of (n_k, rows) with rows either an int (window = last ``rows`` positions)
    or a list of positions. Keys of all requests live at scattered rows of one pool."""
    g = torch.Generator().manual_seed(seed)
    total_k = sum(nk for nk, _ in reqs)
    pool_rows = total_k + extra_rows
    k_pool = (torch.randn(pool_rows, hkv, d, generator=g) * spread).to(dtype)
    perm = torch.randperm(pool_rows, generator=g)
    kv_indptr, qo_indptr, idx, pos = [0], [0], [], []
    off = 0
    for nk, rows in reqs:
        idx.append(perm[off:off + nk])
        off += nk
        p = torch.arange(nk - rows, nk) if isinstance(rows, int) else torch.tensor(sorted(rows), dtype=torch.int64)
        pos.append(p)
        kv_indptr.append(kv_indptr[-1] + nk)
        qo_indptr.append(qo_indptr[-1] + p.numel())
    q = (torch.randn(qo_indptr[-1], hq, d, generator=g) * spread).to(dtype)
    pos = torch.cat(pos) if pos else torch.empty(0, dtype=torch.int64)
    idx = torch.cat(idx).to(torch.int64)
    return (q.to(device), pos.to(device), qo_indptr, k_pool.to(device), idx.to(device), kv_indptr)


def oracle(q, pos, qo, k_pool, idx, kv, scale, threshold):
    """float64 dense statistics per request (on the inputs as stored, i.e. dtype-rounded)."""
    hq = q.shape[1]
    bsz = len(qo) - 1
    col = torch.zeros(hq, kv[-1], dtype=torch.float64)
    below = torch.zeros(bsz, hq, dtype=torch.int64)
    causal = torch.zeros(bsz, hq, dtype=torch.int64)
    ambiguous = torch.zeros(bsz, hq, dtype=torch.int64)
    q, pos, k_pool, idx = q.cpu().double(), pos.cpu(), k_pool.cpu().double(), idx.cpu()
    for b in range(bsz):
        if qo[b + 1] == qo[b]:
            continue
        qb, pb, kb = q[qo[b]:qo[b + 1]], pos[qo[b]:qo[b + 1]], k_pool[idx[kv[b]:kv[b + 1]]]
        st = dense_attention_stats(qb, pb, kb, scale, threshold)
        col[:, kv[b]:kv[b + 1]] = st.col
        below[b], causal[b] = st.below, st.causal
        # entries within a hair of the threshold may fall either way in fp32
        g = hq // kb.shape[1]
        s = torch.einsum("qhd,khd->hqk", qb, kb.repeat_interleave(g, dim=1)) * scale
        mask = torch.arange(kb.shape[0])[None, :] <= pb[:, None]
        s = s.masked_fill(~mask, -math.inf)
        rel = s - s.amax(-1, keepdim=True)
        if threshold > 0:
            ambiguous[b] = (((rel - math.log(threshold)).abs() < 1e-3) & mask).sum((1, 2))
    return col, below, causal, ambiguous


def poisoned_out(hq, total_k, bsz, device):
    return BatchedStats(torch.full((hq, total_k), float("nan"), device=device),
                        torch.full((bsz, hq), -7, dtype=torch.int64, device=device),
                        torch.full((bsz, hq), -7, dtype=torch.int64, device=device))


def check(batch, scale, threshold, tol, **kw):
    q, pos, qo, k_pool, idx, kv = batch
    hq, bsz = q.shape[1], len(qo) - 1
    out = poisoned_out(hq, kv[-1], bsz, q.device)
    got = attention_stats_batched(q, pos, qo, k_pool, idx, kv, scale, threshold, out=out, poison=True, **kw)
    assert got.col is out.col  # written in place
    assert torch.isfinite(got.col).all(), "unwritten (NaN) col entries"
    col, below, causal, amb = oracle(q, pos, qo, k_pool, idx, kv, scale, threshold)
    torch.testing.assert_close(got.col.cpu().double(), col, rtol=tol, atol=tol)
    assert torch.equal(got.causal.cpu(), causal)
    assert ((got.below.cpu() - below).abs() <= amb).all(), (got.below, below, amb)
    # the torch reference (policy.stats.attention_stats, request by request) agrees too
    ref = attention_stats_batched_torch(q, pos, qo, k_pool, idx, kv, scale, threshold)
    torch.testing.assert_close(got.col.float().cpu(), ref.col.float().cpu(), rtol=tol, atol=tol)
    assert torch.equal(got.causal.cpu(), ref.causal.cpu())
    return got


# (requests, Hq, Hkv, D): ragged batches, GQA ratios 1/2/4/MQA, windows of length 1, windows that
# reach the prompt start, requests with no statistics rows, non-power-of-two head dims.
CASES = [
    ([(37, 6), (5, 1), (70, 20)], 4, 2, 12),
    ([(1, 1)], 2, 2, 8),  # one token prompt, window = whole prompt
    ([(24, 24), (9, 9)], 4, 4, 16),  # windows reaching the prompt start
    ([(50, 1), (3, 3), (40, 0), (19, 5)], 8, 2, 8),  # window of one, a request with no rows
    ([(33, 17)], 4, 1, 32),  # MQA
    ([(20, [0, 3, 4, 11, 19]), (31, [30])], 6, 3, 8),  # arbitrary row subsets (H2O-style)
    ([(90, 40)], 2, 1, 16),  # more rows than one query block, many key blocks
]


@pytest.mark.parametrize("pack_heads", [False, True], ids=["per-query-head", "packed-per-kv-head"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_oracle_small(case, dtype, pack_heads, device):
    reqs, hq, hkv, d = CASES[case]
    batch = make_batch(reqs, hq, hkv, d, dtype, device, seed=case)
    tol = 2e-5 if dtype == torch.float32 else 1e-4
    check(batch, scale=d ** -0.5 * 1.3, threshold=0.02, tol=tol, block_n=16, num_splits=2, pack_heads=pack_heads)


@pytest.mark.parametrize("pack_heads, block_m", [(False, 16), (True, 16), (True, 4)])
@pytest.mark.parametrize("num_splits", [1, 3, 50])
@pytest.mark.parametrize("block_n", [16, 32])
def test_key_splits_and_blocks(num_splits, block_n, pack_heads, block_m, device):
    """Packed with block_m 4: 4 rows x 4 query heads (group 4 of the 8 heads' KV head) per program,
    so a request's 9 rows take three row blocks."""
    batch = make_batch([(61, 9), (17, 4)], 8, 2, 8, torch.float32, device, seed=5)
    check(batch, scale=0.4, threshold=0.05, tol=2e-5, block_n=block_n, num_splits=num_splits, pack_heads=pack_heads,
          block_m=block_m)


def test_packed_needs_sixteen_rows_and_kv_heads(device):
    batch = make_batch([(20, 4)], 4, 2, 8, torch.float32, device, seed=7)
    with pytest.raises(ValueError, match="at least 16"):
        check(batch, scale=0.4, threshold=0.05, tol=2e-5, pack_heads=True, block_m=4)  # 2 heads x 4 rows
    with pytest.raises(ValueError, match="num_kv_heads"):
        plan_stats([0, 4], [0, 20], device, pack_heads=True)


def test_fp16_and_thresholds(device):
    batch = make_batch([(45, 12), (8, 2)], 4, 2, 16, torch.float16, device, seed=3)
    for thr in (0.0, 0.01, 0.3):
        check(batch, scale=0.25, threshold=thr, tol=1e-4, block_n=16)


def test_extreme_logits_are_stable(device):
    batch = make_batch([(64, 24)], 4, 2, 16, torch.float32, device, seed=1, spread=6.0)
    got = check(batch, scale=1.0, threshold=0.01, tol=1e-4, block_n=16, num_splits=3)
    assert torch.isfinite(got.col).all()


def test_each_row_sums_to_one_and_plan_is_reusable(device):
    batch = make_batch([(24, 6), (12, 3), (16, 16)], 4, 2, 8, torch.float32, device, seed=9)
    q, pos, qo, k_pool, idx, kv = batch
    plan = plan_stats(qo, kv, device, block_n=16, num_splits=2)
    for layer in range(2):  # the same block tables serve every layer
        k_l = k_pool * (1 + layer)
        got = attention_stats_batched(q, pos, qo, k_l, idx, kv, 0.3, 0.01, plan=plan, poison=True)
        for b in range(len(qo) - 1):
            sums = got.col[:, kv[b]:kv[b + 1]].sum(-1).cpu()
            torch.testing.assert_close(sums, torch.full_like(sums, float(qo[b + 1] - qo[b])), rtol=1e-5, atol=1e-5)


def test_int32_indices_and_strided_queries(device):
    q, pos, qo, k_pool, idx, kv = make_batch([(30, 7), (14, 2)], 4, 2, 8, torch.float32, device, seed=4)
    wide = torch.zeros(q.shape[0], q.shape[1] + 2, q.shape[2], device=device)
    wide[:, 1:-1] = q
    qs = wide[:, 1:-1]  # non-contiguous in the head dimension's parent
    a = attention_stats_batched(qs, pos, qo, k_pool, idx.to(torch.int32), kv, 0.5, 0.02, poison=True, block_n=16)
    b = attention_stats_batched(q, pos, qo, k_pool, idx, kv, 0.5, 0.02, poison=True, block_n=16)
    torch.testing.assert_close(a.col, b.col)
    assert torch.equal(a.below, b.below)


def test_empty_batch_and_no_rows(device):
    q, pos, qo, k_pool, idx, kv = make_batch([(10, 0), (4, 0)], 2, 1, 8, torch.float32, device)
    got = attention_stats_batched(q, pos, qo, k_pool, idx, kv, 0.5, 0.02, poison=True)
    assert torch.equal(got.col, torch.zeros_like(got.col))
    assert int(got.below.abs().sum()) == 0 and int(got.causal.abs().sum()) == 0


def test_bad_inputs_raise(device):
    q, pos, qo, k_pool, idx, kv = make_batch([(10, 3)], 4, 2, 8, torch.float32, device)
    with pytest.raises(ValueError):
        attention_stats_batched(q, pos, [0, 2], k_pool, idx, kv, 0.5)
    with pytest.raises(ValueError):
        attention_stats_batched(q[:, :3], pos, qo, k_pool, idx, kv, 0.5)


def test_dispatch_matches_policy_reference(device):
    """The one-request drop-in gives the policy's AttentionStats on both paths."""
    from vlcache_sglang.kernels import dispatch
    from vlcache_sglang.policy.stats import attention_stats

    g = torch.Generator().manual_seed(2)
    q = torch.randn(7, 4, 8, generator=g).to(device)
    k = torch.randn(29, 2, 8, generator=g).to(device)
    pos = torch.arange(22, 29, device=device)
    ref = attention_stats(q, pos, k, 0.35, 0.02)
    assert dispatch.use_triton(device) == (device.type == "cuda")
    assert dispatch.use_triton(device, "torch") is False and dispatch.use_triton(device, "triton") is True
    with pytest.raises(ValueError):
        dispatch.use_triton(device, "cuda")
    for mode in ("torch", "triton"):
        got = dispatch.attention_stats_auto(q, pos, k, 0.35, 0.02, mode=mode)
        torch.testing.assert_close(got.col.float(), ref.col.float(), rtol=2e-5, atol=2e-5)
        assert torch.equal(got.causal.cpu(), ref.causal.cpu())
        assert (got.below.cpu() - ref.below.cpu()).abs().max() <= 2


def test_stats_dispatch_keeps_one_plan_per_layout(device):
    """The server's ``StatsFn``: every layer of a chunk reuses one launch plan and key index list
    (built once per layout, at most ``max_plans`` kept), and its results are the reference's."""
    from vlcache_sglang.kernels.dispatch import StatsDispatch
    from vlcache_sglang.policy.stats import attention_stats

    fn = StatsDispatch("triton", max_plans=2)
    g = torch.Generator().manual_seed(6)
    for n_k in (29, 29, 40, 29, 51):  # two layers of a 29-key chunk, then other layouts
        q = torch.randn(7, 4, 8, generator=g).to(device)
        k = torch.randn(n_k, 2, 8, generator=g).to(device)
        pos = torch.arange(n_k - 7, n_k, device=device)
        got, ref = fn(q, pos, k, 0.35, 0.02), attention_stats(q, pos, k, 0.35, 0.02)
        torch.testing.assert_close(got.col.float(), ref.col.float(), rtol=2e-5, atol=2e-5)
        assert torch.equal(got.causal.cpu(), ref.causal.cpu())
        assert (got.below.cpu() - ref.below.cpu()).abs().max() <= 2
    assert list(fn._plans) == [(7, 29, 4, 2, k.device), (7, 51, 4, 2, k.device)]  # 40 least recently used
    plan, idx = fn.plan(7, 29, 4, k.device, 2)
    assert fn.plan(7, 29, 4, k.device, 2)[0] is plan and torch.equal(idx.cpu(), torch.arange(29, dtype=torch.int32))
    with pytest.raises(ValueError, match="kernel mode"):
        StatsDispatch("cuda")


@pytest.mark.parametrize("block_m,block_n,pack_heads", [(16, 64, False), (8, 32, True), (32, 16, False)])
def test_stats_dispatch_follows_its_launch_options(device, block_m, block_n, pack_heads):
    """A backend's tuned statistics launch (``kernels/launch_configs.py``) reaches every plan the
    dispatch builds, and any valid launch gives the reference's statistics (GQA: 4 query heads
    over 2 KV heads, so ``pack_heads`` really packs)."""
    from vlcache_sglang.kernels.dispatch import StatsDispatch
    from vlcache_sglang.kernels.launch_configs import StatsLaunch
    from vlcache_sglang.policy.stats import attention_stats

    fn = StatsDispatch("triton", launch=StatsLaunch(block_m, block_n, pack_heads))
    g = torch.Generator().manual_seed(block_m + block_n)
    q = torch.randn(9, 4, 8, generator=g).to(device)
    k = torch.randn(70, 2, 8, generator=g).to(device)
    pos = torch.arange(61, 70, device=device)
    got, ref = fn(q, pos, k, 0.35, 0.02), attention_stats(q, pos, k, 0.35, 0.02)
    torch.testing.assert_close(got.col.float(), ref.col.float(), rtol=2e-5, atol=2e-5)
    assert torch.equal(got.causal.cpu(), ref.causal.cpu())
    assert (got.below.cpu() - ref.below.cpu()).abs().max() <= 2
    (plan, _), = fn._plans.values()
    assert (plan.block_m, plan.block_n, plan.pack_heads) == (block_m, block_n, pack_heads)
    assert plan.q_blk_req.numel() == -(-9 // block_m) and plan.k_blk_req.numel() == -(-70 // block_n)


@pytest.mark.parametrize("method", ["vlcache", "h2o"])
def test_accumulator_with_the_dispatch_as_stats_fn(device, method):
    """``StatsAccumulator(..., stats_fn=attention_stats_auto)`` (what the backend hands the policy)
    gathers the statistics of the policy's own reference, chunk by chunk and layer by layer."""
    from functools import partial

    from vlcache_sglang.kernels import dispatch
    from vlcache_sglang.policy import PolicyConfig, StatsAccumulator, locate_window

    m, hq, hkv, d = 40, 4, 2, 8
    cfg = PolicyConfig(method=method, alpha=0.3, window_size=9)
    window = locate_window(m, [(2, 25)], cfg)
    g = torch.Generator().manual_seed(4)
    layers = [(torch.randn(m, hq, d, generator=g).to(device), torch.randn(m, hkv, d, generator=g).to(device))
              for _ in range(2)]
    accs = {"ref": StatsAccumulator(2, hq, hkv, m, window, cfg),
            "kernel": StatsAccumulator(2, hq, hkv, m, window, cfg,
                                       stats_fn=partial(dispatch.attention_stats_auto, mode="triton"))}
    for acc in accs.values():
        for start, end in ((0, 30), (30, m)):  # two prefill chunks
            for layer, (q, k) in enumerate(layers):
                pos = torch.arange(start, end, device=device)
                acc.add(layer, q[start:end], pos, k[:end], d ** -0.5)
    ref, got = accs["ref"].stats, accs["kernel"].stats
    assert got.complete and got.rows_seen == ref.rows_seen
    torch.testing.assert_close(got.col.float(), ref.col.float(), rtol=2e-5, atol=2e-5)
    assert torch.equal(got.causal.cpu(), ref.causal.cpu())
    assert (got.below.cpu() - ref.below.cpu()).abs().max() <= 2


# ----------------------------------------------------------------------------------------------
# large shapes: CUDA only
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("reqs,hq,hkv,d", [
    ([(4096, 64), (1500, 1), (2048, 2048)], 28, 4, 128),
    ([(8192, 256)], 32, 8, 128),
    ([(3000, 50)] * 6, 16, 2, 64),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pack_heads", [False, True])
def test_large_shapes_cuda(reqs, hq, hkv, d, dtype, pack_heads):
    dev = torch.device("cuda")
    batch = make_batch(reqs, hq, hkv, d, dtype, dev, seed=len(reqs), spread=1.0)
    q, pos, qo, k_pool, idx, kv = batch
    out = poisoned_out(hq, kv[-1], len(qo) - 1, dev)
    got = attention_stats_batched(q, pos, qo, k_pool, idx, kv, d ** -0.5, 0.01, out=out, poison=True,
                                  pack_heads=pack_heads)
    assert torch.isfinite(got.col).all()
    ref = attention_stats_batched_torch(q, pos, qo, k_pool, idx, kv, d ** -0.5, 0.01)
    torch.testing.assert_close(got.col, ref.col.float(), rtol=1e-3, atol=1e-4)
    assert torch.equal(got.causal, ref.causal)
    rel = (got.below - ref.below).abs().double() / ref.causal.clamp_min(1).double()
    assert float(rel.max()) < 1e-4
