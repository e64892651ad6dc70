"""Placeholder for ``sgl_kernel`` on a machine with neither CUDA nor a real sgl-kernel build.

SGLang 0.5.23's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports names from ``sgl_kernel`` at
module import time, but PyPI has no CPU build of it. Every attribute here resolves to a
function that raises ``NotImplementedError`` when *called*, so imports succeed and any kernel
actually reached fails loudly instead of computing something wrong. With the CPU engine and
no AMX registration (``convert_weight_packed`` is deliberately absent from the op names), the
layers take their native torch paths and none of these is called.

Activated only by ``vlcache_sglang_cpu_bootstrap`` (see ``vlcache_sglang/cpu_runtime/bootstrap.py``).
"""
from __future__ import annotations

__version__ = "0.0.0+vlcache.placeholder"
IS_PLACEHOLDER = True


def _missing(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is the CPU placeholder for sgl_kernel "
            "(no CUDA, no real sgl-kernel build). Install sgl-kernel on a CUDA machine."
        )

    kernel.__name__ = name
    kernel.__qualname__ = name
    return kernel


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
