"""SGLang plugin entry point (group ``sglang.srt.plugins``): ``--attention-backend vlcache``.

SGLang calls :func:`register` in the launcher (before argument parsing), in every scheduler
process and in the detokenizer. Everything here is registration; no SGLang file is patched.
"""
from __future__ import annotations

import logging
import os

from vlcache_sglang.settings import CompressionSettings, SettingsError

logger = logging.getLogger(__name__)
BACKEND_NAME = "vlcache"
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_attention_backend_choices

    from vlcache_sglang.backend.attention_backend import create_vlcache_backend

    add_attention_backend_choices([BACKEND_NAME])
    # contiguous K/V pool and the plugin's device tables inside SGLang's memory budget
    from vlcache_sglang.backend.memory_budget import install_memory_hooks

    install_memory_hooks()
    register_attention_backend(BACKEND_NAME)(create_vlcache_backend)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify_request, HookType.AFTER)
    HookRegistry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
                          _attach_request_info, HookType.AFTER)
    HookRegistry.register("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row",
                          _free_kv_row, HookType.AROUND)
    HookRegistry.register("sglang.srt.mem_cache.common.match_kv_cache", _cap_prefix_match, HookType.BEFORE)
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
        ".is_request_level_customized_info_key", _request_level_key, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController._add_memory_usage",
                          _add_vlcache_state, HookType.AFTER)
    # radix sharing of compressed prefixes: our tree, chosen by default with our backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend

    from vlcache_sglang.radix_cache import NAME as RADIX_NAME, create_vlcache_radix_cache

    register_radix_cache_backend(RADIX_NAME, create_vlcache_radix_cache)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.resolve_once", _select_radix_cache, HookType.BEFORE)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.resolve_once", _refuse_unsupported, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker"
                          "._get_total_uncached_sizes", _uncached_in_slots, HookType.AROUND)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _export_sharing, HookType.AFTER)
    HookRegistry.register("sglang.srt.models.qwen2_vl.Qwen2VLForConditionalGeneration.get_image_feature",
                          _count_image_encodes, HookType.AFTER)
    HookRegistry.register("sglang.srt.models.qwen2_vl.Qwen2VLForConditionalGeneration.get_video_feature",
                          _count_video_encodes, HookType.AFTER)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill",
                          _reopen_admission_after_compaction, HookType.BEFORE)
    HookRegistry.register("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner"
                          ".can_run_graph", _graph_fits_buffers, HookType.AFTER)


# -- launch flags -------------------------------------------------------------------------
def _add_cli_args(result, parser, *args, **kwargs):
    group = parser.add_argument_group("vlcache", "VL-Cache KV compression (vlcache-sglang plugin)")
    group.add_argument("--vlcache-budget", type=float, default=None,
                       help="KV budget ratio alpha in (0, 1]; 1.0 keeps everything (default: $VLCACHE_BUDGET or 1.0)")
    group.add_argument("--vlcache-method", type=str, default=None,
                       help="compression method: vlcache, snapkv, pyramidkv, h2o, streamingllm, random, full")
    group.add_argument("--vlcache-config", type=str, default=None,
                       help="a tuned policy configuration (JSON) written by tune.py")
    group.add_argument("--vlcache-sharing", type=str, default=None,
                       help="radix sharing of compressing requests: off (default), prefix or compressed")
    return result


def _export_sharing(server_args, cls, args, *rest, **kwargs):
    """Validate ``--vlcache-sharing`` at launch and export it for the scheduler processes."""
    from vlcache_sglang.settings import ENV_SHARING

    value = getattr(args, "vlcache_sharing", None)
    if value is not None:
        CompressionSettings(sharing=value).validate()
        os.environ[ENV_SHARING] = value
    return server_args


