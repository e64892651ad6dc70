"""Decode-step key lists when the radix tree reports its row rewrites (``rows_reported``).

With the vlcache tree every rewrite of a request row's ids outside a decode step is reported
(:meth:`RequestStates.row_rewritten`, from its checkpoint), so ``LayerListBuilder`` builds a decode
step's lists from each row's cached resolution plus its plain tail in a constant number of device
ops (``_build_decode``): no device op per (request, layer), no ``torch.equal`` of each row. On
SGLang's real pools: the lists equal the checking path's (every resolution made afresh) for
layer and head cells, through decode steps, for compressed rows, a row reading another's virtual
ids and plain rows; the ops of a build do not grow with compressed requests; a reported rewrite
is followed; debug checks count (and repair) a rewrite nobody reported; which rows hold virtual ids
is read from the device only for rows not seen since their last reported rewrite."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.unit.test_layer_lists_host_work import CountOps, fill, setup

ROWS_COMPRESSED = (1, 2, 3, 4, 5, 6)


def compress(s, row: int, n: int, g: torch.Generator) -> None:
    fill(s, row, n)
    units = s.comp.vkv.num_units
    kept = [torch.randperm(n, generator=g)[: max(1, n // (2 + u % 3))].sort().values for u in range(units)]
    assert s.comp.compact_row(row, f"r{row}", kept, 0, n) is not None


def reader_of(s, row: int, source: int, extra: int) -> None:
    """A stock request whose prompt starts with ``source``'s (compressed) ids, then ``extra`` own slots."""
    n = s.lens[source]
    own = s.allocator.alloc(extra)
    s.req_pool.req_to_token[row, :n] = s.req_pool.req_to_token[source, :n]
    s.req_pool.req_to_token[row, n:n + extra] = own.to(torch.int32)
    s.lens[row] = n + extra


def step(s, rows) -> None:
    new = s.allocator.alloc(len(rows))
    for r, slot in zip(rows, new.tolist()):
        s.req_pool.req_to_token[r, s.lens[r]] = slot
        s.lens[r] += 1


def lists(s, rows, reported: bool, fresh: bool = False):
    from vlcache_sglang.backend.metadata import decode_metadata

    builder = s.comp.layer_lists
    builder.rows_reported = reported
    states = [st for st in (s.comp.states.get(r) for r in rows) if st is not None]
    saved = [st.resolved for st in states]
    if fresh:
        for st in states:
            st.resolved = None
    meta = decode_metadata(s.req_pool.req_to_token, torch.tensor(rows), [s.lens[r] for r in rows])
    counter = CountOps()
    try:
        with counter:
            got, _ = builder.build(meta, rows, [f"r{r}" for r in rows])
    finally:
        if fresh:
            for st, r in zip(states, saved):
                st.resolved = r
    return {l: (kv.kv_indices.clone(), kv.kv_indptr_cpu, kv.heads) for l, kv in got.items()}, counter.ops


def assert_same(a, b) -> None:
    assert a.keys() == b.keys() and a
    for l in a:
        assert torch.equal(a[l][0], b[l][0]) and a[l][1] == b[l][1] and a[l][2] == b[l][2], l


@pytest.mark.parametrize("cells", ["layer", "head"])
def test_reported_decode_lists_equal_fresh_resolutions(cells):
    s = setup(cells)
    g = torch.Generator().manual_seed(3)
    for i, row in enumerate(ROWS_COMPRESSED):
        compress(s, row, 30 + 7 * i, g)
    reader_of(s, 10, 2, 5)
    for row in (11, 12):
        fill(s, row, 9 + row)
    batch = [11, 1, 2, 12, 10, 3, 4, 5, 6]
    for _ in range(4):
        step(s, batch)
        fast, _ = lists(s, batch, reported=True)
        assert_same(fast, lists(s, batch, reported=False, fresh=True)[0])


def test_build_ops_do_not_grow_with_compressed_requests():
    s = setup("layer")
    g = torch.Generator().manual_seed(4)
    for i, row in enumerate(ROWS_COMPRESSED):
        compress(s, row, 40 + i, g)
    fill(s, 20, 30)
    ops = {}
    for n in (1, 6):
        batch = [20, *ROWS_COMPRESSED[:n]]
        lists(s, batch, reported=True)  # first resolutions (once per row)
        step(s, batch)
        _, ops[n] = lists(s, batch, reported=True)
    _, checking = lists(s, [20, *ROWS_COMPRESSED], reported=False)
    assert ops[1] == ops[6], ops
    assert checking > 2 * ops[6], (checking, ops)  # the per-request path: ops per request and layer


def test_a_reported_rewrite_is_followed_and_debug_checks_catch_an_unreported_one():
    s = setup("layer")
    g = torch.Generator().manual_seed(5)
    compress(s, 1, 50, g)
    step(s, [1])
    lists(s, [1], reported=True)
    # the tree swaps a real id of the row for its own (identical content elsewhere) and reports it
    s.req_pool.req_to_token[1, s.lens[1] - 1] = int(s.allocator.alloc(1))
    s.comp.states.row_rewritten(1)
    assert_same(lists(s, [1], reported=True)[0], lists(s, [1], reported=False, fresh=True)[0])
    # a rewrite nobody reported: debug checks count it and read the row as it is
    s.req_pool.req_to_token[1, s.lens[1] - 1] = int(s.allocator.alloc(1))
    s.comp.layer_lists.debug_checks = True
    assert_same(lists(s, [1], reported=True)[0], lists(s, [1], reported=False, fresh=True)[0])
    assert s.comp.layer_lists.stale_resolutions == 1
    step(s, [1])
    lists(s, [1], reported=True)
    assert s.comp.layer_lists.stale_resolutions == 1  # a decode step's new slot is no rewrite


