"""Compaction of one request's kept K/V into cells (pure torch, no SGLang)."""
from __future__ import annotations

import pytest
import torch

from vlcache_sglang.backend.cell_store import GlobalKV, compact_request


def make_kv(num_layers=3, rows=64, heads=2, dim=4):
    k = torch.randn(num_layers * rows, heads, dim)
    return GlobalKV(k=k, v=-k.clone(), rows_per_layer=rows, num_layers=num_layers)


@pytest.mark.parametrize("protected", [0, 3])
@pytest.mark.parametrize("seed", range(5))
def test_kept_rows_survive_and_free_slots_are_exactly_the_rest(protected, seed):
    g = torch.Generator().manual_seed(seed)
    kv = make_kv()
    L, R, m = kv.num_layers, kv.rows_per_layer, 20
    row = (torch.randperm(R - 1, generator=g)[:m] + 1).to(torch.int32)  # scattered slots, never 0
    before_k, before_v = kv.k.clone(), kv.v.clone()
    kept = []
    for layer in range(L):
        n = int(torch.randint(1, m, (1,), generator=g))
        kept.append(torch.randperm(m, generator=g)[:n].sort().values)
    freed, layer_ids, c = compact_request(kv, row, kept, protected, m)

    own_counts = [int((k >= protected).sum()) for k in kept]
    assert c == -(-sum(own_counts) // L)
    assert freed.tolist() == row[protected + c : m].tolist()
    for layer, pos in enumerate(kept):
        ids = layer_ids[layer]
        assert ids.numel() == pos.numel()
        expected_src = row[pos].long() + layer * R
        assert torch.equal(kv.k[ids], before_k[expected_src])
        assert torch.equal(kv.v[ids], before_v[expected_src])
        # the tree-owned prefix is read in place, never moved
        assert torch.equal(ids[: int((pos < protected).sum())], expected_src[pos < protected])
    cells = torch.cat([ids for ids, pos in zip(layer_ids, kept)])
    own_cells = torch.cat([ids[(pos >= protected)] for ids, pos in zip(layer_ids, kept)])
    assert own_cells.unique().numel() == own_cells.numel()  # no two kept tokens share a cell
    cell_slots = set(row[protected : protected + c].tolist())
    assert {int(x) % R for x in own_cells} <= cell_slots  # cells live only in the request's kept slots
    # nothing outside the request's own slots was written
    touched = (kv.k != before_k).any(-1).any(-1).nonzero().flatten()
    assert {int(x) % R for x in touched} <= cell_slots
    assert cells.numel() == sum(int(k.numel()) for k in kept)


def test_keeping_everything_frees_nothing():
    kv = make_kv()
    row = torch.arange(1, 11, dtype=torch.int32)
    kept = [torch.arange(10)] * kv.num_layers
    freed, layer_ids, c = compact_request(kv, row, kept, 0, 10)
    assert c == 10 and freed.numel() == 0