def _select_radix_cache(server_args, *args, **kwargs):
    """``--attention-backend vlcache`` picks the ``vlcache`` radix cache unless one was named."""
    from vlcache_sglang.radix_cache import NAME as RADIX_NAME

    if getattr(server_args, "attention_backend", None) == BACKEND_NAME and \
            getattr(server_args, "radix_cache_backend", None) is None and \
            not getattr(server_args, "_resolution_finished", False):
        server_args.radix_cache_backend = RADIX_NAME
    return None


def _from_cli_args(server_args, cls, args, *rest, **kwargs):
    """Validate the vlcache flags at launch and export them for the scheduler processes.

    Without ``--vlcache-config`` / ``VLCACHE_CONFIG``, the model's tuned default policy is used
    (:mod:`vlcache_sglang.tuned_configs`; ``none`` disables it). A policy file in force also gives
    the budget and method unless ``--vlcache-budget`` / ``--vlcache-method`` (or their
    environment variables) are set: defaults < policy file < flags < request.
    """
    import dataclasses

    from vlcache_sglang.settings import ENV_BUDGET, ENV_CONFIG, ENV_METHOD
    from vlcache_sglang.tuned_configs import DISABLED, TunedConfigError, find_default_config, load_policy_file

    env = {k: v for k, v in os.environ.items() if k != ENV_CONFIG}
    base = CompressionSettings.from_env(env)
    explicit = getattr(args, "vlcache_config", None) or os.environ.get(ENV_CONFIG) or None
    config_path, source = None, None
    if explicit is not None and explicit.strip().lower() == DISABLED:
        os.environ.pop(ENV_CONFIG, None)
    elif explicit is not None:
        config_path, source = explicit, "--vlcache-config"
    elif getattr(server_args, "attention_backend", None) == BACKEND_NAME:
        model = getattr(args, "model_path", None) or getattr(server_args, "model_path", None)
        found = find_default_config(model) if model else None
        if found is not None:
            config_path, source = str(found), f"per-model default for {model}"
    policy = None
    if config_path is not None and os.path.isfile(config_path):
        try:
            policy = load_policy_file(config_path)
        except TunedConfigError as exc:
            hint = " (pass --vlcache-config none to launch without it)" if source != "--vlcache-config" else ""
            raise SettingsError(f"{exc}{hint}") from None
    budget_given = getattr(args, "vlcache_budget", None) is not None or bool(os.environ.get(ENV_BUDGET))
    method_given = bool(getattr(args, "vlcache_method", None) or os.environ.get(ENV_METHOD))
    budget = args.vlcache_budget if getattr(args, "vlcache_budget", None) is not None else base.budget
    method = getattr(args, "vlcache_method", None) or base.method
    if policy is not None:
        budget = budget if budget_given else policy.alpha
        method = method if method_given else policy.method
    settings = dataclasses.replace(base, budget=budget, method=method, config_path=config_path).validate()
    # SettingsError above stops the launch with a readable message
    os.environ.update(settings.to_env())
    if getattr(server_args, "attention_backend", None) == BACKEND_NAME:
        if source is not None:
            logger.info("vlcache policy file %s (%s)", os.path.abspath(config_path), source)
        logger.info("vlcache settings: %s", settings.describe())
    return server_args


def _refuse_unsupported(result, server_args, *args, **kwargs):
    """Stop the launch (before any model load) when a flag cannot be served with the vlcache
    backend; the message names each flag and what to do instead (:mod:`vlcache_sglang.compatibility`).
    Also records, for the HTTP process, whether this server compresses at all."""
    if getattr(server_args, "attention_backend", None) != BACKEND_NAME:
        return result
    from vlcache_sglang.compatibility import ENV_SERVER_COMPRESSES, compresses_on, refusals

    settings = CompressionSettings.from_env()
    problems = refusals(server_args, settings)
    if problems:
        raise SettingsError("--attention-backend vlcache cannot serve this launch:\n  "
                            + "\n  ".join(p.message() for p in problems))
    compresses = compresses_on(server_args)
    os.environ[ENV_SERVER_COMPRESSES] = "1" if compresses else "0"
    if not compresses:
        logger.warning("vlcache on CUDA without the opt-in: SGLang's FlashInfer backend serves every request "
                       "uncompressed (budget 1.0); requests asking for compression get a 400")
    return result


