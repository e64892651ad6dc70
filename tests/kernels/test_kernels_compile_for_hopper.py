"""Every Triton kernel the server launches on CUDA compiles for Hopper (sm_90: H100, H200) here,
without a GPU (:mod:`vlcache_sglang.tooling.kernel_compile_check`).

In a fresh process without ``TRITON_INTERPRET`` (this directory's conftest sets it, and under it
Triton's own combine functions are interpreter objects the compiler cannot inline). The GPU image
has triton 3.6, this machine 3.9: a compile here is necessary, not sufficient.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_every_launch_compiles_for_sm90():
    from vlcache_sglang.tooling.kernel_compile_check import CASES

    proc = run("from vlcache_sglang.tooling.kernel_compile_check import main; raise SystemExit(main(['--arch', '90']))")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, [r for r in rows if "error" in r] or proc.stderr[-3000:]
    assert {r["case"] for r in rows} == set(CASES)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_stats_pass1", "_stats_pass2", "_decode_pass1", "_decode_pass2", "_copy_rows"}
    fused = {case for case in CASES if "fused merge" in case}
    assert fused and len(rows) == 2 * len(CASES) - len(fused) and all(r["cubin_bytes"] > 0 for r in rows)
    assert all(r["kernel"] == "_decode_pass1" and r["ordering"].startswith("barrier")
               for r in rows if r["case"] in fused)  # one launch, its memory ordering in the PTX


def test_the_fused_merge_ordering_check_can_fail():
    """The PTX check refuses a relaxed atomic, a merge load through L1, and no barrier between the
    partials' stores and the atomic (on the real kernel's PTX, edited)."""
    proc = run("""
import torch
from vlcache_sglang.tooling import kernel_compile_check as c
with c.captured_launches() as calls:
    c.decode_case(torch.bfloat16, torch.bfloat16, False, 4, 3, True)
fn, args, kwargs = calls[0]
ptx = c.compile_launch(fn, args, kwargs).asm["ptx"]
print("real:", c.fused_merge_ordering(ptx))
print("relaxed:", c.fused_merge_ordering(ptx.replace(".acq_rel", ".relaxed")))
print("l1:", c.fused_merge_ordering(ptx.replace("ld.global.cg", "ld.global")))
lines = ptx.splitlines()
atom = next(i for i, l in enumerate(lines) if "atom." in l)
bars = [i for i in range(atom) if "bar.sync" in lines[i]]
print("unfenced:", c.fused_merge_ordering(chr(10).join(l for i, l in enumerate(lines) if i not in bars)))
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert out["real"] == "None"
    assert "not gpu-scope acq_rel" in out["relaxed"]
    assert "may hit L1" in out["l1"]
    assert "no CTA barrier" in out["unfenced"]


def test_a_launch_the_compiler_refuses_fails_the_check():
    """The check can fail: the statistics' pass 2 with a key tile no power of two (tl.arange)."""
    proc = run("""
import torch
from vlcache_sglang.tooling import kernel_compile_check as c
with c.captured_launches() as calls:
    c.stats_case(torch.bfloat16, torch.bfloat16)
fn, args, kwargs = calls[1]
c.compile_launch(fn, args, kwargs)  # the captured launch compiles
try:
    c.compile_launch(fn, args, {**kwargs, "BLOCK_N": 96})
except Exception as exc:
    print("refused:", type(exc).__name__)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout
