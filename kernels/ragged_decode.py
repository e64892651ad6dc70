"""Plan-free decode attention over ragged page-size-1 lists (FlashInfer's indptr + indices layout).

Why: with VL-Cache every layer keeps a different number of tokens, so a decode step reads 28
lists of 28 different lengths. FlashInfer plans per list length (host work, 80-160 us per plan on
the H200 machine, measured by ``benchmarks/gpu_suite.py``), so a compressed 28-layer step spends
milliseconds planning. This kernel needs no plan: everything it needs (each request's range in
the list) is read from the device ``kv_indptr`` inside the kernel, so a layer costs two launches
and works unchanged inside a CUDA graph.

Split-KV ("flash decoding"): pass 1, grid (request, KV head, split), keeps an online max and
normaliser for the GROUP query heads of one KV head over its split of the list and writes the
partial output and its log2-sum-exp2; pass 2, grid (request, query head), merges the splits.
Each split covers ``ceil(len / splits)`` keys rounded up to a key block; a split past the end
of a short list writes an empty state (weight 0). fp32 accumulation. An empty list gives a zero
output (every split empty: pass 2 divides by a weight sum it replaces with 1).

Fused merge (``fused_merge=True``, a tuned launch option): one launch. Each split program writes
its partial as in pass 1, then counts itself done in a per-(request, KV head) int32 counter (CTA
barrier, then one gpu-scope acq_rel atomic); the one that finds every other split done merges
them (online, L2-only loads) and resets the counter to zero for the next launch or replay. No
program ever waits for another ("last block" reduction, CUDA's threadFenceReduction sample), so
no schedule can deadlock. It saves the second launch's gap and ramp, a few microseconds of a
~15 us decode at 32K, batch 8 (issue 21 item 4's 80 %-of-copy target).

Per-head lists (``per_head=True``, VL-Cache cells at (layer, KV head) granularity): one list per
(request, KV head), list ``b * Hkv + h`` in ``kv_indptr``, of *head-rows* ``row * Hkv + h'``;
program ``(b, h, split)`` reads that list (query heads of KV head ``h``) and loads each key at row
``head_row // Hkv``, head ``head_row % Hkv`` of the same ``[rows, Hkv, D]`` storage: a compacted
cell of head ``h`` may sit in another head's place of its slot (compaction packs a slot's
``L * Hkv`` places). Lists may differ in length per head; the split count is chosen from the longest.

fp8 KV caches (``float8_e5m2`` / ``float8_e4m3fn`` views of SGLang's ``uint8`` storage) are loaded
as fp8 and converted to fp32; ``k_scale`` folds into the softmax scale and ``v_scale`` multiplies
the merged output, which is how FlashInfer applies SGLang's per-layer KV scales.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlcache_sglang.kernels._triton import interpret_for, kernel, next_pow2

__all__ = ["ragged_decode", "ragged_decode_torch", "choose_num_splits", "num_splits_for"]

_LOG2E = 1.4426950408889634
_EMPTY = -1.0e30


def _decode_pass1(Q, K, V, KV_IDX, KV_PTR, O_PART, LSE_PART,
                  stride_qb, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
                  stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  scale_log2, num_splits, num_kv_heads, COUNTER, OUT, stride_outb, stride_outh, v_scale,
                  PER_HEAD: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CAST_F32: tl.constexpr,
                  IEEE: tl.constexpr, FUSED_MERGE: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    if PER_HEAD:
        lst = b * num_kv_heads + kvh
    else:
        lst = b
    kv_beg = tl.load(KV_PTR + lst)
    n = tl.load(KV_PTR + lst + 1) - kv_beg
    span = num_splits * BLOCK_N
    chunk = (n + span - 1) // span * BLOCK_N
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, n)

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    heads = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_ok[:, None] & d_ok[None, :], other=0.0)
    if CAST_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, BLOCK_D], 0.0, tl.float32)  # not tl.zeros: a @jit helper (see _triton.py)
    for k0 in range(lo, hi, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        slot = tl.load(KV_IDX + kv_beg + offs_n, mask=n_ok, other=0).to(tl.int64)
        if PER_HEAD:  # head-row -> (row, the place's head), which need not be kvh
            head = slot % num_kv_heads
            slot = slot // num_kv_heads
        else:
            head = tl.full([BLOCK_N], 0, tl.int64) + kvh
        k = tl.load(K + slot[:, None] * stride_kr + head[:, None] * stride_kh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + slot[:, None] * stride_vr + head[:, None] * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if CAST_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * scale_log2, -1.0e30)
        m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(n_ok[None, :], tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), -1.0e30)
    tl.store(O_PART + b * stride_ob + heads[:, None] * stride_oh + sp * stride_os + offs_d[None, :], o,
             mask=h_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + b * stride_lb + heads * stride_lh + sp, lse, mask=h_ok)
    if FUSED_MERGE:
        # the last of this (request, KV head)'s splits to finish merges them all (no second launch).
        # Every thread's stores above, then one gpu-scope acq_rel atomic (Triton issues a scalar
        # atomic from one thread and broadcasts its result through shared memory, a barrier):
        # CUTLASS's split-K semaphore pattern (barrier, then a release by one thread; the acquiring
        # program's loads after it, L2-only). No program waits on another, so no schedule deadlocks.
        tl.debug_barrier()
        count = COUNTER + b * num_kv_heads + kvh
        done = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
        if done == num_splits - 1:
            m_run = tl.full([BLOCK_H], -1.0e30, tl.float32)
            w_run = tl.full([BLOCK_H], 0.0, tl.float32)
            o_run = tl.full([BLOCK_H, BLOCK_D], 0.0, tl.float32)
            for s_i in range(0, num_splits):
                lse_s = tl.load(LSE_PART + b * stride_lb + heads * stride_lh + s_i, mask=h_ok, other=-1.0e30,
                                cache_modifier=".cg")
                o_s = tl.load(O_PART + b * stride_ob + heads[:, None] * stride_oh + s_i * stride_os
                              + offs_d[None, :], mask=h_ok[:, None] & d_ok[None, :], other=0.0,
                              cache_modifier=".cg")
                live = lse_s > -1.0e29  # an empty split weighs 0
                m_new = tl.maximum(m_run, tl.where(live, lse_s, -1.0e30))
                alpha = tl.exp2(m_run - m_new)
                w_s = tl.where(live, tl.exp2(lse_s - m_new), 0.0)
                o_run = o_run * alpha[:, None] + o_s * w_s[:, None]
                w_run = w_run * alpha + w_s
                m_run = m_new
            merged = o_run / tl.where(w_run > 0.0, w_run, 1.0)[:, None] * v_scale
            tl.store(OUT + b * stride_outb + heads[:, None] * stride_outh + offs_d[None, :],
                     merged.to(OUT.dtype.element_ty), mask=h_ok[:, None] & d_ok[None, :])
            tl.store(count, 0)  # ready for the next launch (or replay)


def _decode_pass2(O_PART, LSE_PART, OUT, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  stride_outb, stride_outh, num_splits, v_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(LSE_PART + b * stride_lb + h * stride_lh + offs_s, mask=s_ok, other=-1.0e30)
    m = tl.reduce(lse, 0, tl.standard._elementwise_max)
    w = tl.where(s_ok & (lse > -1.0e29), tl.exp2(lse - m), 0.0)
    o = tl.load(O_PART + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    w_sum = tl.reduce(w, 0, tl.standard._sum_combine)
    # an empty list: every split empty, o is 0, and the weight sum 0 becomes 1 (a zero output)
    out = tl.reduce(o * w[:, None], 0, tl.standard._sum_combine) / tl.where(w_sum > 0.0, w_sum, 1.0)
    out = out * v_scale
    tl.store(OUT + b * stride_outb + h * stride_outh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)


def choose_num_splits(max_len: int, batch: int, kv_heads: int, *, block_n: int = 64, sm_count: int = 132,
                      max_splits: int = 32, programs_per_sm: float = 2.0, min_blocks: int = 4) -> int:
    """Enough splits to give every SM work (``programs_per_sm`` programs each), never splits of
    under ``min_blocks`` key blocks. Depends only on host-known sizes; fix it for CUDA-graph capture."""
    want = math.ceil(programs_per_sm * sm_count / max(1, batch * kv_heads))
    cap = max(1, math.ceil(max_len / (min_blocks * block_n)))
    return int(max(1, min(want, cap, max_splits)))


def num_splits_for(max_len: int, batch: int, kv_heads: int, device: torch.device, *, block_n: int = 64,
                   **choice) -> int:
    """:func:`choose_num_splits` with ``device``'s SM count (4 off CUDA, where the interpreter runs)."""
    sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return choose_num_splits(max_len, batch, kv_heads, block_n=block_n, sm_count=sm, **choice)


