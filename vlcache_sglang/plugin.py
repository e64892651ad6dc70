"""SGLang plugin entry point (group ``sglang.srt.plugins``): ``--attention-backend vlcache``.

SGLang calls :func:`register` in the launcher (before argument parsing), in every scheduler
process and in the detokenizer. Everything here is registration; no SGLang file is patched.
"""
from __future__ import annotations

import logging
import os

from vlcache_sglang.settings import CompressionSettings, SettingsError, parse_request_overrides

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
    register_attention_backend(BACKEND_NAME)(create_vlcache_backend)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args, HookType.AFTER)
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify", _verify_request, HookType.AFTER)


# -- launch flags -------------------------------------------------------------------------
def _add_cli_args(result, parser, *args, **kwargs):
    group = parser.add_argument_group("vlcache", "VL-Cache KV compression (vlcache-sglang plugin)")
    group.add_argument("--vlcache-budget", type=float, default=None,
                       help="KV budget ratio alpha in (0, 1]; 1.0 keeps everything (default: $VLCACHE_BUDGET or 1.0)")
    group.add_argument("--vlcache-method", type=str, default=None,
                       help="compression method: vlcache, snapkv, pyramidkv, h2o, streamingllm, random, full")
    group.add_argument("--vlcache-config", type=str, default=None,
                       help="a tuned policy configuration (JSON) written by tune.py")
    return result


def _from_cli_args(server_args, cls, args, *rest, **kwargs):
    """Validate the vlcache flags at launch and export them for the scheduler processes."""
    base = CompressionSettings.from_env()
    settings = CompressionSettings(
        budget=base.budget if getattr(args, "vlcache_budget", None) is None else args.vlcache_budget,
        method=getattr(args, "vlcache_method", None) or base.method,
        config_path=getattr(args, "vlcache_config", None) or base.config_path,
    ).validate()  # SettingsError here stops the launch with a readable message
    os.environ.update(settings.to_env())
    if getattr(server_args, "attention_backend", None) == BACKEND_NAME:
        logger.info("vlcache settings: %s", settings.describe())
    return server_args


# -- per-request overrides ----------------------------------------------------------------
def _verify_request(result, sampling_params, *args, **kwargs):
    """Reject a bad ``custom_params["vlcache"]`` in the HTTP process: a 400, not a crash."""
    try:
        parse_request_overrides(sampling_params.custom_params)
    except SettingsError as exc:
        raise ValueError(str(exc)) from None
    return result
