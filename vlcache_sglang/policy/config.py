"""Validated configuration of the compression policy (JSON in, JSON out).

Symbols follow VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317): ``alpha`` is the
whole-model retention ratio (docs/policy.md, Configuration), ``sparsity_threshold`` is the
row-relative filter ``p`` of the layer sparsity (Eq. for gamma), ``clip_min``/``clip_max`` are
the bounds of ``beta[l] = clip(d[l] / Z * alpha * L, 0.01, 1)``.

Fields set to ``None`` take the method's own default (see ``methods/``): SnapKV and PyramidKV
pool with kernel 5 and force-keep their observation window, VL-Cache does neither.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from typing import Any, Literal, Mapping

__all__ = ["PolicyConfig", "PolicyConfigError"]


class PolicyConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of its allowed range."""


WindowMode = Literal["post_vision", "last_w"]
TextOnly = Literal["identity", "last_w"]
Granularity = Literal["layer", "head"]
BudgetKind = Literal["adaptive", "uniform", "pyramid"]

_ENUMS: dict[str, tuple[Any, ...]] = {
    "window_mode": ("post_vision", "last_w"),
    "text_only": ("identity", "last_w"),
    "granularity": ("layer", "head"),
    "budget_fn": (None, "adaptive", "uniform", "pyramid"),
    "stats_dtype": ("float32", "float64"),
    "recent_window": ("shared", "per_layer"),
    "head_budget": ("uniform", "adaptive"),
}
_FLOATS = {"alpha", "sparsity_threshold", "recent_share", "clip_min", "clip_max", "pyramid_beta", "head_floor"}
_INTS = {"window_size", "max_window", "pool_kernel", "n_sink", "seed", "min_prompt_len",
         "key_chunk", "query_chunk"}
_BOOLS = {"protect_window", "redistribute", "h2o_normalize"}
_OPTIONAL = {"max_window", "pool_kernel", "protect_window", "budget_fn"}
#: keys of files saved before a rename -> the field's name now
_LEGACY_KEYS = {"budget": "budget_fn"}


