"""Build FlashInfer's kernels for the lent GPU here, ahead of time, so a GPU session compiles nothing.

FlashInfer JIT-compiles one module per (kernel family, dtype, head dim) on first use. On the lent
H200 that cost the 2026-12-04 session its bf16 phase: the vlcache server's first request waited on
nvcc past the call's end. The modules depend on the CUDA toolkit and the target architecture, not
on a GPU, so this machine (nvcc 13.0, like the GPU machine; no driver) builds them for ``sm_90a``
and the GPU pack ships them where FlashInfer looks for ahead-of-time modules first
(``flashinfer/data/aot/<name>/<name>.so``, ``flashinfer.jit.env.get_aot_path``). A module that does
not load there falls back to FlashInfer's own JIT build (``JitSpec.try_load``), so a stale or
missing module costs time, never correctness; ``scripts/gpu_session.sh`` lists every module the
session still had to build (``flashinfer_jit_built.txt``).

Two gaps of this machine's toolkit are filled for the build only: a ``libcuda.so`` link stub (the
driver is not installed; the loader finds the real one on the GPU machine) and cuRAND's headers
(CUTLASS's utilities include ``curand_kernel.h``, which FA3's Hopper kernels pull in; from the
``nvidia-curand`` wheel). FlashInfer reads its configuration from the environment at import, so
:func:`build_environment` is applied before the first ``import flashinfer``::

    python -m vlcache_sglang.tooling.flashinfer_aot --aot-dir SITE/flashinfer/data/aot \\
        --curand-include WHEEL/nvidia/cu13/include
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

Family = Literal["prefill_fa2", "prefill_fa3", "decode", "cascade"]

#: head dims the GPU session serves: 64 is the bundled model regrouped for FlashInfer (the smoke's
#: ``bf16-flashinfer`` phase, the serving benchmark, the executor tests); 128 is Qwen2-VL-7B (the
#: speed benchmark, the suite's kernel figures). FlashInfer has no head dim 32, the bundled one.
GPU_SESSION_HEAD_DIMS = (64, 128)
#: Hopper (H100/H200): FA3 kernels need the ``a`` variant
DEFAULT_ARCH = "9.0a"


@dataclass(frozen=True)
class FlashInferModule:
    """One FlashInfer JIT module, by the arguments its wrapper derives at ``plan`` time (bf16,
    int32 indices, no positional encoding in the kernel, no sliding window, no logits cap)."""

    family: Family
    head_dim: int = 0

    def jit_spec(self):
        """FlashInfer's ``JitSpec`` for this module (imports FlashInfer)."""
        import torch
        from flashinfer.jit.attention.modules import (_gen_batch_prefill_primary_module, gen_batch_decode_module,
                                                      gen_batch_prefill_module)
        from flashinfer.jit.cascade import gen_cascade_module

        if self.family == "cascade":
            return gen_cascade_module()
        bf16, d = torch.bfloat16, self.head_dim
        args = (bf16, bf16, bf16, torch.int32, d, d, 0, False, False)
        if self.family == "decode":
            return gen_batch_decode_module(*args)
        if self.family == "prefill_fa2":  # paged prefill, and decode where tensor cores are used
            return _gen_batch_prefill_primary_module("fa2", *args, False)
        return gen_batch_prefill_module("fa3", *args, False)  # ragged prefill, backend "auto" on Hopper


def gpu_session_modules(head_dims: tuple[int, ...] = GPU_SESSION_HEAD_DIMS) -> list[FlashInferModule]:
    """What a GPU session's servers and tests reach: SGLang's stock FlashInfer backend (ragged
    prefill ``auto`` = FA3 on Hopper, paged prefill FA2, decode FA2 or, for query groups above 4,
    FA2 prefill kernels; ``merge_state`` from the cascade module) and the plugin's executor (FA2)."""
    mods = [FlashInferModule("cascade")]
    for d in head_dims:
        mods += [FlashInferModule("decode", d), FlashInferModule("prefill_fa2", d), FlashInferModule("prefill_fa3", d)]
    return mods


