"""Per-layer KV cells carved out of SGLang's token slots: the memory side of compression.

SGLang's pool gives every token slot ``s`` one row in each layer's K/V buffer. Dropping a token
from some layers frees nothing, so a compressed request would still hold the union of what its
layers keep. Here the per-layer buffers are re-homed as slices of ONE contiguous tensor
(``k_buffer[l] = K[l * R:(l + 1) * R]``), so row ``g = l * R + s`` is addressable globally and a
slot's ``L`` rows become ``L`` *cells*, each able to hold any layer's token. A request that
keeps ``k_l`` prompt tokens in layer ``l`` packs its ``sum_l k_l`` kept K/V rows into
``c = ceil(sum_l k_l / L)`` of its own slots and hands the rest back to SGLang's allocator:
its footprint becomes ``sum_l k_l / L`` token-equivalents (plus < 1 slot of rounding), not
``max_l k_l`` or the union.

Everything below is plain PyTorch on tensors; SGLang objects are only passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GlobalKV:
    """The pool's K/V storage seen as ``[L * rows_per_layer, heads, dim]``."""

    k: torch.Tensor
    v: torch.Tensor
    rows_per_layer: int
    num_layers: int

    def global_ids(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return slots.to(torch.int64) + layer * self.rows_per_layer


def rehome_pool_buffers(pool) -> GlobalKV:
    """Replace ``pool.k_buffer`` / ``pool.v_buffer`` (lists of per-layer tensors) by views of one
    contiguous tensor each. Call before anything is written (backend construction)."""
    k_layers, v_layers = pool.k_buffer, pool.v_buffer
    rows = k_layers[0].shape[0]
    if any(t.shape[0] != rows for t in list(k_layers) + list(v_layers)):
        raise ValueError("vlcache needs every layer's K/V buffer to have the same number of rows")
    num_layers = len(k_layers)
    k = torch.zeros((num_layers * rows, *k_layers[0].shape[1:]), dtype=k_layers[0].dtype, device=k_layers[0].device)
    v = torch.zeros((num_layers * rows, *v_layers[0].shape[1:]), dtype=v_layers[0].dtype, device=v_layers[0].device)
    pool.k_buffer = [k[l * rows : (l + 1) * rows] for l in range(num_layers)]
    pool.v_buffer = [v[l * rows : (l + 1) * rows] for l in range(num_layers)]
    return GlobalKV(k=k, v=v, rows_per_layer=rows, num_layers=num_layers)


@dataclass
class CompressedRow:
    """One request after compaction. Positions ``[protected, prompt_len)`` of its row now hold
    ``cell_slots`` slot ids at ``[protected, protected + cell_slots)`` and stale ids after."""

    rid: str
    req_pool_idx: int
    prompt_len: int  # m: positions covered by the plan
    protected: int  # p: tree-owned prefix (kept in place, never moved or freed by us)
    cell_slots: int  # c: slots at row[p : p + c] now holding cells
    layer_ids: list[torch.Tensor]  # per layer: global row ids of its kept prompt tokens
    kept_counts: list[int]  # per layer: kept prompt tokens (prefix + own)

    @property
    def dead_range(self) -> tuple[int, int]:
        """Row positions whose slots were already returned to the allocator."""
        return self.protected + self.cell_slots, self.prompt_len

    @property
    def tokens_saved(self) -> int:
        return (self.prompt_len - self.protected) - self.cell_slots


def compact_request(kv: GlobalKV, row: torch.Tensor, kept: list[torch.Tensor], protected: int,
                    prompt_len: int) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Move one request's kept K/V into cells and say which slots are now free.

    Args:
        kv: the global K/V storage.
        row: the request's ``req_to_token`` row (slot ids by position; only ``[0, prompt_len)`` used).
        kept: per layer, sorted kept prompt positions (int64) in ``[0, prompt_len)``.
        protected: positions ``< protected`` belong to the radix tree: read in place, never moved.
        prompt_len: ``m``.

    Returns ``(freed_slots, layer_ids, cell_slots)``: the slot ids to hand back to the allocator,
    per layer the global row ids of the kept tokens (in position order), and ``c``.
    """
    L, R = kv.num_layers, kv.rows_per_layer
    device = kv.k.device
    slots = row[:prompt_len].to(device=device, dtype=torch.int64)
    own_src, own_counts, prefix_ids = [], [], []
    for layer, pos in enumerate(kept):
        pos = pos.to(device)
        in_prefix = pos < protected
        prefix_ids.append(kv.global_ids(layer, slots[pos[in_prefix]]))
        own = pos[~in_prefix]
        own_src.append(kv.global_ids(layer, slots[own]))
        own_counts.append(int(own.numel()))
    total = sum(own_counts)
    owned = prompt_len - protected
    c = -(-total // L)  # ceil
    if c > owned:  # cannot happen: each layer keeps at most `owned` own tokens
        raise AssertionError(f"{total} kept cells do not fit in {owned} owned slots")
    cell_slots = slots[protected : protected + c]
    # cell j lives in slot cell_slots[j // L], layer-row j % L
    j = torch.arange(total, device=device)
    dst = cell_slots[j // L] + (j % L) * R
    src = torch.cat(own_src)
    if total:
        # gather first: destinations are rows of the request's own slots and may still hold sources
        k_src, v_src = kv.k[src], kv.v[src]
        kv.k[dst] = k_src
        kv.v[dst] = v_src
    layer_ids, start = [], 0
    for layer in range(L):
        n = own_counts[layer]
        layer_ids.append(torch.cat([prefix_ids[layer], dst[start : start + n]]))
        start += n
    return slots[protected + c : prompt_len], layer_ids, c
