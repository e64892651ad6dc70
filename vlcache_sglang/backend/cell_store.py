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

Memory. SGLang sizes the pool to fill the device (``--mem-fraction-static``), so re-homing must
not allocate a second pool: with the memory hooks of :mod:`vlcache_sglang.backend.memory_budget` (in the plugin's hook table)
the pool allocates its K and V as ``[L * R, heads, dim]`` tensors in the first place and SGLang's
per-layer buffers are views of them (re-homing is free); a pool built without the hook is moved
layer by layer (one layer of extra memory; through the host on CUDA). Either way every pointer and
stride SGLang caches for the pool (``k_data_ptrs``/``v_data_ptrs``/``data_ptrs``/``data_strides``,
the buffer descriptors) is refreshed from the live tensors.

fp8 KV (``--kv-cache-dtype fp8_e5m2|fp8_e4m3``): SGLang stores ``uint8`` and views it as the fp8
dtype; :class:`GlobalKV` hands out the fp8 views (what SGLang's own ``get_key_buffer`` returns), so
readers dequantize as SGLang's backends do, and moves copy the bytes (:func:`storage_view`).

Which positions a compressed request keeps where, and how SGLang's rows and radix tree refer to
them, is :mod:`vlcache_sglang.backend.virtual_kv`. Everything here is plain PyTorch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: attribute of a pool allocated contiguous (memory_budget.create_contiguous_buffers): its (K, V)
POOL_KV_ATTR = "_vlcache_global_kv"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))


@dataclass
class GlobalKV:
    """The pool's K/V storage seen as ``[L * rows_per_layer, heads, dim]``, in the pool's dtype
    (fp8 pools: fp8 views of SGLang's ``uint8`` storage)."""

    k: torch.Tensor
    v: torch.Tensor
    rows_per_layer: int
    num_layers: int

    def global_ids(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return slots.to(torch.int64) + layer * self.rows_per_layer

    def cells(self, heads_per_unit: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as cell rows: ``[L * R, H, D]`` itself (layer cells) or, with head cells
        (``heads_per_unit == H``), the same memory as ``[L * R * H, 1, D]`` head-rows (row
        ``(l * R + s) * H + h``; see :class:`~vlcache_sglang.backend.virtual_kv.CellUnits`)."""
        if heads_per_unit == 1:
            return self.k, self.v
        if self.k.shape[1] != heads_per_unit or self.v.shape[1] != heads_per_unit:
            raise ValueError(f"head cells need {heads_per_unit} KV heads per row, the pool has {self.k.shape[1]}")
        return (self.k.view(-1, 1, self.k.shape[-1]), self.v.view(-1, 1, self.v.shape[-1]))


def storage_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes for copies (fp8 as ``uint8``, as SGLang stores it: torch has no fp8
    ``index_copy``/``index_put`` on every device); other dtypes unchanged."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def contiguous_storage(pool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(K, V)`` ``[L * R, ...]`` storage tensors whose row slices ARE the pool's per-layer
    buffers (made by the memory hook), or None."""
    found = getattr(pool, POOL_KV_ATTR, None)
    if found is None:
        return None
    k, v = found
    rows = pool.k_buffer[0].shape[0]
    for big, layers in ((k, pool.k_buffer), (v, pool.v_buffer)):
        if big.shape[0] != rows * len(layers):
            return None
        for l, t in enumerate(layers):
            if t.data_ptr() != big[l * rows].data_ptr() or t.shape != big[l * rows:(l + 1) * rows].shape \
                    or t.stride() != big.stride():
                return None
    return k, v


def rehome_pool_buffers(pool) -> GlobalKV:
    """Make ``pool.k_buffer`` / ``pool.v_buffer`` (lists of per-layer tensors) views of one
    contiguous tensor each and return the global view. Free when the pool was allocated that way
    (memory hook); otherwise moved layer by layer. Call before anything is read through cached
    pointers (backend construction); refreshes every pointer SGLang caches for the pool."""
    k_layers, v_layers = pool.k_buffer, pool.v_buffer
    rows = k_layers[0].shape[0]
    if any(t.shape[0] != rows for t in list(k_layers) + list(v_layers)):
        raise ValueError("vlcache needs every layer's K/V buffer to have the same number of rows")
    num_layers = len(k_layers)
    found = contiguous_storage(pool)
    if found is None:
        found = _move_layer_by_layer(pool, rows)
        setattr(pool, POOL_KV_ATTR, found)
    refresh_pool_pointers(pool)
    k, v = found
    dtype = getattr(pool, "dtype", k.dtype)
    if dtype != k.dtype:  # fp8: SGLang stores uint8 and reads through a view
        k, v = k.view(dtype), v.view(dtype)
    return GlobalKV(k=k, v=v, rows_per_layer=rows, num_layers=num_layers)


def _move_layer_by_layer(pool, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback for a pool allocated per layer (no memory hook): peak = pool + one layer on the
    CPU (the target's pages are touched as layers are copied in, each source freed right after);
    on CUDA the layers are parked in host memory first, since the target's allocation is backed
    at once and the pool already fills the device."""
    k_layers, v_layers = pool.k_buffer, pool.v_buffer
    num_layers = len(k_layers)
    device = k_layers[0].device
    k_row, v_row = tuple(k_layers[0].shape[1:]), tuple(v_layers[0].shape[1:])
    dtype = k_layers[0].dtype
    if device.type != "cpu":
        logger.warning("vlcache: the KV pool was not allocated contiguously (memory hooks not installed); "
                       "moving %d layers through host memory", num_layers)
        staged_k, staged_v = [], []
        for l in range(num_layers):
            staged_k.append(k_layers[l].cpu())
            staged_v.append(v_layers[l].cpu())
            k_layers[l] = v_layers[l] = None  # the per-layer allocation goes with its last view
        if device.type == "cuda":
            torch.cuda.empty_cache()
        sources_k, sources_v = staged_k, staged_v
    else:
        sources_k, sources_v = k_layers, v_layers
    k = torch.empty((num_layers * rows, *k_row), dtype=dtype, device=device)
    v = torch.empty((num_layers * rows, *v_row), dtype=dtype, device=device)
    for l in range(num_layers):
        k[l * rows:(l + 1) * rows].copy_(sources_k[l])
        v[l * rows:(l + 1) * rows].copy_(sources_v[l])
        sources_k[l] = sources_v[l] = None
        k_layers[l] = k[l * rows:(l + 1) * rows]
        v_layers[l] = v[l * rows:(l + 1) * rows]
    pool.k_buffer = k_layers
    pool.v_buffer = v_layers
    return k, v


def refresh_pool_pointers(pool) -> None:
    """Recompute what SGLang's ``MHATokenToKVPool`` derives from its buffers at creation: the
    buffer descriptors (PD transfer registration) and ``k_data_ptrs``/``v_data_ptrs``/``data_ptrs``/
    ``data_strides`` (``move_kv_cache`` for speculative decoding, HiCache/PD buffer info)."""
    build_descs = getattr(pool, "_build_kv_buffer_descs", None)
    if build_descs is not None and hasattr(pool, "_kv_buffer_descs"):
        pool._kv_buffer_descs = build_descs()
    init_ptrs = getattr(pool, "_init_data_ptrs_and_strides", None)
    if init_ptrs is not None:
        init_ptrs()
