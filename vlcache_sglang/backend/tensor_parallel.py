"""One plan on every tensor-parallel rank: statistics gathered over SGLang's attention TP group.

Under ``--tp-size N`` each rank holds ``Hq / N`` query heads and ``Hkv / N`` KV heads of every
layer, so each rank's :class:`~vlcache_sglang.policy.stats.PolicyStats` covers only its own heads.
Planned apart, ranks would keep different tokens, free different slots and hand out different
virtual ids, and their schedulers would diverge. So at plan time (once per request, after its
last prefill chunk) the request's statistics are all-gathered along the head axis through SGLang's
own ``GroupCoordinator.all_gather`` (gloo on CPU, NCCL on GPU): the KV-head column scores
``col [L, Hkv/N, m]`` and the per-query-head counts ``below``/``causal`` ``[L, Hq/N]`` (two
collectives per request). Every rank then holds bit-identical statistics of all heads, in the
model's head order (rank ``r`` owns heads ``[r * H/N, (r + 1) * H/N)``), and the pure, deterministic
policy gives the same plan everywhere: head granularity sees every head too.

Under ``VLCACHE_DEBUG_CHECKS=1`` :meth:`StatsGather.agree` all-gathers a digest of what each rank
decided (plan, freed slots, pool counts) and counts disagreements (``/server_info``
``tp_plan_mismatches``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import torch

from vlcache_sglang.policy.stats import PolicyStats

logger = logging.getLogger(__name__)


def attention_tp_group():
    """SGLang's attention tensor-parallel group in this process, or None (no distributed runtime:
    unit tests, tools)."""
    try:
        from sglang.srt.distributed.parallel_state import get_attn_tp_group

        group = get_attn_tp_group()
    except Exception:  # not initialised in this process
        return None
    return group if getattr(group, "world_size", 1) > 1 else None


class StatsGather:
    """Gathers a request's statistics over the attention TP group (identity without one)."""

    def __init__(self, group=None) -> None:
        self.group = group
        self.world_size = int(getattr(group, "world_size", 1)) if group is not None else 1
        self.rank = int(getattr(group, "rank_in_group", 0)) if group is not None else 0
        self.plans_checked = 0
        self.plan_mismatches = 0

    def gather(self, stats: PolicyStats) -> PolicyStats:
        """Statistics of all heads (the same on every rank); ``stats`` itself with one rank or when
        the method gathers nothing (every rank runs the same method, so all skip alike)."""
        if self.world_size == 1 or stats.col is None:
            return stats
        col = self.group.all_gather(stats.col.contiguous(), dim=1)
        counts = self.group.all_gather(torch.stack([stats.below, stats.causal]).contiguous(), dim=2)
        return replace(stats, num_q_heads=stats.num_q_heads * self.world_size,
                       num_kv_heads=stats.num_kv_heads * self.world_size, col=col, below=counts[0],
                       causal=counts[1])

    def agree(self, what: str, values: list[int]) -> bool:
        """Debug: whether every rank holds the same ``values`` (one small all-gather)."""
        if self.world_size == 1:
            return True
        digest = hashlib.sha1(repr(values).encode()).digest()[:8]
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64,
                            device=getattr(self.group, "device", "cpu"))
        every = self.group.all_gather(mine, dim=0)
        self.plans_checked += 1
        same = bool((every == every[0]).all())
        if not same:
            self.plan_mismatches += 1
            logger.error("vlcache debug: tensor-parallel ranks disagree on %s (digests %s)", what, every.tolist())
        return same
