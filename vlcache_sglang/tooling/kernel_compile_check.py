"""Compile every Triton kernel the server launches on CUDA for a GPU architecture, without a GPU.

    python -m vlcache_sglang.tooling.kernel_compile_check            # sm_90 (H100, H200); JSON lines
    python -m vlcache_sglang.tooling.kernel_compile_check --arch 100

CI runs the kernels under Triton's interpreter, which accepts things the compiler refuses (and
the other way round), and GPU time is scarce. So each entry point (statistics, kept-list decode,
compaction move) is called on small CPU tensors of the dtypes the server uses with its launch
captured instead of run (``kernel(fn, device)[grid](...)`` recorded, with the CUDA path's choices:
no interpreter casts, pass 1's launch options), and every captured launch is compiled with
``triton.compile`` down to a cubin (Triton's bundled ptxas). Run it in a process without
``TRITON_INTERPRET=1``: under it Triton's own combine functions are interpreter objects the
compiler cannot inline. On the GPU machine it checks that Triton (3.6 there) too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

TYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
        torch.int64: "i64", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}
Launch = tuple[Callable, tuple, dict]


@contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Inside, the kernel modules' launches are recorded as ``(fn, args, kwargs)``, none run, and
    the host code takes its CUDA branch (``interpret_for`` is False)."""
    from vlcache_sglang.kernels import attention_stats, kv_move, ragged_decode

    calls: list[Launch] = []

    class Launcher:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    saved = []
    for mod in (attention_stats, ragged_decode, kv_move):
        for name, value in (("kernel", lambda fn, device: Launcher(fn)), ("interpret_for", lambda device: False)):
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, value)
    try:
        yield calls
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def compile_launch(fn: Callable, args: tuple, kwargs: dict, arch: int = 90):
    """``fn`` compiled for ``sm_<arch>`` with the captured arguments' types and constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = JITFunction(fn)
    options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(jit.arg_names, args)) | {k: v for k, v in kwargs.items() if k not in options}
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2 ** 31) <= value < 2 ** 31 else "i64"
        else:
            signature[name] = "fp32"
    return triton.compile(ASTSource(jit, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                          options=options)


def stats_case(dtype: torch.dtype, k_dtype: torch.dtype, pack_heads: bool = False) -> None:
    """Two requests' statistics (a 64-row window over 2,000 keys, 6 rows over 600), 7B heads
    (``pack_heads``: one program per KV head)."""
    from vlcache_sglang.kernels.attention_stats import attention_stats_batched

    g = torch.Generator().manual_seed(0)
    q = torch.randn(70, 28, 128, generator=g).to(dtype)
    k_pool = torch.randn(3000, 4, 128, generator=g).to(k_dtype)
    idx = torch.randperm(3000, generator=g)[:2600]
    pos = torch.cat([torch.arange(1936, 2000), torch.arange(594, 600)])
    attention_stats_batched(q, pos, [0, 64, 70], k_pool, idx, [0, 2000, 2600], 128 ** -0.5, 0.01,
                            pack_heads=pack_heads)


def decode_case(dtype: torch.dtype, cache_dtype: torch.dtype, per_head: bool, warps: int | None = None,
                stages: int | None = None, fused: bool = False) -> None:
    """A kept-list decode step of 3 requests (per KV head with ``per_head``), 7B heads (``fused``:
    the one-launch merge)."""
    from vlcache_sglang.kernels.ragged_decode import ragged_decode

    g = torch.Generator().manual_seed(1)
    bsz, hkv = 3, 4
    k = torch.randn(4000, hkv, 128, generator=g).to(cache_dtype)
    v = torch.randn(4000, hkv, 128, generator=g).to(cache_dtype)
    q = torch.randn(bsz, 28, 128, generator=g).to(dtype)
    lens = torch.tensor([300 + 7 * i for i in range(bsz * hkv if per_head else bsz)])
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    rows = torch.randint(0, 4000 * (hkv if per_head else 1), (int(lens.sum()),), generator=g, dtype=torch.int32)
    fp8 = cache_dtype.itemsize == 1
    ragged_decode(q, k, v, indptr, rows, 128 ** -0.5, num_splits=8, per_head=per_head,
                  k_scale=0.5 if fp8 else None, v_scale=2.0 if fp8 else None, num_warps=warps, num_stages=stages,
                  fused_merge=fused)


def move_case(dtype: torch.dtype) -> None:
    """Compaction's gather and scatter of 100 rows (uint8: SGLang's fp8 KV storage)."""
    from vlcache_sglang.kernels.kv_move import move_kv_rows_triton

    k = torch.zeros(512, 4, 128, dtype=dtype)
    v = torch.zeros(512, 4, 128, dtype=dtype)
    move_kv_rows_triton(k, v, torch.arange(0, 100), torch.arange(200, 300))


bf16, fp8e4, fp8e5 = torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2
#: name -> the call whose launches are compiled (the dtypes and options the server and suite use)
CASES: dict[str, Callable[[], None]] = {
    "stats bf16": lambda: stats_case(bf16, bf16),
    "stats fp16": lambda: stats_case(torch.float16, torch.float16),
    "stats fp32": lambda: stats_case(torch.float32, torch.float32),
    "stats bf16 q, fp8 e4m3 keys": lambda: stats_case(bf16, fp8e4),
    "stats bf16, packed per KV head": lambda: stats_case(bf16, bf16, pack_heads=True),
    "stats fp32, packed per KV head": lambda: stats_case(torch.float32, torch.float32, pack_heads=True),
    "decode bf16": lambda: decode_case(bf16, bf16, False),
    "decode bf16 per head": lambda: decode_case(bf16, bf16, True),
    "decode bf16, 8 warps 3 stages (the sweep's)": lambda: decode_case(bf16, bf16, False, 8, 3),
    "decode fp32": lambda: decode_case(torch.float32, torch.float32, False),
    "decode fp8 e4m3 cache": lambda: decode_case(bf16, fp8e4, False),
    "decode fp8 e5m2 cache per head, 4 warps 2 stages": lambda: decode_case(bf16, fp8e5, True, 4, 2),
    "decode bf16, fused merge, 4 warps 3 stages (the sweep's)": lambda: decode_case(bf16, bf16, False, 4, 3, True),
    "decode fp8 e4m3 cache per head, fused merge": lambda: decode_case(bf16, fp8e4, True, fused=True),
    "move bf16": lambda: move_case(bf16),
    "move uint8": lambda: move_case(torch.uint8),
}


def fused_merge_ordering(ptx: str) -> str | None:
    """What is wrong with a fused-merge decode kernel's PTX, or None: every global store of a
    split's partial result comes before a CTA barrier, then one gpu-scope acq_rel atomic (the
    split count), then the merge's loads of the partials, all L2-only (``ld.global.cg``). This is
    the memory ordering the interpreter cannot exercise (it runs programs one after another)."""
    lines = ptx.splitlines()
    atoms = [i for i, line in enumerate(lines) if "atom." in line]
    if len(atoms) != 1:
        return f"expected one atomic, found {len(atoms)}"
    atom = lines[atoms[0]]
    if not ("acq_rel" in atom and ".gpu" in atom):
        return f"the split count's atomic is not gpu-scope acq_rel: {atom.strip()}"
    stores = [i for i in range(atoms[0]) if "st.global" in lines[i]]
    if not stores or not any("bar.sync" in lines[i] for i in range(stores[-1], atoms[0])):
        return "no CTA barrier between the partials' stores and the atomic"
    after = [lines[i] for i in range(atoms[0], len(lines)) if "ld.global" in lines[i]]
    if not after or not all(".cg" in line for line in after):
        return "the merge's loads of the partials are missing or may hit L1 (not .cg)"
    return None


def check(arch: int = 90, cases: dict[str, Callable[[], None]] = CASES) -> list[dict]:
    """One row per captured launch: case, kernel, seconds, cubin bytes or the compiler's error
    (a fused-merge decode whose PTX breaks :func:`fused_merge_ordering` is an error too)."""
    rows = []
    for case, call in cases.items():
        with captured_launches() as calls:
            call()
        for fn, args, kwargs in calls:
            t = time.perf_counter()
            row = {"case": case, "kernel": fn.__name__}
            try:
                compiled = compile_launch(fn, args, kwargs, arch)
                row["cubin_bytes"] = len(compiled.asm["cubin"])
                if kwargs.get("FUSED_MERGE"):
                    problem = fused_merge_ordering(compiled.asm["ptx"])
                    row["ordering"] = problem or "barrier, acq_rel gpu atomic, L2-only merge loads"
                    if problem:
                        row["error"] = f"fused merge ordering: {problem}"
            except Exception as exc:  # noqa: BLE001 - the compiler's error is the result
                row["error"] = f"{type(exc).__name__}: {exc}"[-1500:]
            row["seconds"] = round(time.perf_counter() - t, 2)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    args = ap.parse_args(argv)
    import triton

    rows = check(args.arch)
    for row in rows:
        print(json.dumps(row), flush=True)
    failed = [r for r in rows if "error" in r]
    print(f"triton {triton.__version__}, sm_{args.arch}: {len(rows) - len(failed)} of {len(rows)} launches compiled",
          file=sys.stderr)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
