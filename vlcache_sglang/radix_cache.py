"""``--radix-cache-backend vlcache``: SGLang's radix tree, able to hold compressed KV.

A compressed prompt position is stored in the tree like any token, with its virtual id as the
value (:mod:`vlcache_sglang.backend.virtual_kv`). Matching, splitting, locking and LRU order are
SGLang's own; this subclass changes four things:

* ``checkpoint`` asks the compressor how much of a compressing request may enter (nothing while
  its statistics are pending, only the uncompressed prefix under ``prefix`` sharing);
* sizes are reported in memory, not tokens: a virtual id costs nothing itself, its cells cost
  slots, so ``evictable_size``/``protected_size`` count real ids plus the cell slots whose cells
  all belong to tree entries (exact; the idle leak check holds);
* ``evict`` stops when the requested number of slots is actually free;
* locking moves the virtual ids of a node between the evictable and locked states, so that the
  cell slots of an entry in use are never counted as evictable.

Which compressed entries may match is decided by the key: compressing requests under
``compressed`` sharing carry their policy's namespace in ``extra_key``
(:func:`vlcache_sglang.backend.request_info.prepare_prefix_match`).

The tree finds its process's :class:`~vlcache_sglang.backend.runtime.Runtime` on the KV allocator
it is built with (the attention backend, created first, attached it there) and registers itself
in it; without a vlcache backend in the process (CUDA's stock fallback) it is SGLang's tree.
"""
from __future__ import annotations

import heapq
import logging
import time

from sglang.srt.mem_cache.base_prefix_cache import EvictParams, EvictResult
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from vlcache_sglang.backend.runtime import Runtime, runtime_of
from vlcache_sglang.backend.virtual_kv import CACHED, LOCKED, OWNED

logger = logging.getLogger(__name__)
NAME = "vlcache"


class VLCacheRadixCache(RadixCache):
    """Radix tree whose values may be virtual ids of compressed positions."""

    def __init__(self, params, runtime: Runtime | None = None):
        self.runtime = runtime  # before super().__init__: it calls reset()
        super().__init__(params)
        if runtime is not None and not self.disable:
            runtime.tree = self  # compressed requests may now enter the tree
        if runtime is not None and runtime.compressor is not None:
            # every rewrite of a request row's ids by this tree is reported (checkpoint, below), so
            # decode steps may trust a row's cached resolution without reading the device
            runtime.compressor.layer_lists.rows_reported = True

    def _compressor(self):
        return self.runtime.compressor if self.runtime is not None else None

    def _vkv(self):
        compressor = self._compressor()
        return None if compressor is None else compressor.vkv

    def _n_virtual(self, node: TreeNode) -> int:
        vkv = self._vkv()
        if vkv is None or node.value is None or len(node.value) == 0:
            return 0
        return int((node.value >= vkv.base).sum())

    # -- lifecycle -------------------------------------------------------------------------
    def reset(self):
        super().reset()
        self.virtual_evictable_ = 0  # virtual ids inside the stock token counters
        self.virtual_protected_ = 0
        self.evicted_slots = getattr(self, "evicted_slots", 0)  # running count, kept across flushes
        vkv = self._vkv()
        if vkv is not None:  # flush_cache: the allocator is cleared right after
            vkv.clear()

    def checkpoint(self, req, *, up_to: int):
        compressor = self._compressor()
        if compressor is not None and not self.disable:
            up_to = compressor.insert_limit(int(req.kv.req_pool_idx), req.rid, up_to)
            if up_to <= req.kv.cache_protected_len:
                return  # nothing (new) of this request may enter the tree
        super().checkpoint(req, up_to=up_to)
        if compressor is not None and not self.disable:  # the row may now hold the tree's ids
            compressor.states.row_rewritten(int(req.kv.req_pool_idx))

    def insert(self, params):
        result = super().insert(params)
        vkv = self._vkv()
        if vkv is None or self.disable or params.value is None:
            return result
        new = params.value[result.prefix_len: len(params.key)]
        n = int((new >= vkv.base).sum()) if len(new) else 0
        if n:
            self.virtual_evictable_ += n  # new leaves are unlocked
            vkv.set_state(new, OWNED, CACHED)
        return result

    # -- locks -----------------------------------------------------------------------------
    def inc_lock_ref(self, node: TreeNode):
        self._relock(node, when=0, old=CACHED, new=LOCKED)
        return super().inc_lock_ref(node)

    def dec_lock_ref(self, node: TreeNode, params=None):
        self._relock(node, when=1, old=LOCKED, new=CACHED)
        return super().dec_lock_ref(node, params)

    def _relock(self, node: TreeNode, when: int, old: int, new: int) -> None:
        vkv = self._vkv()
        if vkv is None or self.disable:
            return
        while node is not None and node != self.root_node:
            if node.lock_ref == when:
                n = self._n_virtual(node)
                if n:
                    sign = 1 if new == LOCKED else -1
                    self.virtual_evictable_ -= sign * n
                    self.virtual_protected_ += sign * n
                    vkv.set_state(node.value, old, new)
            node = node.parent

    # -- memory ----------------------------------------------------------------------------
    def evictable_size(self):
        vkv = self._vkv()
        if vkv is None:
            return self.evictable_size_
        return self.evictable_size_ - self.virtual_evictable_ + vkv.cached_cell_slots()[0]

    def protected_size(self):
        vkv = self._vkv()
        if vkv is None:
            return self.protected_size_
        return self.protected_size_ - self.virtual_protected_ + vkv.cached_cell_slots()[1]

    def evict(self, params: EvictParams) -> EvictResult:
        """SGLang's eviction of leaves, in the order of the configured ``--radix-eviction-policy``'s
        strategy (lru, lfu, slru, priority; tlru is refused at launch), counted in slots actually freed."""
        if self.disable:
            return EvictResult()
        vkv = self._vkv()
        start_time = time.perf_counter()
        heap = [(self.eviction_strategy.get_priority(node), node) for node in self.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < params.num_tokens and heap:
            _, x = heapq.heappop(heap)
            n_virtual = self._n_virtual(x)
            slots_before = vkv.slots_freed if vkv is not None else 0
            self.token_to_kv_pool_allocator.free_segment(x.value, start_pos=0)
            freed += len(x.value) - n_virtual + ((vkv.slots_freed - slots_before) if vkv is not None else 0)
            self.virtual_evictable_ -= n_virtual
            self._delete_leaf(x)
            if len(x.parent.children) == 0 and x.parent.lock_ref == 0:
                heapq.heappush(heap, (self.eviction_strategy.get_priority(x.parent), x.parent))
            self.kv_events.record_remove(x)
        self.evicted_slots += freed
        self.update_eviction_metrics(freed, start_time)
        return EvictResult(num_tokens_evicted=freed)


def create_vlcache_radix_cache(ctx) -> VLCacheRadixCache:
    """Factory for :func:`sglang.srt.mem_cache.registry.register_radix_cache_backend`."""
    if ctx.is_hybrid_swa or ctx.is_hybrid_ssm:
        raise ValueError("--radix-cache-backend vlcache supports full-attention models only "
                         "(no sliding-window or mamba hybrids)")
    if ctx.enable_hierarchical_cache:
        raise ValueError("--radix-cache-backend vlcache does not support the hierarchical cache (HiCache)")
    if ctx.params.page_size != 1:
        raise ValueError(f"--radix-cache-backend vlcache needs --page-size 1, got {ctx.params.page_size}")
    return VLCacheRadixCache(ctx.params, runtime_of(ctx.params.token_to_kv_pool_allocator))
