"""The policy search space as Optuna distributions, and the mapping of a trial to a PolicyConfig.

Searched (PolicyConfig field names): ``alpha`` (budget ratio, log scale), ``window_mode`` with its
length (``window_size`` for ``last_w``; ``max_window`` cap for ``post_vision``, 0 = no cap),
``sparsity_threshold`` (log), ``recent_share`` and ``recent_window`` (one recent window shared by
every layer, or the paper's per-layer share of each budget), ``clip_min``, ``clip_max``, ``granularity``
with, for ``head``, its ``head_budget`` split (uniform, or AdaKV's adaptive one with its
``head_floor``), ``pool_kernel``, ``redistribute``. ``--fix name=value`` pins a parameter (or any other
PolicyConfig field) and removes it from the search. The clip ranges follow the alpha range so
every sampled point is a valid policy (``clip_min <= alpha <= clip_max``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from vlcache_sglang.policy import PolicyConfig, PolicyConfigError

#: parameters that only exist under one value of another: name -> (parent, value). A parent comes
#: first; one that is inactive or fixed elsewhere has its PolicyConfig default.
CONDITIONAL = {"window_size": ("window_mode", "last_w"), "max_window": ("window_mode", "post_vision"),
               "head_budget": ("granularity", "head"), "head_floor": ("head_budget", "adaptive")}
_DEFAULTS = PolicyConfig().to_dict()


def _active(name: str, values: Mapping[str, Any]) -> bool:
    """Whether ``name`` means anything given the other values (its parents' chain holds)."""
    if name not in CONDITIONAL:
        return True
    parent, needs = CONDITIONAL[name]
    return _active(parent, values) and values.get(parent, _DEFAULTS[parent]) == needs


class SpaceError(ValueError):
    """A bad ``--fix`` value or alpha range."""


def default_distributions(alpha_lo: float = 0.02, alpha_hi: float = 0.5) -> dict[str, BaseDistribution]:
    """The full search space for an alpha range."""
    if not 0.0 < alpha_lo < alpha_hi <= 1.0:
        raise SpaceError(f"alpha range must satisfy 0 < low < high <= 1, got [{alpha_lo}, {alpha_hi}]")
    return {
        "alpha": FloatDistribution(alpha_lo, alpha_hi, log=True),
        "window_mode": CategoricalDistribution(["post_vision", "last_w"]),
        "window_size": IntDistribution(8, 64, step=8),
        "max_window": CategoricalDistribution([0, 8, 16, 32]),
        "sparsity_threshold": FloatDistribution(1e-3, 0.1, log=True),
        "recent_share": FloatDistribution(0.0, 0.3),
        "recent_window": CategoricalDistribution(["shared", "per_layer"]),
        "clip_min": FloatDistribution(0.0, min(0.02, alpha_lo)),
        "clip_max": FloatDistribution(max(0.5, alpha_hi), 1.0) if alpha_hi < 1.0 else CategoricalDistribution([1.0]),
        "granularity": CategoricalDistribution(["layer", "head"]),
        "head_budget": CategoricalDistribution(["uniform", "adaptive"]),
        "head_floor": FloatDistribution(0.05, 0.5),
        "pool_kernel": CategoricalDistribution([1, 3, 5, 7]),
        "redistribute": CategoricalDistribution([True, False]),
    }


def parse_fixed(pairs: list[str] | None) -> dict[str, Any]:
    """``["granularity=layer", "alpha=0.1"]`` -> ``{"granularity": "layer", "alpha": 0.1}`` (JSON values)."""
    out: dict[str, Any] = {}
    names = set(PolicyConfig().to_dict())
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpaceError(f"--fix expects name=value, got {pair!r}")
        if key not in names:
            raise SpaceError(f"--fix {key}: not a policy field; allowed: {', '.join(sorted(names))}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[key] = value
    return out


@dataclass(frozen=True)
class SearchSpace:
    """Distributions to sample plus fixed PolicyConfig fields (``method`` among them)."""

    distributions: Mapping[str, BaseDistribution]
    fixed: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, method: str = "vlcache", fixed: Mapping[str, Any] | None = None,
              alpha_range: tuple[float, float] = (0.02, 0.5)) -> "SearchSpace":
        fixed = {"method": method, **dict(fixed or {})}
        dists = {k: v for k, v in default_distributions(*alpha_range).items() if k not in fixed}
        for name, (parent, needs) in CONDITIONAL.items():  # parents first: a fixed or dropped one
            if parent not in dists and fixed.get(parent, _DEFAULTS[parent]) != needs:
                dists.pop(name, None)
        space = cls(dists, fixed)
        try:  # fail now, not in trial 1: fixed values with the widest sampled values
            for extreme in (0, -1):
                space.to_policy({k: _edge(d, extreme) for k, d in dists.items()})
        except PolicyConfigError as exc:
            raise SpaceError(f"--fix values do not make a valid policy with this search space: {exc}") from None
        return space

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Ask the trial for every active parameter (window length conditional on the mode)."""
        params: dict[str, Any] = {}
        for name, dist in self.distributions.items():
            if name not in CONDITIONAL:
                params[name] = suggest(trial, name, dist)
        for name in CONDITIONAL:  # parents first
            if name in self.distributions and _active(name, {**self.fixed, **params}):
                params[name] = suggest(trial, name, self.distributions[name])
        return params

    def to_policy(self, params: Mapping[str, Any]) -> PolicyConfig:
        """The PolicyConfig of a parameter set (``max_window`` 0 means no cap)."""
        values = {**self.fixed, **params}
        if values.get("max_window") == 0:
            values["max_window"] = None
        for name in CONDITIONAL:  # inactive conditionals keep the default
            if name in params and not _active(name, values):
                values.pop(name)
        return PolicyConfig().replace(**values)

    def params_for(self, policy: PolicyConfig) -> dict[str, Any] | None:
        """The parameters that reproduce ``policy`` in this space, or None if it lies outside."""
        fields = policy.to_dict()
        if any(fields.get(k) != v for k, v in self.fixed.items()):
            return None
        if fields.get("max_window") is None:
            fields["max_window"] = 0
        fields["pool_kernel"] = policy.resolved_pool_kernel()
        params = {}
        for name, dist in self.distributions.items():
            if not _active(name, fields):
                continue
            if not _inside(dist, fields[name]):
                return None
            params[name] = fields[name]
        return params

    def signature(self) -> dict[str, Any]:
        """JSON-able description used to refuse resuming a study with another space."""
        return {"distributions": {k: json.loads(distribution_to_json(d)) for k, d in sorted(self.distributions.items())},
                "fixed": dict(sorted(self.fixed.items()))}


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """``trial.suggest_*`` for ``dist``."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    raise TypeError(f"unsupported distribution {dist!r}")


def _inside(dist: BaseDistribution, value: Any) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not dist.low <= value <= dist.high:
        return False
    return not (isinstance(dist, IntDistribution) and (value - dist.low) % dist.step)


def _edge(dist: BaseDistribution, which: int) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[which]
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return dist.low if which == 0 else dist.high
    raise TypeError(f"unsupported distribution {dist!r}")
