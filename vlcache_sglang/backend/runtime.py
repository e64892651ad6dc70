"""What one scheduler process (one tensor-parallel rank) of a vlcache server holds.

The attention backend factory creates the :class:`Runtime` of its process and attaches it to the
two SGLang objects that every hook can reach: the KV allocator (shared by the model runner, the
scheduler, the radix tree and every batch) and the model (the vision-encoder hooks). The radix
cache factory finds it on the allocator it is given, so backend and tree meet through the
objects SGLang passes them, not through module globals; a hook that finds no runtime leaves
SGLang alone (a process that serves another backend).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vlcache_sglang.settings import ServerSettings

if TYPE_CHECKING:
    from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend
    from vlcache_sglang.backend.compressor import Compressor
    from vlcache_sglang.radix_cache import VLCacheRadixCache

#: attribute on SGLang's allocator and model that holds the process's :class:`Runtime`
RUNTIME_ATTR = "_vlcache_runtime"


@dataclass
class Runtime:
    """The process's settings, backend and (when it runs) the ``vlcache`` radix tree."""

    settings: ServerSettings
    backend: VLCacheAttnBackend
    tree: VLCacheRadixCache | None = None  # set by the radix cache factory (an enabled tree only)
    images_encoded: int = 0  # images through the vision tower (a radix hit skips the encoder)
    videos_encoded: int = 0
    freed_seen: int = 0  # kv_tokens_saved when admission was last reopened

    @property
    def compressor(self) -> Compressor | None:
        return self.backend.compressor

    @property
    def sharing_on(self) -> bool:
        """Compressing requests may enter the radix tree (the ``vlcache`` tree runs)."""
        return self.tree is not None


def attach(runtime: Runtime, *owners: Any) -> Runtime:
    for owner in owners:
        if owner is not None:
            setattr(owner, RUNTIME_ATTR, runtime)
    return runtime


def runtime_of(obj: Any) -> Runtime | None:
    """The runtime reachable from an SGLang object: itself (allocator, model) or the allocator it
    holds as ``token_to_kv_pool_allocator`` (scheduler, radix tree, model runner, batch)."""
    if obj is None:
        return None
    found = getattr(obj, RUNTIME_ATTR, None)
    if found is None:
        found = getattr(getattr(obj, "token_to_kv_pool_allocator", None), RUNTIME_ATTR, None)
    return found
