"""Launch-side hooks: the ``--vlcache-*`` flags, the one settings object, refusals, request checks.

This and :mod:`vlcache_sglang.settings` are the plugin boundary: the only code that reads the
environment. The route of the settings, in order:

1. ``ServerArgs.add_cli_args`` (after): the ``--vlcache-*`` flags join SGLang's parser;
2. ``ServerArgs.from_cli_args`` (after): their raw values are kept on the ``ServerArgs``
   (``_vlcache_flags``; the offline ``sglang.Engine`` has none and uses the environment);
3. ``ServerArgs.resolve_once`` (before): ``--attention-backend vlcache`` picks the ``vlcache``
   radix cache unless one was named;
4. ``ServerArgs.resolve_once`` (after): flags, environment and the tuned policy file become one
   frozen :class:`~vlcache_sglang.settings.ServerSettings`, validated, checked against the launch
   (:mod:`vlcache_sglang.compatibility`; a refusal stops the launch before any model loads) and
   attached to the ``ServerArgs`` (``_vlcache_settings``), which SGLang pickles with its
   bookkeeping into every scheduler, TP rank and the detokenizer;
5. ``SamplingParams.verify`` (after, HTTP process): a request's ``custom_params["vlcache"]`` is
   validated once, when it arrives (a 400, not a crash);
6. ``GenerateReqInput.normalize_batch_and_arguments`` (after, HTTP process): request fields outside
   the sampling parameters that a vlcache server cannot serve are a 400 too
   (:func:`check_generate_request`).
"""
from __future__ import annotations

import logging
import os

from vlcache_sglang.settings import (
    FLAGS_ATTR,
    CompressionSettings,
    ServerSettings,
    SettingsError,
    attach,
    launch_settings,
    settings_of,
)

logger = logging.getLogger(__name__)
BACKEND_NAME = "vlcache"


def add_cli_args(result, parser, *args, **kwargs):
    from vlcache_sglang.policy import available_methods

    group = parser.add_argument_group("vlcache", "VL-Cache KV compression (vlcache-sglang plugin)")
    group.add_argument("--vlcache-budget", type=float, default=None,
                       help="KV budget ratio alpha in (0, 1]; 1.0 keeps everything (default: $VLCACHE_BUDGET or 1.0)")
    group.add_argument("--vlcache-method", type=str, default=None,
                       help=f"compression method: {', '.join(available_methods())}")
    group.add_argument("--vlcache-config", type=str, default=None,
                       help="a tuned policy configuration (JSON) written by tune.py")
    group.add_argument("--vlcache-sharing", type=str, default=None,
                       help="radix sharing of compressing requests: off (default), prefix or compressed")
    group.add_argument("--vlcache-cells", type=str, default=None,
                       help="KV cell granularity: layer (default; per-head plans hold the union over heads) or "
                            "head (each (layer, KV head) keeps its own positions: per-head plans save memory)")
    return result


def keep_cli_flags(server_args, cls, args, *rest, **kwargs):
    """Keep the raw ``--vlcache-*`` values on the server args until resolution parses them."""
    flags = {name: getattr(args, f"vlcache_{name}", None) for name in ("budget", "method", "config", "sharing", "cells")}
    setattr(server_args, FLAGS_ATTR, flags)
    return server_args


def select_radix_cache(server_args, *args, **kwargs):
    """``--attention-backend vlcache`` picks the ``vlcache`` radix cache unless one was named."""
    from vlcache_sglang.radix_cache import NAME as RADIX_NAME

    if getattr(server_args, "attention_backend", None) == BACKEND_NAME and \
            getattr(server_args, "radix_cache_backend", None) is None and \
            not getattr(server_args, "_resolution_finished", False):
        server_args.radix_cache_backend = RADIX_NAME
    return None


def settle_launch(result, server_args, *args, **kwargs):
    """Parse and validate the launch once, refuse what cannot be served, attach the settings."""
    if settings_of(server_args) is not None:
        return result  # a spawned process re-resolving: settled in the launcher
    ours = getattr(server_args, "attention_backend", None) == BACKEND_NAME
    model = getattr(server_args, "model_path", None) if ours else None
    settings, source = launch_settings(getattr(server_args, FLAGS_ATTR, None) or {}, os.environ, model,
                                       metrics=bool(getattr(server_args, "enable_metrics", False)))
    if not ours:
        return result  # flags validated; nothing of ours runs
    from dataclasses import replace

    from vlcache_sglang.compatibility import compresses_on, refusals

    problems = refusals(server_args, settings)
    if problems:
        raise SettingsError("--attention-backend vlcache cannot serve this launch:\n  "
                            + "\n  ".join(p.message() for p in problems))
    settings = replace(settings, tp_size=int(getattr(server_args, "tp_size", 1) or 1))
    settings = attach(server_args, replace(settings.validate(), compresses=compresses_on(server_args, settings)))
    if source is not None:
        logger.info("vlcache policy file %s (%s)", settings.compression.config_path, source)
    logger.info("vlcache settings: %s", settings.describe())
    if not settings.compresses:
        logger.warning("vlcache on CUDA without the opt-in: SGLang's FlashInfer backend serves every request "
                       "uncompressed (budget 1.0); requests asking for compression get a 400")
    return result


