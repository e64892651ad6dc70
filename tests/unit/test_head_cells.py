"""Head cells (``--vlcache-cells head``) over SGLang's real KV pool and allocator (no server).

A slot's ``L * H`` (layer, KV head) rows are cells: a request whose KV head ``h`` of layer ``l``
keeps ``k_{l,h}`` positions holds ``ceil(sum k_{l,h} / (L * H))`` slots, not the union over heads.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import real_kv_pool
from vlcache_sglang.backend.virtual_kv import CellUnits

L, HKV, D, SIZE = 3, 2, 4, 256


@pytest.fixture
def pool():
    return real_kv_pool(L, HKV, D, SIZE, heads_per_unit=HKV)


def test_head_rows_address_the_pool_layers_heads():
    units = CellUnits(rows_per_layer=10, num_layers=3, heads_per_unit=2)
    slots = torch.tensor([0, 3, 9])
    for layer in range(3):
        for head in range(2):
            rows = units.rows(layer * 2 + head, slots)
            assert rows.tolist() == [(layer * 10 + s) * 2 + head for s in slots.tolist()]
            assert units.slot_of(rows).tolist() == slots.tolist()
    assert units.offsets("cpu").tolist() == [units.rows(u, torch.tensor([0])).item() for u in range(6)]


@pytest.mark.parametrize("protected", [0, 4])
@pytest.mark.parametrize("seed", range(4))
def test_each_head_keeps_its_own_rows_and_the_request_holds_the_sum_over_heads(pool, protected, seed):
    kv_pool, kv, allocator, vkv = pool
    g = torch.Generator().manual_seed(seed)
    m = 24
    row = allocator.alloc(m).to(torch.int32)
    orig = row.clone().long()
    before_k = [kv_pool.k_buffer[l].clone() for l in range(L)]
    before_v = [kv_pool.v_buffer[l].clone() for l in range(L)]
    free0 = allocator.available_size()
    # per (layer, head) sets of different sizes: heads of one layer disagree
    kept = [torch.randperm(m, generator=g)[: int(torch.randint(1, m, (1,), generator=g))].sort().values
            for _ in range(L * HKV)]
    cell_k, cell_v = kv.cells(HKV)
    res = vkv.compact(cell_k, cell_v, row, kept, protected, m)

    own_total = sum(int((k >= protected).sum()) for k in kept)
    assert res.cell_slots == -(-own_total // (L * HKV))  # the sum over heads, not the union
    assert allocator.available_size() == free0 + (m - protected) - res.cell_slots
    resolved = vkv.resolve(row)
    for unit, pos in enumerate(kept):
        layer, head = divmod(unit, HKV)
        present, rows = resolved[unit]
        assert present.tolist() == sorted(set(range(protected)) | set(pos.tolist()))
        # the head-row holds exactly that token's K/V of that layer and head
        assert torch.equal(cell_k[rows, 0], before_k[layer][orig[present], head])
        assert torch.equal(cell_v[rows, 0], before_v[layer][orig[present], head])
    allocator.free(row.clone())
    assert allocator.available_size() == free0 + m  # every slot back
    assert vkv.live_ids == 0 and vkv.live_cell_slots() == 0


def test_tensor_parallel_agreement_keeps_the_slots_and_ids_every_rank_needs(pool):
    kv_pool, kv, allocator, vkv = pool
    m = 20
    row = allocator.alloc(m).to(torch.int32)
    kept = [torch.tensor([0, 1])] * (L * HKV)  # this rank keeps 2 positions per head
    everyone = torch.zeros(m, dtype=torch.bool)
    everyone[[0, 1, 7, 9]] = True  # another rank's heads keep positions 7 and 9 too
    free0 = allocator.available_size()
    cell_k, cell_v = kv.cells(HKV)
    before = cell_k[vkv.units.rows(0, row[:2].long()), 0].clone()
    res = vkv.compact(cell_k, cell_v, row, kept, 0, m, min_cell_slots=3, id_positions=everyone)
    assert res.cell_slots == 3 and res.new_vids == 4  # 12 cells fit 2 slots; the other rank needs 3
    assert vkv.live_cell_slots() == 3  # each of the three holds a cell (dealt round, none empty)
    assert torch.equal(cell_k[vkv.resolve(row)[0][1], 0], before)
    assert allocator.available_size() == free0 + m - 3
    assert [int(row[j]) != vkv.null_id for j in (7, 9)] == [True, True]
    present, _ = vkv.resolve(row)[0]
    assert present.tolist() == [0, 1]  # ids for the other rank's positions own nothing here
    allocator.free(row.clone())
    assert allocator.available_size() == free0 + m and vkv.live_ids == 0


def test_head_cells_refuse_what_cannot_serve_per_head_lists():
    from types import SimpleNamespace

    from vlcache_sglang.backend.attention_backend import check_head_cells
    from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor
    from vlcache_sglang.settings import SettingsError

    config = SimpleNamespace(get_total_num_kv_heads=lambda: 2)
    check_head_cells("head", config, 2, 1, TorchAttentionExecutor())  # one KV head per rank
    check_head_cells("layer", config, 4, 1, object())  # layer cells: nothing to check
    with pytest.raises(SettingsError, match="replicates heads.*--vlcache-cells layer"):
        check_head_cells("head", config, 4, 1, TorchAttentionExecutor())  # 2 heads over 4 ranks
    with pytest.raises(SettingsError, match="per-\\(layer, KV head\\) lists; use --vlcache-cells layer"):
        check_head_cells("head", config, 1, 2, object())


def test_compressed_sharing_with_head_cells_is_served_at_one_rank_and_refused_under_tp():
    from vlcache_sglang.settings import CompressionSettings, ServerSettings, SettingsError, check_request_sharing

    shared = CompressionSettings(budget=0.1, sharing="compressed")
    one_rank = ServerSettings(compression=shared, cells="head").validate()
    check_request_sharing(one_rank, "compressed")
    ServerSettings(compression=shared, cells="layer", tp_size=2).validate()  # layer cells: any tp size
    two_ranks = ServerSettings(cells="head", tp_size=2).validate()  # sharing off: fine
    for mode in ("off", "prefix"):
        check_request_sharing(two_ranks, mode)
    with pytest.raises(SettingsError, match="--tp-size 1.*--vlcache-cells layer"):
        check_request_sharing(two_ranks, "compressed")  # a request's own override (400)
    with pytest.raises(SettingsError, match="sharing 'compressed' with --vlcache-cells head"):
        ServerSettings(compression=shared, cells="head", tp_size=2).validate()  # the launch default
