"""The plugin's device memory inside SGLang's budget: a contiguous pool and per-slot table bytes.

SGLang sizes the KV pool to fill what ``--mem-fraction-static`` leaves
(``DefaultPoolConfigurator.calculate_pool_sizes``: ``available_bytes // cell_size`` slots, the
cell size from ``_compute_cell_size``). Two things the ``vlcache`` backend needs would otherwise
live outside that budget:

* one contiguous ``[L * R, heads, dim]`` K and V (:mod:`vlcache_sglang.backend.cell_store`):
  copying the per-layer buffers into it would need a second pool at start-up. The hook on
  ``MHATokenToKVPool._create_buffers_normal`` allocates K and V that way in the first place
  (same memory-saver region and custom memory pool as SGLang's own allocation), and SGLang's
  per-layer ``k_buffer[l]``/``v_buffer[l]`` are row slices of them; SGLang then derives its
  pointer tables from those views as usual, and re-homing costs nothing;
* the backend's device tables, which grow with the pool: the virtual-id table (``ids_per_slot``
  int32 ids per slot and layer), their birth stamps (int32), and on CUDA the decode graph's
  per-layer index buffers (at most one int32 per slot and layer). The hook on
  ``DefaultPoolConfigurator._compute_cell_size`` adds their bytes per slot to SGLang's cell size,
  so the pool shrinks by what they take.

Both hooks (declared in :mod:`vlcache_sglang.hooks`, AROUND hooks of SGLang's ``HookRegistry``)
act only in processes where the ``vlcache`` backend will serve attention (:func:`vlcache_serves`:
``--attention-backend vlcache``, and on CUDA ``VLCACHE_CUDA_EXECUTOR=flashinfer``, read from the
launch's :class:`~vlcache_sglang.settings.ServerSettings`; elsewhere SGLang's stock backend runs and
nothing changes).
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext

import torch

from vlcache_sglang.backend.cell_store import POOL_KV_ATTR
from vlcache_sglang.settings import COMPRESSING_CUDA_EXECUTORS, ServerSettings, settings_of

logger = logging.getLogger(__name__)

ID_BYTES = 4  # int32 (virtual_kv.ID_DTYPE; graph index buffers)
_FORCE: bool | None = None  # tests only (:func:`forced`): act regardless of the server args


def table_bytes_per_slot(num_layers: int, *, graph_buffers: bool, ids_per_slot: float = 4.0) -> int:
    """Device bytes of the backend's tables per pool slot: virtual-id table (``ids_per_slot``
    x ``num_layers`` int32) + birth stamps (``ids_per_slot`` int32) + decode-graph index buffers
    (``num_layers`` int32, an upper bound: their capacity is ``min(max_bs * context, slots)``).
    With head cells ``num_layers`` is the number of cell units, ``L x`` the rank's KV heads."""
    per = ids_per_slot
    table = per * num_layers * ID_BYTES
    born = per * ID_BYTES
    graph = num_layers * ID_BYTES if graph_buffers else 0
    return math.ceil(table + born + graph)


def vlcache_serves(server_args, device) -> bool:
    """Whether this process's attention runs through the vlcache backend (not the stock fallback)."""
    if _FORCE is not None:
        return _FORCE
    if server_args is None:
        return False
    from vlcache_sglang.launch_hooks import BACKEND_NAME

    names = {getattr(server_args, f, None) for f in
             ("attention_backend", "prefill_attention_backend", "decode_attention_backend")}
    if BACKEND_NAME not in names:
        return False
    if str(device).startswith("cuda"):
        settings = settings_of(server_args)
        return settings is not None and settings.cuda_executor in COMPRESSING_CUDA_EXECUTORS
    return True


@contextmanager
def forced(on: bool = True):
    """Tests: act as if (or as if not) the vlcache backend serves, without server args."""
    global _FORCE
    saved, _FORCE = _FORCE, on
    try:
        yield
    finally:
        _FORCE = saved


def _current_server_args():
    try:
        from sglang.srt.runtime_context import get_server_args

        return get_server_args()
    except Exception:  # not published in this process (tests, tools)
        return None


def _wants_contiguous(pool) -> bool:
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return (type(pool) is MHATokenToKVPool and getattr(pool, "kv_cache_layout", "nhd") == "nhd"
            and not getattr(pool, "use_hnd", False) and pool.page_size == 1 and pool.layer_num > 0
            and vlcache_serves(_current_server_args(), pool.device))


def create_contiguous_buffers(pool) -> None:
    """SGLang's ``_create_buffers_normal`` for an NHD pool, with each of K and V one
    ``[L * R, heads, dim]`` allocation and ``k_buffer[l]``/``v_buffer[l]`` its row slices."""
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE

    k_shape, v_shape = pool._kv_buffer_shapes()
    rows, layers = k_shape[0], pool.layer_num
    with pool.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
        with (torch.cuda.use_mem_pool(pool.custom_mem_pool) if pool.enable_custom_mem_pool else nullcontext()):
            k = torch.zeros((layers * rows, *k_shape[1:]), dtype=pool.store_dtype, device=pool.device)
            v = torch.zeros((layers * rows, *v_shape[1:]), dtype=pool.store_dtype, device=pool.device)
    pool.k_buffer = [k[l * rows:(l + 1) * rows] for l in range(layers)]
    pool.v_buffer = [v[l * rows:(l + 1) * rows] for l in range(layers)]
    setattr(pool, POOL_KV_ATTR, (k, v))
    logger.info("vlcache: KV pool allocated contiguous (%d layers x %d rows; re-homing is free)", layers, rows)


def create_buffers_normal(original, pool, *args, **kwargs):
    """AROUND ``MHATokenToKVPool._create_buffers_normal``: contiguous K/V when vlcache serves."""
    if _wants_contiguous(pool):
        return create_contiguous_buffers(pool)
    return original(pool, *args, **kwargs)


def compute_cell_size(original, configurator, kvc, num_layers, *args, **kwargs):
    """AROUND ``DefaultPoolConfigurator._compute_cell_size``: + the tables' bytes per slot."""
    size = original(configurator, kvc, num_layers, *args, **kwargs)
    device = getattr(kvc, "device", "cpu")
    server_args = getattr(kvc, "server_args", None)
    if size <= 0 or getattr(kvc, "use_mla_backend", False) or not vlcache_serves(server_args, device):
        return size
    settings = settings_of(server_args) or ServerSettings()
    units = num_layers * (_local_kv_heads(kvc) if settings.cells == "head" else 1)
    extra = table_bytes_per_slot(units, graph_buffers=str(device).startswith("cuda"),
                                 ids_per_slot=settings.virtual_ids_per_slot)
    logger.info(budget_message(extra, size))
    return size + extra


def _local_kv_heads(kvc) -> int:
    """KV heads of one attention TP rank (head cells: a slot has ``L`` x this many cells)."""
    from sglang.srt.runtime_context import get_parallel

    return int(kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size))


def install_memory_hooks() -> None:
    """Tests and tools: install and apply only this module's two hooks in this process (a server
    gets them with the whole table from the plugin's ``register()``)."""
    from vlcache_sglang.hooks import HOOKS, install

    install(tuple(h for h in HOOKS if h.fn in (create_buffers_normal, compute_cell_size)), apply=True)


def budget_message(extra: int, cell: int) -> str:
    return (f"vlcache: device tables {extra:,} B/slot ({100.0 * extra / cell:.1f}% of the {cell:,} B cell) "
            "counted in the pool budget")
