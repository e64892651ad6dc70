"""The ahead-of-time FlashInfer build for the GPU session, where it runs without FlashInfer or nvcc:
the module list covers every head dim the session serves, the driver link stub links, the build
environment fills only the toolkit's gaps, and the session lists what it still had to compile."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from vlcache_sglang.fixtures.qwen2vl_7b_dummy import QWEN2_VL_7B, REHEARSAL
from vlcache_sglang.tooling.flashinfer_aot import (GPU_SESSION_HEAD_DIMS, build_environment, gpu_session_modules,
                                                   link_stub_dir)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_modules_cover_every_head_dim_the_session_serves():
    import gpu_server_smoke as smoke
    import gpu_suite

    served = {smoke.FLASHINFER_HEAD_DIM}
    served |= {cfg["hidden"] // cfg["heads"] for cfg in (QWEN2_VL_7B, REHEARSAL)}
    served |= {int(spec.split(",")[3]) for spec in gpu_suite.WARM_CONFIGS}
    assert served <= set(GPU_SESSION_HEAD_DIMS)
    mods = gpu_session_modules()
    for d in served:  # SGLang's stock backend: ragged FA3 (auto on Hopper), paged FA2, decode FA2
        assert {m.family for m in mods if m.head_dim == d} == {"prefill_fa2", "prefill_fa3", "decode"}
    assert [m.family for m in mods].count("cascade") == 1  # merge_state, head-dim independent


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_driver_stub_links_a_library_that_loads_the_real_driver(tmp_path):
    cuda_home = tmp_path / "cuda"
    (cuda_home / "lib64").mkdir(parents=True)
    stub = link_stub_dir(cuda_home, tmp_path / "stub")
    assert stub is not None and (stub / "libcuda.so").exists()
    src = tmp_path / "uses_driver.c"
    src.write_text("int cuInit(unsigned int);\nint init(void) { return cuInit(0); }\n")
    lib = tmp_path / "libuses_driver.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-Wl,--no-as-needed", str(src), f"-L{stub}", "-lcuda", "-o", str(lib)],
                   check=True)
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "[libcuda.so.1]" in needed  # the GPU machine's driver, by its soname
    (cuda_home / "lib64" / "stubs").mkdir()
    (cuda_home / "lib64" / "stubs" / "libcuda.so").write_bytes(b"")
    assert link_stub_dir(cuda_home, tmp_path / "stub2") is None  # a toolkit with its stubs needs none


def test_build_environment_fills_only_the_toolkits_gaps(tmp_path):
    cuda_home = tmp_path / "cuda"
    (cuda_home / "include").mkdir(parents=True)
    curand = tmp_path / "curand"
    env = build_environment(cuda_home, tmp_path / "ws", "9.0a", curand, tmp_path / "stub", 2)
    assert env["FLASHINFER_CUDA_ARCH_LIST"] == "9.0a" and env["FLASHINFER_WORKSPACE_BASE"] == str(tmp_path / "ws")
    assert env["FLASHINFER_EXTRA_CUDAFLAGS"] == f"-I{curand}"
    assert env["FLASHINFER_EXTRA_LDFLAGS"] == f"-L{tmp_path / 'stub'}"
    assert env["PATH"].startswith(str(cuda_home / "bin"))
    (cuda_home / "include" / "curand_kernel.h").write_text("")
    env = build_environment(cuda_home, tmp_path / "ws", "9.0a", curand, None, 2)
    assert "FLASHINFER_EXTRA_CUDAFLAGS" not in env and "FLASHINFER_EXTRA_LDFLAGS" not in env


def test_gpu_session_lists_the_modules_it_still_compiled(tmp_path):
    """gpu_session.sh, however it ends, counts FlashInfer's "Building JIT module" and "Failed to
    load AOT artifact" lines over its logs into flashinfer_jit_built.txt, and packs it with the
    rest of $OUT."""
    root = tmp_path / "tree"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "gpu_session.sh", root / "scripts")
    out = tmp_path / "out"
    (out / "phase").mkdir(parents=True)
    line = "flashinfer.jit: Building JIT module {}; this can take several minutes on first use.\n"
    (out / "phase" / "server_stock.log").write_text(line.format("cascade") + line.format("batch_decode_x"))
    failed = ("2026-12-05 - WARNING - core.py:548 - flashinfer.jit: Failed to load AOT artifact /x/aot/cascade/"
              "cascade.so: undefined symbol: cuLaunchKernelEx. Trying another provider or falling back to JIT build.\n")
    (out / "server_vlcache.log").write_text(line.format("cascade") + failed)
    (out / "notes.txt").write_text(line.format("not_a_log"))
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "STEPS": "", "PACK_TO": str(tmp_path / "s.tgz")}
    subprocess.run(["bash", str(root / "scripts" / "gpu_session.sh")], env=env, check=True, capture_output=True)
    counts = {ln.split(None, 1)[1]: int(ln.split()[0]) for ln in (out / "flashinfer_jit_built.txt").read_text().splitlines()}
    assert counts == {"Building JIT module cascade": 2, "Building JIT module batch_decode_x": 1,
                      "Failed to load AOT artifact /x/aot/cascade/cascade.so: undefined symbol: cuLaunchKernelEx. "
                      "Trying another provider or falling back to JIT build.": 1}
    with tarfile.open(tmp_path / "s.tgz") as tar:
        assert "./flashinfer_jit_built.txt" in tar.getnames()
