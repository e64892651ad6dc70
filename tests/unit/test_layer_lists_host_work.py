"""The per-layer key lists of a forward, built with host work that does not grow with batch x layers.

``LayerListBuilder.build`` runs before every decode step of a batch holding a compressed request.
It used to spend one device op per (plain request, layer) and one device read per plain request:
at batch 64 and 28 layers about 1,800 small ops a step on the host, next to a GPU decode step of
a few milliseconds. Counted here with a ``TorchDispatchMode`` on SGLang's real pools: the ops of one
build do not change with the number of plain requests (head cells: but for one view per plain
request, layer and KV head), and their lists are ``CellUnits.rows`` of their slots."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from torch.utils._python_dispatch import TorchDispatchMode

from vlcache_sglang.backend.cell_store import rehome_pool_buffers
from vlcache_sglang.backend.compressor import Compressor
from vlcache_sglang.backend.metadata import decode_metadata

L, HKV, D, POOL, ROWS = 8, 2, 8, 4096, 40


VIEWS = {"slice", "alias", "view", "as_strided"}


class CountOps(TorchDispatchMode):
    """ATen ops dispatched (``views``: of them, views: no kernel, a little host time each);
    ``kernels`` names the others, in order (``view_ops`` says which ops count as views)."""

    def __init__(self, view_ops: set[str] = VIEWS):
        super().__init__()
        self.view_ops = view_ops
        self.ops = self.views = 0
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops += 1
        if name in self.view_ops:
            self.views += 1
        else:
            self.kernels.append(name)
        return func(*args, **(kwargs or {}))


def setup(cells: str):
    req_pool = ReqToTokenPool(size=ROWS, max_context_len=256, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=POOL, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=D,
                               layer_num=L, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(POOL, torch.float32, "cpu", kv_pool, need_sort=False)
    comp = Compressor(rehome_pool_buffers(kv_pool), req_pool.req_to_token, allocator, num_q_heads=4,
                      num_kv_heads=HKV, cells=cells)
    return SimpleNamespace(req_pool=req_pool, allocator=allocator, comp=comp, lens={})


def fill(s, row: int, n: int) -> None:
    slots = s.allocator.alloc(n)
    s.req_pool.req_to_token[row, :n] = slots.to(torch.int32)
    s.lens[row] = n


def build(s, rows: list[int]):
    meta = decode_metadata(s.req_pool.req_to_token, torch.tensor(rows), [s.lens[r] for r in rows])
    counter = CountOps()
    with counter:
        lists, _ = s.comp.layer_lists.build(meta, rows, [f"r{r}" for r in rows])
    return lists, (counter.ops, counter.views), meta


def check_cells(cells: str) -> None:
    s = setup(cells)
    g = torch.Generator().manual_seed(0)
    fill(s, 0, 60)
    units = s.comp.vkv.num_units
    kept = [torch.randperm(60, generator=g)[:12].sort().values for _ in range(units)]
    assert s.comp.compact_row(0, "r0", kept, 0, 60) is not None
    for r in range(1, 31):
        fill(s, r, 20 + r)
    build(s, [0] + list(range(1, 31)))  # resolves row 0 once (kept on its state)
    counts = {}
    for plain in (4, 30):
        lists, counts[plain], meta = build(s, [0] + list(range(1, plain + 1)))
        hp = s.comp.vkv.units.heads_per_unit
        for layer, kv in lists.items():  # each plain request reads its own slots' cells in that layer
            for b in range(1, plain + 1):
                for head in range(hp):
                    got = kv.slots(b * hp + head)
                    assert torch.equal(got, s.comp.vkv.units.rows(layer * hp + head, meta.kv.slots(b)))
    (ops4, views4), (ops30, views30) = counts[4], counts[30]
    if cells == "layer":
        assert ops30 == ops4, counts  # nothing per plain request
    else:  # head cells: per plain request and layer only views (one per KV head)
        assert ops30 - views30 == ops4 - views4 and views30 - views4 == 26 * L * HKV, counts


def test_layer_cells_build_does_not_grow_with_plain_requests():
    check_cells("layer")


def test_head_cells_build_does_not_grow_with_plain_requests():
    check_cells("head")


class CountNonzero(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.nonzero = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.nonzero += func.overloadpacket.__name__ == "nonzero"
        return func(*args, **(kwargs or {}))


def test_resolving_plain_slots_needs_no_nonzero_per_unit():
    """A decode step appends plain slots to a compressed row's resolution: every unit holds them,
    so no ``nonzero`` (a device read each) per unit; the result is the general path's."""
    for cells in ("layer", "head"):
        s = setup(cells)
        fill(s, 0, 60)
        vkv = s.comp.vkv
        kept = [torch.arange(0, 60, 3 + u % 2) for u in range(vkv.num_units)]
        assert s.comp.compact_row(0, "r0", kept, 0, 60) is not None
        row = s.req_pool.req_to_token[0, :60].to(torch.int64)
        plain = s.allocator.alloc(5).to(torch.int64)
        counter = CountNonzero()
        with counter:
            fast = vkv.resolve(plain)
        assert counter.nonzero == 0
        mixed = vkv.resolve(torch.cat([row, plain]))  # the general path (virtual ids present)
        for u, (present, rows) in enumerate(fast):
            all_present, all_rows = mixed[u]
            tail = all_present >= 60
            assert torch.equal(present, all_present[tail] - 60) and torch.equal(rows, all_rows[tail])
            assert torch.equal(rows, vkv.units.rows(u, plain))
