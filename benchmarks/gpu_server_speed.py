"""Serving speed of compression against the stock backend on Qwen2-VL-7B's shapes (issue 21 item 3).

    python3 benchmarks/gpu_server_speed.py --out "$OUT" --time-budget 300              # GPU: 7B, FlashInfer
    python3 benchmarks/gpu_server_speed.py --out /tmp/speed --scale rehearsal \\
        --visual-tokens 256 1024 --batch 8 --requests 8 --single 2 --max-new 16       # CPU rehearsal

Two servers on the same weights-free model folder
(:mod:`vlcache_sglang.fixtures.qwen2vl_7b_dummy`, ``--load-format dummy``: random weights, nothing
downloaded): the stock backend (``flashinfer`` on CUDA, ``torch_native`` on the CPU) and
``--attention-backend vlcache`` (its FlashInfer executor on CUDA), both with the GPU profile of
``gpu_server_smoke`` (torch fused ops, torch sampler), prefill CUDA graphs off on both, decode
graphs on (CUDA), one ``--max-total-tokens`` pool sized for ``--pool-requests`` uncompressed
requests of the smallest image. Every request of a run has its own image (no radix or
multimodal-cache hits), the same images on both servers; ``ignore_eos``.

Per image size (``--visual-tokens``: 2,048 -> 1,260 px, 2,025 tokens; 8,192 -> 2,520 px, 8,100):

* ``single``: ``--single`` requests one after the other: time to first token (prefill, vision
  encoder, and for vlcache the statistics, plan and compaction: the overhead the issue bounds at
  3 %) and the decode step time at batch 1 (mean time between streamed tokens);
* ``batch``: ``--requests`` requests from ``--batch`` concurrent clients: requests/s, output
  tokens/s, decode step time, and the peak number of running requests (SGLang's own
  ``#running-req`` decode log): at the smallest size the pool holds every stock request (the
  paper's batch-64 comparison), at the larger ones it caps the stock server and shows capacity.

vlcache requests carry ``budget`` ``--budget`` (0.1). On CUDA both servers are up at once (their
start-up overlaps; they are measured one at a time, stock first, phase by phase, so a run cut short
keeps complete pairs); on the CPU one after the other (an idle SGLang server keeps a core busy).
Everything stays within ``--time-budget``. ``server_speed.json`` / ``server_speed.md`` are
rewritten after every measurement. Ratios are vlcache over stock; absolute times mean something
only on a GPU.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_server_bench as bench  # noqa: E402
import gpu_server_smoke as smoke  # noqa: E402
from bench_capacity import peak_running  # noqa: E402

SIDES = ("stock", "vlcache")
TEXT_TOKENS = 64  # the prompt's text around the image, rounded up (pool sizing)
SHUTDOWN_RESERVE_S = 25.0
GIB = 1 << 30
#: per server, beyond weights and pool: CUDA context, decode graphs, prefill and vision activations
WORKING_RESERVE_BYTES = 3 * GIB
#: above this --mem-fraction-static the two servers do not fit one GPU together
MAX_TOGETHER_FRACTION = 0.9


DECODE_LOG = re.compile(r"Decode batch.*?#running-req: (\d+).*?gen throughput \(token/s\): ([0-9.]+)")


def decode_steps(log: Path, offset: int, min_steps: int = 3) -> dict[int, float]:
    """Batch size -> median decode step time (s) from SGLang's own decode log (``--decode-log-interval
    1``: one line per step, ``#running-req / gen throughput`` is that step's time; a line whose
    interval also held a prefill is slower, the median keeps them out), sizes with ``min_steps``."""
    by_size: dict[int, list[float]] = {}
    for running, tput in DECODE_LOG.findall(log.read_text(errors="replace")[offset:]):
        if float(tput) > 0:
            by_size.setdefault(int(running), []).append(int(running) / float(tput))
    return {n: statistics.median(v) for n, v in sorted(by_size.items()) if len(v) >= min_steps}


def pool_tokens(smallest_visual_tokens: int, requests: int, max_new: int) -> int:
    """``--max-total-tokens``: ``requests`` uncompressed requests of the smallest image, whole."""
    return requests * (smallest_visual_tokens + TEXT_TOKENS + max_new)


def together_mem_fraction(free_bytes: int, weights_bytes: int, pool_bytes: int,
                          reserve_bytes: int = WORKING_RESERVE_BYTES) -> float:
    """The smallest ``--mem-fraction-static`` (rounded up to 0.01) with which two servers started
    together on one GPU both get their whole ``--max-total-tokens`` pool, whichever profiles first.

    SGLang 0.5.23 sizes a pool as ``free_at_profile - B x (1 - f)`` bytes
    (``KVCacheConfigurator._profile_available_bytes``), ``B`` the free memory before its own weights
    loaded, and then takes ``min(that, --max-total-tokens)`` with only a warning. ``B`` is at most
    ``free_bytes``; the server that profiles last sees both sets of weights and the other's pool and
    working memory gone: ``free - 2W - P - 2R - free x (1 - f) >= P``, so ``f >= (2W + 2P + 2R) / free``.
    Raises when that exceeds :data:`MAX_TOGETHER_FRACTION` (the two do not fit together)."""
    need = 2 * (weights_bytes + pool_bytes + reserve_bytes)
    fraction = math.ceil(100 * need / free_bytes) / 100
    if fraction > MAX_TOGETHER_FRACTION:
        raise ValueError(
            f"two servers of {weights_bytes / GIB:.1f} GiB weights and a {pool_bytes / GIB:.1f} GiB pool need "
            f"{need / GIB:.1f} GiB together, --mem-fraction-static {fraction:.2f} of the {free_bytes / GIB:.1f} GiB "
            "free: run them one after the other (--no-together) or shrink the pool (--pool-requests)")
    return fraction


def server_memory(model: Path, dtype: str, pool_tokens_: int) -> tuple[int, int]:
    """(weights bytes, vlcache pool bytes) of one server on ``model``: parameters x dtype size, and
    ``pool_tokens_`` cells of K and V over every layer plus the plugin's tables per slot
    (:func:`~vlcache_sglang.backend.memory_budget.table_bytes_per_slot`; the stock pool is smaller)."""
    import torch
    from transformers import AutoConfig

    from vlcache_sglang.backend.memory_budget import table_bytes_per_slot
    from vlcache_sglang.fixtures.qwen2vl_7b_dummy import parameter_count

    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    text = AutoConfig.from_pretrained(model).text_config
    head_dim = text.hidden_size // text.num_attention_heads
    cell = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * size
    cell += table_bytes_per_slot(text.num_hidden_layers, graph_buffers=True)
    return parameter_count(model) * size, pool_tokens_ * cell


def pool_mismatch(requested: int, pools: dict[str, int | None], mem_fraction: float | None) -> str | None:
    """Why the servers' pools cannot be compared (``None`` when each holds exactly ``requested``
    tokens): a capacity or throughput ratio between different pools measures the pools."""
    wrong = {side: n for side, n in pools.items() if n != requested}
    if not wrong:
        return None
    got = ", ".join(f"{side} {n:,}" if n is not None else f"{side} unknown" for side, n in wrong.items())
    hint = (f"raise --mem-fraction-static (it was {mem_fraction})" if mem_fraction is not None
            else "give the servers more memory")
    return (f"pools differ from the requested --max-total-tokens {requested:,} ({got}): SGLang took its "
            f"smaller profiled pool; {hint} or run the servers one after the other (--no-together). "
            "Batch phases skipped (their ratios would compare pools); single phases measured")


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(handle, side: str, images: list[str], clients: int, budget: float | None, max_new: int,
            send_until: float, cut_at: float, label: str) -> dict:
    """``images`` from ``clients`` streaming clients against one server; its figures."""
    from vlcache_sglang.tooling.serving import flush_cache, vlcache_state

    flush_cache(handle.url)
    before = vlcache_state(handle.url)
    offset = len(handle.log_path.read_text(errors="replace"))
    run = bench.Clients(handle.url, images, clients, budget, max_new, send_until, cut_at, f"{label}-{side}",
                        f"{label} {side}")
    run.run()
    samples, wall, poller = run.samples, run.wall, run.poller
    after = vlcache_state(handle.url)
    ok = [s for s in samples if s["ok"]]
    return {
        "sent": len(samples), "ok": len(ok), "planned": len(images), "clients": clients, "wall_s": wall,
        "errors": [s["error"] for s in samples if "error" in s][:3],
        "requests_per_s": len(ok) / wall if wall > 0 and ok else None,
        "output_tokens_per_s": sum(s["completion_tokens"] for s in ok) / wall if wall > 0 and ok else None,
        "ttft_median_s": median(s["ttft_s"] for s in ok), "itl_median_s": median(s["itl_s"] for s in ok),
        "prompt_tokens_mean": statistics.mean(s["prompt_tokens"] for s in ok) if ok else None,
        "kept_ratio_median": median(s.get("kept_ratio") for s in ok),
        "kv_tokens_saved": after.get("kv_tokens_saved", 0) - before.get("kv_tokens_saved", 0),
        "requests_compressed": after.get("requests_compressed", 0) - before.get("requests_compressed", 0),
        "peak_running": peak_running(handle.log_path, offset), "peak_live_kv": poller.live,
        "decode_step_s_by_batch": decode_steps(handle.log_path, offset),
        "max_total_num_tokens": before.get("max_total_num_tokens"),
    }


def ratio(a, b):
    return a / b if a is not None and b else None


def pairs(report: dict) -> list[dict]:
    """vlcache over stock for every phase both servers measured."""
    rows = []
    for key, phase in report["phases"].items():
        s, v = phase.get("stock"), phase.get("vlcache")
        if not (s and v and s.get("ok") and v.get("ok")):
            continue
        if phase["kind"] == "batch" and report.get("pool_mismatch"):
            continue  # its ratios would compare two pools (see pool_mismatch)
        row = {"phase": key, "visual_tokens": phase["visual_tokens"], "kind": phase["kind"]}
        for fig in ("peak_running", "requests_per_s", "output_tokens_per_s", "ttft_median_s", "itl_median_s"):
            row[fig] = (s.get(fig), v.get(fig), ratio(v.get(fig), s.get(fig)))
        if phase["kind"] == "single" and row["ttft_median_s"][2] is not None:
            row["ttft_overhead_pct"] = 100.0 * (row["ttft_median_s"][2] - 1.0)
        # decode step time at the largest batch size both servers ran for several steps
        common = set(s["decode_step_s_by_batch"]) & set(v["decode_step_s_by_batch"])
        if phase["kind"] == "batch" and common:
            n = max(common)
            a, b = s["decode_step_s_by_batch"][n], v["decode_step_s_by_batch"][n]
            row["decode_step_s"] = (a, b, ratio(b, a))
            row["decode_step_batch"] = n
        rows.append(row)
    return rows


def _f(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    cpu = report["device"] != "cuda"
    lines = [f"### Serving speed, {report['scale']} Qwen2-VL-7B shapes (dummy weights), {report['device']}"
             + (f" ({report.get('gpu')})" if report.get("gpu") else ""),
             "", f"stock `{report['stock_backend']}` vs `vlcache` at budget {report['budget']}; pool "
             f"{report['max_total_tokens']:,} tokens"
             + (f" (--mem-fraction-static {report['mem_fraction_static']} each, both up together)"
                if report.get("together") and report.get("mem_fraction_static") else "")
             + f"; {report['max_new']} new tokens per request"
             + ("; CPU: only the ratios of this one run mean anything" if cpu else ""), "",
             "| visual tokens | phase | figure | stock | vlcache | vlcache / stock |", "|---|---|---|---|---|---|"]
    names = {"peak_running": ("peak running requests", "d"), "requests_per_s": ("requests/s", ".3f"),
             "output_tokens_per_s": ("output tokens/s", ".1f"), "ttft_median_s": ("TTFT median (s)", ".4f"),
             "itl_median_s": ("decode step at batch 1, mean between tokens (s)", ".4f"),
             "decode_step_s": ("", ".4f")}
    for row in pairs(report):
        figs = ("ttft_median_s", "itl_median_s") if row["kind"] == "single" else (
            "peak_running", "requests_per_s", "output_tokens_per_s", "ttft_median_s", "decode_step_s")
        for fig in (f for f in figs if f in row):
            s, v, r = row[fig]
            label, spec = names[fig]
            if fig == "decode_step_s":
                label = f"decode step at batch {row['decode_step_batch']} (s, SGLang's log)"
            lines.append(f"| {row['visual_tokens']:,} | {row['kind']} | {label} | {_f(s, spec)} | {_f(v, spec)} | "
                         f"{_f(r, '.2f')}x |")
        if "ttft_overhead_pct" in row:
            lines.append(f"| {row['visual_tokens']:,} | single | TTFT overhead | | | {row['ttft_overhead_pct']:+.1f} % |")
    for key, phase in report["phases"].items():
        for side in SIDES:
            res = phase.get(side) or {}
            if res and (res.get("ok", 0) < res.get("planned", 0) or res.get("errors")):
                lines.append(f"\n{key} {side}: {res.get('ok')} of {res.get('planned')} requests measured "
                             f"({res.get('sent')} sent) {res.get('errors') or ''}")
    for key in ("memory_warning", "pool_mismatch", "stopped"):
        if report.get(key):
            lines += ["", f"{key.replace('_', ' ')}: {report[key]}"]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> str:
    report["ratios"] = pairs(report)
    (out / "server_speed.json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    (out / "server_speed.md").write_text(md)
    return md


def server_specs(model: Path, args, out: Path, cuda: bool, stock_backend: str) -> dict[str, dict]:
    """Both servers' :func:`gpu_server_smoke.launch_spec`: the same flags, pool and profile."""
    common = ["--load-format", "dummy", "--dtype", args.dtype, "--decode-log-interval", "1",
              "--cuda-graph-backend-prefill=disabled"]
    if cuda:
        common += ["--mm-attention-backend", args.mm_attention_backend,
                   "--cuda-graph-max-bs-decode", str(args.max_running)]
        if args.together:  # two servers share the GPU: each keeps to its part
            common += ["--mem-fraction-static", str(args.mem_fraction_static)]
    launch = {"max_total_tokens": args.max_total_tokens, "max_running_requests": args.max_running}
    return {"stock": smoke.launch_spec(model, stock_backend, out, "speed_stock", common, **launch),
            "vlcache": smoke.launch_spec(model, "vlcache", out, "speed_vlcache", common, **launch)}


