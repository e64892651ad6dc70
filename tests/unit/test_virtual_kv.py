"""Virtual ids and cells over SGLang's real KV pool and allocator (no server)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import real_kv_pool
from vlcache_sglang.backend.virtual_kv import CACHED, LOCKED, OWNED, VirtualKV

L, HKV, D, SIZE = 3, 2, 4, 256


@pytest.fixture
def pool():
    _, kv, allocator, vkv = real_kv_pool(L, HKV, D, SIZE)
    return kv, allocator, vkv


def random_kept(g, m, lo=1):
    return [torch.randperm(m, generator=g)[: int(torch.randint(lo, m, (1,), generator=g))].sort().values
            for _ in range(L)]


@pytest.mark.parametrize("protected", [0, 4])
@pytest.mark.parametrize("seed", range(4))
def test_compaction_keeps_exactly_the_kept_rows_and_frees_the_rest(pool, protected, seed):
    kv, allocator, vkv = pool
    g = torch.Generator().manual_seed(seed)
    m = 24
    row = allocator.alloc(m).to(torch.int32)
    before_k, before_v = kv.k.clone(), kv.v.clone()
    free0 = allocator.available_size()
    kept = random_kept(g, m)
    orig = row.clone().long()
    res = vkv.compact(kv.k, kv.v, row, kept, protected, m)

    assert row[:protected].tolist() == orig[:protected].tolist()  # the tree-owned prefix is untouched
    own_total = sum(int((k >= protected).sum()) for k in kept)
    assert res.cell_slots == -(-own_total // L)
    assert allocator.available_size() == free0 + (m - protected) - res.cell_slots
    assert vkv.live_cell_slots() == res.cell_slots
    resolved = vkv.resolve(row)
    for layer, pos in enumerate(kept):
        present, rows = resolved[layer]
        # each layer holds exactly its kept own positions (the prefix stays whole, in place)
        assert present.tolist() == sorted(set(range(protected)) | set(pos.tolist()))
        src = orig[present] + layer * kv.rows_per_layer
        assert torch.equal(kv.k[rows], before_k[src]) and torch.equal(kv.v[rows], before_v[src])
    dropped_everywhere = set(range(protected, m)) - set(torch.cat(kept).tolist())
    assert all(int(row[j]) == vkv.null_id for j in dropped_everywhere)
    # cells live only in the request's own first c slots; nothing else was written
    touched = (kv.k != before_k).any(-1).any(-1).nonzero().flatten() % kv.rows_per_layer
    assert set(touched.tolist()) <= set(orig[protected:protected + res.cell_slots].tolist())


def test_release_frees_a_slot_with_its_last_cell_and_never_twice(pool):
    kv, allocator, vkv = pool
    m = 12
    row = allocator.alloc(m).to(torch.int32)
    kept = [torch.arange(0, 12, 2), torch.arange(1, 12, 2), torch.tensor([0, 5])]  # 14 cells -> 5 slots
    start = allocator.available_size()
    res = vkv.compact(kv.k, kv.v, row, kept, 0, m)
    assert res.cell_slots == 5 and allocator.available_size() == start + m - 5
    ids = row.clone()
    allocator.free(ids[:6])  # SGLang frees part of the row: only fully released slots come back
    partial = allocator.available_size()
    assert vkv.live_cell_slots() < 5 and partial == start + m - vkv.live_cell_slots()
    allocator.free(ids[6:])
    assert allocator.available_size() == start + m and vkv.live_ids == 0 and vkv.live_cell_slots() == 0
    with pytest.raises(AssertionError, match="double free"):
        allocator.free(ids[:1] if int(ids[0]) != vkv.null_id else ids[1:2])


def test_mixed_real_and_virtual_frees_and_tree_states(pool):
    kv, allocator, vkv = pool
    m = 10
    row = allocator.alloc(m + 3).to(torch.int32)  # 10 prompt positions + a 3-token real tail
    kept = [torch.arange(m)] * L
    vkv.compact(kv.k, kv.v, row, kept, 0, m)
    assert vkv.cached_cell_slots() == (0, 0)  # request-owned: neither evictable nor protected
    vkv.set_state(row, OWNED, CACHED)
    assert vkv.cached_cell_slots() == (m, 0)
    vkv.set_state(row[:4], CACHED, LOCKED)
    ev, prot = vkv.cached_cell_slots()
    assert prot >= 1 and ev + prot == m
    vkv.set_state(row[:4], LOCKED, CACHED)
    start = allocator.available_size()
    allocator.free(row.clone())  # virtual prompt and real tail in one call
    assert allocator.available_size() == start + m + 3 and vkv.live_ids == 0


def test_compaction_on_top_of_a_compressed_prefix(pool):
    """Multi-turn: turn 2's row starts with turn 1's virtual ids; it keeps only what they hold."""
    kv, allocator, vkv = pool
    m1, m2 = 16, 24
    row = torch.zeros(m2, dtype=torch.int32)
    row[:m1] = allocator.alloc(m1).to(torch.int32)
    vkv.compact(kv.k, kv.v, row, [torch.tensor([0, 3, 7]), torch.tensor([3, 9]), torch.tensor([15])], 0, m1)
    row[m1:] = allocator.alloc(m2 - m1).to(torch.int32)
    present = vkv.resolve(row[:m1])
    with pytest.raises(AssertionError, match="does not hold"):  # position 1 was dropped in every layer
        vkv.compact(kv.k, kv.v, row.clone(), [torch.tensor([1])] * L, m1, m2)
    kept = [torch.cat([present[l][0], torch.arange(m1, m2, 3)]) for l in range(L)]
    res = vkv.compact(kv.k, kv.v, row, kept, m1, m2)
    assert [p.tolist() for p, _ in vkv.resolve(row)] == [k.tolist() for k in kept]
    assert [ids.numel() for ids in res.prefix_ids] == [3, 2, 1]


def test_running_out_of_virtual_ids_leaves_the_request_alone(pool):
    kv, allocator, _ = pool
    small = VirtualKV(kv.rows_per_layer, L, capacity=3)
    small.free_slots_fn = allocator.free
    row = allocator.alloc(8).to(torch.int32)
    before = row.clone()
    assert small.compact(kv.k, kv.v, row, [torch.arange(8)] * L, 0, 8) is None
    assert torch.equal(row, before) and small.live_ids == 0


def test_device_tables_are_int32_and_their_bytes_are_what_the_pool_budget_charges():
    from vlcache_sglang.backend.memory_budget import table_bytes_per_slot

    rows = SIZE + 1
    vkv = VirtualKV(rows, L, capacity=4 * rows)
    assert vkv.table.dtype == torch.int32 and vkv.born.dtype == torch.int32
    assert vkv.device_bytes() == rows * table_bytes_per_slot(L, graph_buffers=False)


def test_size_counters_equal_a_full_recount_through_a_random_workload_with_eviction(pool):
    """evictable/protected/live cell slots are running totals (O(1) per query); after every
    operation a tree and the scheduler do (compact, insert, lock, unlock, free part of a row,
    evict) they equal a recount over every slot."""
    kv, allocator, vkv = pool
    g = torch.Generator().manual_seed(7)
    live: list[torch.Tensor] = []  # rows of virtual ids still held (request-owned or in the "tree")
    states: list[int] = []

    seen = set()

    def check():
        assert (vkv.live_cell_slots(), *vkv.cached_cell_slots()) == vkv.recount()
        seen.update(n for n, c in zip(("evictable", "protected"), vkv.cached_cell_slots()) if c)

    for step in range(120):
        op = int(torch.randint(0, 6, (1,), generator=g))
        if op == 0 or not live:  # a request compacts
            m = int(torch.randint(4, 20, (1,), generator=g))
            if allocator.available_size() < m:
                op = 5
            else:
                row = allocator.alloc(m).to(torch.int32)
                if vkv.compact(kv.k, kv.v, row, random_kept(g, m), 0, m) is not None:
                    live.append(row[row > vkv.base].clone())
                    states.append(OWNED)
        i = int(torch.randint(0, len(live), (1,), generator=g)) if live else None
        if i is None:
            check()
            continue
        ids = live[i]
        if op == 1 and states[i] == OWNED:  # inserted into the tree
            vkv.set_state(ids, OWNED, CACHED)
            states[i] = CACHED
        elif op == 2 and states[i] == CACHED:  # a request locks the node
            vkv.set_state(ids, CACHED, LOCKED)
            states[i] = LOCKED
        elif op == 3 and states[i] == LOCKED:
            vkv.set_state(ids, LOCKED, CACHED)
            states[i] = CACHED
        elif op == 4 and ids.numel() > 1:  # part of a row is freed (dedup / split node)
            cut = int(torch.randint(1, ids.numel(), (1,), generator=g))
            allocator.free(ids[:cut].clone())
            live[i] = ids[cut:]
        elif op == 5 and states[i] != LOCKED:  # eviction / finish frees the rest
            allocator.free(ids.clone())
            live.pop(i)
            states.pop(i)
        check()
    for ids in live:
        allocator.free(ids.clone())
    check()
    assert vkv.recount() == (0, 0, 0) and allocator.available_size() == SIZE
    assert seen == {"evictable", "protected"}


@pytest.mark.parametrize("eviction_policy", ["lru", "lfu", "slru", "priority"])  # tlru: refused at launch
def test_tree_sizes_stay_exact_through_a_random_workload_on_sglangs_radix_tree(pool, eviction_policy):
    """The same on the vlcache radix tree (SGLang's RadixCache underneath): compacted requests
    inserted (with shared prefixes deduplicated as checkpoint does), matched and locked, unlocked,
    evicted; the O(1) totals equal a recount after every step and the idle check holds at the end,
    under each ``--radix-eviction-policy`` the tree serves (its eviction orders leaves by SGLang's
    own strategy object)."""
    from array import array
    from collections import Counter
    from types import SimpleNamespace

    from sglang.srt.disaggregation.kv_events import BlockRemoved, BlockStored
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixKey

    from vlcache_sglang.radix_cache import VLCacheRadixCache

    kv, allocator, vkv = pool
    req_pool = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    # what the backend's Runtime offers
    runtime = SimpleNamespace(compressor=SimpleNamespace(vkv=vkv, layer_lists=SimpleNamespace(rows_reported=False)),
                              tree=None)
    try:
        tree = VLCacheRadixCache(CacheInitParams(disable=False, req_to_token_pool=req_pool,
                                                 token_to_kv_pool_allocator=allocator, page_size=1,
                                                 eviction_policy=eviction_policy, enable_kv_cache_events=True),
                                 runtime)
        assert type(tree.eviction_strategy).__name__.lower().startswith(eviction_policy)
        assert runtime.compressor.layer_lists.rows_reported  # the tree reports its row rewrites
        g = torch.Generator().manual_seed(11)
        locked = []
        seen = set()

        published: Counter = Counter()  # blocks a router following --kv-events-config believes cached

        def tree_tokens() -> int:
            stack, total = [tree.root_node], 0
            while stack:
                node = stack.pop()
                total += len(node.key) if node is not tree.root_node else 0
                stack.extend(node.children.values())
            return total

        def check():
            for event in tree.kv_events.take():
                if isinstance(event, BlockStored):
                    published.update(event.block_hashes)
                elif isinstance(event, BlockRemoved):
                    published.subtract(event.block_hashes)
            assert min(published.values(), default=0) >= 0  # nothing removed that was not stored
            assert sum(published.values()) == tree_tokens()  # page size 1: one block per cached token
            assert (vkv.live_cell_slots(), *vkv.cached_cell_slots()) == vkv.recount()
            ev, prot = vkv.cached_cell_slots()
            seen.update(n for n, c in (("evictable", ev), ("protected", prot)) if c)

        for step in range(80):
            op = int(torch.randint(0, 4, (1,), generator=g))
            if op == 0:  # a compressed request's prompt enters the tree (a few shared stems)
                m = int(torch.randint(6, 16, (1,), generator=g))
                if allocator.available_size() < m:
                    tree.evict(EvictParams(num_tokens=m))
                if allocator.available_size() < m:
                    continue
                stem = int(torch.randint(0, 3, (1,), generator=g))
                tokens = [1000 * stem + i for i in range(m)]
                row = allocator.alloc(m).to(torch.int32)
                if vkv.compact(kv.k, kv.v, row, random_kept(g, m), 0, m) is None:
                    allocator.free(row.clone())
                    continue
                res = tree.insert(InsertParams(key=RadixKey(array("q", tokens)), value=row.long()))
                if res.prefix_len:  # the tree already holds that prefix: free the duplicate ids
                    allocator.free(row[: res.prefix_len].long())
            elif op == 1:  # a request matches a prefix and locks it
                stem, n = int(torch.randint(0, 3, (1,), generator=g)), int(torch.randint(1, 12, (1,), generator=g))
                match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1000 * stem + i for i in range(n)]))))
                if match.last_device_node is not tree.root_node:
                    tree.inc_lock_ref(match.last_device_node)
                    locked.append(match.last_device_node)
            elif op == 2 and locked:  # it finishes
                tree.dec_lock_ref(locked.pop(int(torch.randint(0, len(locked), (1,), generator=g))))
            elif op == 3:
                tree.evict(EvictParams(num_tokens=int(torch.randint(1, 30, (1,), generator=g))))
            check()
        while locked:
            tree.dec_lock_ref(locked.pop())
        check()
        assert tree.protected_size() == 0
        assert allocator.available_size() + tree.evictable_size() == SIZE  # SGLang's idle check
        tree.evict(EvictParams(num_tokens=SIZE))
        check()
        assert allocator.available_size() == SIZE and vkv.recount() == (0, 0, 0)
        assert seen == {"evictable", "protected"}
        assert +published == Counter()  # the event stream ends balanced: every stored block removed
    finally:
        runtime.tree = None
