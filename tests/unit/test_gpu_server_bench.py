"""benchmarks/gpu_server_bench.py without a server: the figures it derives from samples and
``/server_info`` states, its table, and the command line scripts/gpu_session.sh gives it."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_server_bench as bench  # noqa: E402


def sample(ttft, tokens=8, saved=0, ok=True, end=4.0):
    return {"ok": ok, "ttft_s": ttft, "end": end, "completion_tokens": tokens, "prompt_tokens": 90,
            "kv_tokens_saved": saved}


def state(compressed=0, saved=0, available=20000):
    return {"available_kv_tokens": available, "max_total_num_tokens": 20000, "requests_compressed": compressed,
            "kv_tokens_saved": saved}


def test_phase_figures_and_the_comparison():
    full = bench.summarize(1.0, [sample(t) for t in (0.4, 0.1, 0.2, 0.3)], 6, 2, 2.0, state(), state(), 19000, 900)
    low_samples = [sample(0.1, saved=70), sample(0.2, saved=80), {"ok": False, "error": "boom", "ttft_s": None}]
    low = bench.summarize(0.1, low_samples, 6, 2, 1.0, state(3, 100), state(5, 250), 19600, 180)
    assert (full["sent"], full["ok"], full["planned"]) == (4, 4, 6)
    assert full["ttft_median_s"] == pytest.approx(0.25) and full["ttft_p90_s"] == 0.4
    assert full["output_tokens_per_s"] == 16.0 and full["peak_available_kv_drop"] == 1000
    assert (low["ok"], low["errors"], low["output_tokens_per_s"]) == (2, ["boom"], 16.0)
    assert (low["compressed_meta"], low["kv_tokens_saved_meta"]) == (2, 150)
    assert (low["compressed_server"], low["kv_tokens_saved_server"]) == (2, 150)
    c = bench.compare([full, low])
    assert (c["high"], c["low"]) == (1.0, 0.1)
    assert c["ttft_median"] == pytest.approx(0.15 / 0.25) and c["peak_available_kv_drop"] == pytest.approx(0.4)
    assert c["peak_live_kv"] == pytest.approx(0.2)
    md = bench.markdown({"device": "cpu", "phases": [full, low], "comparison": c, "clients": 2, "max_new": 8})
    assert "absolute times are not meaningful" in md and "| 0.1 | 2 / 3 / 6 |" in md and "| 180 |" in md
    assert "not meaningful" not in bench.markdown({"device": "cuda", "phases": [full]})


def test_gpu_session_command_line_parses(tmp_path, monkeypatch):
    script = (REPO / "scripts" / "gpu_session.sh").read_text()
    line = re.search(r"python3 benchmarks/gpu_server_bench.py (.*?) 2>&1", script.replace("\\\n", " "), re.S)
    assert line, "gpu_session.sh no longer runs the benchmark"
    argv = line.group(1).replace('"$OUT"', str(tmp_path)).replace('"$BENCH_BUDGET"', "180")
    argv = argv.replace("${BENCH_ARGS:-}", "").split()
    seen = {}
    monkeypatch.setattr(bench.smoke, "stop_servers_on_sigterm", lambda: None)  # leave pytest's SIGTERM alone
    monkeypatch.setattr(bench.smoke, "serve", lambda *a, **kw: seen.update(kw) or {"ok": False, "error": "no server"})
    assert bench.main(argv) == 1  # nothing measured without a server, and the report says why
    assert seen["startup_timeout"] <= 180 and (tmp_path / "server_bench.json").exists()
    assert "server failed" in (tmp_path / "server_bench.md").read_text()
    assert script.index("gpu_server_smoke.py") < script.index("gpu_server_bench.py") < script.index("gpu_suite.py")
