"""Ten questions on one image: time to first token and KV memory per request, by sharing mode.

    python benchmarks/bench_radix_sharing.py [--pages 3] [--out benchmarks/results/radix_sharing.json]

One ``--attention-backend vlcache`` server (bundled trained model, CPU). For each configuration
the cache is flushed, then the ten questions of a page are asked

* one after the other (streaming), to time the first token of each: the first question pays for
  the image, the next nine show what sharing saves;
* the first alone, then all ten at once (16-token answers), sampling the pool while they run:
  peak KV in use / 10 is the memory per request (shared tree prefixes included).

Configurations: full cache (budget 1.0: stock radix sharing of the uncompressed prompt), unshared
compression (budget 0.1, ``sharing=off``), and the two sharing modes at budget 0.1 (``prefix``:
uncompressed image in the tree, each question selects from it; ``compressed``: the first
question's compressed image shared). Figures are CPU ratios from one run; accuracy is exact match.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import png_base64  # noqa: E402
from vlcache_sglang.bundled import bundled_model_dir  # noqa: E402
from vlcache_sglang.research.hf_eval.items import ChatPrompter  # noqa: E402
from vlcache_sglang.tooling.serving import running_server, vlcache_state  # noqa: E402
from vlcache_sglang.research.tasks.shared_page import questions_on_one_page  # noqa: E402

CONFIGS = {
    "full cache": {"budget": 1.0},
    "unshared 0.1": {"budget": 0.1, "sharing": "off"},
    "prefix 0.1": {"budget": 0.1, "sharing": "prefix"},
    "compressed 0.1": {"budget": 0.1, "sharing": "compressed"},
}


def first_token_time(url: str, text: str, image: str, vlcache: dict) -> tuple[float, str]:
    """Seconds to the first streamed chunk, and the whole answer."""
    payload = {"text": text, "image_data": image, "stream": True,
               "sampling_params": {"max_new_tokens": 12, "temperature": 0, "custom_params": {"vlcache": vlcache}}}
    t0, ttft, answer = time.perf_counter(), None, ""
    with requests.post(f"{url}/generate", json=payload, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            answer = json.loads(line[5:])["text"]
    return ttft, answer


def pool_used(url: str) -> int:
    s = vlcache_state(url)
    return s["max_total_num_tokens"] - s["available_kv_tokens"]


def peak_memory(url: str, texts: list[str], image: str, vlcache: dict) -> int:
    """Peak KV slots in use while all questions run at once (16-token answers), after the first
    question was asked alone (so whatever a mode shares is in the tree, as for an image that
    was asked about before)."""
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], pool_used(url))
            time.sleep(0.02)

    def run(text):
        payload = {"text": text, "image_data": image,
                   "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True,
                                       "custom_params": {"vlcache": vlcache}}}
        requests.post(f"{url}/generate", json=payload, timeout=600).raise_for_status()

    run(texts[0])
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with cf.ThreadPoolExecutor(max_workers=len(texts)) as pool:
        list(pool.map(run, texts))
    stop.set()
    poller.join()
    return peak[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pages", type=int, default=3, help="pages (ten questions each) per configuration")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "radix_sharing.json")
    args = p.parse_args()
    from PIL import Image

    prompter = ChatPrompter.from_pretrained(bundled_model_dir())
    pages = []
    for seed in range(args.pages):
        rgb, qa = questions_on_one_page(seed=200 + seed, n=10)
        pages.append((png_base64(Image.fromarray(rgb)), [prompter.text(q) for q, _ in qa], [a for _, a in qa]))
    results: dict[str, dict] = {}
    with running_server(bundled_model_dir(), attention_backend="vlcache", max_running_requests=10) as server:
        flush = lambda: requests.post(f"{server.url}/flush_cache", timeout=60).raise_for_status()  # noqa: E731
        flush()
        first_token_time(server.url, pages[0][1][0], pages[0][0], {"budget": 1.0})  # warm-up
        for name, vlcache in tqdm(CONFIGS.items(), desc="configurations"):
            first, rest, correct, peaks = [], [], 0, []
            for image, texts, answers in pages:
                flush()
                for i, (text, gold) in enumerate(zip(texts, answers)):
                    ttft, answer = first_token_time(server.url, text, image, vlcache)
                    (first if i == 0 else rest).append(ttft)
                    correct += answer.strip() == gold
                flush()
                peaks.append(peak_memory(server.url, texts, image, vlcache))
            results[name] = {"ttft_first_s": statistics.median(first), "ttft_rest_s": statistics.median(rest),
                             "kv_per_request": statistics.mean(peaks) / 10,
                             "accuracy": 100.0 * correct / (10 * len(pages))}
    base = results["unshared 0.1"]
    print(f"\nten questions per page, {args.pages} pages, CPU, one server run (medians of time to first token)")
    print("| configuration | TTFT q1 (s) | TTFT q2-q10 (s) | q2-q10 vs unshared | KV slots / request | "
          "vs unshared | accuracy (%) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['ttft_first_s']:.3f} | {r['ttft_rest_s']:.3f} | "
              f"{r['ttft_rest_s'] / base['ttft_rest_s']:.2f}x | {r['kv_per_request']:.1f} | "
              f"{r['kv_per_request'] / base['kv_per_request']:.2f}x | {r['accuracy']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"pages": args.pages, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
