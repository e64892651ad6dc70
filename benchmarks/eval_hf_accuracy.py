"""Accuracy and fidelity against the KV budget, every policy, in Hugging Face transformers.

    python benchmarks/eval_hf_accuracy.py [--methods ...] [--alphas ...] [--n 32] [--split heldout]

For every item of the split: one full-attention HF prefill (post-RoPE q/k captured), then per
(method, alpha) the plan the SGLang backend would build (same policy code), each layer's cache
cropped to it, and greedy decoding (first token from the prefill logits). Prints the tables
(accuracy, measured kept share, token agreement, KL), writes them as JSON (every item's outcome
too with --save-items) and the figure as PNG. See docs/accuracy-vs-budget.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALPHAS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 1.0]


def parse_args(argv: list[str] | None = None):
    from vlcache_sglang.bundled import bundled_model_dir
    from vlcache_sglang.research.hf_eval.report import method_order
    from vlcache_sglang.policy import PolicyConfig, PolicyConfigError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=None, help="registered method names (default: all)")
    p.add_argument("--alphas", type=float, nargs="+", default=ALPHAS)
    p.add_argument("--n", type=int, default=32, help="items per question type (32 = the whole split)")
    p.add_argument("--qtypes", nargs="+", default=None, help="question types (default: all of the split)")
    p.add_argument("--split", default="heldout", help="a split directory under --data")
    p.add_argument("--data", default=str(ROOT / "data" / "tinyvlm-docvqa"))
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hf_accuracy_vs_budget.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "figures" / "accuracy_vs_budget.png"))
    p.add_argument("--save-items", action="store_true", help="also store every item's outcome in the JSON")
    p.add_argument("--recent-window", choices=["shared", "per_layer"], default=None,
                   help="PolicyConfig.recent_window of every policy (default: the policy default)")
    args = p.parse_args(argv)
    args.model = args.model or str(bundled_model_dir())
    args.methods = args.methods or method_order()
    if args.n < 1 or args.max_new_tokens < 1 or args.threads < 1:
        p.error("--n, --max-new-tokens and --threads must be >= 1")
    try:
        extra = {} if args.recent_window is None else {"recent_window": args.recent_window}
        args.policies = [PolicyConfig(method=m, alpha=a, **extra) for m in args.methods for a in args.alphas]
    except PolicyConfigError as e:
        p.error(f"invalid policy: {e}")
    split_dir = Path(args.data) / args.split
    if not split_dir.is_dir():
        p.error(f"no split directory {split_dir}")
    args.split_dir = split_dir
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    from vlcache_sglang.research.hf_eval import ChatPrompter, evaluate_policies, items_from_dataset, load_model
    from vlcache_sglang.research.hf_eval.report import markdown_tables, plot_accuracy_vs_budget
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    torch.set_num_threads(args.threads)
    items = items_from_dataset(load_eval_dataset(args.split_dir), args.n, args.qtypes)
    model = load_model(args.model)
    prompter = ChatPrompter.from_pretrained(args.model)
    print(f"{len(items)} items ({args.split}), {len(args.policies)} policies, model {args.model}", flush=True)
    t0 = time.monotonic()
    results = evaluate_policies(model, prompter, items, args.policies, args.max_new_tokens)
    seconds = time.monotonic() - t0
    tables = markdown_tables(results)
    header = (f"{len(items)} {args.split} items, HF transformers greedy, max {args.max_new_tokens} new tokens; "
              f"{seconds:.0f} s on {platform.machine()} CPU ({os.cpu_count()} cores, {args.threads} torch thread(s))")
    print("\n" + header + "\n\n" + tables)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python benchmarks/eval_hf_accuracy.py", *sys.argv[1:]]),
        "model": str(Path(args.model).resolve().relative_to(ROOT)) if Path(args.model).resolve().is_relative_to(ROOT)
        else args.model,
        "split": args.split, "n_items": len(items), "methods": args.methods, "alphas": args.alphas,
        "recent_window": args.recent_window,
        "max_new_tokens": args.max_new_tokens, "seconds": round(seconds, 1), "threads": args.threads,
        "machine": " ".join(x for x in (platform.machine(), platform.processor(), f"{os.cpu_count()} cores") if x),
        "torch": torch.__version__, "tables_markdown": tables,
        "results": [r.to_dict(include_items=args.save_items) for r in results],
    }, indent=1))
    png = plot_accuracy_vs_budget(results, args.plot, title=f"tinyvlm-docvqa, {args.split}, {len(items)} items "
                                  "(HF reference: plan applied after prefill, greedy)")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