READS = {"nonzero", "equal", "_local_scalar_dense", "is_nonzero", "masked_select"}


class CountReads(TorchDispatchMode):
    """Ops whose result size or value the host must wait for (on a GPU: a stream drain)."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        masks = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        if name in READS or masks:  # a boolean mask index is a nonzero inside
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def count_virtual_reads(s) -> list[int]:
    """Calls of the builder's one whole-batch device read (a ``tolist``, which no dispatch mode sees)."""
    builder, calls = s.comp.layer_lists, []
    read = builder._rows_with_virtual_ids

    def counted(kv, batch):
        calls.append(batch)
        return read(kv, batch)

    builder._rows_with_virtual_ids = counted
    return calls


def test_a_decode_step_reads_virtual_rows_only_for_rows_not_seen_since_a_rewrite():
    s = setup("layer")
    g = torch.Generator().manual_seed(8)
    for row in (1, 2):
        compress(s, row, 40 + row, g)
    reader_of(s, 10, 2, 4)
    fill(s, 9, 20)
    reads = count_virtual_reads(s)
    batch = [1, 9, 10]

    def reads_of_a_step(rows) -> int:
        before = len(reads)
        step(s, rows)
        assert_same(lists(s, rows, reported=True)[0], lists(s, rows, reported=False, fresh=True)[0])
        reads.pop()  # the checking path's own read
        return len(reads) - before

    assert reads_of_a_step(batch) == 1  # first decode step: every row unseen
    assert reads_of_a_step(batch) == 0 and reads_of_a_step(batch) == 0
    fill(s, 11, 15)
    assert reads_of_a_step(batch + [11]) == 1  # a request joins
    assert reads_of_a_step(batch + [11]) == 0
    s.comp.states.row_rewritten(9)  # the tree reports a checkpoint of row 9
    assert reads_of_a_step(batch + [11]) == 1
    s.comp.states.drop(11)  # SGLang frees row 11, another request takes it
    fill(s, 11, 12)
    assert reads_of_a_step(batch + [11]) == 1
    assert s.comp.states.holds_virtual(11, "r11") is False
    units, n = s.comp.vkv.num_units, s.lens[11]  # the backend compacts row 11 after it was seen
    assert s.comp.compact_row(11, "r11", [torch.arange(0, n, 2 + u % 2) for u in range(units)], 0, n) is not None
    assert s.comp.states.holds_virtual(11, "r11") is None
    assert reads_of_a_step(batch + [11]) == 1 and s.comp.states.holds_virtual(11, "r11") is True
    assert s.comp.states.holds_virtual(10, "r10") is True and s.comp.states.holds_virtual(9, "r9") is False
    assert s.comp.states.holds_virtual(9, "another") is None  # the row is another request's now
    # row 9 takes a virtual id nobody reported: debug checks read every step and count it
    s.comp.layer_lists.debug_checks = True
    s.req_pool.req_to_token[9, 0] = s.req_pool.req_to_token[2, 0]
    assert reads_of_a_step(batch) == 1
    assert s.comp.layer_lists.stale_resolutions == 1 and s.comp.states.holds_virtual(9, "r9") is True
    for row in (1, 2, 9, 10, 11):
        s.comp.states.drop(row)
    assert s.comp.states.counts()["row_flags_live"] == 0


def test_a_reported_decode_step_waits_for_no_device_result():
    """The step's slot lists and every layer's lists: no nonzero, no comparison read back, no
    scalar read, and (every row seen in an earlier step) not the read of which rows hold virtual
    ids either."""
    from vlcache_sglang.backend.metadata import decode_metadata

    s = setup("layer")
    g = torch.Generator().manual_seed(6)
    for row in (1, 2, 3):
        compress(s, row, 40 + row, g)
    fill(s, 9, 25)
    batch = [1, 9, 2, 3]
    lists(s, batch, reported=True)  # first resolutions
    step(s, batch)
    s.comp.layer_lists.rows_reported = True
    reads = count_virtual_reads(s)
    counter = CountReads()
    with counter:
        meta = decode_metadata(s.req_pool.req_to_token, torch.tensor(batch), [s.lens[r] for r in batch])
        s.comp.layer_lists.build(meta, batch, [f"r{r}" for r in batch])
    assert counter.reads == [] and reads == []
    s.comp.layer_lists.rows_reported = False  # the checking path reads every row back
    counter = CountReads()
    with counter:
        s.comp.layer_lists.build(meta, batch, [f"r{r}" for r in batch])
    assert counter.reads


def test_host_rows_take_the_host_copy_and_debug_checks_compare_it():
    from types import SimpleNamespace

    from vlcache_sglang.backend.metadata import host_rows

    fb = SimpleNamespace(req_pool_indices=torch.tensor([4, 2, 7]), req_pool_indices_cpu=torch.tensor([4, 2, 7]))
    counter = CountReads()
    with counter:
        assert host_rows(fb) == [4, 2, 7] and host_rows(fb, count=2) == [4, 2]
    assert counter.reads == []
    assert host_rows(SimpleNamespace(req_pool_indices=torch.tensor([3]), req_pool_indices_cpu=None)) == [3]
    fb.req_pool_indices_cpu = torch.tensor([4, 7, 2])
    assert host_rows(fb) == [4, 7, 2]  # trusted without checks
    with pytest.raises(AssertionError, match="req_pool_indices_cpu"):
        host_rows(fb, check=True)
