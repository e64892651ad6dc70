"""Accuracy of the bundled model through a real SGLang server at several budgets and methods.

    python benchmarks/eval_server_accuracy.py [--budgets 0.05 0.1 0.2] [--n 32]

One `--attention-backend vlcache` server; every (method, budget) is a per-request override, so
all cells of the table come from one run of one server. Items: the held-out split shipped in
data/tinyvlm-docvqa (grid 16 = 256 visual tokens). Exact match of the whole answer (case and
spacing normalised). Requests and scoring: tuning/evaluator.py (shared with tune.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tuning.data import load_items  # noqa: E402
from tuning.evaluator import FULL_CACHE, ServerEvaluator  # noqa: E402
from vlcache_sglang.bundled import bundled_model_dir  # noqa: E402
from vlcache_sglang.policy import PolicyConfig  # noqa: E402
from vlcache_sglang.tooling.serving import running_server  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["vlcache", "snapkv", "h2o", "streamingllm", "random"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--qtypes", nargs="+", default=["single", "multi"])
    p.add_argument("--n", type=int, default=32, help="items per question type")
    args = p.parse_args()
    items = load_items(ROOT / "data" / "tinyvlm-docvqa", "heldout", groups=args.qtypes, per_group=args.n)
    cells = [("full", 1.0)] + [(m, b) for m in args.methods for b in args.budgets]
    acc: dict[tuple[str, float, str], float] = {}
    # every request carries its whole policy (PolicyConfig defaults + method and budget), and
    # 'none' keeps a tuned per-model default file out of the server
    with running_server(bundled_model_dir(), attention_backend="vlcache",
                        extra_args=["--vlcache-config", "none"]) as server:
        evaluator = ServerEvaluator(server.url, max_tokens=16, concurrency=8)
        for method, budget in tqdm(cells, desc="methods x budgets"):
            policy = FULL_CACHE if method == "full" else PolicyConfig(method=method, alpha=budget)
            result = evaluator.evaluate(policy, items)
            for qtype in args.qtypes:
                acc[(method, budget, qtype)] = 100.0 * result.per_group[qtype]
    print(f"\nheld-out, {args.n} items per type, exact match (%), one server run")
    print("| method | budget | " + " | ".join(args.qtypes) + " |")
    print("|---|---|" + "---|" * len(args.qtypes))
    for method, budget in cells:
        print(f"| {method} | {budget} | " + " | ".join(f"{acc[(method, budget, q)]:.1f}" for q in args.qtypes) + " |")


if __name__ == "__main__":
    main()