# -- per-request overrides ----------------------------------------------------------------
def _verify_request(result, sampling_params, *args, **kwargs):
    """Reject a bad ``custom_params["vlcache"]`` in the HTTP process: a 400, not a crash. A
    request asking for compression from a server that cannot compress is a 400 too."""
    from vlcache_sglang.compatibility import ENV_SERVER_COMPRESSES, not_compressing_message
    from vlcache_sglang.policy_resolution import check_request, resolve_policy

    settings = CompressionSettings.from_env()
    try:
        check_request(settings, sampling_params.custom_params)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    if os.environ.get(ENV_SERVER_COMPRESSES) == "0" and sampling_params.custom_params:
        policy = resolve_policy(settings, sampling_params.custom_params)
        if policy.alpha < 1.0 and policy.method != "full":
            raise ValueError(not_compressing_message())
    return result


# -- scheduler side (no-ops unless this process runs the vlcache backend) ------------------
def _attach_request_info(forward_batch, cls, batch, *args, **kwargs):
    from vlcache_sglang.backend import state

    backend = state.active()
    if backend is not None and forward_batch.forward_mode.is_extend() and batch.reqs:
        from vlcache_sglang.backend.request_info import collect_request_info

        try:
            backend.stage_request_info(forward_batch.rids, collect_request_info(batch, backend.settings))
        except Exception:  # never take the scheduler down: serve this batch uncompressed
            logger.exception("vlcache: could not read per-request settings; batch served uncompressed")
            backend.stage_request_info(None, None)
    return forward_batch


def _cap_prefix_match(*args, **kwargs):
    """A compressing request reuses a cached prefix only up to its statistics window."""
    from vlcache_sglang.backend import state

    backend = state.active()
    req = args[0] if args else kwargs.get("req")
    if backend is None or req is None:
        return None
    from vlcache_sglang.backend.request_info import prepare_prefix_match

    try:
        cap = prepare_prefix_match(req, backend.settings)
    except Exception:  # never block scheduling on our side: match as stock
        logger.exception("vlcache: prefix cap failed for %s", getattr(req, "rid", "?"))
        return None
    if cap is None:
        return None
    current = kwargs.get("max_prefix_len")
    kwargs["max_prefix_len"] = cap if current is None else min(current, cap)
    return args, kwargs


def _reopen_admission_after_compaction(scheduler, running_batch=None, *args, **kwargs):
    """Let the scheduler try admission again once compaction has returned KV to the pool.

    When a prefill pass runs out of tokens, SGLang latches ``running_batch.batch_is_full`` and
    clears it only when a request *leaves* the batch: stock requests free memory only by
    finishing. A compressed request frees most of its prompt right after its prefill, so with the
    latch alone a whole wave of compressed requests decodes to the end while the pool stands
    half empty (measured: 44 running, 60 % of the pool free, 84 queued). Clearing the latch is
    safe: the next pass still checks every request against the pool."""
    from vlcache_sglang.backend import state

    compressor = state.active_compressor()
    batch = running_batch if running_batch is not None else getattr(scheduler, "running_batch", None)
    if compressor is None or batch is None:
        return None
    freed = compressor.counters.kv_tokens_saved
    if freed != getattr(scheduler, "_vlcache_freed_seen", 0):
        scheduler._vlcache_freed_seen = freed
        if getattr(batch, "batch_is_full", False):
            batch.batch_is_full = False
    return None


def _graph_fits_buffers(result, runner, forward_batch, *args, **kwargs):
    """A decode batch whose per-layer lists could overflow the vlcache backend's CUDA-graph buffers
    runs eagerly (only heavy radix sharing can make a batch read more keys than the pool holds)."""
    if not result:
        return result
    fits = getattr(getattr(runner, "attn_backend", None), "graph_can_run", None)
    return result if fits is None else bool(fits(forward_batch))


