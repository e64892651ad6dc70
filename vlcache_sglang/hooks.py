"""Every place the plugin touches SGLang, in one table, and how it is installed.

Kinds:

* ``before`` / ``after`` / ``around``: SGLang's ``HookRegistry`` wraps the target (installed by
  :func:`install`, applied by SGLang's ``load_plugins`` in every process);
* ``registration``: a call into one of SGLang's registries (installed by :func:`install`);
* ``subclass``: a plugin class derived from the target (imported, never patched);
* ``instance``: attributes the plugin writes on SGLang objects at run time (``where`` says where).

:func:`install` resolves every target first. One that no longer resolves (SGLang moved or renamed
it) does not get skipped with a log line, as SGLang's registry would do: the plugin then installs
only a launch check, and ``--attention-backend vlcache`` stops with a message naming each missing
symbol. ``tests/unit/test_hooks.py`` asserts that every target resolves with the parameters its
hook expects.
"""
from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

from vlcache_sglang import launch_hooks as launch
from vlcache_sglang import scheduler_hooks as sched
from vlcache_sglang.backend import memory_budget as memory

logger = logging.getLogger(__name__)
WRAPS = ("before", "after", "around")


@dataclass(frozen=True)
class Hook:
    target: str  # dotted SGLang symbol
    kind: str  # before | after | around | registration | subclass | instance
    why: str
    fn: Callable | None = None  # the hook (wraps) or what the registration installs
    expects: tuple[str, ...] = ()  # leading parameter names of the target the hook relies on
    where: str = ""  # subclass / instance: the plugin code that does it


def _register_backend_choice() -> None:
    from sglang.srt.server_args import add_attention_backend_choices

    add_attention_backend_choices([launch.BACKEND_NAME])


def _register_attention_backend() -> None:
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    from vlcache_sglang.backend.attention_backend import create_vlcache_backend

    register_attention_backend(launch.BACKEND_NAME)(create_vlcache_backend)


def _register_radix_cache() -> None:
    from sglang.srt.mem_cache.registry import register_radix_cache_backend

    from vlcache_sglang.radix_cache import NAME, create_vlcache_radix_cache

    register_radix_cache_backend(NAME, create_vlcache_radix_cache)


SA = "sglang.srt.server_args.ServerArgs"
SCHED = "sglang.srt.managers.scheduler_components"
QWEN2_VL = "sglang.srt.models.qwen2_vl.Qwen2VLForConditionalGeneration"

HOOKS: tuple[Hook, ...] = (
    # -- launch ---------------------------------------------------------------------------
    Hook("sglang.srt.server_args.add_attention_backend_choices", "registration",
         "--attention-backend vlcache is a valid choice", _register_backend_choice),
    Hook("sglang.srt.layers.attention.attention_registry.register_attention_backend", "registration",
         "the vlcache attention backend factory", _register_attention_backend),
    Hook("sglang.srt.mem_cache.registry.register_radix_cache_backend", "registration",
         "--radix-cache-backend vlcache: a radix tree that holds compressed KV", _register_radix_cache),
    Hook(f"{SA}.add_cli_args", "after", "the --vlcache-* flags", launch.add_cli_args, ("parser",)),
    Hook(f"{SA}.from_cli_args", "after", "keep the raw --vlcache-* values until resolution",
         launch.keep_cli_flags, ("cls", "args")),
    Hook(f"{SA}.resolve_once", "before", "--attention-backend vlcache picks the vlcache radix cache",
         launch.select_radix_cache, ("self",)),
    Hook(f"{SA}.resolve_once", "after", "one ServerSettings per launch; refusals before any model loads",
         launch.settle_launch, ("self",)),
    Hook("sglang.srt.sampling.sampling_params.SamplingParams.verify", "after",
         "a bad custom_params['vlcache'] (or beam_width > 1, stop_token_ids past the vocabulary) is a 400 in "
         "the HTTP process", launch.verify_request, ("self", "vocab_size")),
    Hook("sglang.srt.managers.io_struct.GenerateReqInput.normalize_batch_and_arguments", "after",
         "extra_key in the vlcache: namespace, token_indices_to_pool without logprob_start_len 0: a 400",
         launch.verify_generate_request, ("self",)),
    # -- memory budget ----------------------------------------------------------------------
    Hook("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal", "around",
         "K and V allocated as one [L * R, heads, dim] tensor each (re-homing costs nothing)",
         memory.create_buffers_normal, ("self",)),
    Hook("sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size", "around",
         "the plugin's device tables counted in SGLang's cell size (the pool shrinks by them)",
         memory.compute_cell_size, ("self", "kvc", "num_layers")),
    # -- scheduler --------------------------------------------------------------------------
    Hook("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "after",
         "per-request info (policy, window, chunking) staged for the extend forward",
         sched.attach_request_info, ("cls", "batch", "model_runner")),
    Hook("sglang.srt.mem_cache.common.match_kv_cache", "before",
         "cap a compressing request's prefix match at its window; compressed sharing's namespace",
         sched.cap_prefix_match, ("req", "tree_cache")),
    Hook("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", "around",
         "drop the request's state when SGLang frees its row", sched.free_kv_row, ("self", "kv", "ranges")),
    Hook("sglang.srt.managers.scheduler.Scheduler.get_new_batch_prefill", "before",
         "reopen admission once compaction returned KV to the pool",
         sched.reopen_admission_after_compaction, ("self", "running_batch")),
    Hook(f"{SCHED}.invariant_checker.SchedulerInvariantChecker._get_total_uncached_sizes", "around",
         "the strict busy memory check counts cell slots, not positions", sched.uncached_in_slots, ("self",)),
    Hook(f"{SCHED}.output_streamer.SchedulerOutputStreamer.is_request_level_customized_info_key", "after",
         "vlcache_* meta_info entries are per request", sched.request_level_key, ("self", "key")),
    Hook(f"{SCHED}.internal_state.SchedulerInternalStateController._add_memory_usage", "after",
         "pool and compression accounting in /server_info", sched.add_vlcache_state, ("self", "state")),
    Hook(f"{SCHED}.weight_updater.SchedulerWeightUpdaterManager.flush_cache_after_weight_update", "before",
         "a weight update also empties SGLang's image-embedding cache (stock keeps old embeddings)",
         sched.drop_stale_image_embeddings, ("self", "recv_req")),
    Hook(f"{QWEN2_VL}.get_image_feature", "after", "images_encoded in /server_info",
         sched.count_image_encodes, ("self", "items")),
    Hook(f"{QWEN2_VL}.get_video_feature", "after", "videos_encoded in /server_info",
         sched.count_video_encodes, ("self", "items")),
    Hook("sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph", "after",
         "a batch whose lists overflow the graph buffers runs eagerly", sched.graph_fits_buffers,
         ("self", "forward_batch")),
    # -- subclasses -------------------------------------------------------------------------
    Hook("sglang.srt.layers.attention.base_attn_backend.AttentionBackend", "subclass",
         "the vlcache attention backend", where="vlcache_sglang.backend.attention_backend.VLCacheAttnBackend"),
    Hook("sglang.srt.mem_cache.radix_cache.RadixCache", "subclass",
         "matching, splitting, locking, LRU are SGLang's; sizes in slots, checkpoint limits and reports row rewrites",
         where="vlcache_sglang.radix_cache.VLCacheRadixCache"),
    # -- instance attributes ------------------------------------------------------------------
    Hook("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.free", "instance",
         "virtual ids in any free() go to VirtualKV.release, real ids to the allocator",
         where="vlcache_sglang.backend.virtual_kv.install_free_filter (backend construction)"),
    Hook("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool.get_key_buffer", "instance",
         "k_buffer/v_buffer become row slices of one tensor (and the cached pointer tables are "
         "refreshed); _vlcache_global_kv holds it",
         where="vlcache_sglang.backend.cell_store.rehome_pool_buffers, memory_budget.create_contiguous_buffers"),
    Hook("sglang.srt.managers.schedule_batch.Req", "instance",
         "_vlcache_spec (the request's decision, once), _vlcache_user_extra_key and extra_key "
         "(compressed sharing's namespace), skip_radix_cache_insert, customized_info (meta_info)",
         where="vlcache_sglang.backend.request_info, vlcache_sglang.backend.report"),
    Hook("sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator", "instance",
         "_vlcache_runtime on the allocator and the model: how hooks, backend and tree meet",
         where="vlcache_sglang.backend.runtime.attach (backend construction)"),
    Hook(SA, "instance", "_vlcache_flags, then _vlcache_settings: the launch's settings, pickled into "
         "every process with the server args", where="vlcache_sglang.launch_hooks"),
)


