"""Fused VL-Cache attention statistics in Triton, batched over requests (indptr layout).

For every request ``b`` of a batch, its statistics query rows (the post-vision window, or any
subset of its prompt rows) ``q[qo_indptr[b]:qo_indptr[b+1]]`` at positions ``q_positions`` attend
causally to the request's keys ``k_pool[kv_indices[kv_indptr[b]:kv_indptr[b+1]]]`` (FlashInfer
page-size-1 layout: key ``j`` of the request is pool row ``kv_indices[kv_indptr[b] + j]``, and a
row at position ``t`` sees keys ``0..t``). Per query head ``h`` this computes the same quantities
as :func:`vlcache_sglang.policy.stats.attention_stats` (its reference):

* ``col[h, kv_indptr[b] + j] = sum_q A[h, q, j]``  (fp32, ragged like ``kv_indices``);
* ``below[b, h] = #{(q, j): j <= pos_q, A[h, q, j] < p * max_j' A[h, q, j']}``;
* ``causal[b, h] = #{(q, j): j <= pos_q}``.

Two passes, as in the paper, and never an m-by-m (or window-by-m) block in memory:

1. ``_stats_pass1``: grid (query block, query head or KV head, key split). An online softmax
   over the split's causal keys gives each row's running max and normaliser (log2 domain) per split.
   Program (0, 0, 0) also zeroes ``below`` and ``causal`` (pass 2 starts after it ends).
2. ``_stats_pass2``: grid (key block, query head or KV head). Each program loads its key tile
   once, walks the request's query rows, combines their key splits (a log2-sum-exp2 over at most a few dozen
   splits, recomputed per program: cheaper than a launch), recomputes the logits and emits the
   column sums of the probabilities and the threshold count. Since ``max_j A[q, j] = 1 / sum_q``,
   the test ``A < p * max A`` is ``s - max_s < log p``: no division. Every ``col`` element is
   written by exactly one program (no float atomics); each program adds its threshold and causal
   counts to its request's ``below`` and ``causal`` with an int64 atomic add, whose sum does not
   depend on the order: the result is deterministic.

Two kernel launches and two allocations per layer, nothing else on the host: the statistics of an
8K prompt are bound by the host's launches, not by the GPU (H200, 2026-11-26: 0.29 ms at 2K and at
8K alike, about 19 launches then, most of them small torch ops).

Heads per program: one query head (``grid(.., Hq, ..)``, the default), or with a plan's
``pack_heads`` all ``G = Hq / Hkv`` query heads of one KV head (``grid(.., Hkv, ..)``): their rows
are packed head-major into one ``[next_pow2(G) * BLOCK_M, D]`` tile, so each key tile is loaded
once per KV head instead of once per query head and feeds one larger dot product; pass 2 reduces
the probabilities per head (a reshape to ``[G', BLOCK_M, BLOCK_N]``). Which is faster on a GPU is
the GPU suite's ``stats_sweep`` to say.

Inputs may be bf16, fp16 or fp32 (fp32 accumulation; fp32 inputs use IEEE dot products), with
GQA (query head ``h`` reads KV head ``h // (Hq // Hkv)``). The key pool is read in place through
the indices; nothing is gathered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import triton.language as tl

from vlcache_sglang.kernels._triton import interpret_for, kernel, next_pow2

__all__ = [
    "BatchedStats",
    "StatsLaunchPlan",
    "attention_stats_batched",
    "attention_stats_batched_torch",
    "plan_stats",
]

_LOG2E = 1.4426950408889634
_NEG = -1.0e30  # "minus infinity" that keeps exp2 differences finite


class BatchedStats(NamedTuple):
    """Statistics of one layer for a batch of requests."""

    col: torch.Tensor  # [Hq, total_keys] float32, aligned with kv_indices
    below: torch.Tensor  # [B, Hq] int64
    causal: torch.Tensor  # [B, Hq] int64

    def request(self, b: int, kv_indptr_cpu: Sequence[int]):
        """Request ``b``'s :class:`~vlcache_sglang.policy.stats.AttentionStats` (views)."""
        from vlcache_sglang.policy.stats import AttentionStats

        return AttentionStats(self.col[:, kv_indptr_cpu[b]:kv_indptr_cpu[b + 1]], self.below[b], self.causal[b])