def _uncached_in_slots(original, checker, *args, **kwargs):
    """SGLang's busy memory check (``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY``) counts a row's
    private *positions*; a compacted row holds virtual ids there, whose cells take fewer slots.
    Count slots instead: real ids in each owner's private range plus every cell slot that a
    request-owned virtual id reads (what the tree's sizes leave out)."""
    full, swa = original(checker, *args, **kwargs)
    from vlcache_sglang.backend import state

    compressor = state.active_compressor()
    if compressor is None:
        return full, swa
    rows = checker.req_to_token_pool.req_to_token
    real = 0
    for req in checker._requests_owning_rows():
        ids = rows[req.kv.req_pool_idx, req.kv.cache_protected_len:req.kv.kv_allocated_len]
        real += int((ids < compressor.vkv.base).sum())
    return real + compressor.vkv.owned_cell_slots(), swa


def _free_kv_row(original, tree_cache, kv, ranges, *args, **kwargs):
    """Release through SGLang's own path (virtual ids are filtered in ``allocator.free``); forget
    the request's compression state."""
    from vlcache_sglang.backend import state

    compressor = state.active_compressor()
    if compressor is not None:
        compressor.forget(int(kv.req_pool_idx))
    return original(tree_cache, kv, ranges, *args, **kwargs)


def _count_image_encodes(result, model, items, *args, **kwargs):
    """Count images through the vision tower (``/server_info``: a radix hit skips the encoder)."""
    from vlcache_sglang.backend import state

    backend = state.active()
    if backend is not None:
        backend.images_encoded += len(items)
    return result


def _count_video_encodes(result, model, items, *args, **kwargs):
    """Count videos through the vision tower (``/server_info``: ``videos_encoded``)."""
    from vlcache_sglang.backend import state

    backend = state.active()
    if backend is not None:
        backend.videos_encoded += len(items)
    return result


def _request_level_key(result, streamer, key, *args, **kwargs):
    """``vlcache_*`` entries of a request's customized info are per request, not per token."""
    return True if key.startswith("vlcache_") else result


def _add_vlcache_state(result, internal_state, state, *args, **kwargs):
    """Expose pool and compression accounting in ``/server_info`` (leak checks, dashboards)."""
    from dataclasses import asdict

    from vlcache_sglang.backend import state as backend_state

    scheduler = internal_state.scheduler
    compressor = backend_state.active_compressor()
    tree = scheduler.tree_cache
    state["vlcache"] = {
        "available_kv_tokens": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "evictable_kv_tokens": int(tree.evictable_size()) if tree is not None else 0,
        "max_total_num_tokens": int(scheduler.max_total_num_tokens),
        "compressed_requests_live": len(compressor.rows) if compressor else 0,
        "pending_statistics": len(compressor.pending) if compressor else 0,
        "resolved_rows_live": len(compressor.resolved) if compressor else 0,
        "virtual_ids_live": compressor.vkv.live_ids if compressor else 0,
        "cell_slots_live": compressor.vkv.live_cell_slots() if compressor else 0,
        "radix_cache": type(tree).__name__ if tree is not None else None,
        "radix_cache_disabled": bool(getattr(tree, "disable", False)),  # --disable-radix-cache
        "evicted_slots": int(getattr(tree, "evicted_slots", 0)),
        "images_encoded": getattr(backend_state.active(), "images_encoded", 0),
        "videos_encoded": getattr(backend_state.active(), "videos_encoded", 0),
        "freed_reads": getattr(backend_state.active(), "freed_reads", 0),
        # whether freed_reads was being counted at all (VLCACHE_DEBUG_CHECKS=1)
        "debug_checks": bool(getattr(backend_state.active(), "debug_checks", False)),
        "tp_size": compressor.gather.world_size if compressor else 1,
        "tp_plans_checked": compressor.gather.plans_checked if compressor else 0,  # debug checks
        "tp_plan_mismatches": compressor.gather.plan_mismatches if compressor else 0,
        **(asdict(compressor.counters) if compressor else {}),
    }
    return result
