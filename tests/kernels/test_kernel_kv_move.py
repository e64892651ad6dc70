"""Moving kept K/V rows: Triton vs torch reference, overlap safety, batched compaction."""
from __future__ import annotations

import pytest
import torch

from vlcache_sglang.kernels.kv_move import (
    compact_requests,
    compaction_moves,
    move_kv_rows,
    move_kv_rows_triton,
)

HAS_CUDA = torch.cuda.is_available()


def storage(rows, heads, dim, dtype, device, seed=0, v_dim=None):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, heads, dim, generator=g).to(dtype).to(device)
    v = torch.randn(rows, heads, v_dim or dim, generator=g).to(dtype).to(device)
    return k, v


def overlapping_moves(rows, n, seed):
    """Destinations are a permutation of (mostly) the sources: every write hits a row still to be read."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randperm(rows, generator=g)[:n]
    dst = src[torch.randperm(n, generator=g)]
    dst[: n // 3] = torch.randperm(rows, generator=g)[: n // 3]  # some go elsewhere
    seen, pairs = set(), []
    for s, d in zip(src.tolist(), dst.tolist()):  # destinations must be distinct
        if d not in seen:
            seen.add(d)
            pairs.append((s, d))
    src, dst = (torch.tensor(x, dtype=torch.int64) for x in zip(*pairs))
    return src, dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,heads,dim,n,v_dim", [(50, 2, 8, 30, None), (17, 1, 4, 17, None),
                                                     (64, 3, 12, 40, 20), (9, 2, 8, 1, None)])
def test_triton_equals_reference_under_overlap(dtype, rows, heads, dim, n, v_dim, device):
    k, v = storage(rows, heads, dim, dtype, device, seed=n, v_dim=v_dim)
    src, dst = overlapping_moves(rows, n, seed=rows)
    k_ref, v_ref = k.clone(), v.clone()
    expected_k, expected_v = k.clone(), v.clone()
    expected_k[dst] = k[src]  # simultaneous assignment semantics
    expected_v[dst] = v[src]
    move_kv_rows(k_ref, v_ref, src, dst)
    assert torch.equal(k_ref, expected_k) and torch.equal(v_ref, expected_v)
    move_kv_rows_triton(k, v, src.to(device), dst.to(device), block_r=4, block_e=16, poison_temp=True)
    assert torch.equal(k, expected_k) and torch.equal(v, expected_v)


def test_empty_and_bad_moves(device):
    k, v = storage(8, 2, 4, torch.float32, device)
    before = k.clone()
    move_kv_rows_triton(k, v, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    assert torch.equal(k, before)
    with pytest.raises(ValueError):
        move_kv_rows_triton(k, v, torch.tensor([1, 2]), torch.tensor([3]))


def _random_request(g, R, m, L, slots_taken):
    free = [s for s in range(1, R) if s not in slots_taken]
    pick = torch.tensor(free)[torch.randperm(len(free), generator=g)[:m]]
    slots_taken.update(pick.tolist())
    kept = []
    for _ in range(L):
        n = int(torch.randint(1, m + 1, (1,), generator=g))
        kept.append(torch.randperm(m, generator=g)[:n].sort().values)
    return pick.to(torch.int32), kept


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("protected", [0, 3])
def test_compaction_moves_pack_kept_rows_into_the_first_owned_slots(seed, protected, device):
    g = torch.Generator().manual_seed(seed)
    L, R, m = 3, 64, 20
    k, v = storage(L * R, 2, 4, torch.float32, device, seed=seed)
    row, kept = _random_request(g, R, m, L, set())
    mv = compaction_moves(L, R, row.to(device), kept, protected, m)
    own = [kp[kp >= protected] for kp in kept]
    assert mv.cell_slots == -(-sum(o.numel() for o in own) // L)
    assert mv.freed.tolist() == row[protected + mv.cell_slots:m].tolist()
    assert mv.dst.unique().numel() == mv.dst.numel()  # no two kept tokens share a cell
    assert set((mv.dst % R).tolist()) <= set(row[protected:protected + mv.cell_slots].tolist())
    k2, v2 = k.clone(), v.clone()
    move_kv_rows_triton(k2, v2, mv.src, mv.dst)
    for layer, pos in enumerate(own):
        src = row.to(device)[pos].long() + layer * R
        assert torch.equal(k2[mv.own_dst[layer]], k[src]) and torch.equal(v2[mv.own_dst[layer]], v[src])


@pytest.mark.parametrize("use_triton", [False, True])
def test_batched_compaction_equals_one_by_one(use_triton, device):
    g = torch.Generator().manual_seed(11)
    L, R = 4, 96
    k, v = storage(L * R, 2, 8, torch.bfloat16, device, seed=3)
    taken: set[int] = set()
    reqs = [(*_random_request(g, R, m, L, taken), p) for m, p in ((20, 0), (7, 2), (30, 5))]
    k1, v1 = k.clone(), v.clone()
    moves = [compaction_moves(L, R, row.to(device), kept, p, row.numel()) for row, kept, p in reqs]
    for mv in moves:
        move_kv_rows(k1, v1, mv.src, mv.dst)
    compact_requests(k, v, moves, use_triton=use_triton)
    assert torch.equal(k, k1) and torch.equal(v, v1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_moves_cuda(dtype):
    dev = torch.device("cuda")
    rows, n = 200_000, 60_000
    k, v = storage(rows, 4, 128, dtype, dev, seed=1)
    src, dst = overlapping_moves(rows, n, seed=2)
    src, dst = src.to(dev), dst.to(dev)
    ek, ev = k.clone(), v.clone()
    move_kv_rows(ek, ev, src, dst)
    move_kv_rows_triton(k, v, src, dst, poison_temp=True)
    assert torch.equal(k, ek) and torch.equal(v, ev)
