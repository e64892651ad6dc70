"""How a question about the first of two images fares under compression (docs/policy.md, "Several
images").

Each item is a held-out docvqa page with a ``single`` question (the asked page) and a second
page that does not contain the asked key (the distractor). The prompt holds both pages, asked
page first or last, then the question; it is served by a running ``--attention-backend vlcache``
server at the full cache and at a budget, and the exact-match accuracy is printed per position.

    python benchmarks/eval_multi_image_position.py --url http://127.0.0.1:30000 --n 32 --budget 0.1
"""
from __future__ import annotations

import argparse
import base64
import io
import json

import requests
from PIL import Image

from vlcache_sglang.research.tasks.docvqa import DocGenerator

PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
          "{q}<|im_end|>\n<|im_start|>assistant\n")


def png_base64(array) -> str:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def items(n: int, grid: int, seed: int):
    """(asked page, distractor page, question, answer): the distractor lacks the asked key."""
    gen = DocGenerator(seed, digit_split="heldout")
    out = []
    while len(out) < n:
        doc = gen.sample(grid, "single")
        other = gen.sample(grid, "single")
        while doc.keys[0] in set(int(k) for k in other.cell_key):
            other = gen.sample(grid, "single")
        out.append((png_base64(gen.render(doc)), png_base64(gen.render(other)), doc.question, doc.answer))
    return out


def ask(url: str, images: list[str], question: str, budget: float) -> str:
    vl = {"budget": budget, "method": "vlcache"} if budget < 1.0 else {"budget": 1.0}
    r = requests.post(f"{url}/generate", json={
        "text": PROMPT.format(q=question), "image_data": images,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "custom_params": {"vlcache": vl}}}, timeout=600)
    r.raise_for_status()
    return r.json()["text"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--grid", type=int, default=16, help="cells per page side (16: 256 visual tokens a page)")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=2020)
    args = ap.parse_args()
    data = items(args.n, args.grid, args.seed)
    result = {}
    for budget in (1.0, args.budget):
        for position in ("first", "last"):
            correct = 0
            for asked, other, question, answer in data:
                pages = [asked, other] if position == "first" else [other, asked]
                correct += ask(args.url, pages, question, budget).strip() == answer.strip()
            result[f"budget {budget}, asked page {position}"] = correct / len(data)
            print(f"budget {budget}, asked page {position}: {correct}/{len(data)}", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
