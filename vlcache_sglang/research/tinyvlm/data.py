"""Batches of documents for training and evaluation: symbolic cells and rendered pages.

All documents of a batch share the question type and grid size, so every row has the same prompt
length (letters are single tokens) and the same answer length.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlcache_sglang.research.tasks.docvqa import N_PARTS, DocGenerator, Document
from vlcache_sglang.research.tinyvlm.assets import Prompter, patchify

AUX_SLOTS = 1 + N_PARTS          # slot 0: a single value; slots 1..3: the parts of a number


@dataclass
class Batch:
    """One batch of documents of a single question type and grid size (tensors on CPU)."""

    qtype: str
    grid: int
    docs: list[Document]
    input_ids: torch.Tensor          # (B, prompt_len + answer_len)
    prompt_len: int
    vis_start: int
    n_visual: int
    answer: torch.Tensor             # (B, answer_len)
    digit_pos: list[int]             # answer indices of the digit tokens
    letter_pos: list[int]            # prompt positions of the key letters
    targets: torch.Tensor            # (B, T) target cells (row-major, = visual token index)
    cell_key: torch.Tensor           # (B, n_visual)
    cell_digit: torch.Tensor
    cell_part: torch.Tensor
    aux_targets: torch.Tensor        # (B, n_letters, AUX_SLOTS), digit or -100

    @property
    def prompt_ids(self) -> torch.Tensor:
        return self.input_ids[:, :self.prompt_len]

    @property
    def image_grid_thw(self) -> torch.Tensor:
        return torch.tensor([[1, 2 * self.grid, 2 * self.grid]] * len(self.docs), dtype=torch.long)


def make_batch(gen: DocGenerator, prompter: Prompter, qtype: str, grid: int, size: int, **ranges) -> Batch:
    """Sample ``size`` documents of ``qtype`` on a ``grid x grid`` page (``ranges``: see DocGenerator.sample)."""
    return batch_from_docs([gen.sample(grid, qtype, **ranges) for _ in range(size)], prompter)


def batch_from_docs(docs: list[Document], prompter: Prompter) -> Batch:
    """Collate documents that share question type and grid size."""
    qtype, grid = docs[0].qtype, docs[0].grid
    assert all(d.qtype == qtype and d.grid == grid for d in docs)
    n = grid * grid
    rows, answers = [], []
    for d in docs:
        p = prompter.prompt_ids(qtype, d.keys, n)
        a = prompter.answer_ids(qtype, d.answer_digits)
        rows.append(p + a)
        answers.append(a)
    prompt_len = len(rows[0]) - len(answers[0])
    vis_start = rows[0].index(prompter.image_pad)
    aux = np.full((len(docs), len(docs[0].keys), AUX_SLOTS), -100, np.int64)
    for b, d in enumerate(docs):
        if qtype == "number":
            aux[b, 0, 1:] = d.cell_digit[d.target_cells]
        else:
            aux[b, :, 0] = d.cell_digit[d.target_cells]
    return Batch(
        qtype=qtype, grid=grid, docs=docs, input_ids=torch.tensor(rows), prompt_len=prompt_len,
        vis_start=vis_start, n_visual=n, answer=torch.tensor(answers),
        digit_pos=prompter.digit_positions(qtype, len(docs[0].answer_digits)),
        letter_pos=prompter.letter_positions(qtype, docs[0].keys, n),
        targets=torch.tensor([d.target_cells for d in docs]),
        cell_key=torch.from_numpy(np.stack([d.cell_key for d in docs])),
        cell_digit=torch.from_numpy(np.stack([d.cell_digit for d in docs])),
        cell_part=torch.from_numpy(np.stack([d.cell_part for d in docs])),
        aux_targets=torch.from_numpy(aux),
    )


def render_batch(gen: DocGenerator, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and image_grid_thw of the batch's pages (identical to the real image processor)."""
    return patchify(np.stack([gen.render(d) for d in batch.docs]))
