"""The GPU suite's plumbing, exercised on the CPU with tiny shapes (``--cpu-smoke``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the suite itself runs, compiled; the GPU "
                    "image's triton 3.6 interpreter cannot run the statistics kernel (numpy 2 scalar conversion)")
def test_gpu_suite_cpu_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--cpu-smoke", "--skip-tests",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    figures = {r["figure"] for r in report["results"]}
    assert {"stats_share", "stats_sweep", "decode_speedup", "decode_sweep", "plan_us_per_step",
            "kv_move"} <= figures, report["results"]
    stats = next(r for r in report["results"] if r["figure"] == "stats_sweep")
    assert [(c["block_m"], c["block_n"], c["pack_heads"]) for c in stats["configs"]] == [
        (16, 64, False), (32, 64, False), (16, 64, True)]
    assert all(c.get("correct") for c in stats["configs"]) and stats["best"] is not None, stats["configs"]
    sweep = next(r for r in report["results"] if r["figure"] == "decode_sweep")
    # every configuration ran and agreed with the default one (the sweep's guard against a fast wrong one)
    assert sweep["configs"] and all(c.get("correct") for c in sweep["configs"]), sweep["configs"]
    assert sweep["configs"][1]["block_n"] == 32 and sweep["best"] is not None
    fused = [c for c in sweep["configs"] if c["fused_merge"]]  # the one-launch merge is timed and checked
    assert len(fused) == 1 and fused[0]["counters_left"] == 0 and not sweep["configs"][0]["fused_merge"]
    assert sweep["best_fused"] == fused[0] and not sweep["best_two_launch"]["fused_merge"]
    assert not [r for r in report["results"] if str(r.get("skipped", "")).startswith("error")], report["results"]
    decode = [r for r in report["results"] if r["figure"] == "decode_speedup"]
    # the served path (the executor's graph mode, buffers for 256 requests) is timed beside the kernel
    assert decode and all(r["served_max_bs"] == 256 and r["served_graph_kept_s"] > 0 for r in decode), decode
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "| figure |" in md and "stats share" in md and "| statistics sweep (3 plans) |" in md
    assert "served decode graph (executor, max_bs 256)" in md
    assert "best fused block 128" in md and "fused merge" in md


def test_gpu_suite_help():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--cpu-smoke" in proc.stdout