def link_stub_dir(cuda_home: Path, work: Path) -> Path | None:
    """A folder holding a ``libcuda.so`` to link against, or None where the toolkit has its stubs."""
    if (cuda_home / "lib64" / "stubs" / "libcuda.so").exists():
        return None
    work.mkdir(parents=True, exist_ok=True)
    src = work / "libcuda_stub.c"
    src.write_text("/* link-time stand-in for the CUDA driver; the real libcuda.so.1 loads at run time */\n")
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o",
                    str(work / "libcuda.so"), str(src)], check=True)
    return work


def build_environment(cuda_home: Path, workspace: Path, arch: str, curand_include: Path | None,
                      stub_dir: Path | None, jobs: int) -> dict[str, str]:
    """The environment FlashInfer's JIT reads at import, for a build without a GPU."""
    env = {"CUDA_HOME": str(cuda_home), "FLASHINFER_CUDA_ARCH_LIST": arch,
           "FLASHINFER_WORKSPACE_BASE": str(workspace), "MAX_JOBS": str(jobs),
           "PATH": f"{cuda_home / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    if stub_dir is not None:
        env["FLASHINFER_EXTRA_LDFLAGS"] = f"-L{stub_dir}"
    if curand_include is not None and not (cuda_home / "include" / "curand_kernel.h").exists():
        env["FLASHINFER_EXTRA_CUDAFLAGS"] = f"-I{curand_include}"
    return env


def build_modules(modules: list[FlashInferModule], aot_dir: Path) -> list[dict]:
    """Build each module (FlashInfer's own ninja build) and copy it to ``aot_dir/<name>/<name>.so``."""
    from tqdm import tqdm

    records = []
    for mod in tqdm(modules, desc="FlashInfer modules", unit="module"):
        spec = mod.jit_spec()
        t0 = time.monotonic()
        spec.build()
        dst = aot_dir / spec.name / f"{spec.name}.so"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(spec.jit_library_path, dst)
        records.append(dict(asdict(mod), name=spec.name, seconds=round(time.monotonic() - t0, 1),
                            bytes=dst.stat().st_size))
    return records


def check_loads(aot_dir: Path, names: list[str], cuda_home: Path) -> None:
    """Load every built module through tvm-ffi, as FlashInfer will (the toolkit's ``libcudart``
    first, as torch loads it on the GPU machine; no GPU needed): a module with an unresolved
    symbol fails here, not on the GPU."""
    import ctypes

    import tvm_ffi

    for lib in sorted((cuda_home / "lib64").glob("libcudart.so.*"))[:1]:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    for name in names:
        tvm_ffi.load_module(str(aot_dir / name / f"{name}.so"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--aot-dir", type=Path, required=True, help="flashinfer/data/aot of the pack's site")
    ap.add_argument("--cuda-home", type=Path, default=Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")))
    ap.add_argument("--arch", default=DEFAULT_ARCH)
    ap.add_argument("--curand-include", type=Path, help="cuRAND headers, where the toolkit lacks them")
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(GPU_SESSION_HEAD_DIMS))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if "flashinfer" in sys.modules:
        raise SystemExit("flashinfer was imported before its build environment was set")
    with tempfile.TemporaryDirectory(prefix="vlcache-fi-aot-") as tmp:
        os.environ.update(build_environment(args.cuda_home, Path(tmp) / "workspace", args.arch, args.curand_include,
                                            link_stub_dir(args.cuda_home, Path(tmp) / "stub"), args.jobs))
        records = build_modules(gpu_session_modules(tuple(args.head_dims)), args.aot_dir)
    check_loads(args.aot_dir, [r["name"] for r in records], args.cuda_home)
    import flashinfer

    manifest = {"flashinfer": flashinfer.__version__, "arch": args.arch, "modules": records}
    (args.aot_dir / "vlcache_prebuilt.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for r in records:
        print(f"{r['seconds']:7.1f} s {r['bytes'] / 2**20:7.2f} MiB  {r['name']}")
    print(f"{len(records)} modules, {sum(r['bytes'] for r in records) / 2**20:.1f} MiB, in {args.aot_dir}")


if __name__ == "__main__":
    main()
