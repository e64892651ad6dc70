"""The torch executor over per-(request, KV head) lists (head cells), against float64 attention.

A per-head list holds head-rows ``row * H + h`` of the ``[rows, H, D]`` storage; KV head ``h``'s
query group attends only to its own list, whose last entries are the forward's new rows.
"""
from __future__ import annotations

import pytest
import torch

from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV

ROWS, HKV, D = 64, 2, 8


def head_lists(per_request: list[list[torch.Tensor]], places: list[int] | None = None) -> RaggedKV:
    """``per_request[b][h]``: storage rows of request ``b``'s KV head ``h`` -> per-head RaggedKV of
    head-rows at each head's own place (or at head ``places[h]``: a cell in another head's place)."""
    places = places or list(range(HKV))
    parts = [rows * HKV + places[h] for heads in per_request for h, rows in enumerate(heads)]
    indptr = [0]
    for p in parts:
        indptr.append(indptr[-1] + p.numel())
    return RaggedKV(torch.tensor(indptr), torch.cat(parts), indptr, heads=HKV)


def layer_lists(per_request: list[torch.Tensor]) -> RaggedKV:
    indptr = [0]
    for p in per_request:
        indptr.append(indptr[-1] + p.numel())
    return RaggedKV(torch.tensor(indptr), torch.cat(per_request), indptr)


def reference(q, k, v, rows: list[torch.Tensor], new: int, scale: float, place=(0, 1)) -> torch.Tensor:
    """float64: query head ``i`` of KV head ``h`` over ``rows[h]`` (read at head ``place[h]``); the
    last ``new`` keys are the queries' own tokens (causal among them)."""
    hq = q.shape[1]
    group = hq // HKV
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(hq):
        h = i // group
        key, value = k[rows[h], place[h]].double(), v[rows[h], place[h]].double()
        prefix = rows[h].numel() - new
        s = q[:, i].double() @ key.T * scale
        mask = torch.arange(rows[h].numel()).unsqueeze(0) > (prefix + torch.arange(new)).unsqueeze(1)
        out[:, i] = torch.softmax(s.masked_fill(mask, float("-inf")), -1) @ value
    return out


@pytest.fixture
def storage():
    g = torch.Generator().manual_seed(0)
    return torch.randn(ROWS, HKV, D, generator=g), torch.randn(ROWS, HKV, D, generator=g)


def random_rows(g, n_lo: int, n_hi: int, tail: torch.Tensor) -> torch.Tensor:
    n = int(torch.randint(n_lo, n_hi, (1,), generator=g))
    return torch.cat([torch.randperm(ROWS - 8, generator=g)[:n].sort().values, tail])


@pytest.mark.parametrize("hq", [2, 4])
def test_identical_head_lists_give_the_layer_list_result(storage, hq):
    k, v = storage
    g = torch.Generator().manual_seed(hq)
    rows = [random_rows(g, 3, 20, torch.tensor([ROWS - 1 - b])) for b in range(3)]
    q = torch.randn(3, hq, D, generator=g)
    meta = ForwardMetadata(True, layer_lists(rows), list(range(4)), [0] * 3)
    ex = TorchAttentionExecutor()
    layer = ex.decode(q, torch.empty_like(q), k, v, layer_lists(rows), meta, 0.3, hq != HKV)
    per_head = ex.decode(q, torch.empty_like(q), k, v, head_lists([[r, r] for r in rows]), meta, 0.3, hq != HKV)
    torch.testing.assert_close(per_head, layer, rtol=0, atol=1e-6)


@pytest.mark.parametrize("hq", [2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_decode_over_different_head_lists_matches_float64(storage, hq, seed):
    k, v = storage
    g = torch.Generator().manual_seed(10 + seed)
    batch = 3
    rows = [[random_rows(g, 0, 25, torch.tensor([ROWS - 1 - b])) for _ in range(HKV)] for b in range(batch)]
    q = torch.randn(batch, hq, D, generator=g)
    kv = head_lists(rows)
    meta = ForwardMetadata(True, kv, list(range(batch + 1)), [0] * batch)
    out = TorchAttentionExecutor().decode(q, torch.empty_like(q), k, v, kv, meta, 0.3, hq != HKV)
    for b in range(batch):
        torch.testing.assert_close(out[b:b + 1].double(), reference(q[b:b + 1], k, v, rows[b], 1, 0.3),
                                   rtol=1e-5, atol=1e-5)
    # and the heads really read different lists: one shared list gives another answer
    shared = head_lists([[heads[0], heads[0]] for heads in rows])
    assert not torch.allclose(TorchAttentionExecutor().decode(q, torch.empty_like(q), k, v, shared, meta, 0.3,
                                                              hq != HKV), out)


def test_extend_over_per_head_compressed_prefixes_matches_float64(storage):
    k, v = storage
    g = torch.Generator().manual_seed(7)
    hq, new = 4, [3, 1]
    tails = [torch.arange(ROWS - 8, ROWS - 5), torch.tensor([ROWS - 1])]
    rows = [[random_rows(g, 2, 12, tails[b]) for _ in range(HKV)] for b in range(2)]
    q = torch.randn(sum(new), hq, D, generator=g)
    kv = head_lists(rows)
    meta = ForwardMetadata(False, kv, [0, 3, 4], [10, 10])
    out = TorchAttentionExecutor().extend(q, torch.empty_like(q), k, v, kv, meta, 0.3, True)
    torch.testing.assert_close(out[:3].double(), reference(q[:3], k, v, rows[0], 3, 0.3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:].double(), reference(q[3:], k, v, rows[1], 1, 0.3), rtol=1e-5, atol=1e-5)


def test_head_lists_for_another_head_count_are_refused(storage):
    k, v = storage
    kv = RaggedKV(torch.tensor([0, 1, 2, 3, 4]), torch.arange(4), [0, 1, 2, 3, 4], heads=4)
    meta = ForwardMetadata(True, kv, [0, 1], [0])
    with pytest.raises(ValueError, match="4 KV heads"):
        TorchAttentionExecutor().decode(torch.randn(1, 4, D), torch.empty(1, 4, D), k, v, kv, meta, 0.3, True)


def test_cells_in_another_heads_place_are_read_where_they_are(storage):
    """Compaction packs a slot's L * H places with any (layer, head)'s cells: head 0's list may
    point at head 1's place and the other way round."""
    k, v = storage
    g = torch.Generator().manual_seed(3)
    rows = [[random_rows(g, 2, 20, torch.tensor([ROWS - 1])) for _ in range(HKV)]]
    q = torch.randn(1, 4, D, generator=g)
    kv = head_lists(rows, places=[1, 0])
    meta = ForwardMetadata(True, kv, [0, 1], [0])
    out = TorchAttentionExecutor().decode(q, torch.empty_like(q), k, v, kv, meta, 0.3, True)
    torch.testing.assert_close(out.double(), reference(q, k, v, rows[0], 1, 0.3, place=(1, 0)), rtol=1e-5, atol=1e-5)
