"""Evaluate the tiny document-VQA model in HF transformers, with the visual KV cropped after prefill.

For each batch: a full-attention prefill (eager attention when scores are needed), the first answer
token from the prefill logits, then greedy decoding from a cache in which every layer keeps all text
positions and a chosen set of visual positions. Conditions:

* ``full``: nothing removed (a no-op crop; equals ``model.generate``);
* ``drop_targets``: only the target cells' KV removed (dependence test (a));
* ``top10``: per layer, the 10 % of visual tokens with the most post-question attention kept
  (VL-Cache-style scoring: attention from every prompt row after the image, summed over heads);
* ``rand10``: a random 10 % of visual tokens kept (the same set in every layer).

Exact match = the greedy output equals ``<prefix> d ...<|im_end|>`` token for token.

    python -m vlcache_sglang.research.tinyvlm.evaluate --model models/tinyvlm-docvqa --grids 16,32,64 --n 64
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vlcache_sglang.research.tasks.docvqa import QTYPES, DocGenerator, Document
from vlcache_sglang.research.tinyvlm.assets import Prompter, patchify
from vlcache_sglang.research.tinyvlm.kvcache import crop_cache, greedy_from_cache, prefill

CONDITIONS = ("full", "drop_targets", "top10", "rand10")


@dataclass
class EvalItem:
    """One question about one page (from a generator or a dataset on disk)."""

    rgb: np.ndarray                  # (H, W, 3) uint8
    qtype: str
    keys: list[int]
    answer_digits: list[int]
    target_cells: list[int]
    grid: int


def items_from_generator(seed: int, qtype: str, grid: int, n: int, digit_split: str = "heldout") -> list[EvalItem]:
    """``n`` freshly sampled items (deterministic in ``seed``)."""
    gen = DocGenerator(seed, digit_split)
    out = []
    for _ in range(n):
        d: Document = gen.sample(grid, qtype)
        out.append(EvalItem(gen.render(d), qtype, d.keys, d.answer_digits, d.target_cells, grid))
    return out


def items_from_dataset(ds) -> list[EvalItem]:
    """Items from a dataset written by :mod:`vlcache_sglang.research.tasks.datasets_io`."""
    return [EvalItem(np.asarray(r["image"].convert("RGB")), r["qtype"], list(r["keys"]), list(r["answer_digits"]),
                     list(r["target_cells"]), int(r["grid"])) for r in ds]


def load_model(model_dir: str | Path, eager_text: bool = True):
    """The model (float32, eval mode; text attention eager so attentions can be returned) and tokenizer."""
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    if eager_text:
        model.config.text_config._attn_implementation = "eager"
    return model, AutoTokenizer.from_pretrained(model_dir)


@torch.no_grad()
def evaluate_items(model, prompter: Prompter, items: list[EvalItem], batch_size: int = 16,
                   conditions: tuple[str, ...] = CONDITIONS, keep_frac: float = 0.10, seed: int = 0,
                   attention_stats: bool = True) -> dict:
    """Exact match per condition and per-layer attention shares over ``items`` (one qtype and grid)."""
    rng = np.random.default_rng(seed)
    need_att = attention_stats or "top10" in conditions
    hits: dict[str, list[bool]] = {c: [] for c in conditions}
    share, vis_share, top1 = [], [], []
    cfg_t = model.config.text_config
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        qtype, grid = chunk[0].qtype, chunk[0].grid
        n = grid * grid
        ids = torch.tensor([prompter.prompt_ids(qtype, it.keys, n) for it in chunk])
        gold = torch.tensor([prompter.answer_ids(qtype, it.answer_digits) for it in chunk])
        tgt = torch.tensor([it.target_cells for it in chunk])
        pv, thw = patchify(np.stack([it.rgb for it in chunk]))
        vs = int((ids[0] == prompter.image_pad).nonzero()[0])
        ve, L, B = vs + n, ids.shape[1], len(chunk)
        cache, first_logits, deltas, att = prefill(model, ids, pv, thw, prompter.image_pad, output_attentions=need_att)
        first = first_logits.argmax(-1)
        k = max(1, round(keep_frac * n))
        keep: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        if need_att:
            post = [a[:, :, ve + 1:L, vs:ve].float() for a in att]        # (B, H, rows, n) per layer
            tg = tgt[:, None, None, :].expand(-1, post[0].shape[1], post[0].shape[2], -1)
            share.append(torch.stack([p.gather(3, tg).sum(3).mean((1, 2)) for p in post], 1))          # (B, layers)
            vis_share.append(torch.stack([(p.gather(3, tg).sum(3) / p.sum(3)).mean((1, 2)) for p in post], 1))
            top1.append(torch.stack([(p.mean((1, 2)).argmax(-1)[:, None] == tgt).any(1).float() for p in post], 1))
            keep["top10"] = [p.sum((1, 2)).topk(k, -1).indices for p in post]
        all_idx = torch.arange(n).expand(B, -1)
        keep["full"] = all_idx
        keep["drop_targets"] = torch.stack([all_idx[b][~torch.isin(all_idx[b], tgt[b])] for b in range(B)])
        keep["rand10"] = torch.stack([torch.from_numpy(rng.permutation(n)[:k]) for _ in range(B)])
        for c in conditions:
            out = greedy_from_cache(model, crop_cache(cache, keep[c], vs, n, cfg_t), first, L, deltas, gold.shape[1])
            hits[c] += (out == gold).all(1).tolist()
        del att, cache
    res = {"n": len(items), "visual_tokens": items[0].grid ** 2,
           "exact": {c: round(float(np.mean(v)), 4) for c, v in hits.items()}}
    if share:
        res["per_layer_target_share"] = [round(x, 4) for x in torch.cat(share).mean(0).tolist()]
        res["per_layer_target_share_of_visual"] = [round(x, 4) for x in torch.cat(vis_share).mean(0).tolist()]
        res["per_layer_top1_is_target"] = [round(x, 4) for x in torch.cat(top1).mean(0).tolist()]
        res["uniform_share_of_visual"] = round(len(items[0].target_cells) / items[0].grid ** 2, 5)
    return res


def batch_size_for(grid: int) -> int:
    """Keep eager attention matrices small: about 8k visual tokens per batch."""
    return int(np.clip(8192 // (grid * grid), 1, 32))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/tinyvlm-docvqa")
    ap.add_argument("--grids", default="16,32")
    ap.add_argument("--qtypes", default=",".join(QTYPES))
    ap.add_argument("--n", type=int, default=64, help="items per question type and grid")
    ap.add_argument("--dataset", default=None, help="evaluate a saved dataset (path) instead of fresh samples")
    ap.add_argument("--seed", type=int, default=20_000)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    prompter = Prompter(tok)
    conds = tuple(args.conditions.split(","))
    results: dict[str, dict] = {}
    groups: dict[tuple[str, int], list[EvalItem]] = {}
    if args.dataset:
        from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

        for it in items_from_dataset(load_eval_dataset(args.dataset)):
            groups.setdefault((it.qtype, it.grid), []).append(it)
    else:
        for grid in (int(g) for g in args.grids.split(",")):
            for j, q in enumerate(args.qtypes.split(",")):
                groups[(q, grid)] = items_from_generator(args.seed + 100 * grid + j, q, grid, args.n)
    for (q, grid), items in groups.items():
        t = time.time()
        r = evaluate_items(model, prompter, items, batch_size=batch_size_for(grid), conditions=conds)
        r["seconds"] = round(time.time() - t, 1)
        results[f"{q}@{grid}"] = r
        print(json.dumps({f"{q}@{grid}": r}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
