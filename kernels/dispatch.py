"""Which implementation runs where: Triton on CUDA, the torch reference elsewhere.

``VLCACHE_KERNELS=torch`` forces the torch reference everywhere (debugging, A/B checks);
``VLCACHE_KERNELS=triton`` forces Triton (on CPU tensors that means Triton's interpreter: slow,
for tests only). Everything here takes and returns the same objects as the reference.

What the server calls (the lead wires these in):

* statistics, one layer of an extend batch: :func:`batched_attention_stats` (all compressing
  requests of the batch at once; build the block tables once per forward with
  :func:`plan_batched_stats` and pass them as ``plan=`` to every layer), or the one-request
  drop-in :func:`attention_stats_auto` with the signature of
  :func:`vlcache_sglang.policy.stats.attention_stats`;
* compaction: :func:`move_kv_rows_auto` (or ``kv_move.compact_requests`` for many requests).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from vlcache_sglang.policy.stats import AttentionStats

__all__ = [
    "attention_stats_auto",
    "batched_attention_stats",
    "move_kv_rows_auto",
    "plan_batched_stats",
    "use_triton",
]


def use_triton(device: torch.device | str) -> bool:
    """Triton on CUDA (unless ``VLCACHE_KERNELS=torch``); torch elsewhere (unless ``=triton``)."""
    mode = os.environ.get("VLCACHE_KERNELS", "auto").lower()
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    if torch.device(device).type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover
        return False
    return True


def plan_batched_stats(qo_indptr_cpu: Sequence[int], kv_indptr_cpu: Sequence[int], device, num_q_heads: int):
    """Block tables for :func:`batched_attention_stats` (``None`` where torch will run)."""
    if not use_triton(device):
        return None
    from vlcache_sglang.kernels.attention_stats import plan_stats

    return plan_stats(qo_indptr_cpu, kv_indptr_cpu, device, num_q_heads=num_q_heads)


def batched_attention_stats(q, q_positions, qo_indptr_cpu, k_pool, kv_indices, kv_indptr_cpu, scale: float,
                            threshold: float = 0.01, *, plan=None, dtype: torch.dtype = torch.float32):
    """:class:`~vlcache_sglang.kernels.attention_stats.BatchedStats` of one layer for a batch.

    ``dtype`` is the torch reference's accumulation dtype (the Triton kernel accumulates in fp32;
    a float64 request, ``stats_dtype="float64"``, therefore always takes the torch path).
    """
    if dtype == torch.float64 or not use_triton(k_pool.device):
        from vlcache_sglang.kernels.attention_stats import attention_stats_batched_torch

        return attention_stats_batched_torch(q, q_positions, qo_indptr_cpu, k_pool, kv_indices, kv_indptr_cpu,
                                             scale, threshold, dtype=dtype)
    from vlcache_sglang.kernels.attention_stats import attention_stats_batched

    return attention_stats_batched(q, q_positions, qo_indptr_cpu, k_pool, kv_indices, kv_indptr_cpu, scale,
                                   threshold, plan=plan)


def attention_stats_auto(q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, scale: float,
                         threshold: float = 0.01, *, key_chunk: int = 1024, query_chunk: int = 128,
                         dtype: torch.dtype = torch.float32) -> AttentionStats:
    """Drop-in for :func:`vlcache_sglang.policy.stats.attention_stats` (one request, keys given
    as a ``[n_k, Hkv, D]`` tensor): the Triton kernel on CUDA (fp32 accumulation), the torch
    reference elsewhere or when ``dtype`` is float64."""
    if dtype == torch.float64 or not use_triton(k.device):
        from vlcache_sglang.policy.stats import attention_stats

        return attention_stats(q, q_positions, k, scale, threshold, key_chunk=key_chunk,
                               query_chunk=query_chunk, dtype=dtype)
    from vlcache_sglang.kernels.attention_stats import attention_stats_batched

    n_q, n_k = q.shape[0], k.shape[0]
    idx = torch.arange(n_k, device=k.device, dtype=torch.int32)
    out = attention_stats_batched(q, q_positions.to(k.device), [0, n_q], k, idx, [0, n_k], scale, threshold)
    return AttentionStats(out.col, out.below[0], out.causal[0])


def move_kv_rows_auto(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``k[dst] = k[src]; v[dst] = v[src]`` (sources read first): Triton on CUDA, torch elsewhere."""
    from vlcache_sglang.kernels import kv_move

    if use_triton(k.device):
        kv_move.move_kv_rows_triton(k, v, src, dst)
    else:
        kv_move.move_kv_rows(k, v, src, dst)
