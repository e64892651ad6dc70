"""Serving figures of one whole SGLang server with compression, within a fixed time (issue 21).

    PYTHONPATH=out/gpu-site:. python3 benchmarks/gpu_server_bench.py --out "$OUT" --time-budget 180

scripts/gpu_session.sh runs it right after benchmarks/gpu_server_smoke.py passed. One
``--attention-backend vlcache`` server, launched exactly as the smoke launches its vlcache server
(``gpu_server_smoke.serve``: the GPU profile, the opt-in CUDA executor, prefill graphs off), on
the bundled model. The same fixed set of image requests (distinct images, so no radix hits;
``ignore_eos`` so every request generates ``--max-new`` tokens) is sent at every ``--budgets``
value (per request ``custom_params={"vlcache": {"budget": b}}``) by ``--clients`` concurrent
streaming clients, the radix cache flushed before each budget. Per budget it records:

* time to first token of every request (first streamed chunk of ``/generate``);
* output tokens per second over the phase (all completion tokens / phase wall time);
* requests compressed and KV tokens saved, from each answer's ``meta_info``
  (``vlcache_kv_tokens_saved``) and from the ``/server_info`` counters' change
  (``requests_compressed``, ``kv_tokens_saved``);
* the peak drop of ``available_kv_tokens`` below its value at the phase's start, and the peak
  live KV (slots held by running requests: ``max_total - available - evictable``), polled.

Time: everything (server start, a warm-up request per budget, the phases, the shutdown) stays
within ``--time-budget`` seconds. Each budget gets an equal share of what is left when it starts;
no request is sent after 90 % of its share, a request still streaming at the end is cut, and
the figures say how many requests each budget measured. ``server_bench.json`` and
``server_bench.md`` are rewritten after every phase, so a run cut short keeps what it measured.
Figures compare the rows of one run; absolute times mean something only on a GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_server_smoke as smoke  # noqa: E402

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + smoke.QUESTION
          + "<|im_end|>\n<|im_start|>assistant\n")
SHUTDOWN_RESERVE_S = 20.0  # stopping the server (SIGTERM, then the group's exit) and writing
POLL_S = 0.1
STOP = threading.Event()  # set when the run is being stopped (SIGTERM): no more sends, streams end


def _first(value, default=0):
    """meta_info ``vlcache_*`` entries are per request lists (one entry here) or scalars."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def stream_one(url: str, image_b64: str, budget: float | None, max_new: int, rid: str, cut_at: float) -> dict:
    """One streaming ``/generate`` (``budget`` None: no vlcache parameters, for a stock server);
    returns its timings and accounting. Stops reading (SGLang then aborts the request) when
    ``cut_at`` (monotonic) passes."""
    params = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    if budget is not None:
        params["custom_params"] = {"vlcache": {"budget": budget}}
    payload = {"text": PROMPT, "image_data": image_b64, "stream": True, "rid": rid, "sampling_params": params}
    t0 = time.monotonic()
    ttft, meta, cut = None, {}, False
    try:
        with requests.post(f"{url}/generate", json=payload, stream=True,
                           timeout=(10, max(1.0, cut_at - t0))) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data:"):
                    continue
                body = line[5:].strip()
                if body == b"[DONE]":
                    break
                if ttft is None:
                    ttft = time.monotonic() - t0
                meta = json.loads(body).get("meta_info", meta)
                if (time.monotonic() > cut_at or STOP.is_set()) and meta.get("finish_reason") is None:
                    cut = True
                    break
    except Exception as exc:  # a timeout or a server error is a figure too
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500], "ttft_s": ttft,
                "latency_s": time.monotonic() - t0}
    saved = int(_first(meta.get("vlcache_kv_tokens_saved")))
    latency, completion = time.monotonic() - t0, int(meta.get("completion_tokens", 0))
    # mean time between tokens after the first: the decode step time this request saw
    itl = (latency - ttft) / (completion - 1) if ttft is not None and completion > 1 else None
    return {"ok": not cut and ttft is not None, "cut": cut, "ttft_s": ttft, "latency_s": latency, "itl_s": itl,
            "end": time.monotonic(), "completion_tokens": completion,
            "prompt_tokens": int(meta.get("prompt_tokens", 0)), "kv_tokens_saved": saved,
            "kept_ratio": _first(meta.get("vlcache_kept_ratio"), None)}


