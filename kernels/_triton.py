"""How this package turns its kernel functions into launchable Triton kernels.

The kernels are written as plain Python functions and wrapped on first use, per device:

* tensors on CUDA -> ``triton.runtime.jit.JITFunction`` (compiled; what ``@triton.jit`` gives);
* tensors on the CPU, or ``TRITON_INTERPRET=1`` -> Triton's interpreter
  (``triton.runtime.interpreter.InterpretedFunction``; what ``@triton.jit`` gives under
  ``TRITON_INTERPRET=1``).

So the choice does not depend on *when* ``triton`` or this package was imported (``@triton.jit``
reads ``TRITON_INTERPRET`` once, at decoration time, and in one pytest process something else may
import triton first). Only features that both the interpreter of triton 3.9 and the compiler of
triton 3.6 support are used: ``tl.load/store`` with masks, ``tl.dot`` (fp32 accumulation,
``input_precision="ieee"`` for fp32 inputs), ``tl.where``, ``tl.max/sum``, ``tl.exp2/log2``,
``range`` loops with runtime bounds, ``tl.atomic_add`` on int64 (integer sums: the result does
not depend on the programs' order). No float atomics (they would make results depend on the
schedule), no helper ``@jit`` functions (each kernel is one function), no global non-constexpr
constants.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

_CACHE: dict[tuple[Callable, bool], object] = {}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - triton is a torch dependency on Linux
        return False
    return True


def interpret_for(device: torch.device) -> bool:
    """Whether a launch on tensors of ``device`` goes through the interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel(fn: Callable, device: torch.device):
    """The launchable kernel for ``fn`` on ``device`` (``kernel(fn, dev)[grid](*args)``)."""
    interp = interpret_for(device)
    key = (fn, interp)
    k = _CACHE.get(key)
    if k is None:
        if interp:
            from triton.runtime.interpreter import InterpretedFunction

            k = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            k = JITFunction(fn)
        _CACHE[key] = k
    return k


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
