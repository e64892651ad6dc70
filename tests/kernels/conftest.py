"""Kernel tests: Triton's interpreter on CPU-only machines, compiled kernels on CUDA.

``TRITON_INTERPRET=1`` is set here when CUDA is absent, but the kernels do not rely on it: they
pick the interpreter for CPU tensors at launch (``kernels/_triton.py``), so it does
not matter whether SGLang (which imports triton) was imported earlier in the same pytest process.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA when present (compiled kernels), else the CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")