def serving_settings() -> ServerSettings | None:
    """The settings of the server this (HTTP) process runs, from SGLang's runtime context."""
    try:
        from sglang.srt.runtime_context import get_server_args

        return settings_of(get_server_args())
    except Exception:  # nothing published in this process (tools, tests)
        return None


def check_sampling_params(sampling_params, server: ServerSettings | None, vocab_size: int | None = None) -> None:
    """A bad ``custom_params["vlcache"]``, a request asking for compression from a server that
    cannot compress, and on a vlcache server beam search (``beam_width`` > 1) and
    ``stop_token_ids`` outside the vocabulary: ``ValueError``."""
    from vlcache_sglang.compatibility import not_compressing_message
    from vlcache_sglang.policy_resolution import check_request
    from vlcache_sglang.settings import check_request_sharing

    if server is not None and int(getattr(sampling_params, "beam_width", 0) or 0) > 1:
        # beam rows alias the leader's (compacted) row and ride the decode batch without a request
        # of their own: before this check one beam request killed the scheduler, budget 1.0 too
        raise ValueError(f"beam_width {sampling_params.beam_width}: beam search is not supported by "
                         "--attention-backend vlcache; drop beam_width (use n for several samples), or serve "
                         "beam search with --attention-backend flashinfer/triton")
    stops = getattr(sampling_params, "stop_token_ids", None) or ()
    if server is not None and vocab_size and any(not 0 <= int(t) < vocab_size for t in stops):
        # SGLang checks logit_bias ids, not these: with min_new_tokens its penalizer scatters them
        # into a vocabulary-sized tensor and the scheduler dies (torch_native too)
        raise ValueError(f"stop_token_ids must be in [0, {vocab_size - 1}], got {sorted(stops)}")
    settings = server.compression if server is not None else CompressionSettings()
    try:
        policy = check_request(settings, sampling_params.custom_params)
        if policy is not None and server is not None:
            check_request_sharing(server, settings.with_request(sampling_params.custom_params).sharing)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    if policy is not None and server is not None and not server.compresses \
            and policy.alpha < 1.0 and policy.method != "full":
        raise ValueError(not_compressing_message())


def verify_request(result, sampling_params, *args, **kwargs):
    """After ``SamplingParams.verify(vocab_size)`` in the HTTP process: :func:`check_sampling_params` (a 400)."""
    vocab_size = args[0] if args else kwargs.get("vocab_size")
    check_sampling_params(sampling_params, serving_settings(), vocab_size)
    return result

def _values(value) -> list:
    """A field of a single or a batch request, as a list."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def check_generate_request(obj) -> None:
    """The request fields (outside ``sampling_params``) a vlcache server answers with a 400.

    - ``extra_key`` / ``lora_id`` naming the plugin's radix namespace (``vlcache:``): compressed
      prefixes are cached under ``[user key|]vlcache:<policy digest>``; a request sending that key
      itself would read another request's compressed KV while being served as stock.
    - ``token_indices_to_pool`` without ``logprob_start_len`` 0 (as ``/v1/score`` sends it): the
      indices count from the prompt's start but are read from the rows this forward computes, so
      with the prompt cached SGLang 0.5.23's scheduler dies on an IndexError, whatever the backend.
    """
    from vlcache_sglang.backend.request_info import NAMESPACE_PREFIX

    for name in ("extra_key", "lora_id"):
        if any(NAMESPACE_PREFIX in str(v) for v in _values(getattr(obj, name, None))):
            raise ValueError(f"{name} may not contain {NAMESPACE_PREFIX!r}: --attention-backend vlcache keeps "
                             f"compressed prefixes under that radix namespace; choose another {name}")
    pools, starts = getattr(obj, "token_indices_to_pool", None), getattr(obj, "logprob_start_len", None)
    if getattr(obj, "is_single", True):
        pools, starts = [pools], [starts]
    elif not isinstance(starts, list):
        starts = [starts] * len(pools or [])
    if any(p is not None and s != 0 for p, s in zip(pools or [], starts)):
        raise ValueError("token_indices_to_pool needs logprob_start_len 0 (as /v1/score sends it): with a cached "
                         "prompt the indices point past the rows computed (SGLang's scheduler would stop)")


def verify_generate_request(result, obj, *args, **kwargs):
    """After SGLang normalized a ``GenerateReqInput`` in the HTTP process: :func:`check_generate_request`
    on a vlcache server (a ``ValueError`` is SGLang's 400)."""
    if serving_settings() is not None:
        check_generate_request(obj)
    return result
