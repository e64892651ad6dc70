"""Moving kept K/V rows into their cells, for many requests and all layers at once.

``vlcache_sglang.backend.virtual_kv.VirtualKV.compact`` packs one request's kept K/V rows (global
row ids ``l * R + slot`` of the ``[L * R, H, D]`` storage) into cells carved from the request's
own slots. Sources and destinations overlap: a destination cell may still hold a source row of
another layer, so every source is read before any destination is written. Here that is done for
a whole batch of requests with two launches (gather all sources into a temporary, then scatter
the temporary into the destinations), which is correct for any overlap between ``src`` and
``dst`` as long as the destinations are distinct (they are: no two kept tokens share a cell, and
different requests own different slots).

* :func:`move_kv_rows` - the torch reference (``index_select`` into a temporary, ``index_copy_``).
* :func:`move_kv_rows_triton` - the same in Triton (one row-copy kernel, launched twice).
* :func:`compaction_moves` - the cell assignment without the copy, so that the moves
  of several requests can be concatenated and done by one call (:func:`compact_requests`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton.language as tl

from vlcache_sglang.kernels._triton import kernel, next_pow2

__all__ = [
    "CompactionMoves",
    "compact_requests",
    "compaction_moves",
    "move_kv_rows",
    "move_kv_rows_triton",
]


def move_kv_rows(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Reference: ``k[dst] = k[src]; v[dst] = v[src]`` with every source read first."""
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src and dst must be equal-length 1-D index tensors, got {tuple(src.shape)}, {tuple(dst.shape)}")
    if src.numel() == 0:
        return
    src = src.to(device=k.device, dtype=torch.int64)
    dst = dst.to(device=k.device, dtype=torch.int64)
    ks, vs = k.index_select(0, src), v.index_select(0, src)
    k.index_copy_(0, dst, ks)
    v.index_copy_(0, dst, vs)


