"""Per-GPU-model launch options of the Triton kernels (``kernels/launch_configs.py``), the setting
that picks them (``VLCACHE_KERNEL_LAUNCHES``) and the tool that writes them from a GPU-suite report
(``vlcache_sglang.tooling.adopt_kernel_sweeps``), fed here by a real ``--cpu-smoke`` run of the
suite's two sweeps."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from vlcache_sglang.kernels.launch_configs import (DecodeLaunch, KernelLaunches, LaunchConfigError, StatsLaunch,
                                                   config_path_for, device_file_name, launches_for,
                                                   launches_for_device_name, load_launches, parse_launches)
from vlcache_sglang.settings import ENV_KERNEL_LAUNCHES, ServerSettings, SettingsError
from vlcache_sglang.tooling.adopt_kernel_sweeps import adopt
from vlcache_sglang.tooling.adopt_kernel_sweeps import main as adopt_main

REPO = Path(__file__).resolve().parents[2]
GOOD = {"schema": 1, "stats": {"block_m": 8, "block_n": 128, "pack_heads": True},
        "decode": {"block_n": 32, "programs_per_sm": 4, "num_warps": 8, "num_stages": 3, "fused_merge": True}}


def test_a_launch_file_round_trips_and_missing_sections_are_the_defaults(tmp_path):
    got = parse_launches(GOOD, "x.json")
    assert got.stats == StatsLaunch(8, 128, True) and got.decode == DecodeLaunch(32, 4, 8, 3, True)
    # a file written before fused_merge existed (schema 1 too) means the two-launch kernel
    assert parse_launches({"schema": 1, "decode": {"block_n": 32}}, "old.json").decode.fused_merge is False
    assert got.describe() == {"source": "x.json", "stats": GOOD["stats"], "decode": GOOD["decode"]}
    only_stats = parse_launches({"schema": 1, "stats": GOOD["stats"], "measured": {"any": "provenance"}}, "y")
    assert only_stats.decode == DecodeLaunch() and KernelLaunches().source == "defaults"
    path = tmp_path / "f.json"
    path.write_text(json.dumps(GOOD))
    assert load_launches(path) == parse_launches(GOOD, str(path))


@pytest.mark.parametrize("data,match", [
    ({"stats": {}}, "expected an object with \"schema\": 1"),
    ({"schema": 2}, "expected an object with \"schema\": 1"),
    ({"schema": 1, "stats": {"block_m": 16, "blockn": 64}}, r"unknown \"stats\" option\(s\) \['blockn'\]"),
    ({"schema": 1, "decode": {"warps": 4}}, r"unknown \"decode\" option"),
    ({"schema": 1, "stats": [16, 64]}, "\"stats\" must be an object"),
    ({"schema": 1, "stats": {"block_m": 24}}, "block_m must be a power of two"),
    ({"schema": 1, "stats": {"block_n": 8}}, "block_n one in 16..512"),
    ({"schema": 1, "stats": {"pack_heads": "yes"}}, "pack_heads a boolean"),
    ({"schema": 1, "decode": {"block_n": 48}}, "block_n must be a power of two in 16..512"),
    ({"schema": 1, "decode": {"programs_per_sm": 0}}, r"programs_per_sm in \(0, 64\]"),
    ({"schema": 1, "decode": {"num_warps": 3}}, "num_warps a power of two"),
    ({"schema": 1, "decode": {"num_stages": 0}}, "num_stages 1..8"),
    ({"schema": 1, "decode": {"block_n": True}}, "block_n must be a power of two"),
    ({"schema": 1, "decode": {"fused_merge": 1}}, "fused_merge a boolean"),
])
def test_a_bad_launch_file_is_refused_naming_the_file_and_the_option(data, match):
    with pytest.raises(LaunchConfigError, match=match) as err:
        parse_launches(data, "/cfg/NVIDIA_H200.json")
    assert "/cfg/NVIDIA_H200.json" in str(err.value)


def test_unreadable_files_are_refused(tmp_path):
    with pytest.raises(LaunchConfigError, match="not found"):
        load_launches(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LaunchConfigError, match="not readable JSON"):
        load_launches(tmp_path / "bad.json")


def test_device_names_map_to_one_file_each(tmp_path):
    assert device_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    assert device_file_name("NVIDIA H200") == "NVIDIA_H200.json"
    assert device_file_name(" NVIDIA A100-SXM4-80GB ") == "NVIDIA_A100-SXM4-80GB.json"
    assert config_path_for("NVIDIA H200", tmp_path) == tmp_path / "NVIDIA_H200.json"


def test_auto_reads_the_gpu_models_file_else_the_defaults(tmp_path):
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps(GOOD))
    h200 = launches_for_device_name("NVIDIA H200", "auto", tmp_path)
    assert h200.stats == StatsLaunch(8, 128, True) and h200.source == str(tmp_path / "NVIDIA_H200.json")
    assert launches_for_device_name("NVIDIA H100 80GB HBM3", "auto", tmp_path) == KernelLaunches()
    assert launches_for_device_name("NVIDIA H200", "defaults", tmp_path) == KernelLaunches()
    assert launches_for_device_name(None, "auto", tmp_path) == KernelLaunches()
    # off CUDA there is no GPU model: auto gives the defaults; an explicit file is still read
    assert launches_for("cpu", "auto", tmp_path) == KernelLaunches()
    assert launches_for("cpu", str(tmp_path / "NVIDIA_H200.json")).decode == DecodeLaunch(32, 4, 8, 3, True)
    (tmp_path / "NVIDIA_H200.json").write_text(json.dumps({"schema": 1, "decode": {"num_warps": 5}}))
    with pytest.raises(LaunchConfigError, match="num_warps"):  # a shipped file that is wrong stops the backend
        launches_for_device_name("NVIDIA H200", "auto", tmp_path)


def test_shipped_launch_files_are_valid_and_named_for_their_device():
    from vlcache_sglang.kernels.launch_configs import CONFIG_DIR

    for path in sorted(CONFIG_DIR.glob("*.json")) if CONFIG_DIR.is_dir() else []:
        data = json.loads(path.read_text())
        parse_launches(data, str(path))
        assert path.name == device_file_name(data["device"]), path


def test_the_setting_is_checked_at_launch(tmp_path):
    assert ServerSettings.from_env({}).kernel_launches == "auto"
    assert ServerSettings.from_env({ENV_KERNEL_LAUNCHES: " Defaults "}).kernel_launches == "defaults"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(GOOD))
    assert ServerSettings.from_env({ENV_KERNEL_LAUNCHES: str(path)}).kernel_launches == str(path)
    with pytest.raises(SettingsError, match=f"{ENV_KERNEL_LAUNCHES}: kernel launch file not found"):
        ServerSettings.from_env({ENV_KERNEL_LAUNCHES: str(tmp_path / "missing.json")})
    path.write_text(json.dumps({"schema": 1, "stats": {"block_m": 3}}))
    with pytest.raises(SettingsError, match="block_m must be a power of two.*adopt_kernel_sweeps"):
        ServerSettings.from_env({ENV_KERNEL_LAUNCHES: str(path)})


def test_the_suites_first_sweep_rows_are_the_defaults():
    """The adopt tool compares every winner with the sweep's first row: it must be what a server
    without a tuned file runs."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert dict(zip(("block_m", "block_n", "pack_heads"), gpu_suite.STATS_SWEEP[0])) == asdict(StatsLaunch())
    assert dict(zip(("block_n", "programs_per_sm", "num_warps", "num_stages", "fused_merge"),
                    gpu_suite.DECODE_SWEEP[0])) == asdict(DecodeLaunch())
    assert gpu_suite.BENCH_STEPS == ("stats", "stats_sweep", "decode", "decode_sweep", "planning", "kv_move")


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory) -> dict:
    """The ``sweeps`` step of scripts/gpu_session.sh (the first kit call's GPU work), rehearsed on
    the CPU: the suite's two sweeps only, decode first, on the interpreter (seconds)."""
    out = tmp_path_factory.mktemp("session")
    env = dict(os.environ, STEPS="sweeps", SWEEPS_ARGS="--cpu-smoke", OUT=str(out),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "sweeps" / "gpu_suite.json").read_text())
    assert [r["figure"] for r in report["results"]] == ["decode_sweep", "stats_sweep"]  # no other step
    assert report["tests"] == {}  # no tests either
    return report


