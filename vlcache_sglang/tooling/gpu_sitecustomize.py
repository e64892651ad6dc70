"""``sitecustomize`` of the GPU kit's site folder (``gpu_kit install`` copies it to ``out/gpu-site``).

Standard library only. It adapts SGLang 0.5.23 to what the lent GPU machine lacks, and nothing else:

* ``nvidia-cutlass-dsl`` (the ``cutlass`` package, hundreds of MB) is not in the kit, but on CUDA
  every Qwen2 MLP builds a ``DualGemm`` whose ``_select_mode`` imports
  ``sglang.kernels.ops.gemm.cutedsl_dual_gemm`` (``import cutlass``) unconditionally; the first GPU
  run's servers died there. When that import fails, the mode is ``None``: SGLang's own choice for
  any layer the fused kernel does not serve (its gate-up and down GEMMs run as two plain GEMMs).

* a server that hangs says where: ``SIGUSR1`` writes every thread's Python stack of the process
  to its stderr, the server log (``faulthandler``). ``serving`` sends it to a server's process
  group before stopping one that never became ready (the first GPU run's vlcache server sat in
  its first request for 50 s and left no clue).

Applied by a post-import hook, so SGLang is not imported at interpreter start; it runs in every
process that has the site folder on ``PYTHONPATH`` (the stock and the vlcache servers alike, so
their comparison stays like for like). Logged once per process.
"""
from __future__ import annotations

import faulthandler
import importlib.abc
import importlib.machinery
import logging
import signal
import sys

DUAL_GEMM_MODULE = "sglang.srt.layers.dual_gemm"
_logger = logging.getLogger("vlcache_sglang.gpu_profile")


def patch_dual_gemm(module) -> None:
    """``DualGemm._select_mode`` returns ``None`` where its CuTe-DSL kernel cannot be imported."""
    cls = module.DualGemm
    original = cls._select_mode
    if getattr(original, "_vlcache_gpu_profile", False):
        return
    warned = []

    def _select_mode(self, gate_up_proj, hidden_size):
        try:
            return original(self, gate_up_proj, hidden_size)
        except ImportError as exc:
            if not warned:
                warned.append(True)
                _logger.warning("GPU kit profile: DualGemm off (%s: nvidia-cutlass-dsl is not installed); "
                                "the MLP runs its gate-up and down GEMMs separately", exc)
            self.max_tokens = 0
            return None

    _select_mode._vlcache_gpu_profile = True
    cls._select_mode = _select_mode


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`patch_dual_gemm` right after SGLang's ``dual_gemm`` module is executed."""

    def find_spec(self, name, path=None, target=None):
        if name != DUAL_GEMM_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        patch_dual_gemm(module)


def install() -> None:
    if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


install()
