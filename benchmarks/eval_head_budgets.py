"""Accuracy against the KV memory a server actually holds: layer plans, per-head plans held as the
union over heads (layer cells) and per-head plans held per head (``--vlcache-cells head``).

    python benchmarks/eval_head_budgets.py [--alphas 0.05 0.1 0.2] [--n 32] [--split heldout]

Hugging Face harness on the bundled model (``vlcache_sglang.research.hf_eval``): every item is
prefilled once per cell mode, each policy's plan (the server's policy code) is applied after the
prefill (per KV head with head cells: each head's query group masked off what it dropped, as the
server's per-head lists), and greedy answers are scored by exact match. "held" is the share of the
prompt's KV the request keeps: ``sum_l |kept_l| / (L m)`` with layer cells, ``sum_{l,h} k_{l,h} /
(L H m)`` with head cells. Writes a JSON table and a PNG (accuracy against held share).
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

#: (label, policy fields beyond alpha, cells)
VARIANTS = [
    ("layer", {}, "layer"),
    ("head uniform, union (layer cells)", {"granularity": "head"}, "layer"),
    ("head adaptive, union (layer cells)", {"granularity": "head", "head_budget": "adaptive"}, "layer"),
    ("head uniform, per head (head cells)", {"granularity": "head"}, "head"),
    ("head adaptive, per head (head cells)", {"granularity": "head", "head_budget": "adaptive"}, "head"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--n", type=int, default=32, help="items per question type (32 = the whole split)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--data", default=str(ROOT / "data" / "tinyvlm-docvqa"))
    p.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "head_budgets.json"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "figures" / "head_budgets.png"))
    args = p.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 1 or any(not 0 < a <= 1 for a in args.alphas):
        p.error("--n and --max-new-tokens must be >= 1 and every alpha in (0, 1]")
    return args


def table(rows: list[dict], alphas: list[float]) -> str:
    lines = ["| variant | " + " | ".join(f"alpha {a:g}: accuracy / held" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)]
    for label in dict.fromkeys(r["variant"] for r in rows):
        cells = {r["alpha"]: r for r in rows if r["variant"] == label}
        lines.append(f"| {label} | " + " | ".join(
            f"{cells[a]['accuracy']:.3f} / {cells[a]['held_ratio']:.3f}" for a in alphas) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], full_accuracy: float, path: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["held_ratio"], r["accuracy"]) for r in rows if r["variant"] == label)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.axhline(full_accuracy, color="grey", linestyle="--", label="full cache")
    ax.set_xlabel("share of the prompt's KV held")
    ax.set_ylabel("exact-match accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from vlcache_sglang.bundled import bundled_model_dir
    from vlcache_sglang.policy import PolicyConfig
    from vlcache_sglang.research.hf_eval import ChatPrompter, evaluate_policies, items_from_dataset, load_model
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    torch.set_num_threads(args.threads)
    model_dir = args.model or str(bundled_model_dir())
    items = items_from_dataset(load_eval_dataset(Path(args.data) / args.split), args.n)
    model, prompter = load_model(model_dir), ChatPrompter.from_pretrained(model_dir)
    rows, full = [], None
    t0 = time.monotonic()
    for cells in ("layer", "head"):
        chosen = [(label, extra) for label, extra, c in VARIANTS if c == cells]
        policies = [PolicyConfig(alpha=a, **extra) for _, extra in chosen for a in args.alphas]
        results = evaluate_policies(model, prompter, items, policies, args.max_new_tokens, cells=cells,
                                    desc=f"{cells} cells")
        for (label, _), result in zip([c for c in chosen for _ in args.alphas], results):
            rows.append({"variant": label, "alpha": result.alpha, "cells": cells, "accuracy": result.accuracy,
                         "held_ratio": result.held_ratio, "kept_ratio_union": result.kept_ratio,
                         "same_as_full": result.same_as_full, "kl_mean": result.kl_mean})
            full = result.full_accuracy
    seconds = time.monotonic() - t0
    text = table(rows, args.alphas)
    print(f"\n{len(items)} {args.split} items, full cache accuracy {full:.3f}; {seconds:.0f} s\n\n{text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join(["python benchmarks/eval_head_budgets.py", *(argv if argv is not None else sys.argv[1:])]),
        "n_items": len(items), "split": args.split, "alphas": args.alphas, "full_accuracy": full,
        "seconds": round(seconds, 1), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores",
        "table_markdown": text, "rows": rows,
    }, indent=1))
    png = plot(rows, full, args.plot, f"tinyvlm-docvqa {args.split}, {len(items)} items: accuracy vs KV held")
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
