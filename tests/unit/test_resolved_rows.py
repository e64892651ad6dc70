"""The Compressor's per-row resolution cache, on SGLang's real pools and allocator.

Every forward reads each compressed request's per-layer lists; resolving the whole row each time
is O(length x layers), so the last resolution is reused and only new ids are resolved. Reuse must
never change what a forward reads: after every step the lists equal a fresh resolution, including
after the row is rewritten and after a table row of an id it holds is rewritten (an id released
and handed out again)."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

from vlcache_sglang.backend.cell_store import rehome_pool_buffers
from vlcache_sglang.backend.compressor import Compressor
from vlcache_sglang.backend.metadata import decode_metadata

L, HKV, D, POOL = 3, 2, 8, 512


def setup():
    req_pool = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=POOL, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=D,
                               layer_num=L, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(POOL, torch.float32, "cpu", kv_pool, need_sort=False)
    kv = rehome_pool_buffers(kv_pool)
    comp = Compressor(kv, req_pool.req_to_token, allocator, num_q_heads=4, num_kv_heads=HKV)
    return SimpleNamespace(req_pool=req_pool, allocator=allocator, kv=kv, comp=comp, lens={})


def add_compressed(s, row: int, n: int, g: torch.Generator) -> None:
    slots = s.allocator.alloc(n)
    s.req_pool.req_to_token[row, :n] = slots.to(torch.int32)
    kept = [torch.randperm(n, generator=g)[: max(1, n // (l + 2))].sort().values for l in range(L)]
    assert s.comp.compact_row(row, f"r{row}", kept, 0, n) is not None
    s.lens[row] = n


def layer_lists(s, rows: list[int]):
    meta = decode_metadata(s.req_pool.req_to_token, torch.tensor(rows), [s.lens[r] for r in rows])
    layer_kv, positions = s.comp.layer_lists.build(meta, rows, [f"r{r}" for r in rows])
    return {l: (layer_kv[l].kv_indices.clone(), layer_kv[l].kv_indptr_cpu) for l in layer_kv}, positions


def fresh_lists(s, rows):
    """The lists resolved afresh (every row's cached resolution set aside meanwhile)."""
    states = [st for st in (s.comp.states.get(r) for r in rows) if st is not None]
    saved = [st.resolved for st in states]
    for st in states:
        st.resolved = None
    try:
        return layer_lists(s, rows)
    finally:
        for st, r in zip(states, saved):
            st.resolved = r


def assert_same(a, b):
    lists_a, pos_a = a
    lists_b, pos_b = b
    assert lists_a.keys() == lists_b.keys()
    for l in lists_a:
        assert torch.equal(lists_a[l][0], lists_b[l][0]) and lists_a[l][1] == lists_b[l][1]
        for x, y in zip(pos_a[l], pos_b[l]):
            assert (x is None and y is None) or torch.equal(x, y)


def decode_step(s, rows):
    new = s.allocator.alloc(len(rows))
    for r, slot in zip(rows, new.tolist()):
        s.req_pool.req_to_token[r, s.lens[r]] = slot
        s.lens[r] += 1


def test_decode_steps_reuse_the_resolution_and_read_what_a_fresh_one_reads(monkeypatch):
    s = setup()
    g = torch.Generator().manual_seed(0)
    add_compressed(s, 1, 40, g)
    add_compressed(s, 2, 61, g)
    resolved_ids = []
    original = s.comp.vkv.resolve
    monkeypatch.setattr(s.comp.vkv, "resolve", lambda ids: resolved_ids.append(ids.numel()) or original(ids))
    for step in range(5):
        decode_step(s, [1, 2])
        resolved_ids.clear()
        got = layer_lists(s, [1, 2])
        # after the first resolution of each row only the step's new token is resolved
        assert resolved_ids == ([40 + step + 1, 61 + step + 1] if step == 0 else [1, 1])
        assert_same(got, fresh_lists(s, [1, 2]))


def test_a_rewritten_row_or_table_row_is_resolved_afresh():
    s = setup()
    g = torch.Generator().manual_seed(1)
    add_compressed(s, 1, 50, g)
    decode_step(s, [1])
    layer_lists(s, [1])
    # the tree swaps a real id of the row for another (identical content elsewhere)
    spare = s.allocator.alloc(1)
    s.req_pool.req_to_token[1, s.lens[1] - 1] = int(spare)
    assert_same(layer_lists(s, [1]), fresh_lists(s, [1]))
    # an id the row holds gets a new table row (released and handed out again by a later
    # compaction): same ids in the row, other K/V rows behind them
    vkv = s.comp.vkv
    row = s.req_pool.req_to_token[1, : s.lens[1]].long()
    vid = int(row[row > vkv.base][0])
    before = layer_lists(s, [1])
    vkv.table[vid - vkv.base] = torch.arange(L) * vkv.rows_per_layer + 7  # what a rebirth writes
    vkv.births += 1
    vkv.born[vid - vkv.base] = vkv.births
    after = layer_lists(s, [1])
    assert_same(after, fresh_lists(s, [1]))
    assert any(not torch.equal(before[0][l][0], after[0][l][0]) for l in after[0])
    s.comp.forget(1)
    assert 1 not in s.comp.resolved
