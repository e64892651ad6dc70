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

Which positions a compressed request keeps where, and how SGLang's rows and radix tree refer to
them, is :mod:`vlcache_sglang.backend.virtual_kv`. Everything here is plain PyTorch.
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
