"""CPU runtime bootstrap, loaded from a ``.pth`` file in the project's CPU virtual environment.

Installed by ``scripts/setup_env.sh`` as ``vlcache_sglang_cpu_bootstrap`` (a standalone copy, so it
works before any editable-install finder is active). It only registers two import hooks and
never imports torch at interpreter start:

1. torchvision: PyPI's torchvision wheel is CUDA-linked; beside a ``+cpu`` torch its ``_C`` fails
   to load and ``torchvision._meta_registrations`` then raises
   ``operator torchvision::nms does not exist``. Right before that module is imported we define
   the ``nms``/``qnms`` schemas (with a pure-torch CPU ``nms``) when torchvision has no ops.
2. sgl_kernel: when something imports ``sgl_kernel``, no real one is installed and torch has no
   CUDA, serve the placeholder package shipped in ``vlcache_sglang/cpu_runtime`` (it serves any
   ``sgl_kernel.*`` submodule and names the ``torch.ops.sgl_kernel`` ops SGLang references at
   import time, each raising if called).
   On any machine with CUDA or a real sgl-kernel this hook does nothing.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_PLACEHOLDER_DIRNAME = os.path.join("vlcache_sglang", "cpu_runtime", "sgl_kernel_placeholder")
_keep_alive: list = []


def _define_torchvision_ops() -> None:
    import torch
    import torchvision.extension as ext

    if ext._has_ops():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    _keep_alive.append(lib)
    for name in ("nms", "qnms"):
        lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

    def nms_cpu(dets, scores, iou_threshold):
        if dets.numel() == 0:
            return torch.empty((0,), dtype=torch.long, device=dets.device)
        x1, y1, x2, y2 = dets.unbind(1)
        areas = (x2 - x1) * (y2 - y1)
        suppressed = torch.zeros(dets.size(0), dtype=torch.bool)
        keep = []
        for i in scores.argsort(descending=True).tolist():
            if suppressed[i]:
                continue
            keep.append(i)
            inter = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0) * (
                torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)
            ).clamp(min=0)
            suppressed |= inter / (areas[i] + areas - inter) > iou_threshold
        return torch.tensor(keep, dtype=torch.long, device=dets.device)

    lib.impl("nms", nms_cpu, "CPU")


def _placeholder_root() -> str | None:
    for entry in sys.path:
        candidate = os.path.join(entry or ".", _PLACEHOLDER_DIRNAME)
        if os.path.isdir(os.path.join(candidate, "sgl_kernel")):
            return candidate
    spec = importlib.util.find_spec("vlcache_sglang")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = os.path.join(loc, "cpu_runtime", "sgl_kernel_placeholder")
            if os.path.isdir(candidate):
                return candidate
    return None


class _CpuRuntimeFinder(importlib.abc.MetaPathFinder):
    _busy = False

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision._meta_registrations":
            _define_torchvision_ops()
            return None
        if name != "sgl_kernel" or self._busy:
            return None
        self._busy = True
        try:
            real = importlib.machinery.PathFinder.find_spec(name, path)
            if real is not None:
                return None
            import torch

            if torch.cuda.is_available():
                return None
            root = _placeholder_root()
            if root is None:
                return None
            # the placeholder names its own torch.ops and serves its submodules
            return importlib.machinery.PathFinder.find_spec(name, [root])
        finally:
            self._busy = False


if not any(isinstance(f, _CpuRuntimeFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _CpuRuntimeFinder())