# --------------------------------------------------------------------------------------------
# kernels (plain functions; see kernels/_triton.py for how they are jitted or interpreted)
# --------------------------------------------------------------------------------------------
def _stats_pass1(Q, POS, K, KV_IDX, QO_PTR, KV_PTR, BLK_REQ, BLK_START, M_OUT, L_OUT, BELOW, CAUSAL,
                 stride_qr, stride_qh, stride_kr, stride_kh, stride_ms, stride_mh,
                 stride_bb, stride_bh, stride_cb, stride_ch, n_counts, num_heads,
                 scale_log2, split_len,
                 GROUP: tl.constexpr, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr,
                 IEEE: tl.constexpr):
    pid = tl.program_id(0)
    hp = tl.program_id(1)
    sp = tl.program_id(2)
    if (pid == 0) & (hp == 0) & (sp == 0):
        # pass 2 adds its counts atomically into below / causal [B, Hq]: zero them here (pass 2
        # starts after every pass-1 program ended), which saves two launches
        for i0 in range(0, n_counts, 256):
            offs = i0 + tl.arange(0, 256)
            ok = offs < n_counts
            rb = offs // num_heads
            rh = offs % num_heads
            zero = tl.full([256], 0, tl.int64)
            tl.store(BELOW + rb * stride_bb + rh * stride_bh, zero, mask=ok)
            tl.store(CAUSAL + rb * stride_cb + rh * stride_ch, zero, mask=ok)
    b = tl.load(BLK_REQ + pid)
    r0 = tl.load(BLK_START + pid)
    q_beg = tl.load(QO_PTR + b)
    n_q = tl.load(QO_PTR + b + 1) - q_beg
    kv_beg = tl.load(KV_PTR + b)
    n_k = tl.load(KV_PTR + b + 1) - kv_beg
    h0 = hp * HEADS  # this program's query heads h0 .. h0 + HEADS - 1, all of one KV head
    kvh = h0 // GROUP

    # packed rows: (head g, row i) at g * BLOCK_M + i, one dot product for all the heads
    offs_r = tl.arange(0, HEADS_P2 * BLOCK_M)
    g = offs_r // BLOCK_M
    offs_m = r0 + offs_r % BLOCK_M
    row_ok = (offs_m < n_q) & (g < HEADS)
    rows = (q_beg + offs_m).to(tl.int64)
    head = h0 + g
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + rows[:, None] * stride_qr + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)

    k_lo = sp * split_len
    k_hi = tl.minimum(tl.minimum(k_lo + split_len, n_k), tl.reduce(pos, 0, tl.standard._elementwise_max) + 1)
    m_i = tl.full([HEADS_P2 * BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.full([HEADS_P2 * BLOCK_M], 0.0, tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_hi
        slot = tl.load(KV_IDX + kv_beg + offs_n, mask=n_ok, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if CAST_F32:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        valid = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        s = tl.where(valid, s, -1.0e30)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        p = tl.where(valid, tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * tl.exp2(m_i - m_new) + tl.reduce(p, 1, tl.standard._sum_combine)
        m_i = m_new
    out = sp * stride_ms + head * stride_mh + rows
    tl.store(M_OUT + out, m_i, mask=row_ok)
    tl.store(L_OUT + out, l_i, mask=row_ok)


def _stats_pass2(Q, POS, K, KV_IDX, QO_PTR, KV_PTR, BLK_REQ, BLK_START, M_PART, L_PART, COL, BELOW, CAUSAL,
                 stride_qr, stride_qh, stride_kr, stride_kh, stride_ms, stride_mh, stride_ch,
                 stride_bb, stride_bh, stride_cb, stride_cbh, num_splits,
                 scale_log2, log2_thr,
                 GROUP: tl.constexpr, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr,
                 IEEE: tl.constexpr):
    pid = tl.program_id(0)
    hp = tl.program_id(1)
    b = tl.load(BLK_REQ + pid)
    k0 = tl.load(BLK_START + pid)
    q_beg = tl.load(QO_PTR + b)
    n_q = tl.load(QO_PTR + b + 1) - q_beg
    kv_beg = tl.load(KV_PTR + b)
    n_k = tl.load(KV_PTR + b + 1) - kv_beg
    h0 = hp * HEADS
    kvh = h0 // GROUP

    offs_n = k0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_k
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    slot = tl.load(KV_IDX + kv_beg + offs_n, mask=n_ok, other=0).to(tl.int64)
    k = tl.load(K + slot[:, None] * stride_kr + kvh * stride_kh + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        k = k.to(tl.float32)
    offs_r = tl.arange(0, HEADS_P2 * BLOCK_M)
    g = offs_r // BLOCK_M
    head = h0 + g
    acc = tl.full([HEADS_P2, BLOCK_N], 0.0, tl.float32)
    cnt = tl.full([HEADS_P2, BLOCK_N], 0, tl.int32)
    cnt_causal = tl.full([HEADS_P2, BLOCK_N], 0, tl.int32)
    for r0 in range(0, n_q, BLOCK_M):
        offs_m = r0 + offs_r % BLOCK_M
        row_ok = (offs_m < n_q) & (g < HEADS)
        rows = (q_beg + offs_m).to(tl.int64)
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
        # the key splits of pass 1, combined (log2-sum-exp2): each row's max and log-normaliser
        part = head * stride_mh + rows
        m2 = tl.full([HEADS_P2 * BLOCK_M], -1.0e30, tl.float32)
        for sp in range(0, num_splits):
            m2 = tl.maximum(m2, tl.load(M_PART + sp * stride_ms + part, mask=row_ok, other=-1.0e30))
        l_tot = tl.full([HEADS_P2 * BLOCK_M], 0.0, tl.float32)
        for sp in range(0, num_splits):
            m_sp = tl.load(M_PART + sp * stride_ms + part, mask=row_ok, other=-1.0e30)
            l_sp = tl.load(L_PART + sp * stride_ms + part, mask=row_ok, other=0.0)
            l_tot += l_sp * tl.exp2(m_sp - m2)
        lse2 = m2 + tl.log2(tl.where(l_tot > 0, l_tot, 1.0))
        q = tl.load(Q + rows[:, None] * stride_qr + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if CAST_F32:
            q = q.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        valid = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
        p = tl.where(valid, tl.exp2(tl.where(valid, s - lse2[:, None], -1.0e30)), 0.0)
        low = valid & ((s - m2[:, None]) < log2_thr)
        # per head: the packed rows of head g are g * BLOCK_M .. (g + 1) * BLOCK_M - 1
        acc += tl.reduce(tl.reshape(p, [HEADS_P2, BLOCK_M, BLOCK_N]), 1, tl.standard._sum_combine)
        cnt += tl.reduce(tl.reshape(low.to(tl.int32), [HEADS_P2, BLOCK_M, BLOCK_N]), 1, tl.standard._sum_combine)
        cnt_causal += tl.reduce(tl.reshape(valid.to(tl.int32), [HEADS_P2, BLOCK_M, BLOCK_N]), 1,
                                tl.standard._sum_combine)
    offs_g = tl.arange(0, HEADS_P2)
    heads = h0 + offs_g
    g_ok = offs_g < HEADS
    tl.store(COL + heads[:, None] * stride_ch + kv_beg + offs_n[None, :], acc, mask=g_ok[:, None] & n_ok[None, :])
    # integer atomics: the sums do not depend on the programs' order (deterministic)
    tl.atomic_add(BELOW + b * stride_bb + heads * stride_bh,
                  tl.reduce(cnt, 1, tl.standard._sum_combine).to(tl.int64), mask=g_ok)
    tl.atomic_add(CAUSAL + b * stride_cb + heads * stride_cbh,
                  tl.reduce(cnt_causal, 1, tl.standard._sum_combine).to(tl.int64), mask=g_ok)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
@dataclass
class StatsLaunchPlan:
    """Block tables of one batch layout; build once per forward, reuse for every layer."""

    batch_size: int
    total_q: int
    total_k: int
    max_k: int
    block_m: int
    block_n: int
    num_splits: int
    split_len: int
    qo_indptr: torch.Tensor  # int32 [B+1] on device
    kv_indptr: torch.Tensor  # int32 [B+1] on device
    q_blk_req: torch.Tensor  # int32 [n_qblocks]
    q_blk_start: torch.Tensor
    k_blk_req: torch.Tensor  # int32 [n_kblocks]
    k_blk_start: torch.Tensor
    #: one program per KV head, its query heads' rows packed into one dot product (GQA: keys are
    #: read once per KV head, not once per query head); else one program per query head
    pack_heads: bool = False


def _blocks(indptr: Sequence[int], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([indptr[i + 1] - indptr[i] for i in range(len(indptr) - 1)], dtype=torch.int64)
    nblk = (lens + block - 1) // block
    req = torch.repeat_interleave(torch.arange(lens.numel()), nblk)
    first = torch.cumsum(nblk, 0) - nblk
    start = (torch.arange(int(nblk.sum())) - torch.repeat_interleave(first, nblk)) * block
    return req.to(torch.int32), start.to(torch.int32)


def plan_stats(qo_indptr_cpu: Sequence[int], kv_indptr_cpu: Sequence[int], device: torch.device | str, *,
               block_m: int = 16, block_n: int = 64, num_splits: int | None = None,
               target_programs: int | None = None, num_q_heads: int = 1, pack_heads: bool = False,
               num_kv_heads: int | None = None) -> StatsLaunchPlan:
    """Host-side block tables for :func:`attention_stats_batched` (no device sync).

    ``num_splits`` (pass 1 key splits, flash-decoding style) defaults to enough programs to fill
    a GPU (``target_programs``, 4 x SM count on CUDA) and to 1 on the CPU interpreter.
    ``pack_heads``: one program per KV head (``num_kv_heads`` of them) for all its query heads;
    ``block_m`` then counts rows per query head.
    """
    if pack_heads and not num_kv_heads:
        raise ValueError("pack_heads needs num_kv_heads")
    device = torch.device(device)
    qo = [int(x) for x in qo_indptr_cpu]
    kv = [int(x) for x in kv_indptr_cpu]
    if len(qo) != len(kv) or len(qo) < 1:
        raise ValueError("qo_indptr and kv_indptr must both have batch_size + 1 entries")
    if any(qo[i + 1] < qo[i] or kv[i + 1] < kv[i] for i in range(len(qo) - 1)) or qo[0] or kv[0]:
        raise ValueError("indptr must start at 0 and be non-decreasing")
    bsz = len(qo) - 1
    max_k = max([kv[i + 1] - kv[i] for i in range(bsz)], default=0)
    q_req, q_start = _blocks(qo, block_m)
    k_req, k_start = _blocks(kv, block_n)
    if num_splits is None:
        if device.type == "cuda":
            if target_programs is None:
                target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
            base = max(1, q_req.numel() * (num_kv_heads if pack_heads else num_q_heads))
            num_splits = max(1, min(-(-target_programs // base), -(-max_k // block_n)))
        else:
            num_splits = 1
    num_splits = max(1, int(num_splits))
    split_len = max(block_n, -(-max(max_k, 1) // num_splits))
    split_len = -(-split_len // block_n) * block_n
    num_splits = max(1, -(-max(max_k, 1) // split_len))

    def dev(t):
        return t.to(device, non_blocking=True)

    return StatsLaunchPlan(
        batch_size=bsz, total_q=qo[-1], total_k=kv[-1], max_k=max_k, block_m=block_m, block_n=block_n,
        num_splits=num_splits, split_len=split_len,
        qo_indptr=dev(torch.tensor(qo, dtype=torch.int32)), kv_indptr=dev(torch.tensor(kv, dtype=torch.int32)),
        q_blk_req=dev(q_req), q_blk_start=dev(q_start), k_blk_req=dev(k_req), k_blk_start=dev(k_start),
        pack_heads=pack_heads,
    )


def _check(q, q_positions, k_pool, kv_indices, plan: StatsLaunchPlan):
    if q.dim() != 3 or k_pool.dim() != 3:
        raise ValueError(f"q must be [n_q, Hq, D] and k_pool [rows, Hkv, D]; got {tuple(q.shape)}, {tuple(k_pool.shape)}")
    if q.shape[2] != k_pool.shape[2] or q.shape[1] % k_pool.shape[1]:
        raise ValueError(f"head dims differ or Hq={q.shape[1]} is not a multiple of Hkv={k_pool.shape[1]}")
    if q.shape[0] != plan.total_q or q_positions.shape != (plan.total_q,):
        raise ValueError(f"q has {q.shape[0]} rows and q_positions {tuple(q_positions.shape)}; qo_indptr says {plan.total_q}")
    if kv_indices.shape != (plan.total_k,):
        raise ValueError(f"kv_indices has shape {tuple(kv_indices.shape)}; kv_indptr says {plan.total_k}")
    if q.device != k_pool.device or kv_indices.device != k_pool.device or q_positions.device != k_pool.device:
        raise ValueError("q, q_positions, k_pool and kv_indices must be on one device")


def attention_stats_batched(q: torch.Tensor, q_positions: torch.Tensor, qo_indptr_cpu: Sequence[int],
                            k_pool: torch.Tensor, kv_indices: torch.Tensor, kv_indptr_cpu: Sequence[int],
                            scale: float, threshold: float = 0.01, *, plan: StatsLaunchPlan | None = None,
                            out: BatchedStats | None = None, poison: bool = False,
                            block_m: int = 16, block_n: int = 64, num_splits: int | None = None,
                            pack_heads: bool = False) -> BatchedStats:
    """Triton statistics of a batch of requests (see the module docstring).

    Args:
        q: ``[total_q, Hq, D]`` statistics rows of all requests, concatenated (post-RoPE).
        q_positions: ``[total_q]`` int, each row's position in its request's key list.
        qo_indptr_cpu / kv_indptr_cpu: host ``[B+1]`` offsets of each request's rows / keys.
        k_pool: ``[rows, Hkv, D]`` the KV pool's K buffer (a layer's buffer, or the global one).
        kv_indices: ``[total_keys]`` int32/int64 pool rows of each request's keys, in position order.
        scale: softmax scale; threshold: ``p`` of the sparsity filter (``<= 0``: count nothing).
        plan: block tables from :func:`plan_stats` for this layout (built here when absent, from
            ``block_m``, ``block_n``, ``num_splits`` and ``pack_heads``).
        out: optional preallocated outputs (``col [Hq, total_keys]`` fp32, ``below``/``causal``
            ``[B, Hq]`` int64); every element is overwritten.
        poison: fill every output and intermediate buffer with NaN / a sentinel before launching
            (tests: catches elements no program writes).
    """
    device = k_pool.device
    if plan is None:
        plan = plan_stats(qo_indptr_cpu, kv_indptr_cpu, device, block_m=block_m, block_n=block_n,
                          num_splits=num_splits, num_q_heads=q.shape[1], pack_heads=pack_heads,
                          num_kv_heads=k_pool.shape[1])
    _check(q, q_positions, k_pool, kv_indices, plan)
    hq, d = q.shape[1], q.shape[2]
    group = hq // k_pool.shape[1]
    bsz = plan.batch_size
    if out is None:
        col = torch.empty(hq, plan.total_k, dtype=torch.float32, device=device)
        below = torch.empty(bsz, hq, dtype=torch.int64, device=device)
        causal = torch.empty(bsz, hq, dtype=torch.int64, device=device)
    else:
        col, below, causal = out
    if poison:
        col.fill_(float("nan"))
        below.fill_(-(1 << 40))
        causal.fill_(-(1 << 40))
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_pool.stride(-1) != 1:
        raise ValueError("k_pool's head dimension must be contiguous")
    pos = q_positions if q_positions.dtype in (torch.int32, torch.int64) else q_positions.to(torch.int64)
    if pos.stride(0) != 1:
        pos = pos.contiguous()
    idx = kv_indices if kv_indices.dtype in (torch.int32, torch.int64) else kv_indices.to(torch.int64)
    # fp32 dot products in IEEE precision (no TF32). Triton 3.9's interpreter gets bf16 x bf16
    # dot products wrong (checked: errors of 1e10), so there bf16 is widened first; the products
    # of bf16 values are exact in fp32 either way, so this changes only which path is exercised.
    cast = (q.dtype != k_pool.dtype or q.dtype == torch.float32
            or (interpret_for(device) and q.dtype == torch.bfloat16))
    ieee = cast
    block_d = max(16, next_pow2(d))
    scale_log2 = float(scale) * _LOG2E
    log2_thr = math.log2(threshold) if threshold > 0 else _NEG
    bm, bn = plan.block_m, plan.block_n
    heads = group if plan.pack_heads else 1  # query heads per program
    heads_p2 = next_pow2(heads)
    if heads_p2 * bm < 16:
        raise ValueError(f"a program's rows ({heads_p2} heads x block_m {bm}) must be at least 16 (tl.dot)")
    packing = dict(GROUP=group, HEADS=heads, HEADS_P2=heads_p2)

    if plan.total_q == 0 or bsz == 0:
        col.zero_()
        below.zero_()
        causal.zero_()
        return BatchedStats(col, below, causal)

    # four launches in all (two allocations, two kernels): at 8K keys the statistics are bound by
    # the host's launches, not by the GPU (2026-11-26: the same 0.29 ms at 2K and 8K)
    m_part = torch.empty(plan.num_splits, hq, plan.total_q, dtype=torch.float32, device=device)
    l_part = torch.empty_like(m_part)
    if poison:
        m_part.fill_(float("nan"))
        l_part.fill_(float("nan"))
    grid1 = (plan.q_blk_req.numel(), hq // heads, plan.num_splits)
    kernel(_stats_pass1, device)[grid1](
        q, pos, k_pool, idx, plan.qo_indptr, plan.kv_indptr, plan.q_blk_req, plan.q_blk_start, m_part, l_part,
        below, causal,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), m_part.stride(0), m_part.stride(1),
        below.stride(0), below.stride(1), causal.stride(0), causal.stride(1), bsz * hq, hq,
        scale_log2, plan.split_len,
        **packing, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, CAST_F32=cast, IEEE=ieee,
    )
    n_kblk = plan.k_blk_req.numel()
    if n_kblk:
        kernel(_stats_pass2, device)[(n_kblk, hq // heads)](
            q, pos, k_pool, idx, plan.qo_indptr, plan.kv_indptr, plan.k_blk_req, plan.k_blk_start, m_part, l_part,
            col, below, causal,
            q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), m_part.stride(0), m_part.stride(1),
            col.stride(0), below.stride(0), below.stride(1), causal.stride(0), causal.stride(1), plan.num_splits,
            scale_log2, log2_thr,
            **packing, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, CAST_F32=cast, IEEE=ieee,
        )
    return BatchedStats(col, below, causal)


def attention_stats_batched_torch(q: torch.Tensor, q_positions: torch.Tensor, qo_indptr_cpu: Sequence[int],
                                  k_pool: torch.Tensor, kv_indices: torch.Tensor, kv_indptr_cpu: Sequence[int],
                                  scale: float, threshold: float = 0.01, *, dtype: torch.dtype = torch.float32,
                                  key_chunk: int = 1024, query_chunk: int = 128) -> BatchedStats:
    """Reference: :func:`vlcache_sglang.policy.stats.attention_stats` request by request."""
    from vlcache_sglang.policy.stats import attention_stats

    hq = q.shape[1]
    bsz = len(qo_indptr_cpu) - 1
    cdt = torch.promote_types(torch.promote_types(q.dtype, dtype), torch.float32)
    col = torch.zeros(hq, int(kv_indptr_cpu[-1]), dtype=cdt, device=q.device)
    below = torch.zeros(bsz, hq, dtype=torch.int64, device=q.device)
    causal = torch.zeros(bsz, hq, dtype=torch.int64, device=q.device)
    for b in range(bsz):
        q0, q1 = int(qo_indptr_cpu[b]), int(qo_indptr_cpu[b + 1])
        k0, k1 = int(kv_indptr_cpu[b]), int(kv_indptr_cpu[b + 1])
        if q1 == q0:
            continue
        keys = k_pool[kv_indices[k0:k1].to(torch.int64)]
        st = attention_stats(q[q0:q1], q_positions[q0:q1].to(torch.int64), keys, scale, threshold,
                             key_chunk=key_chunk, query_chunk=query_chunk, dtype=dtype)
        col[:, k0:k1] = st.col
        below[b] = st.below
        causal[b] = st.causal
    return BatchedStats(col, below, causal)
