"""Scheduler-side hooks (declared in :mod:`vlcache_sglang.hooks`).

Each finds its process's :class:`~vlcache_sglang.backend.runtime.Runtime` through the SGLang
object it is handed (:func:`~vlcache_sglang.backend.runtime.runtime_of`) and leaves SGLang alone
when there is none (a process that serves another attention backend).
"""
from __future__ import annotations

import logging
from dataclasses import asdict

import torch

from vlcache_sglang.backend.request_state import RequestStates
from vlcache_sglang.backend.runtime import runtime_of

logger = logging.getLogger(__name__)


def attach_request_info(forward_batch, cls, batch, model_runner, *args, **kwargs):
    """``ForwardBatch.init_new``: stage the extend batch's per-request info for the backend; give
    a decode batch the host copy of its rows (``req_pool_indices_cpu``)."""
    runtime = runtime_of(model_runner)
    if runtime is not None and forward_batch.forward_mode.is_extend() and batch.reqs:
        from vlcache_sglang.backend.request_info import collect_request_info

        backend = runtime.backend
        try:
            backend.stage_request_info(forward_batch.rids, collect_request_info(batch, runtime))
        except Exception:  # never take the scheduler down: serve this batch uncompressed
            logger.exception("vlcache: could not read per-request settings; batch served uncompressed")
            backend.stage_request_info(None, None)
    elif runtime is not None and forward_batch.forward_mode.is_decode() and batch.reqs and \
            getattr(forward_batch, "req_pool_indices_cpu", None) is None:
        # decode: SGLang passes the rows' host copy for extend only; the backend's per-layer lists
        # need them on the host every step, and reading the device tensor would drain the stream
        forward_batch.req_pool_indices_cpu = torch.tensor([int(r.kv.req_pool_idx) for r in batch.reqs],
                                                          dtype=torch.int64)
    return forward_batch


def cap_prefix_match(req, tree_cache, *args, **kwargs):
    """``match_kv_cache``: a compressing request reuses a cached prefix only up to its statistics
    window (or, under ``compressed`` sharing, only what its policy's namespace holds)."""
    runtime = runtime_of(tree_cache)
    if runtime is None or req is None:
        return None
    from vlcache_sglang.backend.request_info import prepare_prefix_match

    try:
        cap = prepare_prefix_match(req, runtime)
    except Exception:  # never block scheduling on our side: match as stock
        logger.exception("vlcache: prefix cap failed for %s", getattr(req, "rid", "?"))
        return None
    if cap is None:
        return None
    current = kwargs.get("max_prefix_len")
    kwargs["max_prefix_len"] = cap if current is None else min(current, cap)
    return (req, tree_cache, *args), kwargs


def reopen_admission_after_compaction(scheduler, running_batch=None, *args, **kwargs):
    """``Scheduler.get_new_batch_prefill``: let the scheduler try admission again once compaction
    has returned KV to the pool.

    When a prefill pass runs out of tokens, SGLang latches ``running_batch.batch_is_full`` and
    clears it only when a request *leaves* the batch: stock requests free memory only by
    finishing. A compressed request frees most of its prompt right after its prefill, so with the
    latch alone a whole wave of compressed requests decodes to the end while the pool stands
    half empty (measured: 44 running, 60 % of the pool free, 84 queued). Clearing the latch is
    safe: the next pass still checks every request against the pool."""
    runtime = runtime_of(scheduler)
    batch = running_batch if running_batch is not None else getattr(scheduler, "running_batch", None)
    if runtime is None or runtime.compressor is None or batch is None:
        return None
    freed = runtime.compressor.counters.kv_tokens_saved
    if freed != runtime.freed_seen:
        runtime.freed_seen = freed
        if getattr(batch, "batch_is_full", False):
            batch.batch_is_full = False
    return None


def graph_fits_buffers(result, runner, forward_batch, *args, **kwargs):
    """``DecodeCudaGraphRunner.can_run_graph``: a decode batch whose per-layer lists could overflow
    the vlcache backend's CUDA-graph buffers runs eagerly (only heavy radix sharing can make a
    batch read more keys than the pool holds)."""
    if not result:
        return result
    fits = getattr(getattr(runner, "attn_backend", None), "graph_can_run", None)
    return result if fits is None else bool(fits(forward_batch))


def uncached_in_slots(original, checker, *args, **kwargs):
    """``SchedulerInvariantChecker._get_total_uncached_sizes``: SGLang's busy memory check
    (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``) counts a row's private *positions*; a
    compacted row holds virtual ids there, whose cells take fewer slots. Count slots instead: real
    ids in each owner's private range plus every cell slot that a request-owned virtual id reads
    (what the tree's sizes leave out)."""
    full, swa = original(checker, *args, **kwargs)
    runtime = runtime_of(checker)
    if runtime is None or runtime.compressor is None:
        return full, swa
    vkv = runtime.compressor.vkv
    rows = checker.req_to_token_pool.req_to_token
    real = 0
    for req in checker._requests_owning_rows():
        ids = rows[req.kv.req_pool_idx, req.kv.cache_protected_len:req.kv.kv_allocated_len]
        real += int((ids < vkv.base).sum())
    return real + vkv.owned_cell_slots(), swa


