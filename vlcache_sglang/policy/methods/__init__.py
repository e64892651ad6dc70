"""Method registry: one file per method, each a score function plus a budget function."""

from __future__ import annotations

from vlcache_sglang.policy.methods.base import Method, ScoreContext

__all__ = ["Method", "ScoreContext", "available_methods", "get_method", "register_method"]

_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (``replace=True`` to override an existing name)."""
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(available_methods())}") from None


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


from vlcache_sglang.policy.methods import (  # noqa: E402  (registration side effects)
    full,
    h2o,
    pyramidkv,
    rand,
    snapkv,
    streamingllm,
    vlcache,
)

for _mod in (vlcache, snapkv, pyramidkv, h2o, streamingllm, rand, full):
    register_method(_mod.METHOD)
