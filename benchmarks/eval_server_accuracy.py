"""Accuracy of the bundled model through a real SGLang server at several budgets and methods.

    python benchmarks/eval_server_accuracy.py [--budgets 0.05 0.1 0.2] [--n 32]

One `--attention-backend vlcache` server; every (method, budget) is a per-request override, so
all cells of the table come from one run of one server. Items: the held-out split shipped in
data/tinyvlm-docvqa (grid 16 = 256 visual tokens). Exact match of the whole answer.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import sys
from pathlib import Path

import requests
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlcache_sglang.bundled import bundled_model_dir  # noqa: E402
from vlcache_sglang.serving import running_server  # noqa: E402


def load_items(qtypes: list[str], n: int):
    from vlcache_sglang.tasks.datasets_io import load_eval_dataset

    ds = load_eval_dataset(ROOT / "data" / "tinyvlm-docvqa" / "heldout")
    items = []
    for qtype in qtypes:
        rows = [r for r in ds if r["qtype"] == qtype][:n]
        for r in rows:
            buf = io.BytesIO()
            r["image"].convert("RGB").save(buf, format="PNG")
            items.append((qtype, base64.b64encode(buf.getvalue()).decode(), r["question"], r["answer"]))
    return items


def ask(url: str, item, method: str, budget: float) -> bool:
    qtype, image, question, answer = item
    r = requests.post(f"{url}/v1/chat/completions", json={
        "model": "default", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": question}]}],
        "custom_params": {"vlcache": {"budget": budget, "method": method}},
    }, timeout=600)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"].strip() == answer.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["vlcache", "snapkv", "h2o", "streamingllm", "random"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--qtypes", nargs="+", default=["single", "multi"])
    p.add_argument("--n", type=int, default=32, help="items per question type")
    args = p.parse_args()
    items = load_items(args.qtypes, args.n)
    cells = [("full", 1.0)] + [(m, b) for m in args.methods for b in args.budgets]
    acc: dict[tuple[str, float, str], float] = {}
    with running_server(bundled_model_dir(), attention_backend="vlcache") as server:
        for method, budget in tqdm(cells, desc="methods x budgets"):
            with cf.ThreadPoolExecutor(max_workers=8) as pool:
                ok = list(pool.map(lambda it: ask(server.url, it, method, budget), items))
            for qtype in args.qtypes:
                sel = [o for o, it in zip(ok, items) if it[0] == qtype]
                acc[(method, budget, qtype)] = 100.0 * sum(sel) / len(sel)
    print(f"\nheld-out, {args.n} items per type, exact match (%), one server run")
    print("| method | budget | " + " | ".join(args.qtypes) + " |")
    print("|---|---|" + "---|" * len(args.qtypes))
    for method, budget in cells:
        print(f"| {method} | {budget} | " + " | ".join(f"{acc[(method, budget, q)]:.1f}" for q in args.qtypes) + " |")


if __name__ == "__main__":
    main()