def _copy_rows(SRC_K, SRC_V, DST_K, DST_V, IDX, n_rows, row_k, row_v,
               s_src_k, s_src_v, s_dst_k, s_dst_v,
               GATHER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    """Rows ``i`` of a block: GATHER: ``DST[i] = SRC[IDX[i]]``; else ``DST[IDX[i]] = SRC[i]``."""
    pid = tl.program_id(0)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < n_rows
    idx = tl.load(IDX + offs_r, mask=r_ok, other=0).to(tl.int64)
    lin = offs_r.to(tl.int64)
    if GATHER:
        src_k, src_v, dst_k, dst_v = idx * s_src_k, idx * s_src_v, lin * s_dst_k, lin * s_dst_v
    else:
        src_k, src_v, dst_k, dst_v = lin * s_src_k, lin * s_src_v, idx * s_dst_k, idx * s_dst_v
    for e0 in range(0, row_k, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        m = r_ok[:, None] & (offs_e < row_k)[None, :]
        x = tl.load(SRC_K + src_k[:, None] + offs_e[None, :], mask=m)
        tl.store(DST_K + dst_k[:, None] + offs_e[None, :], x, mask=m)
    for e0 in range(0, row_v, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        m = r_ok[:, None] & (offs_e < row_v)[None, :]
        x = tl.load(SRC_V + src_v[:, None] + offs_e[None, :], mask=m)
        tl.store(DST_V + dst_v[:, None] + offs_e[None, :], x, mask=m)


def _rows_view(t: torch.Tensor) -> tuple[int, int]:
    """(elements per row, row stride) of a ``[N, ...]`` tensor whose rows are contiguous."""
    row = math.prod(t.shape[1:])
    if t.shape[0] and not t[0].is_contiguous():
        raise ValueError("each row of the K/V storage must be contiguous")
    return row, t.stride(0)


def move_kv_rows_triton(k: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, *,
                        block_r: int = 4, block_e: int | None = None, poison_temp: bool = False) -> None:
    """Triton version of :func:`move_kv_rows`: gather into a temporary, then scatter."""
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src and dst must be equal-length 1-D index tensors, got {tuple(src.shape)}, {tuple(dst.shape)}")
    n = src.numel()
    if n == 0:
        return
    if k.shape[0] != v.shape[0]:
        raise ValueError("k and v must have the same number of rows")
    src = src.to(device=k.device, dtype=torch.int64)
    dst = dst.to(device=k.device, dtype=torch.int64)
    row_k, s_k = _rows_view(k)
    row_v, s_v = _rows_view(v)
    tk = torch.empty((n, *k.shape[1:]), dtype=k.dtype, device=k.device)
    tv = torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=v.device)
    if poison_temp:
        tk.fill_(float("nan") if tk.is_floating_point() else -1)
        tv.fill_(float("nan") if tv.is_floating_point() else -1)
    if block_e is None:
        block_e = min(1024, next_pow2(max(row_k, row_v)))
    grid = (-(-n // block_r),)
    fn = kernel(_copy_rows, k.device)
    fn[grid](k, v, tk, tv, src, n, row_k, row_v, s_k, s_v, row_k, row_v,
             GATHER=True, BLOCK_R=block_r, BLOCK_E=block_e)
    fn[grid](tk, tv, k, v, dst, n, row_k, row_v, row_k, row_v, s_k, s_v,
             GATHER=False, BLOCK_R=block_r, BLOCK_E=block_e)


@dataclass
class CompactionMoves:
    """One request's compaction, before any row is moved."""

    src: torch.Tensor  # int64 global rows read (own kept positions, layers in order)
    dst: torch.Tensor  # int64 global rows written (cells)
    freed: torch.Tensor  # slot ids handed back to the allocator
    own_dst: list[torch.Tensor]  # per layer: cells of its kept own positions (position order)
    cell_slots: int


def compaction_moves(num_layers: int, rows_per_layer: int, row: torch.Tensor, kept: Sequence[torch.Tensor],
                     protected: int, prompt_len: int, device: torch.device | str | None = None, *,
                     heads_per_unit: int = 1, min_cell_slots: int = 0) -> CompactionMoves:
    """The cell assignment of one request (used by ``VirtualKV.compact``), without moving anything.

    ``kept`` has one entry per cell unit: ``num_layers`` counts units, which are layers
    (``heads_per_unit == 1``: slot ``s`` of unit ``u`` is row ``u * R + s`` of ``[L * R, H, D]``) or,
    with head cells, (layer, KV head) pairs ``u = l * H + h`` (row ``(l * R + s) * H + h`` of the
    storage read as ``[L * R * H, 1, D]``; ``num_layers`` is then ``L * H``).

    Positions ``[protected, prompt_len)`` of ``row`` are the request's own real slots. Cell ``j`` of
    its kept own positions (units in order, positions in order within a unit) lives in slot
    ``cell_slots[j // U]`` at unit ``j % U``; ``c = max(ceil(sum_u k_u / U), min_cell_slots)`` slots
    hold them all (with more slots than packing needs, cell ``j`` goes to slot ``j % c``, unit
    ``j // c``, so every slot holds a cell and returns with its last one) and the other own slots
    are freed. Positions below ``protected`` are read in place.
    """
    U, R, hp = num_layers, rows_per_layer, heads_per_unit
    if U % hp:
        raise ValueError(f"{U} cell units are not a multiple of {hp} heads")
    device = torch.device(device) if device is not None else row.device
    slots = row[:prompt_len].to(device=device, dtype=torch.int64)

    def rows_of(unit: torch.Tensor | int, s: torch.Tensor) -> torch.Tensor:
        return (s + (unit // hp) * R) * hp + unit % hp

    own_src, own_counts = [], []
    for unit, pos in enumerate(kept):
        own = pos.to(device)
        own = own[own >= protected]
        own_src.append(rows_of(unit, slots[own]))
        own_counts.append(int(own.numel()))
    total = sum(own_counts)
    packed = -(-total // U)
    c = max(packed, min_cell_slots)
    if c > prompt_len - protected:
        raise AssertionError(f"{total} kept cells ({c} slots) do not fit in {prompt_len - protected} owned slots")
    if c > total:
        raise AssertionError(f"{c} cell slots need at least one of the {total} kept cells each")
    cell_slots = slots[protected:protected + c]
    j = torch.arange(total, device=device)
    if c == packed:
        dst = rows_of(j % U, cell_slots[j // U])
    else:  # more slots than packing needs (min_cell_slots): deal the cells round so none is empty
        dst = rows_of(j // c, cell_slots[j % c])
    src = torch.cat(own_src) if own_src else torch.empty(0, dtype=torch.int64, device=device)
    own_dst, start = [], 0
    for n in own_counts:
        own_dst.append(dst[start:start + n])
        start += n
    return CompactionMoves(src=src, dst=dst, freed=slots[protected + c:prompt_len], own_dst=own_dst, cell_slots=c)


def compact_requests(k: torch.Tensor, v: torch.Tensor, moves: Sequence[CompactionMoves], *,
                     use_triton: bool | None = None) -> None:
    """Do the moves of many requests (all layers) at once: one gather and one scatter."""
    moves = [m for m in moves if m.src.numel()]
    if not moves:
        return
    src = torch.cat([m.src.to(k.device) for m in moves])
    dst = torch.cat([m.dst.to(k.device) for m in moves])
    if use_triton is None:
        use_triton = k.is_cuda
    (move_kv_rows_triton if use_triton else move_kv_rows)(k, v, src, dst)