@dataclass(frozen=True)
class PolicyConfig:
    """What to keep. Every field is a JSON scalar; ``validate()`` checks ranges.

    Attributes:
        method: registered method name (``available_methods()``).
        alpha: retention ratio in (0, 1]; the mean per-layer budget is ``alpha * m``.
        sparsity_threshold: ``p`` in [0, 1): ``A[q, j] < p * max_j' A[q, j']`` counts as zero.
        window_mode: ``"post_vision"`` (tokens after the last visual token) or ``"last_w"``.
        window_size: ``w``, length of the last-w window (also the post-vision fallback).
        max_window: optional cap on the post-vision window length (its last tokens are kept).
        text_only: prompts without images: ``"identity"`` (no compression) or ``"last_w"``.
        recent_share: share of a budget always kept as the most recent tokens (paper: 10%).
        recent_window: ``"shared"``: one window ``r = ceil(recent_share * alpha * m)`` for every
            layer, which is also every layer's budget floor (so a sparse layer on the floor keeps
            only recent tokens); ``"per_layer"`` (the paper's rule): each layer keeps
            ``max(1, floor(recent_share * k_l))`` recent tokens inside its own budget ``k_l``.
        protect_window: also force-keep the whole statistics window (None: method default).
        clip_min, clip_max: per-layer budget bounds as fractions of ``m`` (paper: 0.01, 1).
        redistribute: make the kept total exactly ``round(alpha * m * L)`` (water-filling
            of what clipping cuts or adds); the paper does not (False).
        budget_fn: override of the method's budget function (None: method default); not to be
            confused with the launch/request "budget", which is ``alpha``. Policy files saved
            with the old key ``budget`` still load (:meth:`from_dict`).
        granularity: ``"layer"`` (one kept set per layer) or ``"head"`` (one per KV head; the
            server holds them per head with ``--vlcache-cells head``, else their union per layer).
        head_budget: with ``granularity="head"``, how the layer's ``H * k_l`` splits over its KV
            heads: ``"uniform"`` (``k_l`` each) or ``"adaptive"`` (AdaKV: a floor of
            ``ceil(head_floor * k_l)`` each, the rest by the heads' own scores, one joint top-k).
        head_floor: the share of ``k_l`` every head keeps under ``head_budget="adaptive"`` (AdaKV's
            safeguard, 0.2; 1.0 is uniform).
        pool_kernel: odd 1-D average-pooling kernel over key scores (None: method default).
        pyramid_beta: PyramidKV's steepness ``beta`` (>= 1).
        n_sink: StreamingLLM's attention sinks.
        h2o_normalize: divide H2O's accumulated attention by the number of queries that see
            each key (kvpress ObservedAttentionPress); False = H2O's plain sum.
        seed: seed of the ``random`` method.
        min_prompt_len: prompts shorter than this stay uncompressed.
        key_chunk, query_chunk: chunk sizes of the statistics (memory ~ heads*q_chunk*k_chunk).
        stats_dtype: accumulation dtype of the statistics.
    """

    method: str = "vlcache"
    alpha: float = 0.1
    sparsity_threshold: float = 0.01
    window_mode: str = "post_vision"
    window_size: int = 50
    max_window: int | None = None
    text_only: str = "identity"
    recent_share: float = 0.1
    recent_window: str = "shared"
    protect_window: bool | None = None
    clip_min: float = 0.01
    clip_max: float = 1.0
    redistribute: bool = True
    budget_fn: str | None = None
    granularity: str = "layer"
    head_budget: str = "uniform"
    head_floor: float = 0.2
    pool_kernel: int | None = None
    pyramid_beta: float = 20.0
    n_sink: int = 4
    h2o_normalize: bool = False
    seed: int = 0
    min_prompt_len: int = 0
    key_chunk: int = 1024
    query_chunk: int = 128
    stats_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "PolicyConfig":
        """Check every field; raise :class:`PolicyConfigError` naming the field. Returns self."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        from vlcache_sglang.policy.methods import available_methods, get_method

        if self.method not in available_methods():
            raise PolicyConfigError(
                f"method: unknown method {self.method!r}; allowed: {', '.join(available_methods())}")
        for name, allowed in _ENUMS.items():
            if getattr(self, name) not in allowed:
                raise PolicyConfigError(
                    f"{name}: {getattr(self, name)!r} is not one of {', '.join(map(repr, allowed))}")
        _range("alpha", self.alpha, 0.0, 1.0, lo_open=True)
        _range("sparsity_threshold", self.sparsity_threshold, 0.0, 1.0, hi_open=True)
        _range("recent_share", self.recent_share, 0.0, 1.0)
        _range("head_floor", self.head_floor, 0.0, 1.0)
        _range("clip_min", self.clip_min, 0.0, 1.0)
        _range("clip_max", self.clip_max, 0.0, 1.0, lo_open=True)
        if self.clip_min > self.clip_max:
            raise PolicyConfigError(
                f"clip_min: {self.clip_min} must not exceed clip_max ({self.clip_max})")
        # alpha = 1 is the identity plan whatever the clip bounds (a tuned file may cap clip_max)
        if self.alpha < 1.0 and not self.clip_min <= self.alpha <= self.clip_max:
            raise PolicyConfigError(
                f"alpha: {self.alpha} must lie within [clip_min, clip_max] = "
                f"[{self.clip_min}, {self.clip_max}] (lower clip_min to go below it)")
        _int_min("window_size", self.window_size, 1)
        if self.max_window is not None:
            _int_min("max_window", self.max_window, 1)
        if self.pool_kernel is not None:
            _int_min("pool_kernel", self.pool_kernel, 1)
            if self.pool_kernel % 2 == 0:
                raise PolicyConfigError(f"pool_kernel: {self.pool_kernel} must be odd (1, 3, 5, ...)")
        if not math.isfinite(self.pyramid_beta) or self.pyramid_beta < 1:
            raise PolicyConfigError(f"pyramid_beta: {self.pyramid_beta} must be a finite number >= 1")
        _int_min("n_sink", self.n_sink, 0)
        _int_min("seed", self.seed, 0)
        _int_min("min_prompt_len", self.min_prompt_len, 0)
        _int_min("key_chunk", self.key_chunk, 1)
        _int_min("query_chunk", self.query_chunk, 1)
        method = get_method(self.method)
        if self.resolved_budget_fn() == "adaptive" and method.rows == "none":
            raise PolicyConfigError(
                f"budget_fn: 'adaptive' needs attention statistics, which method {self.method!r} "
                "does not gather; use 'uniform' or 'pyramid'")
        return self

    # ------------------------------------------------------- method-default resolution
    def resolved_budget_fn(self) -> str:
        """The budget function in force (``budget_fn`` or the method's default)."""
        from vlcache_sglang.policy.methods import get_method

        return self.budget_fn if self.budget_fn is not None else get_method(self.method).default_budget

    def resolved_pool_kernel(self) -> int:
        """The pooling kernel in force (``pool_kernel`` or the method's default)."""
        from vlcache_sglang.policy.methods import get_method

        return self.pool_kernel if self.pool_kernel is not None else get_method(self.method).default_pool_kernel

    def resolved_protect_window(self) -> bool:
        """Whether the statistics window is force-kept (``protect_window`` or method default)."""
        from vlcache_sglang.policy.methods import get_method

        if self.protect_window is not None:
            return self.protect_window
        return get_method(self.method).default_protect_window

    # ----------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON scalars."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """JSON text of :meth:`to_dict` (sorted keys)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PolicyConfig":
        """Build and validate from a mapping of JSON scalars; unknown keys are errors.

        A legacy key (``budget`` for ``budget_fn``) is accepted instead of the field's name.
        """
        if not isinstance(data, Mapping):
            raise PolicyConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        return cls().replace(**_renamed_legacy_keys(data))

    @classmethod
    def from_json(cls, text: str) -> "PolicyConfig":
        """Parse JSON text (an object of field names to scalars) and validate."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyConfigError(f"config: not valid JSON ({e})") from e
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PolicyConfig":
        """Read a JSON file written by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_json` to ``path``."""
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")

    def replace(self, **overrides: Any) -> "PolicyConfig":
        """A validated copy with ``overrides`` (JSON scalars, e.g. a request's extra params).

        Integers are accepted for float fields and integral floats for int fields.
        """
        names = {f.name for f in fields(self)}
        clean: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in names:
                raise PolicyConfigError(
                    f"{key}: unknown field; allowed: {', '.join(sorted(names))}")
            clean[key] = _coerce(key, value)
        return dataclasses.replace(self, **clean)  # __post_init__ validates


# ---------------------------------------------------------------------- helpers
def _renamed_legacy_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for old, new in _LEGACY_KEYS.items():
        if old in out:
            if new in out:
                raise PolicyConfigError(f"{new}: given twice, as {new!r} and as its old name {old!r}; keep one")
            out[new] = out.pop(old)
    return out


def _coerce(name: str, value: Any) -> Any:
    if value is None and name in _OPTIONAL:
        return None
    if name in _FLOATS and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if name in _INTS and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_type(name: str, value: Any) -> None:
    if value is None and name in _OPTIONAL:
        return
    if name in _FLOATS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif name in _INTS:
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif name in _BOOLS:
        ok = isinstance(value, bool)
        want = "true or false"
    else:
        ok = isinstance(value, str)
        want = "a string"
    if not ok:
        opt = " or null" if name in _OPTIONAL else ""
        raise PolicyConfigError(f"{name}: expected {want}{opt}, got {value!r}")


def _range(name: str, v: float, lo: float, hi: float, *, lo_open: bool = False,
           hi_open: bool = False) -> None:
    bad = (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi)
    if bad:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise PolicyConfigError(f"{name}: {v} is outside {interval}")


def _int_min(name: str, v: int, lo: int) -> None:
    if v < lo:
        raise PolicyConfigError(f"{name}: {v} must be an integer >= {lo}")
