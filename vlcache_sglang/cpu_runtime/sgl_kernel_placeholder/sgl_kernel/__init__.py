"""Placeholder for ``sgl_kernel`` where no real sgl-kernel build is installed.

SGLang 0.5.23 imports names from ``sgl_kernel`` and its submodules (``sgl_kernel.quantization``,
``sgl_kernel.kvcacheio``, ...) at module import time: its CPU engine (``SGLANG_USE_CPU_ENGINE=1``)
and every CUDA code path. PyPI has no CPU build of it, and the CUDA build (about 355 MB, built for
torch 2.14.1) cannot reach the lent GPU machine. Every attribute of this package and of any of its
submodules resolves to a function that raises ``NotImplementedError`` when *called*, so imports
succeed and any kernel actually reached fails loudly, naming itself, instead of computing
something wrong. With the CPU engine and no AMX registration (``convert_weight_packed`` is
deliberately absent from the op names), and on CUDA with SGLang's pure-torch fused ops
(``SGLANG_FORCE_FUSED_OP_BACKEND=torch``, the GPU profile in ``vlcache_sglang/tooling/gpu_kit.py``),
the layers take their torch paths; the GPU server smoke's log names any kernel still reached.

Importing it also names the ``torch.ops.sgl_kernel`` ops SGLang references at import time
(``../../sgl_kernel_ops.txt``), each raising when called.

Served by ``vlcache_sglang_cpu_bootstrap`` on CPU (``vlcache_sglang/cpu_runtime/bootstrap.py``)
and by the GPU profile's ``PYTHONPATH`` (``gpu_kit.SGL_KERNEL_PLACEHOLDER``) on the lent GPU.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

__version__ = "0.0.0+vlcache.placeholder"
IS_PLACEHOLDER = True
__path__: list[str] = []  # a package without a directory of submodules: the finder below serves them


def _missing(name: str):
    def kernel(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is the placeholder for sgl_kernel "
            "(no real sgl-kernel build is installed). Install sgl-kernel, or run the layer's torch path "
            "(SGLANG_FORCE_FUSED_OP_BACKEND=torch)."
        )

    kernel.__name__ = name.rsplit(".", 1)[-1]
    kernel.__qualname__ = kernel.__name__
    return kernel


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)


class _PlaceholderSubmodule(types.ModuleType):
    """``sgl_kernel.<sub>``: every public attribute is a kernel that raises when called."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(f"{self.__name__.removeprefix('sgl_kernel.')}.{name}")


#: submodules left absent (ImportError), because SGLang has its own fallback when they are missing
#: (``sglang/srt/layers/quantization/utils.py``: ``get_scalar_types`` mocks the GPTQ scalar types)
ABSENT_SUBMODULES = frozenset({"scalar_type"})


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any other ``sgl_kernel.<sub>[.<subsub>]`` import as a :class:`_PlaceholderSubmodule`."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("sgl_kernel.") or sys.modules.get("sgl_kernel") is not _this:
            return None
        if fullname.split(".")[1] in ABSENT_SUBMODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _PlaceholderSubmodule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        return None


def _name_torch_ops() -> None:
    import torch

    names_file = os.path.join(os.path.dirname(__file__), "..", "..", "sgl_kernel_ops.txt")
    namespace = torch.ops.sgl_kernel
    with open(names_file) as fh:
        for name in fh.read().split():
            setattr(namespace, name, _missing(name))


_this = sys.modules[__name__]
if not any(isinstance(f, _SubmoduleFinder) for f in sys.meta_path):
    sys.meta_path.append(_SubmoduleFinder())
_name_torch_ops()
