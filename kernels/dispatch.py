"""Which implementation runs where: Triton on CUDA, the torch reference elsewhere.

Every entry point takes the choice as an explicit ``mode`` (:data:`KERNEL_MODES`): ``"auto"``
(Triton on CUDA, torch elsewhere), ``"torch"`` (the torch reference everywhere: debugging, A/B
checks) or ``"triton"`` (Triton everywhere; on CPU tensors that means Triton's interpreter: slow,
for tests only). Nothing here reads the environment: the launch settings own that choice and pass
it down. Everything here takes and returns the same objects as the reference.

What the server calls:

* statistics of one request: a :class:`StatsDispatch` (one per compressor), with the signature
  of :func:`vlcache_sglang.policy.stats.attention_stats` (a ``StatsFn``), handed to
  ``StatsAccumulator(..., stats_fn=...)``; :func:`attention_stats_auto` is the same for one call; the batched kernel itself is
  :func:`vlcache_sglang.kernels.attention_stats.attention_stats_batched`;
* compaction: :func:`move_kv_rows_auto` (or ``kv_move.compact_requests`` for many requests).
"""
from __future__ import annotations

from typing import Literal

from vlcache_sglang.kernels.launch_configs import StatsLaunch

import torch

from vlcache_sglang.policy.stats import AttentionStats

__all__ = [
    "KERNEL_MODES",
    "KernelMode",
    "StatsDispatch",
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


class StatsDispatch:
    """A ``StatsFn`` (the signature of :func:`vlcache_sglang.policy.stats.attention_stats`) that runs
    the Triton kernel where :func:`use_triton` says so, keeping each key count's launch plan and key
    indices: every layer of a prefill chunk has the same row and key counts, so the host builds them
    once per chunk instead of once per layer (six small host-to-device copies and an ``arange``
    each). One per compressor; at most ``max_plans`` layouts are kept (least recently used
    dropped first)."""

    def __init__(self, mode: KernelMode = "auto", max_plans: int = 16, launch: StatsLaunch | None = None) -> None:
        use_triton("cpu", mode)  # validates the mode
        self.mode = mode
        self.launch = (launch or StatsLaunch()).check()  # plan_stats' blocks (kernels/launch_configs.py)
        self.max_plans = max_plans
        self._plans: dict[tuple, tuple] = {}

    def plan(self, n_q: int, n_k: int, num_q_heads: int, device: torch.device, num_kv_heads: int = 1):
        """(launch plan, int32 key indices ``0..n_k-1``) of one request's layout."""
        from vlcache_sglang.kernels.attention_stats import plan_stats

        key = (n_q, n_k, num_q_heads, num_kv_heads, device)
        hit = self._plans.pop(key, None)  # re-inserted last: the least recently used goes first
        if hit is None:
            if len(self._plans) >= self.max_plans:
                self._plans.pop(next(iter(self._plans)))
            hit = (plan_stats([0, n_q], [0, n_k], device, num_q_heads=num_q_heads, block_m=self.launch.block_m,
                              block_n=self.launch.block_n, pack_heads=self.launch.pack_heads,
                              num_kv_heads=num_kv_heads),
                   torch.arange(n_k, device=device, dtype=torch.int32))
        self._plans[key] = hit
        return hit

    def __call__(self, q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, scale: float,
                 threshold: float = 0.01, *, key_chunk: int = 1024, query_chunk: int = 128,
                 dtype: torch.dtype = torch.float32) -> AttentionStats:
        if dtype == torch.float64 or not use_triton(k.device, self.mode):
            from vlcache_sglang.policy.stats import attention_stats

            return attention_stats(q, q_positions, k, scale, threshold, key_chunk=key_chunk,
                                   query_chunk=query_chunk, dtype=dtype)
        from vlcache_sglang.kernels.attention_stats import attention_stats_batched

        n_q, n_k = q.shape[0], k.shape[0]
        plan, idx = self.plan(n_q, n_k, q.shape[1], k.device, k.shape[1])
        out = attention_stats_batched(q, q_positions.to(k.device), [0, n_q], k, idx, [0, n_k], scale, threshold,
                                      plan=plan)
        return AttentionStats(out.col, out.below[0], out.causal[0])


def attention_stats_auto(q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, scale: float,
                         threshold: float = 0.01, *, key_chunk: int = 1024, query_chunk: int = 128,
                         dtype: torch.dtype = torch.float32, mode: KernelMode = "auto") -> AttentionStats:
    """Drop-in for :func:`vlcache_sglang.policy.stats.attention_stats` (one request, keys given
    as a ``[n_k, Hkv, D]`` tensor): the Triton kernel where :func:`use_triton` says so (fp32
    accumulation), the torch reference otherwise or when ``dtype`` is float64. One call, no plan
    kept: the server hands the policy a :class:`StatsDispatch`, which keeps them."""
    return StatsDispatch(mode)(q, q_positions, k, scale, threshold, key_chunk=key_chunk, query_chunk=query_chunk,
                               dtype=dtype)


def move_kv_rows_auto(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *,
                      mode: KernelMode = "auto") -> None:
    """``k[dst] = k[src]; v[dst] = v[src]`` (sources read first): Triton where :func:`use_triton`
    says so (``mode="auto"``: on CUDA), torch otherwise."""
    from vlcache_sglang.kernels import kv_move

    if use_triton(k.device, mode):
        kv_move.move_kv_rows_triton(k, v, src, dst)
    else:
        kv_move.move_kv_rows(k, v, src, dst)
