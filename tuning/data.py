"""Evaluation items for tuning: a study split and a disjoint held-out split of one dataset.

A dataset is a directory holding one ``datasets`` folder per split (as written by
``python -m vlcache_sglang.research.tasks.datasets_io``: ``calibration/`` and ``heldout/``), or a Hugging
Face dataset id (``name`` or ``name:config``) whose split names may use slicing
(``validation[:200]``). Rows need ``image``, ``question`` and ``answer`` (a string) or
``answers`` (a list); an optional ``qtype`` column groups the accuracy.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


class DatasetError(ValueError):
    """The dataset or split cannot be loaded or has the wrong columns."""


@dataclass(frozen=True)
class EvalItem:
    """One question about one image with its accepted answers."""

    id: str
    image_png_b64: str
    question: str
    answers: tuple[str, ...]
    group: str = "all"

    @property
    def image_data_url(self) -> str:
        return f"data:image/png;base64,{self.image_png_b64}"

    def image(self):
        """The image as a PIL RGB image."""
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(self.image_png_b64))).convert("RGB")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix != "" or name.count("/") > 1


def load_split(dataset: str | Path, split: str):
    """One split of ``dataset`` as a ``datasets.Dataset``; :class:`DatasetError` if it cannot be loaded."""
    import datasets

    root = Path(str(dataset)).expanduser()
    if root.is_dir():
        path = root / split
        if not path.is_dir():
            have = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DatasetError(f"dataset {str(root)!r} has no split {split!r} (found: {', '.join(have) or 'none'})")
        ds = datasets.load_from_disk(str(path))
        return ds[next(iter(ds))] if isinstance(ds, datasets.DatasetDict) else ds
    name = str(dataset)
    if _looks_like_path(name):
        raise DatasetError(f"dataset directory {name!r} does not exist")
    repo, _, config = name.partition(":")
    try:
        return datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - any hub/network failure gets the same explanation
        raise DatasetError(
            f"could not load the Hugging Face dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Loading a dataset by name needs network access to the Hugging Face Hub or a local cache; "
            "offline, pass a directory with one folder per split "
            "(`python -m vlcache_sglang.research.tasks.datasets_io --out DIR` writes one).") from e


def _answers(row: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(row.get("answers"), (list, tuple)) and row["answers"]:
        return tuple(str(a) for a in row["answers"])
    if row.get("answer") is not None:
        return (str(row["answer"]),)
    raise DatasetError("a row has neither 'answer' nor a non-empty 'answers' column")


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def to_items(ds, *, groups: Sequence[str] | None = None, per_group: int | None = None) -> list[EvalItem]:
    """Rows of ``ds`` as items, optionally only ``groups`` (``qtype`` values), ``per_group`` each."""
    missing = {"image", "question"} - set(ds.column_names)
    if missing:
        raise DatasetError(f"dataset rows lack the column(s) {sorted(missing)}; have {ds.column_names}")
    counts: dict[str, int] = {}
    items: list[EvalItem] = []
    for i, row in enumerate(ds):
        group = str(row.get("qtype") or "all")
        if groups and group not in groups:
            continue
        if per_group is not None and counts.get(group, 0) >= per_group:
            continue
        counts[group] = counts.get(group, 0) + 1
        items.append(EvalItem(id=str(row.get("id", i)), image_png_b64=_png_b64(row["image"]),
                              question=str(row["question"]), answers=_answers(row), group=group))
    if not items:
        raise DatasetError(f"no rows left after selecting question types {list(groups or [])}")
    if groups:
        absent = sorted(set(groups) - set(counts))
        if absent:
            raise DatasetError(f"question type(s) {absent} not in the dataset (have {sorted(counts)})")
    return items


def load_items(dataset: str | Path, split: str, *, groups: Sequence[str] | None = None,
               per_group: int | None = None) -> list[EvalItem]:
    """:func:`load_split` then :func:`to_items`."""
    return to_items(load_split(dataset, split), groups=groups, per_group=per_group)
