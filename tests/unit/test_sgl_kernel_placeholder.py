"""The sgl_kernel placeholder answers every import SGLang makes on CUDA, and any kernel reached raises.

On CUDA SGLang 0.5.23 imports ``sgl_kernel`` and its submodules unconditionally (activation,
layernorm, ``sgl_kernel.quantization`` via GGUF, ``sgl_kernel.kvcacheio``, ...), and the lent GPU
machine has no sgl-kernel. The rehearsal below imports the server's modules in a process where
torch reports a CUDA device, with the placeholder on ``sys.path`` as ``scripts/gpu_session.sh``
puts it: before the placeholder served submodules this failed on ``sgl_kernel.quantization``.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.fake_cuda import PRELUDE
from vlcache_sglang.tooling.gpu_kit import SGL_KERNEL_PLACEHOLDER

REPO = Path(__file__).resolve().parents[2]
#: what a ``--attention-backend vlcache`` server process imports on the Qwen2-VL path
SERVER_MODULES = [
    "sglang.srt.layers.activation", "sglang.srt.layers.layernorm", "sglang.srt.layers.sampler",
    "sglang.srt.mem_cache.memory_pool", "sglang.srt.mem_cache.memory_pool_host",
    "sglang.srt.layers.rotary_embedding", "sglang.srt.models.qwen2_vl", "sglang.srt.model_executor.model_runner",
    "sglang.srt.managers.scheduler", "sglang.srt.entrypoints.engine", "sglang.srt.entrypoints.http_server",
    "sglang.srt.layers.attention.vision", "vlcache_sglang.plugin", "vlcache_sglang.backend.attention_backend",
]

FAKE_CUDA = PRELUDE + textwrap.dedent("""
    import importlib, sys
    sys.path.insert(0, sys.argv[1])
    failed = []
    for name in sys.argv[2:]:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    import sgl_kernel
    assert getattr(sgl_kernel, "IS_PLACEHOLDER", False), sgl_kernel
    print("FAILED" if failed else "ALL IMPORTED", *failed, sep="\\n")
""")


def test_server_modules_import_as_on_cuda_with_the_placeholder():
    pytest.importorskip("sglang")
    proc = subprocess.run([sys.executable, "-c", FAKE_CUDA, str(REPO / SGL_KERNEL_PLACEHOLDER), *SERVER_MODULES],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SGLANG_FORCE_FUSED_OP_BACKEND": "torch",
                               "HOME": str(Path.home())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ALL IMPORTED" in proc.stdout, proc.stdout[-3000:]


def _fresh_placeholder(monkeypatch):
    for name in [n for n in sys.modules if n == "sgl_kernel" or n.startswith("sgl_kernel.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(REPO / SGL_KERNEL_PLACEHOLDER))
    import sgl_kernel

    return sgl_kernel


def test_any_submodule_imports_and_its_kernels_raise_naming_themselves(monkeypatch):
    sgl_kernel = _fresh_placeholder(monkeypatch)
    assert sgl_kernel.IS_PLACEHOLDER
    from sgl_kernel.kvcacheio import transfer_kv_direct
    from sgl_kernel.quantization.deep import anything

    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.kvcacheio\.transfer_kv_direct was called"):
        transfer_kv_direct(1, 2)
    with pytest.raises(NotImplementedError, match="quantization.deep.anything"):
        anything()
    with pytest.raises(NotImplementedError, match=r"sgl_kernel\.rmsnorm was called"):
        sgl_kernel.rmsnorm()
    import torch

    with pytest.raises(NotImplementedError, match="silu_and_mul_cpu"):
        torch.ops.sgl_kernel.silu_and_mul_cpu(torch.zeros(2))


def test_submodules_sglang_has_fallbacks_for_stay_absent(monkeypatch):
    """``sglang/srt/layers/quantization/utils.py`` mocks the GPTQ scalar types when
    ``sgl_kernel.scalar_type`` is missing; a placeholder there would break its attribute reads."""
    _fresh_placeholder(monkeypatch)
    with pytest.raises(ImportError):
        importlib.import_module("sgl_kernel.scalar_type")
