"""Which implementation runs where: Triton on CUDA, the torch reference elsewhere.

Every entry point takes the choice as an explicit ``mode`` (:data:`KERNEL_MODES`): ``"auto"``
(Triton on CUDA, torch elsewhere), ``"torch"`` (the torch reference everywhere: debugging, A/B
checks) or ``"triton"`` (Triton everywhere; on CPU tensors that means Triton's interpreter: slow,
for tests only). Nothing here reads the environment: the launch settings own that choice and pass
it down. Everything here takes and returns the same objects as the reference.

What the server calls:

* statistics of one request: :func:`attention_stats_auto`, with the signature of
  :func:`vlcache_sglang.policy.stats.attention_stats` (a ``StatsFn``), handed to
  ``StatsAccumulator(..., stats_fn=...)``; the batched kernel itself is
  :func:`vlcache_sglang.kernels.attention_stats.attention_stats_batched`;
* compaction: :func:`move_kv_rows_auto` (or ``kv_move.compact_requests`` for many requests).
"""
from __future__ import annotations

from typing import Literal

import torch

from vlcache_sglang.policy.stats import AttentionStats

__all__ = [
    "KERNEL_MODES",
    "KernelMode",
    "attention_stats_auto",
    "move_kv_rows_auto",
    "use_triton",
]

KernelMode = Literal["auto", "torch", "triton"]
KERNEL_MODES: tuple[str, ...] = ("auto", "torch", "triton")


def use_triton(device: torch.device | str, mode: KernelMode = "auto") -> bool:
    """``mode="auto"``: Triton on CUDA (when triton imports), torch elsewhere; ``"torch"`` / ``"triton"``
    force one. Raises ValueError for any other mode."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(KERNEL_MODES)}; got {mode!r}")
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


def attention_stats_auto(q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, scale: float,
                         threshold: float = 0.01, *, key_chunk: int = 1024, query_chunk: int = 128,
                         dtype: torch.dtype = torch.float32, mode: KernelMode = "auto") -> AttentionStats:
    """Drop-in for :func:`vlcache_sglang.policy.stats.attention_stats` (one request, keys given
    as a ``[n_k, Hkv, D]`` tensor): the Triton kernel where :func:`use_triton` says so (fp32
    accumulation), the torch reference otherwise or when ``dtype`` is float64. With a mode other
    than ``"auto"``, bind it (``functools.partial(attention_stats_auto, mode=...)``) to get a
    ``StatsFn``."""
    if dtype == torch.float64 or not use_triton(k.device, mode):
        from vlcache_sglang.policy.stats import attention_stats

        return attention_stats(q, q_positions, k, scale, threshold, key_chunk=key_chunk,
                               query_chunk=query_chunk, dtype=dtype)
    from vlcache_sglang.kernels.attention_stats import attention_stats_batched

    n_q, n_k = q.shape[0], k.shape[0]
    idx = torch.arange(n_k, device=k.device, dtype=torch.int32)
    out = attention_stats_batched(q, q_positions.to(k.device), [0, n_q], k, idx, [0, n_k], scale, threshold)
    return AttentionStats(out.col, out.below[0], out.causal[0])


def move_kv_rows_auto(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *,
                      mode: KernelMode = "auto") -> None:
    """``k[dst] = k[src]; v[dst] = v[src]`` (sources read first): Triton where :func:`use_triton`
    says so (``mode="auto"``: on CUDA), torch otherwise."""
    from vlcache_sglang.kernels import kv_move

    if use_triton(k.device, mode):
        kv_move.move_kv_rows_triton(k, v, src, dst)
    else:
        kv_move.move_kv_rows(k, v, src, dst)
