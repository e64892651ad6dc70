"""Turn launch settings plus a request's overrides into a validated :class:`PolicyConfig`.

Precedence (later wins): PolicyConfig defaults < the tuned config file (``--vlcache-config``)
< launch flags (``--vlcache-budget``, ``--vlcache-method``) < the request's
``custom_params["vlcache"]`` (``budget`` maps to ``alpha``; any other PolicyConfig field by name).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping

from vlcache_sglang.policy import PolicyConfig, PolicyConfigError
from vlcache_sglang.settings import CompressionSettings, SettingsError, parse_request_overrides


@lru_cache(maxsize=16)
def _base_config(config_path: str | None) -> PolicyConfig:
    if not config_path:
        return PolicyConfig()
    try:
        return PolicyConfig.load(config_path)
    except (OSError, ValueError) as exc:
        raise SettingsError(f"vlcache config {config_path!r} is not a valid policy file: {exc}") from None


@lru_cache(maxsize=256)
def _resolve(config_path: str | None, budget: float, method: str, extra: tuple) -> PolicyConfig:
    try:
        return _base_config(config_path).replace(alpha=budget, method=method, **dict(extra))
    except PolicyConfigError as exc:
        raise SettingsError(f"vlcache: {exc}") from None


def resolve_request(settings: CompressionSettings, custom_params: Mapping[str, Any] | None = None
                    ) -> tuple[CompressionSettings, PolicyConfig]:
    """A request's settings (server defaults with its overrides) and the policy it runs with,
    from one parse of its ``custom_params`` (raises :class:`SettingsError` on a bad value)."""
    s = settings.with_request(custom_params)
    extra = tuple(sorted(s.policy_overrides.items()))
    return s, _resolve(s.config_path, float(s.budget), s.method, extra)


def resolve_policy(settings: CompressionSettings, custom_params: Mapping[str, Any] | None = None) -> PolicyConfig:
    """The policy one request runs with (raises :class:`SettingsError` on a bad value)."""
    return resolve_request(settings, custom_params)[1]


def check_request(settings: CompressionSettings, custom_params: Mapping[str, Any] | None) -> PolicyConfig | None:
    """Validate a request's overrides fully (used where a 400 can still be returned): the policy
    they give, None when the request has none (the server's defaults, validated at launch)."""
    if parse_request_overrides(custom_params):
        return resolve_policy(settings, custom_params)
    return None
