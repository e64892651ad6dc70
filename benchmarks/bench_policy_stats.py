"""Cost of the policy's statistics relative to the prefill attention itself (CPU, one layer).

    PYTHONPATH=. python benchmarks/bench_policy_stats.py [--lengths 1024 4096 16384]

For each prompt length m it times, in one run and on the same random q/k/v of one layer:

* ``attention``: causal prefill attention, ``F.scaled_dot_product_attention(is_causal=True)``
  with GQA - what the engine computes anyway;
* ``vlcache``: the statistics of the post-vision window (``--window`` rows, VL-Cache/SnapKV/
  PyramidKV) through ``StatsAccumulator.add`` (chunked two-pass softmax, threshold counts);
* ``h2o``: the same for every prompt row (H2O), the worst case;
* ``plan``: ``build_plan`` (budgets + pooling + top-k) for ``--layers`` layers divided by the
  layer count, i.e. per layer.

Ratios are ``time / attention time`` (best of ``--repeats`` interleaved rounds). Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F

from vlcache_sglang.policy import PolicyConfig, PolicyStats, StatsAccumulator, build_plan, locate_window


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per function, the functions interleaved within each round
    so that load from other processes hits them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench(m: int, hq: int, hkv: int, d: int, window: int, layers: int, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(m)
    q = torch.randn(m, hq, d, generator=g)
    k = torch.randn(m, hkv, d, generator=g)
    v = torch.randn(m, hkv, d, generator=g)
    scale = d ** -0.5
    pos = torch.arange(m)
    spans = [(8, m - window - 1)]  # one image, then a `window`-token question

    def attention() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                              v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)

    def stats(method: str) -> Callable[[], object]:
        cfg = PolicyConfig(method=method, window_size=window)
        win = locate_window(m, spans, cfg)

        def run() -> None:
            StatsAccumulator(1, hq, hkv, m, win, cfg).add(0, q, pos, k, scale)
        return run

    cfg = PolicyConfig(alpha=0.1)
    win = locate_window(m, spans, cfg)
    synthetic = PolicyStats(m, layers, hq, hkv, win, "window", torch.rand(layers, hkv, m, generator=g),
                            torch.randint(0, 1000, (layers, hq), generator=g),
                            torch.full((layers, hq), 1000, dtype=torch.int64), [win.length] * layers)

    attention()  # warm-up (first-call allocations) outside the timed rounds
    fns = {"attention": attention, "vlcache": stats("vlcache"), "h2o": stats("h2o"),
           "plan": lambda: build_plan(synthetic, cfg)}
    out = _interleaved(fns, repeats)
    out["plan"] /= layers
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--q-heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=50, help="post-vision window rows")
    ap.add_argument("--layers", type=int, default=32, help="layers for the plan-building cost")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 keeps ratios stable on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; one layer, "
          f"Hq={args.q_heads} Hkv={args.kv_heads} D={args.head_dim}, window={args.window} rows; "
          f"best of {args.repeats}, interleaved")
    header = f"{'m':>6} | {'attention ms':>12} | {'vlcache stats':>20} | {'h2o stats (all rows)':>22} | {'plan / layer':>18}"
    print(header)
    print("-" * len(header))
    for m in args.lengths:
        r = bench(m, args.q_heads, args.kv_heads, args.head_dim, args.window, args.layers, args.repeats)
        a = r["attention"]

        def cell(key: str, width: int) -> str:
            return f"{r[key] * 1e3:9.2f} ms {r[key] / a:6.1%}".rjust(width)
        print(f"{m:>6} | {a * 1e3:12.1f} | {cell('vlcache', 20)} | {cell('h2o', 22)} | {cell('plan', 18)}",
              flush=True)


if __name__ == "__main__":
    main()
