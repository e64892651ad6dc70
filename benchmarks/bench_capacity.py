"""Capacity of one real SGLang server at budget 0.1 against full cache.

    python benchmarks/bench_capacity.py [--max-total-tokens 6000] [--requests 96]
    python benchmarks/bench_capacity.py --cells head --policy granularity=head --budgets 1.0 0.136

One `--attention-backend vlcache` server with a fixed `--max-total-tokens`; the same image
workload is sent twice through the per-request override (budget 1.0, then 0.1), so both runs
share the build, the process and the pool. Prints, per budget: the largest number of requests
running at once (SGLang's own `#running-req` log, written every decode step), request throughput, and the mean decode step
time of a single long-context request; then the ratios. CPU figures are ratios only.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import re
import sys
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import make_test_image, png_base64  # noqa: E402
from vlcache_sglang.bundled import tiny_random_model_dir  # noqa: E402
from vlcache_sglang.tooling.serving import running_server  # noqa: E402

PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "Describe the picture.<|im_end|>\n<|im_start|>assistant\n")
RUNNING = re.compile(r"Decode batch.*?#running-req: (\d+)")


def one(url: str, image_b64: str, budget: float, max_new: int, rid: str, policy: dict | None = None) -> int:
    """One request; returns the KV tokens its compression saved (0 when uncompressed)."""
    r = requests.post(f"{url}/generate", json={
        "text": PROMPT, "image_data": image_b64, "rid": rid,
        "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True,
                            "custom_params": {"vlcache": {"budget": budget, **(policy or {})}}},
    }, timeout=1800)
    r.raise_for_status()
    meta = r.json()["meta_info"]
    assert meta.get("cached_tokens", 0) < 32, "radix hit: every image must be new to the server"
    return int((meta.get("vlcache_kv_tokens_saved") or [0])[0])


def peak_running(log: Path, start: int) -> int:
    text = log.read_text(errors="replace")[start:]
    return max((int(x) for x in RUNNING.findall(text)), default=0)


def capacity_run(server, budget: float, n: int, image_size: int, max_new: int, policy: dict | None = None) -> dict:
    # images unique to this run: a radix hit would share the prefix and inflate capacity
    seed0 = 10_000 + int(budget * 1000) * n
    images = [png_base64(make_test_image(seed0 + i, (image_size, image_size))) for i in range(n)]
    offset = len(server.log_path.read_text(errors="replace"))
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        saved = list(pool.map(lambda i: one(server.url, images[i], budget, max_new, f"cap-{budget}-{i}", policy),
                              range(n)))
    elapsed = time.monotonic() - t0
    requests.post(f"{server.url}/flush_cache", timeout=60)
    return {"peak_running": peak_running(server.log_path, offset), "throughput": n / elapsed, "seconds": elapsed,
            "saved_per_request": sum(saved) / n}


def _json_or_text(value: str):
    """``0.7`` -> 0.7, ``true`` -> True, ``head`` -> "head" (policy values from the command line)."""
    import json

    try:
        return json.loads(value)
    except ValueError:
        return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--max-total-tokens", type=int, default=12000)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--image-size", type=int, default=896, help="px; 896 -> 1024 visual tokens")
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.1], help="the first is the reference")
    p.add_argument("--cells", choices=["layer", "head"], default="layer", help="--vlcache-cells of the server")
    p.add_argument("--policy", action="append", default=[], metavar="FIELD=VALUE",
                   help="a policy field every request sets (repeatable), e.g. granularity=head")
    args = p.parse_args()
    policy = {k: _json_or_text(v) for k, v in (kv.split("=", 1) for kv in args.policy)}
    model = args.model or tiny_random_model_dir()
    rows = {}
    with running_server(model, attention_backend="vlcache", max_total_tokens=args.max_total_tokens,
                        max_running_requests=args.requests, startup_timeout=600,
                        extra_args=["--decode-log-interval", "1", "--vlcache-cells", args.cells]) as server:
        for budget in args.budgets:
            print(f"capacity run, budget {budget} ...", flush=True)
            rows[budget] = capacity_run(server, budget, args.requests, args.image_size, args.max_new, policy)
    full, comp = rows[args.budgets[0]], rows[args.budgets[-1]]
    print()
    print(f"max_total_tokens={args.max_total_tokens}, {args.requests} requests of "
          f"{(args.image_size // 28) ** 2} visual tokens, {args.max_new} new tokens each; --vlcache-cells "
          f"{args.cells}, policy {policy or 'default'}")
    print("| budget | peak running requests | requests/s | KV tokens freed per request |")
    print("|---|---|---|---|")
    for b, r in rows.items():
        print(f"| {b} | {r['peak_running']} | {r['throughput']:.2f} | {r['saved_per_request']:.0f} |")
    print(f"| ratio {args.budgets[-1]:g} / {args.budgets[0]:g} | {comp['peak_running'] / max(1, full['peak_running']):.1f}x | "
          f"{comp['throughput'] / full['throughput']:.2f}x | |")


if __name__ == "__main__":
    main()
