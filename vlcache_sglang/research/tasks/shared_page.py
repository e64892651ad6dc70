"""Many questions about one page: the workload of radix sharing (multi-question, multi-turn)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from vlcache_sglang.research.tasks.docvqa import NO_KEY, NO_PART, DocGenerator


def questions_on_one_page(seed: int, n: int, grid: int = 16, digit_split: str = "heldout"
                          ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """One rendered page and ``n`` single-lookup ``(question, answer)`` pairs about it, one per
    distinct key (deterministic in ``seed``)."""
    gen = DocGenerator(seed, digit_split)
    doc = gen.sample(grid, "single", singles=(max(n, 4), max(n, 14)))
    single_cells = [int(c) for c in np.flatnonzero((doc.cell_key != NO_KEY) & (doc.cell_part == NO_PART))]
    if len(single_cells) < n:
        raise ValueError(f"the page has {len(single_cells)} single keys, fewer than {n}")
    pairs = []
    for c in single_cells[:n]:
        q = replace(doc, qtype="single", keys=[int(doc.cell_key[c])], answer_digits=[int(doc.cell_digit[c])],
                    target_cells=[c])
        pairs.append((q.question, q.answer))
    return gen.render(doc), pairs