def _figure(report: dict, name: str) -> dict:
    return next(r for r in report["results"] if r.get("figure") == name)


def _gpu(report: dict, stats_best_over_default: float | None, decode_best_over_default: float | None) -> dict:
    """``report`` as if from a GPU: each sweep's best row timed at the given fraction of its default
    (its configuration made different from the default's), or left out (None: a sweep that failed)."""
    report = copy.deepcopy(report)
    report["mode"], report["device"] = "gpu", "NVIDIA H200"
    results = []
    for name, frac, key, alt in (("stats_sweep", stats_best_over_default, "eager_s",
                                  {"block_m": 8, "block_n": 64, "pack_heads": True}),
                                 ("decode_sweep", decode_best_over_default, "s",
                                  {"block_n": 128, "programs_per_sm": 4, "num_warps": 8, "num_stages": 3})):
        entry = _figure(report, name)
        if frac is None:
            results.append({"figure": name, "skipped": "error: compiler refused"})
            continue
        entry["best"] = {**entry["default"], **alt, key: entry["default"][key] * frac, "correct": True}
        results.append(entry)
    report["results"] = results
    return report


def test_the_decode_sweep_times_the_split_count_served_decode_graphs_use(smoke_report):
    """A served decode step replays a CUDA graph, whose split count comes from the batch size and the
    graph buffers' capacity (at least the batch's full lengths), not from the kept length: the sweep
    must time that count, or its winner is chosen for launches the server never makes."""
    import torch

    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor

    entry = _figure(smoke_report, "decode_sweep")
    bsz, n = entry["batch"], entry["n"]
    rows = [r for r in entry["configs"] if "error" not in r]
    assert rows
    for r in rows:
        launch = DecodeLaunch(r["block_n"], r["programs_per_sm"], r["num_warps"], r["num_stages"], r["fused_merge"])
        ex = FlashInferAttentionExecutor("cpu", cuda_graph=True, max_batch_size=4 * bsz, max_kv_tokens=bsz * n,
                                         num_layers=1, decode_launch=launch)
        splits, _ = ex.graph_buffers.split_workspace(bsz, 4, 2, 16, torch.device("cpu"))  # the smoke's 4 query, 2 KV heads
        assert r["splits"] == splits, r