class PoolPoller:
    """Lowest ``available_kv_tokens`` and highest live KV (``max_total - available - evictable``:
    slots held by running requests, not by the radix cache) while a phase runs (``/server_info``,
    every POLL_S)."""

    def __init__(self, url: str):
        self.url, self.low, self.live, self.polls = url, None, None, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from vlcache_sglang.tooling.serving import vlcache_state

        while not self._stop.is_set():
            try:
                s = vlcache_state(self.url)
                avail = int(s["available_kv_tokens"])
                live = int(s["max_total_num_tokens"]) - avail - int(s["evictable_kv_tokens"])
                self.low = avail if self.low is None else min(self.low, avail)
                self.live = live if self.live is None else max(self.live, live)
                self.polls += 1
            except Exception:
                pass
            self._stop.wait(POLL_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


class Clients:
    """``clients`` threads streaming ``images`` (each once, in order) at ``budget``; none sent after
    ``send_until``, a stream still open at ``cut_at`` is cut. ``samples`` fills as answers come
    (also when the run is stopped: SIGTERM sets STOP and the other clients end); ``wall`` is the
    phase's time to its last answer; ``poller`` watched the pool meanwhile."""

    def __init__(self, url: str, images: list[str], clients: int, budget: float | None, max_new: int,
                 send_until: float, cut_at: float, rid: str, desc: str):
        self.url, self.images, self.clients, self.budget, self.max_new = url, images, clients, budget, max_new
        self.send_until, self.cut_at, self.rid, self.desc = send_until, cut_at, rid, desc
        self.samples: list[dict] = []
        self.poller = PoolPoller(url)
        self.wall = 0.0

    def run(self) -> None:
        from tqdm import tqdm

        lock, nxt = threading.Lock(), [0]
        bar = tqdm(total=len(self.images), desc=self.desc, unit="req", mininterval=2.0)

        def client():
            while True:
                with lock:
                    i = nxt[0]
                    if i >= len(self.images) or time.monotonic() >= self.send_until or STOP.is_set():
                        return
                    nxt[0] += 1
                s = stream_one(self.url, self.images[i], self.budget, self.max_new, f"{self.rid}-{i}", self.cut_at)
                with lock:
                    self.samples.append(s)
                bar.update(1)

        t0 = time.monotonic()
        try:
            with self.poller, cf.ThreadPoolExecutor(max_workers=self.clients) as pool:
                futures = [pool.submit(client) for _ in range(self.clients)]
                try:
                    for f in futures:
                        f.result()
                except BaseException:  # SIGTERM (SystemExit) or a client's error: the others end now
                    STOP.set()
                    raise
        finally:
            bar.close()
            self.wall = max([s["end"] for s in self.samples if "end" in s], default=time.monotonic()) - t0


def run_phase(url: str, budget: float, images: list[str], clients: int, max_new: int,
              send_until: float, cut_at: float, phases: list[dict]) -> None:
    """All ``images`` at ``budget`` from ``clients`` threads; none sent after ``send_until``.
    Appends the phase's figures to ``phases``, also when it is interrupted (SIGTERM)."""
    from vlcache_sglang.tooling.serving import flush_cache, vlcache_state

    flush_cache(url)
    before = vlcache_state(url)
    run = Clients(url, images, clients, budget, max_new, send_until, cut_at, f"bench-{budget}", f"budget {budget}")
    try:
        run.run()
    finally:
        try:
            after = vlcache_state(url)
        except Exception:
            after = before
        phases.append(summarize(budget, run.samples, len(images), clients, run.wall, before, after, run.poller.low,
                                run.poller.live))
        phases[-1]["interrupted"] = STOP.is_set()


def summarize(budget, samples, planned, clients, wall, before, after, low, live=None) -> dict:
    ok = [s for s in samples if s["ok"]]
    ttft = sorted(s["ttft_s"] for s in ok)
    out_tokens = sum(s.get("completion_tokens", 0) for s in samples)
    return {
        "budget": budget, "planned": planned, "sent": len(samples), "ok": len(ok),
        "cut": sum(bool(s.get("cut")) for s in samples), "errors": [s["error"] for s in samples if "error" in s][:5],
        "clients": clients, "wall_s": wall,
        "ttft_median_s": statistics.median(ttft) if ttft else None,
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else None,
        "ttft_s": [round(t, 4) for t in ttft],
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall if wall > 0 else None,
        "prompt_tokens_mean": statistics.mean(s["prompt_tokens"] for s in ok) if ok else None,
        "compressed_meta": sum(s.get("kv_tokens_saved", 0) > 0 for s in samples),
        "kv_tokens_saved_meta": sum(s.get("kv_tokens_saved", 0) for s in samples),
        "compressed_server": after.get("requests_compressed", 0) - before.get("requests_compressed", 0),
        "kv_tokens_saved_server": after.get("kv_tokens_saved", 0) - before.get("kv_tokens_saved", 0),
        "available_kv_start": before["available_kv_tokens"], "max_total_num_tokens": before["max_total_num_tokens"],
        "peak_available_kv_drop": None if low is None else before["available_kv_tokens"] - low,
        "peak_live_kv": live,
    }


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    cpu = report.get("device") != "cuda"
    lines = [f"### Whole-server benchmark: {report.get('model_name')}, device {report.get('device')}, "
             f"{report.get('clients')} clients, {report.get('max_new')} new tokens per request"
             + (" (CPU: absolute times are not meaningful; compare the rows of this one run)" if cpu else ""),
             "", "| budget | requests ok / sent / planned | TTFT median (s) | TTFT p90 (s) | output tok/s | "
             "compressed (meta / server) | KV tokens saved (meta / server) | peak available_kv drop | "
             "peak live KV | wall (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in report.get("phases", []):
        lines.append(f"| {p['budget']} | {p['ok']} / {p['sent']} / {p['planned']} | "
                     f"{_fmt(p['ttft_median_s'], '.3f')} | "
                     f"{_fmt(p['ttft_p90_s'], '.3f')} | {_fmt(p['output_tokens_per_s'], '.1f')} | "
                     f"{p['compressed_meta']} / {p['compressed_server']} | {p['kv_tokens_saved_meta']:,} / "
                     f"{p['kv_tokens_saved_server']:,} | {_fmt(p['peak_available_kv_drop'], ',')} | "
                     f"{_fmt(p.get('peak_live_kv'), ',')} | {p['wall_s']:.1f} |")
    c = report.get("comparison")
    if c:
        lines += ["", f"budget {c['low']} vs {c['high']}: TTFT median x{_fmt(c['ttft_median'], '.2f')}, "
                  f"output tok/s x{_fmt(c['output_tokens_per_s'], '.2f')}, "
                  f"peak available_kv drop x{_fmt(c['peak_available_kv_drop'], '.2f')}, "
                  f"peak live KV x{_fmt(c.get('peak_live_kv'), '.2f')}"]
    if report.get("stopped"):
        lines += ["", f"stopped: {report['stopped']}"]
    return "\n".join(lines) + "\n"


def _ratio(a, b):
    return a / b if a is not None and b else None


def compare(phases: list[dict]) -> dict | None:
    """The lowest budget's figures over the highest's (same run, same images)."""
    if len(phases) < 2:
        return None
    hi, lo = max(phases, key=lambda p: p["budget"]), min(phases, key=lambda p: p["budget"])
    return {"high": hi["budget"], "low": lo["budget"], "ttft_median": _ratio(lo["ttft_median_s"], hi["ttft_median_s"]),
            "output_tokens_per_s": _ratio(lo["output_tokens_per_s"], hi["output_tokens_per_s"]),
            "peak_available_kv_drop": _ratio(lo["peak_available_kv_drop"], hi["peak_available_kv_drop"]),
            "peak_live_kv": _ratio(lo.get("peak_live_kv"), hi.get("peak_live_kv"))}


def write(report: dict, out: Path) -> str:
    report["comparison"] = compare(report["phases"])
    (out / "server_bench.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "server_bench.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--time-budget", type=float, default=180.0,
                    help="seconds for everything: server start, warm-up, phases, shutdown")
    ap.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.1])
    ap.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=96, help="requests per budget (the same images each time)")
    ap.add_argument("--max-new", type=int, default=64, help="tokens generated per request (ignore_eos)")
    ap.add_argument("--image-size", type=int, default=448,
                    help="square image side (bundled model: 448 gives 784 image tokens, an 802-token prompt)")
    ap.add_argument("--max-total-tokens", type=int, default=20000, help="the server's KV pool (tokens)")
    ap.add_argument("--model", type=Path, default=None,
                    help="default: the bundled model (on CUDA regrouped into heads of 64, as the smoke's FlashInfer phase)")
    ap.add_argument("--dtype", default=None, help="the server's --dtype (default: bfloat16 on CUDA, where the "
                    "FlashInfer executor serves and has no float32 kernels; float32 elsewhere)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more server argument (repeatable; --server-arg=--flag=value)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    smoke.stop_servers_on_sigterm()
    from tests.conftest import make_test_image, png_base64
    from vlcache_sglang.bundled import bundled_model_dir
    from vlcache_sglang.tooling.serving import has_cuda

    # on CUDA the FlashInfer executor serves: the bundled weights in heads FlashInfer has kernels for
    model = args.model or smoke.model_for(bundled_model_dir(), smoke.FLASHINFER_HEAD_DIM if has_cuda() else None)
    dtype = args.dtype or ("bfloat16" if has_cuda() else "float32")
    deadline = t_start + args.time_budget - min(SHUTDOWN_RESERVE_S, 0.15 * args.time_budget)
    side = (args.image_size, args.image_size)
    images = [png_base64(make_test_image(5000 + i, side)) for i in range(args.requests)]
    report = {"model": str(model), "model_name": Path(model).name, "device": "cuda" if has_cuda() else "cpu",
              "clients": args.clients, "max_new": args.max_new, "image_size": args.image_size,
              "time_budget_s": args.time_budget, "dtype": dtype,
              "server_args": smoke.GPU_PROFILE_ARGS + smoke.VLCACHE_EXTRA_ARGS + args.server_arg,
              "server_env": smoke.GPU_PROFILE_ENV, "phases": [], "warmup_s": {}}

    def bench(url: str) -> dict:
        report["server_ready_s"] = time.monotonic() - t_start
        for j, b in enumerate(args.budgets):  # first use of each path (JIT compiles) stays out of the figures
            t = time.monotonic()
            w = stream_one(url, png_base64(make_test_image(900 + j, side)), b, 4, f"warm-{b}", deadline)
            report["warmup_s"][str(b)] = {"seconds": time.monotonic() - t, "ok": w["ok"]}
        for i, b in enumerate(args.budgets):
            now = time.monotonic()
            if now >= deadline:
                report["stopped"] = f"time budget spent before budget {b}"
                break
            # the last tenth of a share is for the requests still streaming (not cut)
            send_until = now + 0.9 * (deadline - now) / (len(args.budgets) - i)
            run_phase(url, b, images, args.clients, args.max_new, send_until, deadline, report["phases"])
            write(report, args.out)
        return {}

    launch = {"startup_timeout": max(10.0, deadline - time.monotonic()), "max_total_tokens": args.max_total_tokens,
              "max_running_requests": max(args.clients, 16)}
    try:
        result = smoke.serve(model, "vlcache", args.out, "vlcache_bench",
                             ["--dtype", dtype] + smoke.VLCACHE_EXTRA_ARGS + args.server_arg,
                             bench, **launch)
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()[-3000:]}
    except BaseException as exc:  # SIGTERM: the server is already stopped; keep what was measured
        report["stopped"] = f"{type(exc).__name__} {exc} (SIGTERM: the backstop timeout)"
        report["total_s"] = time.monotonic() - t_start
        print(write(report, args.out))
        raise
    if not result.get("ok"):
        report["server_error"] = result.get("error")
        report.setdefault("stopped", "server failed (see server_vlcache_bench.log, server_error)")
    report["total_s"] = time.monotonic() - t_start
    md = write(report, args.out)
    print(md)
    if report.get("server_error"):
        print(f"--- server failed: {report['server_error'][:2000]}")
    measured = [p for p in report["phases"] if p["ok"] > 0]
    return 0 if len(measured) == len(args.budgets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