class HookTargetMissing(RuntimeError):
    """SGLang no longer has a symbol the plugin hooks."""


def resolve(target: str) -> Any:
    """The object a dotted path names (module prefix imported, the rest looked up)."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(target)


def check(hook: Hook) -> str | None:
    """Why ``hook`` cannot be installed on this SGLang (None: it can)."""
    try:
        obj = resolve(hook.target)
    except (ImportError, AttributeError) as exc:
        return f"{hook.target} does not resolve ({type(exc).__name__}: {exc})"
    if hook.kind in WRAPS and hook.expects:
        func = inspect.unwrap(obj.__func__ if inspect.ismethod(obj) else obj)
        names = tuple(inspect.signature(func).parameters)[:len(hook.expects)]
        if names != hook.expects:
            return f"{hook.target} takes {names}, the hook expects {hook.expects}"
    return None


def problems(hooks: tuple[Hook, ...] = HOOKS) -> list[str]:
    return [p for p in (check(h) for h in hooks) if p is not None]


def install(hooks: tuple[Hook, ...] = HOOKS, *, apply: bool = False) -> list[str]:
    """Install the table into SGLang (idempotent). Returns the problems (empty when installed);
    with any, only a launch check is installed that refuses ``--attention-backend vlcache``.
    ``apply``: also patch now (tests and tools; SGLang's ``load_plugins`` applies otherwise)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    found = problems(hooks)
    if found:
        for p in found:
            logger.error("vlcache: cannot hook SGLang: %s", p)
        _install_refusal(found)
        return found
    for hook in hooks:
        if hook.kind == "registration":
            hook.fn()
        elif hook.kind in WRAPS:
            registered = [h for _, h, _ in HookRegistry._hooks.get(hook.target, ())]
            if hook.fn not in registered:
                HookRegistry.register(hook.target, hook.fn, HookType(hook.kind))
    if apply:
        HookRegistry.apply_hooks()
    return []


def _install_refusal(found: list[str]) -> None:
    """Keep ``--attention-backend vlcache`` selectable, and stop such a launch with the list."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_attention_backend_choices

    add_attention_backend_choices([launch.BACKEND_NAME])
    HookRegistry.register(f"{SA}.resolve_once", refusal_hook(found), HookType.AFTER)


def refusal_hook(found: list[str]) -> Callable:
    """An AFTER hook of ``ServerArgs.resolve_once`` that stops a vlcache launch, naming ``found``."""
    def refuse(result, server_args, *args, **kwargs):
        if getattr(server_args, "attention_backend", None) == launch.BACKEND_NAME:
            raise HookTargetMissing("vlcache-sglang cannot hook this SGLang (it supports SGLang 0.5.23):\n  "
                                    + "\n  ".join(found))
        return result

    return refuse