def test_adopting_a_cpu_smoke_report_is_refused_unless_asked(smoke_report, tmp_path, capsys):
    report_path = tmp_path / "gpu_suite.json"
    report_path.write_text(json.dumps(smoke_report))
    assert adopt_main([str(report_path), "--folder", str(tmp_path / "cfg")]) == 2
    assert "is not a GPU run" in capsys.readouterr().err and not (tmp_path / "cfg").exists()
    assert adopt_main([str(report_path), "--folder", str(tmp_path / "cfg"), "--allow-cpu-smoke"]) == 0
    written = config_path_for(smoke_report["device"], tmp_path / "cfg")
    launches = load_launches(written)  # what the tool writes, a server accepts
    assert launches.stats.check() and launches.decode.check()


def test_a_winner_is_adopted_only_when_clearly_faster(smoke_report, tmp_path):
    path, content = adopt(_gpu(smoke_report, 0.5, 0.99), tmp_path)
    assert path == tmp_path / "NVIDIA_H200.json"
    got = launches_for_device_name("NVIDIA H200", "auto", tmp_path)
    assert got.stats == StatsLaunch(8, 64, True)  # 2x faster: adopted
    assert got.decode == DecodeLaunch()  # 1 % faster: noise, the defaults stay
    assert content["measured"]["stats"]["decision"] == "adopted"
    assert content["measured"]["decode"]["decision"].startswith("defaults kept")
    assert content["measured"]["stats"]["default_s"] == _figure(smoke_report, "stats_sweep")["default"]["eager_s"]
    # a later report whose statistics sweep failed changes only the decode section
    adopt(_gpu(smoke_report, None, 0.8), tmp_path)
    again = launches_for_device_name("NVIDIA H200", "auto", tmp_path)
    assert again.stats == StatsLaunch(8, 64, True) and again.decode == DecodeLaunch(128, 4, 8, 3)


def test_a_wrong_or_stale_sweep_is_never_adopted(smoke_report, tmp_path):
    wrong = _gpu(smoke_report, 0.5, 0.5)
    _figure(wrong, "stats_sweep")["best"]["correct"] = False
    _figure(wrong, "decode_sweep")["best"] = None  # what the suite reports when no configuration was correct
    _, content = adopt(wrong, tmp_path)
    assert "stats" not in content and "decode" not in content  # nothing correct: nothing written but provenance
    assert content["measured"]["stats"]["decision"] == "no correct configuration: section unchanged"
    got = launches_for_device_name("NVIDIA H200", "auto", tmp_path)
    assert (got.stats, got.decode) == (StatsLaunch(), DecodeLaunch())
    stale = _gpu(smoke_report, 0.5, 0.5)
    _figure(stale, "decode_sweep")["default"]["block_n"] = 32  # the suite was run with other defaults
    with pytest.raises(LaunchConfigError, match="not the current defaults"):
        adopt(stale, tmp_path)
