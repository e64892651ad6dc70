#!/usr/bin/env python
"""Train the tiny document-VQA Qwen2-VL (models/tinyvlm-docvqa) from a seed.

Stages (see docs/tinyvlm.md): 1 ``lookup`` (LM on symbolic cells), 2 ``vision`` (vision tower onto the
stage-1 cell embeddings), 3 ``decode`` (LM fine-tuned with the visual KV cropped after prefill), then
``compose`` (stage-3 LM + stage-2 vision tower, saved with tokenizer and processor).

    python scripts/train_tinyvlm.py --out runs/tinyvlm --stage all --model-out models/tinyvlm-docvqa
    python scripts/train_tinyvlm.py --out runs/tinyvlm --stage decode --resume     # continue after a kill

Stages 2 and 3 both start from stage 1 and may run at the same time in two processes.
A GPU is used when present (``--device`` overrides); on CPU ``--threads`` sets torch's thread count.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vlcache_sglang.research.tinyvlm.assets import ModelSize
from vlcache_sglang.research.tinyvlm.training import (DecodeConfig, Env, LookupConfig, VisionConfig, compose,
                                                      train_decode, train_lookup, train_vision)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/tinyvlm"), help="checkpoints and logs")
    ap.add_argument("--stage", choices=["all", "lookup", "vision", "decode", "compose"], default="all")
    ap.add_argument("--model-out", type=Path, default=None, help="save the composed model here")
    ap.add_argument("--lm-from", choices=["decode", "lookup"], default="decode",
                    help="which LM checkpoint compose uses (lookup = without the decode-time stage)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lookup-steps", type=int, default=LookupConfig.steps)
    ap.add_argument("--lookup-stop-at", type=int, default=None,
                    help="stop stage 1 after this many steps (the LR schedule still spans --lookup-steps)")
    ap.add_argument("--lookup-advance", type=float, default=LookupConfig.advance_at,
                    help="stage 1 moves to the next grid size when the running exact-digit accuracy reaches this")
    ap.add_argument("--vision-steps", type=int, default=VisionConfig.steps)
    ap.add_argument("--decode-steps", type=int, default=DecodeConfig.steps)
    ap.add_argument("--decode-lr", type=float, default=DecodeConfig.lr)
    ap.add_argument("--decode-grids", default=",".join(map(str, DecodeConfig.grids)))
    ap.add_argument("--w-full", type=float, default=DecodeConfig.w_full)
    ap.add_argument("--w-swap", type=float, default=DecodeConfig.w_swap)
    ap.add_argument("--swap-full-cache", action="store_true",
                    help="swap with the full visual cache only (the first stage-3 run; not recommended)")
    ap.add_argument("--w-droponly", type=float, default=DecodeConfig.w_droponly)
    ap.add_argument("--decode-init", type=Path, default=None,
                    help="start stage 3 from this checkpoint (default: the stage-1 checkpoint)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    env = Env(ModelSize(), device=args.device, seed=args.seed)
    times = {}
    lookup_ck = args.out / "lookup.pt"
    if args.stage in ("all", "lookup"):
        t = time.time()
        train_lookup(env, args.out, LookupConfig(steps=args.lookup_steps, seed=args.seed, advance_at=args.lookup_advance,
                                              stop_at=args.lookup_stop_at), resume=args.resume)
        times["lookup_s"] = round(time.time() - t, 1)
    if args.stage in ("all", "vision"):
        t = time.time()
        train_vision(Env(ModelSize(), device=args.device, seed=args.seed), args.out,
                     VisionConfig(steps=args.vision_steps, seed=args.seed), lookup_ck, resume=args.resume)
        times["vision_s"] = round(time.time() - t, 1)
    if args.stage in ("all", "decode"):
        t = time.time()
        cfg = DecodeConfig(steps=args.decode_steps, lr=args.decode_lr, seed=args.seed, w_full=args.w_full,
                           w_droponly=args.w_droponly, w_swap=args.w_swap, swap_cropped=not args.swap_full_cache, grids=tuple(int(g) for g in args.decode_grids.split(",")))
        train_decode(Env(ModelSize(), device=args.device, seed=args.seed), args.out, cfg,
                     args.decode_init or lookup_ck, resume=args.resume, cell_ckpt=lookup_ck)
        times["decode_s"] = round(time.time() - t, 1)
    if args.model_out is not None and args.stage in ("all", "compose"):
        lm = args.out / ("decode.pt" if args.lm_from == "decode" else "lookup.pt")
        path = compose(Env(ModelSize(), device="cpu", seed=args.seed), lm, args.out / "vision.pt", args.model_out)
        print(f"saved {path}")
    if times:
        with open(args.out / "times.jsonl", "a") as f:
            f.write(json.dumps({"stage": args.stage, "threads": args.threads, "device": str(env.device), **times}) + "\n")


if __name__ == "__main__":
    main()