def ragged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indptr: torch.Tensor,
                  kv_indices: torch.Tensor, scale: float, *, out: torch.Tensor | None = None,
                  num_splits: int | None = None, max_len: int | None = None, block_n: int = 64,
                  workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
                  k_scale: float | None = None, v_scale: float | None = None,
                  per_head: bool = False, num_warps: int | None = None, num_stages: int | None = None,
                  fused_merge: bool = False, counters: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b] = softmax(q[b] K_b^T * scale) V_b`` where ``K_b = k_cache[kv_indices[indptr[b]:indptr[b+1]]]``.

    fp8 caches: ``K_b``/``V_b`` are the stored values times ``k_scale``/``v_scale`` (1 if None).

    q/out ``[B, Hq, D]``; k_cache/v_cache ``[rows, Hkv, D]`` (GQA: ``Hq % Hkv == 0``); an empty
    list gives zeros. ``per_head``: ``kv_indptr`` has ``B * Hkv + 1`` entries, list ``b * Hkv + h``
    holds head-rows ``row * Hkv + h`` and feeds query heads ``h * G .. (h + 1) * G - 1``.
    ``num_splits`` (or ``max_len``, the longest list, to choose it) is host-side;
    ``workspace`` = preallocated ``(o_part [B, Hq, S, D] fp32, lse_part [B, Hq, S] fp32)`` for
    CUDA-graph use. ``num_warps`` / ``num_stages``: pass 1's launch options on CUDA (Triton's
    defaults when None; the GPU suite's sweep times the alternatives).

    ``fused_merge``: one launch; the last split of each (request, KV head) to finish merges them
    (found by an atomic count in ``counters``, int32, at least ``B * Hkv`` entries, all zero on
    entry and left zero by the kernel, so a buffer kept across launches and CUDA-graph replays
    needs no reset; None allocates one). Off by default until a GPU stress test has passed
    (``tests/kernels/test_kernel_ragged_decode.py``): the interpreter runs programs one after another,
    so it checks the merge's arithmetic, not its memory ordering.
    """
    bsz, hq, d = q.shape
    hkv = k_cache.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache need a contiguous head dimension")
    if out is None:
        out = torch.empty_like(q)
    if bsz == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    device = q.device
    if num_splits is None:
        if max_len is None:
            max_len = int((kv_indptr[1:] - kv_indptr[:-1]).max())
        num_splits = num_splits_for(max_len, bsz, hkv, device, block_n=block_n)
    if workspace is None:
        o_part = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=device)
        lse_part = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=device)
    else:
        o_part, lse_part = workspace[0][:bsz, :, :num_splits], workspace[1][:bsz, :, :num_splits]
    k_scale = 1.0 if k_scale is None else float(k_scale)
    v_scale = 1.0 if v_scale is None else float(v_scale)
    cast = (q.dtype != k_cache.dtype or q.dtype == torch.float32
            or (interpret_for(device) and q.dtype == torch.bfloat16))
    group = hq // hkv
    block_d = max(16, next_pow2(d))
    launch = {} if interpret_for(device) else {
        k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    if fused_merge:
        if counters is None:
            counters = torch.zeros(bsz * hkv, dtype=torch.int32, device=device)
        elif counters.dtype != torch.int32 or counters.numel() < bsz * hkv:
            raise ValueError(f"counters must be int32 with at least {bsz * hkv} entries (batch x KV heads)")
    kernel(_decode_pass1, device)[(bsz, hkv, num_splits)](
        q, k_cache, v_cache, kv_indices, kv_indptr, o_part, lse_part,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        float(scale) * k_scale * _LOG2E, num_splits, hkv,
        counters if fused_merge else lse_part, out, out.stride(0), out.stride(1), v_scale,
        PER_HEAD=bool(per_head), GROUP=group, HEAD_DIM=d, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        CAST_F32=cast, IEEE=cast, FUSED_MERGE=bool(fused_merge), **launch,
    )
    if fused_merge:
        return out
    kernel(_decode_pass2, device)[(bsz, hq)](
        o_part, lse_part, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0),
        lse_part.stride(1), out.stride(0), out.stride(1), num_splits, v_scale,
        HEAD_DIM=d, BLOCK_S=max(2, next_pow2(num_splits)), BLOCK_D=block_d,
    )
    return out


def ragged_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indptr_cpu,
                        kv_indices: torch.Tensor, scale: float, k_scale: float | None = None,
                        v_scale: float | None = None, per_head: bool = False) -> torch.Tensor:
    """Reference: request by request (per KV head with ``per_head``), fp32 softmax (fp8 caches
    dequantized with the scales); an empty list gives zeros."""
    out = torch.zeros_like(q)
    hkv = k_cache.shape[1]
    g = q.shape[1] // hkv
    ks = 1.0 if k_scale is None else k_scale
    vs = 1.0 if v_scale is None else v_scale
    for b in range(q.shape[0]):
        if per_head:
            for h in range(hkv):
                i = b * hkv + h
                hr = kv_indices[int(kv_indptr_cpu[i]):int(kv_indptr_cpu[i + 1])].to(torch.int64)
                heads = slice(h * g, (h + 1) * g)
                k = k_cache[hr // hkv, hr % hkv].unsqueeze(1)  # each cell at its own place
                v = v_cache[hr // hkv, hr % hkv].unsqueeze(1)
                out[b, heads] = _attend(q[b, heads], k, v, scale, ks, vs)
        else:
            rows = kv_indices[int(kv_indptr_cpu[b]):int(kv_indptr_cpu[b + 1])].to(torch.int64)
            out[b] = _attend(q[b], k_cache[rows], v_cache[rows], scale, ks, vs)
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, k_scale: float,
            v_scale: float) -> torch.Tensor:
    """``q [Hq, D]`` over ``k``/``v`` ``[n, Hkv, D]`` in fp32 (GQA by repetition); zeros if ``n == 0``."""
    if k.shape[0] == 0:
        return torch.zeros_like(q)
    g = q.shape[0] // k.shape[1]
    k = k.float().repeat_interleave(g, 1) * k_scale
    v = v.float().repeat_interleave(g, 1) * v_scale
    s = torch.einsum("hd,khd->hk", q.float(), k) * scale
    return torch.einsum("hk,khd->hd", torch.softmax(s, -1), v).to(q.dtype)