def free_kv_row(original, tree_cache, kv, ranges, *args, **kwargs):
    """``BasePrefixCache.free_kv_row``: release through SGLang's own path (virtual ids are filtered
    in ``allocator.free``); drop the request's state."""
    runtime = runtime_of(tree_cache)
    if runtime is not None and runtime.compressor is not None:
        runtime.compressor.forget(int(kv.req_pool_idx))
    return original(tree_cache, kv, ranges, *args, **kwargs)


def count_image_encodes(result, model, items, *args, **kwargs):
    """``get_image_feature``: images through the vision tower (a radix hit skips the encoder)."""
    runtime = runtime_of(model)
    if runtime is not None:
        runtime.images_encoded += len(items)
    return result


def drop_stale_image_embeddings(updater, *args, **kwargs):
    """``SchedulerWeightUpdaterManager.flush_cache_after_weight_update`` (reached after every
    update that changed the served weights: from disk, tensors, IPC or a distributed group): empty
    SGLang's multimodal embedding cache as well.

    SGLang 0.5.23 keeps that cache (``mm_schedule.embedding_cache``, keyed by the image's hash)
    across weight updates, and neither the update nor ``/flush_cache`` clears it: an image sent
    before an update was answered with its old vision-tower embedding afterwards (``torch_native``
    the same), and that embedding is also what the plugin scored and planned from. Whatever the
    request's ``flush_cache`` says about the KV cache, embeddings of the old weights are wrong."""
    if runtime_of(getattr(updater, "scheduler", None)) is None:
        return None
    from sglang.srt.managers import mm_schedule

    cache = mm_schedule.embedding_cache
    if cache is not None:
        cache.clear()
    return None


def count_video_encodes(result, model, items, *args, **kwargs):
    """``get_video_feature``: videos through the vision tower (``videos_encoded``)."""
    runtime = runtime_of(model)
    if runtime is not None:
        runtime.videos_encoded += len(items)
    return result


def request_level_key(result, streamer, key, *args, **kwargs):
    """``vlcache_*`` entries of a request's customized info are per request, not per token."""
    return True if key.startswith("vlcache_") else result


def add_vlcache_state(result, internal_state, state, *args, **kwargs):
    """``_add_memory_usage``: pool and compression accounting in ``/server_info`` (leak checks,
    dashboards)."""
    scheduler = internal_state.scheduler
    runtime = runtime_of(scheduler)
    compressor = runtime.compressor if runtime is not None else None
    backend = runtime.backend if runtime is not None else None
    tree = scheduler.tree_cache
    counts = (compressor.states if compressor else RequestStates()).counts()  # all zero without one
    state["vlcache"] = {
        "available_kv_tokens": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "evictable_kv_tokens": int(tree.evictable_size()) if tree is not None else 0,
        "max_total_num_tokens": int(scheduler.max_total_num_tokens),
        **counts,
        "virtual_ids_live": compressor.vkv.live_ids if compressor else 0,
        "cell_slots_live": compressor.vkv.live_cell_slots() if compressor else 0,
        "radix_cache": type(tree).__name__ if tree is not None else None,
        "radix_cache_disabled": bool(getattr(tree, "disable", False)),  # --disable-radix-cache
        "evicted_slots": int(getattr(tree, "evicted_slots", 0)),
        "images_encoded": runtime.images_encoded if runtime is not None else 0,
        "videos_encoded": runtime.videos_encoded if runtime is not None else 0,
        "freed_reads": getattr(backend, "freed_reads", 0),
        # debug checks: decode steps whose cached row resolution a missing rewrite report left stale
        "stale_resolutions": compressor.layer_lists.stale_resolutions if compressor else 0,
        # whether freed_reads was being counted at all (VLCACHE_DEBUG_CHECKS=1)
        "debug_checks": bool(getattr(backend, "debug_checks", False)),
        # KV cell granularity served (--vlcache-cells): what a request's vlcache_kept_ratio counts
        "cells": "head" if compressor is not None and compressor.head_cells else "layer",
        "tp_size": compressor.gather.world_size if compressor else 1,
        "tp_plans_checked": compressor.gather.plans_checked if compressor else 0,  # debug checks
        "tp_plan_mismatches": compressor.gather.plan_mismatches if compressor else 0,
        # the Triton kernels' launch options and where they came from (a tuned file or the defaults)
        "kernel_launches": backend.kernel_launches.describe() if hasattr(backend, "kernel_launches") else None,
        **(asdict(compressor.counters) if compressor else {}),
    }
    return result