def main(argv: list[str] | None = None) -> int:
    from vlcache_sglang.fixtures.qwen2vl_7b_dummy import image_side_for, write_dummy_model
    from vlcache_sglang.tooling.serving import has_cuda, running_servers, vlcache_state

    cuda = has_cuda()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds for everything, server starts included")
    ap.add_argument("--scale", choices=["7b", "rehearsal"], default="7b" if cuda else "rehearsal")
    ap.add_argument("--visual-tokens", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--batch", type=int, default=64, help="concurrent clients of the batch phase")
    ap.add_argument("--requests", type=int, default=64, help="requests of each batch phase")
    ap.add_argument("--single", type=int, default=4, help="requests of each single phase")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--pool-requests", type=int, default=None,
                    help="the pool holds this many uncompressed requests of the smallest size (default --batch)")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--mm-attention-backend", default="triton_attn",
                    help="vision attention on CUDA (sdpa builds an s x s mask: 1 GB per 8K-token image)")
    ap.add_argument("--mem-fraction-static", type=float, default=None,
                    help="each server's, when both are up together (default: the smallest with which both "
                         "get the whole pool on this GPU, see together_mem_fraction)")
    ap.add_argument("--together", action=argparse.BooleanOptionalAction, default=cuda,
                    help="both servers up at once (default on CUDA)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    deadline = t_start + args.time_budget - SHUTDOWN_RESERVE_S
    args.out.mkdir(parents=True, exist_ok=True)
    smoke.stop_servers_on_sigterm()
    from tests.conftest import make_test_image, png_base64

    sizes = sorted({image_side_for(n) for n in args.visual_tokens})
    args.max_total_tokens = pool_tokens(sizes[0][1], args.pool_requests or args.batch, args.max_new)
    args.max_running = max(args.batch, args.requests)
    model = write_dummy_model(Path(tempfile.gettempdir()) / f"vlcache-qwen2vl-{args.scale}-dummy", args.scale)
    stock_backend = "flashinfer" if cuda else "torch_native"
    report = {"scale": args.scale, "device": "cuda" if cuda else "cpu", "budget": args.budget,
              "stock_backend": stock_backend, "max_total_tokens": args.max_total_tokens,
              "max_new": args.max_new, "together": args.together,
              "args": {k: str(v) for k, v in vars(args).items()}, "phases": {}}
    if cuda:
        import torch

        report["gpu"] = torch.cuda.get_device_name()
        if args.together:
            weights, pool = server_memory(model, args.dtype, args.max_total_tokens)
            free = torch.cuda.mem_get_info()[0]
            needed = together_mem_fraction(free, weights, pool)
            report["memory_gib"] = {"free": round(free / GIB, 2), "weights": round(weights / GIB, 2),
                                    "pool": round(pool / GIB, 2), "mem_fraction_needed": needed}
            if args.mem_fraction_static is None:
                args.mem_fraction_static = needed
            elif args.mem_fraction_static < needed:
                report["memory_warning"] = (f"--mem-fraction-static {args.mem_fraction_static} is below the "
                                            f"{needed} both servers need for the whole pool on this GPU")
                print(report["memory_warning"], flush=True)
        report["mem_fraction_static"] = args.mem_fraction_static

    def build_plan() -> tuple[list, dict]:
        """[(key, visual tokens, kind, images)] and a warm-up image per size: the same images on
        both servers, every one its own (PNG encoding of 8K-token images takes a while: it runs
        while the servers start)."""
        plan = []
        for j, (side, tokens) in enumerate(sizes):
            px = (side, side)
            plan.append((f"{tokens}-single", tokens, "single",
                         [png_base64(make_test_image(20_000 + 1000 * j + i, px)) for i in range(args.single)]))
            plan.append((f"{tokens}-batch", tokens, "batch",
                         [png_base64(make_test_image(40_000 + 1000 * j + i, px)) for i in range(args.requests)]))
        warm = {tokens: png_base64(make_test_image(900 + j, (side, side))) for j, (side, tokens) in enumerate(sizes)}
        return plan, warm

    planned = cf.ThreadPoolExecutor(max_workers=1).submit(build_plan)
    n_phases = 2 * len(sizes)
    measurements_left = [n_phases * len(SIDES)]

    def run(handle, side: str, key: str, tokens: int, kind: str, images: list[str], warm: dict) -> None:
        now = time.monotonic()
        if now >= deadline:
            report["stopped"] = f"time budget spent before {key} {side}"
            return
        if kind == "batch" and report.get("pool_mismatch"):
            measurements_left[0] -= 1
            return
        share = (deadline - now) / max(1, measurements_left[0])
        measurements_left[0] -= 1
        budget = args.budget if side == "vlcache" else None
        phase = report["phases"].setdefault(key, {"visual_tokens": tokens, "kind": kind})
        if (tokens, side) not in warmed:  # JIT builds and autotuning stay out of the figures
            bench.stream_one(handle.url, warm[tokens], budget, 4, f"warm-{tokens}-{side}", now + share)
            warmed.add((tokens, side))
            share, now = max(1.0, share - (time.monotonic() - now)), time.monotonic()
        phase[side] = measure(handle, side, images, 1 if kind == "single" else args.batch, budget, args.max_new,
                              now + 0.85 * share, now + share, key)
        print(write(report, args.out), flush=True)

    warmed: set = set()
    specs = server_specs(model, args, args.out, cuda, stock_backend)
    groups = [list(SIDES)] if args.together else [[s] for s in SIDES]
    try:
        for group in groups:
            for spec in (specs[s] for s in group):
                spec["startup_timeout"] = max(10.0, deadline - time.monotonic())
            with running_servers({s: specs[s] for s in group}) as handles:
                report.setdefault("startup_s", {}).update({s: round(time.monotonic() - t_start, 1) for s in group})
                for s, h in handles.items():
                    if isinstance(h, Exception):
                        report.setdefault("server_errors", {})[s] = f"{type(h).__name__}: {h}"[-3000:]
                up = {s: h for s, h in handles.items() if not isinstance(h, Exception)}
                report.setdefault("pools", {}).update({s: vlcache_state(h.url).get("max_total_num_tokens")
                                                       for s, h in up.items()})
                report["pool_mismatch"] = pool_mismatch(args.max_total_tokens, report["pools"],
                                                        args.mem_fraction_static if args.together else None)
                plan, warm = planned.result()
                for key, tokens, kind, phase_images in plan:
                    for s in group:
                        if s in up:
                            run(up[s], s, key, tokens, kind, phase_images, warm)
    except Exception:
        report["error"] = traceback.format_exc()[-3000:]
    except BaseException as exc:  # SIGTERM: servers are stopped; keep what was measured
        report["stopped"] = f"{type(exc).__name__} {exc} (SIGTERM: the backstop timeout)"
        print(write(report, args.out))
        raise
    report["total_s"] = round(time.monotonic() - t_start, 1)
    print(write(report, args.out))
    for s, e in report.get("server_errors", {}).items():
        print(f"--- {s} server failed: {e[:2000]}")
    if report.get("error"):
        print(report["error"])
    return 0 if len(report["ratios"]) == n_phases else 1


if __name__ == "__main__":
    raise SystemExit(main())
