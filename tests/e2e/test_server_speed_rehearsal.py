"""CPU rehearsal of the GPU speed benchmark (benchmarks/gpu_server_speed.py, issue 21 item 3).

The whole benchmark, as scripts/gpu_session.sh runs it on a GPU, at CPU size: two real SGLang
servers one after the other (stock ``torch_native``, then ``vlcache``) on the weights-free
rehearsal model (Qwen2-VL-7B's patch geometry, query group and head dim; ``--load-format dummy``),
a small and a large image size, single and batch phases. Asserts what holds on any device: every
phase measured on both servers, every vlcache request compressed to the budget and none of the
stock ones, and the fixed pool holding more vlcache requests than stock ones at the large size.
Times are not asserted (ratios from one CPU run mean little; the GPU run prints them).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

pytestmark = pytest.mark.server

ARGS = ["--scale", "rehearsal", "--visual-tokens", "256", "1024", "--batch", "6", "--requests", "6",
        "--single", "2", "--max-new", "12", "--time-budget", "600"]

@pytest.fixture(scope="module")
def report(tmp_path_factory, monkeypatch_module):
    import gpu_server_speed as speed

    out = tmp_path_factory.mktemp("speed")
    monkeypatch_module.setattr(speed.smoke, "stop_servers_on_sigterm", lambda: None)  # pytest's SIGTERM
    rc = speed.main(["--out", str(out)] + ARGS)
    data = json.loads((out / "server_speed.json").read_text())
    data["rc"], data["md"] = rc, (out / "server_speed.md").read_text()
    return data

@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()

def test_every_phase_measured_on_both_servers(report):
    assert report["rc"] == 0, report.get("server_errors") or report.get("error")
    assert not report.get("together"), "on the CPU the servers run one after the other"
    assert {r["phase"] for r in report["ratios"]} == {"256-single", "256-batch", "1024-single", "1024-batch"}
    for phase in report["phases"].values():
        for side in ("stock", "vlcache"):
            assert phase[side]["ok"] == phase[side]["planned"], (side, phase[side]["errors"])
    assert "| 1,024 | batch | peak running requests |" in report["md"]
    assert "TTFT overhead" in report["md"]
    # both servers hold exactly the requested pool (read back from /server_info), so they compare
    assert report["pools"] == {"stock": report["max_total_tokens"], "vlcache": report["max_total_tokens"]}
    assert report["pool_mismatch"] is None and "pool mismatch" not in report["md"]

def test_vlcache_compresses_every_request_and_stock_none(report):
    for phase in report["phases"].values():
        v, s = phase["vlcache"], phase["stock"]
        assert v["requests_compressed"] == v["ok"] and v["kv_tokens_saved"] > 0
        assert v["kept_ratio_median"] == pytest.approx(0.1, abs=0.01)
        assert s["kv_tokens_saved"] == 0 and s["kept_ratio_median"] is None
        assert v["prompt_tokens_mean"] == s["prompt_tokens_mean"]  # the same requests

def test_the_fixed_pool_holds_more_compressed_requests(report):
    pool = report["max_total_tokens"]
    large = report["phases"]["1024-batch"]
    stock, ours = large["stock"]["peak_running"], large["vlcache"]["peak_running"]
    # the pool holds 6 small uncompressed requests: at 1,024 visual tokens only a few stock ones
    assert stock * large["stock"]["prompt_tokens_mean"] <= pool
    assert stock < 6 and ours == 6 and ours > stock
    small = report["phases"]["256-batch"]
    assert small["stock"]["peak_running"] == small["vlcache"]["peak_running"] == 6
