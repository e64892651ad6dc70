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


def session_argv(script: str, benchmark: str, var: str, budget: str, out: Path) -> list[str]:
    """The arguments gpu_session.sh gives ``benchmark``, with ``$OUT`` and its budget filled in."""
    line = re.search(rf"python3 benchmarks/{benchmark} (.*?) 2>&1", script.replace("\\\n", " "), re.S)
    assert line, f"gpu_session.sh no longer runs {benchmark}"
    argv = line.group(1).replace('"$OUT"', str(out)).replace(f'"${var}_BUDGET"', budget)
    return argv.replace(f"${{{var}_ARGS:-}}", "").split()


def test_gpu_session_command_line_parses(tmp_path, monkeypatch):
    script = (REPO / "scripts" / "gpu_session.sh").read_text()
    argv = session_argv(script, "gpu_server_bench.py", "BENCH", "180", tmp_path)
    seen = {}
    monkeypatch.setattr(bench.smoke, "stop_servers_on_sigterm", lambda: None)  # leave pytest's SIGTERM alone
    monkeypatch.setattr(bench.smoke, "serve", lambda *a, **kw: seen.update(kw) or {"ok": False, "error": "no server"})
    assert bench.main(argv) == 1  # nothing measured without a server, and the report says why
    assert seen["startup_timeout"] <= 180 and (tmp_path / "server_bench.json").exists()
    assert "server failed" in (tmp_path / "server_bench.md").read_text()
    assert script.index("gpu_server_smoke.py") < script.index("gpu_server_bench.py") < script.index("gpu_suite.py")


def test_gpu_session_speed_command_line_parses(tmp_path, monkeypatch):
    """The speed step of gpu_session.sh parses, keeps its server starts within its budget, and a
    run whose servers never come up says so (exit 1, the errors in its report)."""
    from contextlib import contextmanager

    import gpu_server_speed as speed

    from vlcache_sglang.tooling import serving

    script = (REPO / "scripts" / "gpu_session.sh").read_text()
    argv = session_argv(script, "gpu_server_speed.py", "SPEED", "120", tmp_path)
    seen = {}

    @contextmanager
    def no_servers(specs):
        seen.update(specs)
        yield {name: RuntimeError(f"{name} did not start") for name in specs}

    monkeypatch.setattr(speed.smoke, "stop_servers_on_sigterm", lambda: None)
    monkeypatch.setattr(serving, "running_servers", no_servers)
    assert speed.main(argv + ["--scale", "rehearsal", "--requests", "2", "--single", "1"]) == 1
    assert set(seen) == {"stock", "vlcache"}
    assert all(spec["startup_timeout"] <= 120 for spec in seen.values())
    assert "--load-format" in seen["stock"]["extra_args"]
    report = (tmp_path / "server_speed.json").read_text()
    assert "stock did not start" in report and "vlcache did not start" in report
    assert script.index("gpu_server_smoke.py") < script.index("gpu_server_speed.py") < script.index("gpu_suite.py")


def test_the_smokes_divergence_diagnosis_locates_a_tie_break():
    """benchmarks/gpu_server_smoke.py keeps every comparison exact; where one fails it reports the
    first differing token and each run's top-2 gap there, read from SGLang's ``output_top_logprobs``
    (``(logprob, token id, text)`` per candidate)."""
    import gpu_server_smoke as smoke

    response = {"meta_info": {"output_top_logprobs": [[[-0.01, 5, None], [-4.2, 7, None]],
                                                       [[-0.69, 8, None], [-0.70, 9, None]]]}}
    top = smoke.top2(response)
    assert top == [[(-0.01, 5), (-4.2, 7)], [(-0.69, 8), (-0.70, 9)]]
    assert smoke.divergence([5, 8], [5, 8], top, top) is None
    other = [[(-0.01, 5), (-4.2, 7)], [(-0.695, 9), (-0.70, 8)]]
    assert smoke.divergence([5, 8], [5, 9], top, other) == {"index": 1, "a": 8, "b": 9, "gap_nats_a": 0.01,
                                                            "gap_nats_b": 0.005}
    assert smoke.divergence([5, 8], [5, 8, 2]) == {"index": 2, "a": None, "b": 2}  # one run stopped early
    assert smoke.divergence([3], [5], None, top) == {"index": 0, "a": 3, "b": 5, "gap_nats_b": 4.19}
