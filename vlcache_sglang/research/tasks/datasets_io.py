"""Evaluation sets of the synthetic document-VQA task as Hugging Face ``datasets`` on disk.

Two splits, kept apart: ``calibration`` (for tuning compression policies) and ``heldout`` (for reporting).
They use disjoint handwritten-digit samples (see :func:`vlcache_sglang.research.tasks.docvqa.handwritten_digits`),
disjoint seeds, and neither shares digits with the training split.

    python -m vlcache_sglang.research.tasks.datasets_io --out data/tinyvlm-docvqa --grids 16 --n 32

Each row: ``image`` (PIL), ``question``, ``answer``, ``qtype``, ``grid``, ``keys`` (letter indices),
``answer_digits``, ``target_cells`` (row-major cell = visual-token index), ``id``.
:func:`load_eval_dataset` loads such a directory, or a Hugging Face dataset name (e.g.
``lmms-lab/DocVQA``) for users with network access.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from vlcache_sglang.research.tasks.docvqa import QTYPES, DocGenerator

SPLIT_SEEDS = {"calibration": 1_000_000, "heldout": 2_000_000}


def build_split(split: str, grids: list[int], n: int, qtypes: tuple[str, ...] = QTYPES):
    """A ``datasets.Dataset`` with ``n`` rows per (grid, question type), deterministic in ``split``."""
    import datasets
    from PIL import Image

    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}")
    rows: dict[str, list] = {k: [] for k in ("id", "image", "question", "answer", "qtype", "grid", "keys",
                                             "answer_digits", "target_cells")}
    for grid in grids:
        for j, q in enumerate(qtypes):
            gen = DocGenerator(SPLIT_SEEDS[split] + 1000 * grid + j, digit_split=split)
            for i in range(n):
                d = gen.sample(grid, q)
                rows["id"].append(f"{split}-{q}-g{grid}-{i:04d}")
                rows["image"].append(Image.fromarray(gen.render(d)).convert("L"))
                rows["question"].append(d.question)
                rows["answer"].append(d.answer)
                rows["qtype"].append(q)
                rows["grid"].append(grid)
                rows["keys"].append(d.keys)
                rows["answer_digits"].append(d.answer_digits)
                rows["target_cells"].append(d.target_cells)
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "qtype": datasets.Value("string"), "grid": datasets.Value("int32"),
        "keys": datasets.Sequence(datasets.Value("int32")),
        "answer_digits": datasets.Sequence(datasets.Value("int32")),
        "target_cells": datasets.Sequence(datasets.Value("int32")),
    })
    return datasets.Dataset.from_dict(rows, features=features)


def build_all(out: str | Path, grids: list[int], n: int) -> dict[str, Path]:
    """Write ``out/calibration`` and ``out/heldout``."""
    paths = {}
    for split in SPLIT_SEEDS:
        p = Path(out) / split
        build_split(split, grids, n).save_to_disk(str(p))
        paths[split] = p
    return paths


def load_eval_dataset(name_or_path: str | Path, split: str | None = None):
    """A dataset saved with :func:`build_all` (a local directory), or a Hugging Face dataset name.

    Raises:
        RuntimeError: a hub name was given but the hub cannot be reached (offline machine).
    """
    import datasets

    p = Path(name_or_path)
    if p.exists():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or next(iter(ds))]
        return ds
    try:
        return datasets.load_dataset(str(name_or_path), split=split or "validation")
    except Exception as e:  # noqa: BLE001 - any hub/network failure gets the same explanation
        raise RuntimeError(
            f"could not load the Hugging Face dataset {str(name_or_path)!r}: {type(e).__name__}: {e}. "
            "Loading a dataset by name needs network access to the Hugging Face Hub (or a local cache); "
            "offline, pass a directory written by `python -m vlcache_sglang.research.tasks.datasets_io --out DIR`."
        ) from e


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/tinyvlm-docvqa")
    ap.add_argument("--grids", default="16", help="comma-separated grid sizes (visual tokens = grid^2)")
    ap.add_argument("--n", type=int, default=32, help="rows per grid and question type")
    args = ap.parse_args(argv)
    for split, p in build_all(args.out, [int(g) for g in args.grids.split(",")], args.n).items():
        print(split, p)


if __name__ == "__main__":
    main()
