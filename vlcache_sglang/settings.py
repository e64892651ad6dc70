"""Server-wide and per-request compression settings (no SGLang import).

Launch time, either on the stock command line (flags added by the plugin)::

    python -m sglang.launch_server ... --attention-backend vlcache \\
        --vlcache-budget 0.1 --vlcache-method vlcache --vlcache-config tuned.json

or through the environment (``VLCACHE_BUDGET``, ``VLCACHE_METHOD``, ``VLCACHE_CONFIG``), which is
also how the launch flags reach SGLang's spawned scheduler processes.

Per request, inside ``custom_params`` (OpenAI ``extra_body={"custom_params": {...}}`` or
``/generate``'s ``sampling_params.custom_params``)::

    {"vlcache": {"budget": 0.05, "method": "snapkv"}}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

ENV_BUDGET = "VLCACHE_BUDGET"
ENV_METHOD = "VLCACHE_METHOD"
ENV_CONFIG = "VLCACHE_CONFIG"
ENV_SHARING = "VLCACHE_SHARING"
REQUEST_KEY = "vlcache"
#: Request keys that are not policy fields: ``return_plan`` adds the kept positions per layer to
#: the response's ``meta_info`` (``vlcache_kept_positions``), for tests and debugging; ``sharing``
#: picks how the radix tree shares this request's KV (see :data:`SHARING_MODES`).
REQUEST_ONLY_KEYS = frozenset({"return_plan", "sharing"})
#: Radix sharing of compressing requests (with the ``vlcache`` radix cache):
#: ``off`` (default): nothing of a compressing request enters the tree; all of its own prompt is
#: compacted, so it holds only its kept cells, and its answer never depends on what is cached;
#: ``prefix``: the uncompressed prefix before the statistics window enters the tree (shared with
#: every request) and stays in place: each question selects from the full image exactly as
#: unshared, but the image is held uncompressed (good for many questions on one image, no memory
#: saving for an image asked about once);
#: ``compressed``: the compressed prompt and answer enter the tree under a namespace keyed by the
#: policy, so later turns and repeats reuse the compressed KV (smallest, but selected without the
#: new question: a repeat's first token is computed over the compressed cache).
SHARING_MODES = ("off", "prefix", "compressed")

#: Compression methods the backend can be asked for (policy registry names).
METHODS = ("vlcache", "snapkv", "pyramidkv", "h2o", "streamingllm", "random", "full")


class SettingsError(ValueError):
    """A compression setting is invalid; the message names the setting and what is allowed."""


@dataclass(frozen=True)
class CompressionSettings:
    """What a request is compressed with: budget ratio alpha, method, extra policy fields."""

    budget: float = 1.0
    method: str = "vlcache"
    config_path: str | None = None
    sharing: str = "off"
    policy_overrides: Mapping[str, Any] = field(default_factory=dict)

    def validate(self) -> "CompressionSettings":
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0.0 < b <= 1.0:
            raise SettingsError(f"vlcache budget must be a number in (0, 1], got {b!r}")
        if self.method not in METHODS:
            raise SettingsError(f"vlcache method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.config_path is not None and not os.path.isfile(self.config_path):
            raise SettingsError(f"vlcache config file not found: {self.config_path!r}")
        if self.sharing not in SHARING_MODES:
            raise SettingsError(f"vlcache sharing must be one of {', '.join(SHARING_MODES)}; got {self.sharing!r}")
        return self

    @property
    def compresses(self) -> bool:
        return self.budget < 1.0 and self.method != "full"

    # -- sources --------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "CompressionSettings":
        kwargs: dict[str, Any] = {}
        if environ.get(ENV_BUDGET):
            try:
                kwargs["budget"] = float(environ[ENV_BUDGET])
            except ValueError:
                raise SettingsError(f"{ENV_BUDGET} must be a number in (0, 1], got {environ[ENV_BUDGET]!r}") from None
        if environ.get(ENV_METHOD):
            kwargs["method"] = environ[ENV_METHOD]
        if environ.get(ENV_CONFIG):
            kwargs["config_path"] = environ[ENV_CONFIG]
        if environ.get(ENV_SHARING):
            kwargs["sharing"] = environ[ENV_SHARING]
        return cls(**kwargs).validate()

    def to_env(self) -> dict[str, str]:
        env = {ENV_BUDGET: repr(float(self.budget)), ENV_METHOD: self.method, ENV_SHARING: self.sharing}
        if self.config_path:
            env[ENV_CONFIG] = os.path.abspath(self.config_path)
        return env

    def with_request(self, custom_params: Mapping[str, Any] | None) -> "CompressionSettings":
        """These settings overridden by a request's ``custom_params["vlcache"]`` (validated)."""
        overrides = parse_request_overrides(custom_params)
        if not overrides:
            return self
        policy = dict(self.policy_overrides)
        policy.update({k: v for k, v in overrides.items()
                       if k not in ("budget", "method") and k not in REQUEST_ONLY_KEYS})
        return replace(
            self, budget=overrides.get("budget", self.budget), method=overrides.get("method", self.method),
            sharing=overrides.get("sharing", self.sharing), policy_overrides=policy,
        ).validate()

    def describe(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {})}, sort_keys=True)


def parse_request_overrides(custom_params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Extract and type-check ``custom_params["vlcache"]``; raises :class:`SettingsError`."""
    if not custom_params or REQUEST_KEY not in custom_params:
        return {}
    raw = custom_params[REQUEST_KEY]
    if not isinstance(raw, Mapping):
        raise SettingsError(f'custom_params["{REQUEST_KEY}"] must be an object like {{"budget": 0.1}}, got {raw!r}')
    out = dict(raw)
    for key, value in out.items():
        if not isinstance(key, str) or not (value is None or isinstance(value, (bool, int, float, str))):
            raise SettingsError(f'custom_params["{REQUEST_KEY}"][{key!r}] must be a JSON scalar, got {value!r}')
    if "budget" in out:
        CompressionSettings(budget=out["budget"]).validate()
    if "method" in out:
        CompressionSettings(method=out["method"]).validate()
    if "sharing" in out:
        CompressionSettings(sharing=out["sharing"]).validate()
    return out
