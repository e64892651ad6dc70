"""SGLang plugin entry point (group ``sglang.srt.plugins``): ``--attention-backend vlcache``.

SGLang calls :func:`register` in the launcher (before argument parsing), in every scheduler
process and in the detokenizer, then applies the registered hooks. Everything the plugin does to
SGLang is declared in :data:`vlcache_sglang.hooks.HOOKS`; no SGLang file is patched.
"""
from __future__ import annotations

from vlcache_sglang.launch_hooks import BACKEND_NAME

__all__ = ["BACKEND_NAME", "register"]


def register() -> None:
    """Install :data:`~vlcache_sglang.hooks.HOOKS` (idempotent). A target SGLang no longer has
    makes ``--attention-backend vlcache`` launches stop with a message naming it."""
    from vlcache_sglang.hooks import install

    install()
