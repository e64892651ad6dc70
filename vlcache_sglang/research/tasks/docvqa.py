"""Synthetic document-VQA task built from real offline content.

A *document* is an ``S x S`` grid of 16 x 16 px cells (one LLM visual token per cell for a Qwen2-VL
vision tower with patch 8 and merge 2, so ``S * S`` visual tokens: S=16 gives 256, S=64 gives 4,096).
Every cell is one of

* a **keyed value**: a printed key letter (PIL bitmap font) in the top-left 8 x 8 quarter and a
  handwritten digit (scikit-learn ``load_digits``) in the top-right quarter;
* a **number part**: as a keyed value, plus a printed part index ``1``/``2``/``3`` in the bottom-left
  quarter; a *number* key owns three such cells scattered over the page, holding its three digits;
* a **distractor**: a handwritten digit with no key;
* **blank** paper with light speckle noise.

Each letter names at most one key per document. Question types (answers after a short fixed
preamble so that the informative tokens are decoded after the prefill, i.e. after KV compression):

=========  ===========================================  ===================  ==============
qtype      question                                     answer               target cells
=========  ===========================================  ===================  ==============
single     ``What is the value of K?``                  ``value: 7``         1
multi      ``What are the values of K, B and Q?``       ``values: 7 3 1``    3
number     ``What is the number K?``                    ``number: 4 0 2``    3 (parts 1-3)
max        ``What is the largest value of K, B and Q?`` ``max: 9``           3
=========  ===========================================  ===================  ==============

Everything is deterministic given a seed. The module only needs numpy, Pillow and scikit-learn.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

LETTERS = string.ascii_uppercase
CELL = 16                      # pixels per cell side = patch_size (8) * spatial_merge_size (2)
QTYPES = ("single", "multi", "number", "max")
NO_KEY = 26                    # symbolic cell ids: key 0..25 or 26 = none
NO_DIGIT = 10                  # digit 0..9 or 10 = none
NO_PART = 0                    # part 1..3 or 0 = not a number part
N_PARTS = 3                    # digits per number
N_MULTI = 3                    # keys per multi / max question
DIGIT_SPLITS = ("train", "calibration", "heldout")

# chance of an exact answer when the answer is guessed uniformly
CHANCE = {"single": 0.1, "multi": 0.001, "number": 0.001, "max": 0.1}


def question_text(qtype: str, keys: list[str]) -> str:
    """The question for ``qtype`` about the key letters ``keys``."""
    if qtype == "single":
        return f"What is the value of {keys[0]}?"
    if qtype == "multi":
        return f"What are the values of {keys[0]}, {keys[1]} and {keys[2]}?"
    if qtype == "number":
        return f"What is the number {keys[0]}?"
    if qtype == "max":
        return f"What is the largest value of {keys[0]}, {keys[1]} and {keys[2]}?"
    raise ValueError(f"unknown question type {qtype!r}")


ANSWER_PREFIX = {"single": "value:", "multi": "values:", "number": "number:", "max": "max:"}


def answer_text(qtype: str, digits: list[int]) -> str:
    """The answer string (without the end-of-turn token), e.g. ``value: 7``."""
    return ANSWER_PREFIX[qtype] + "".join(f" {d}" for d in digits)


def tokenizer_corpus() -> str:
    """Text that makes the offline BPE tokenizer encode questions and answers compactly."""
    parts = []
    for q in QTYPES:
        parts += [question_text(q, [LETTERS[i], LETTERS[(i + 7) % 26], LETTERS[(i + 13) % 26]]) for i in range(26)]
        parts += [answer_text(q, [d, (d + 3) % 10, (d + 6) % 10]) for d in range(10)]
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# glyphs
@lru_cache(maxsize=1)
def printed_glyphs() -> dict[str, np.ndarray]:
    """8 x 8 ink bitmaps (float32 in [0, 1]) of the 26 capital letters and the digits 1-3, PIL bitmap font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()
    out = {}
    for c in LETTERS + "123":
        im = Image.new("L", (8, 8), 0)
        d = ImageDraw.Draw(im)
        x0, y0, x1, y1 = d.textbbox((0, 0), c, font=font)
        d.text(((8 - (x1 - x0)) // 2 - x0, (8 - (y1 - y0)) // 2 - y0), c, fill=255, font=font)
        out[c] = np.asarray(im, np.float32) / 255.0
    return out


@lru_cache(maxsize=4)
def handwritten_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn digits (8 x 8 ink in [0, 1], labels), split 75/5/20 % into train/calibration/heldout."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.RandomState(0).permutation(len(y))
    a, b = int(0.75 * len(y)), int(0.80 * len(y))
    idx = {"train": perm[:a], "calibration": perm[a:b], "heldout": perm[b:]}[split]
    return (x[idx].reshape(-1, 8, 8) / 16.0).astype(np.float32), y[idx].astype(np.int64)


# ---------------------------------------------------------------------------------------------
@dataclass
class Document:
    """A symbolic document (cell contents) with one question about it.

    ``cell_key``/``cell_digit``/``cell_part`` are (S*S,) arrays in row-major cell order;
    ``digit_index`` picks the handwritten sample drawn in each digit cell (-1 = none).
    """

    grid: int
    cell_key: np.ndarray
    cell_digit: np.ndarray
    cell_part: np.ndarray
    digit_index: np.ndarray
    qtype: str
    keys: list[int]
    answer_digits: list[int]
    target_cells: list[int]           # cells whose content the answer reads (order = answer order)
    digit_split: str = "train"
    noise_seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def question(self) -> str:
        return question_text(self.qtype, [LETTERS[k] for k in self.keys])

    @property
    def answer(self) -> str:
        return answer_text(self.qtype, self.answer_digits)


class DocGenerator:
    """Samples documents and questions.

    Args:
        seed: seed of the generator's numpy ``Generator``.
        digit_split: which scikit-learn digit samples to draw (``train``, ``calibration``, ``heldout``).
        singles: inclusive range of single-value keys per document.
        numbers: inclusive range of number keys (three cells each) per document.
        distractor_frac: upper bound of the share of free cells that get a key-less digit.
    """

    def __init__(self, seed: int, digit_split: str = "train", singles: tuple[int, int] = (4, 14),
                 numbers: tuple[int, int] = (1, 3), distractor_frac: float = 0.6, blank_noise: float = 0.15):
        if digit_split not in DIGIT_SPLITS:
            raise ValueError(f"digit_split must be one of {DIGIT_SPLITS}")
        self.rng = np.random.default_rng(seed)
        self.digit_split = digit_split
        self.singles, self.numbers = singles, numbers
        self.distractor_frac, self.blank_noise = distractor_frac, blank_noise
        self.digit_ink, self.digit_label = handwritten_digits(digit_split)

    def sample(self, grid: int, qtype: str, singles: tuple[int, int] | None = None,
               numbers: tuple[int, int] | None = None) -> Document:
        """One document of ``grid x grid`` cells and a ``qtype`` question about it (``singles`` and
        ``numbers`` override the generator's key-count ranges for this document)."""
        rng, n = self.rng, grid * grid
        singles, numbers = singles or self.singles, numbers or self.numbers
        need_singles = 1 if qtype == "single" else (N_MULTI if qtype in ("multi", "max") else 0)
        need_numbers = 1 if qtype == "number" else 0
        n_num = int(rng.integers(max(numbers[0], need_numbers), numbers[1] + 1))
        max_single = min(singles[1], 26 - n_num, n - N_PARTS * n_num - 1)
        n_single = int(rng.integers(min(max(singles[0], need_singles), max_single), max_single + 1))
        if n_single < need_singles or n_single + N_PARTS * n_num > n:
            raise ValueError(f"grid {grid} too small for a {qtype} question")
        letters = rng.choice(26, size=n_single + n_num, replace=False)
        cells = rng.permutation(n)
        ck = np.full(n, NO_KEY, np.int64)
        cd = np.full(n, NO_DIGIT, np.int64)
        cp = np.full(n, NO_PART, np.int64)
        di = np.full(n, -1, np.int64)
        used = n_single + N_PARTS * n_num
        n_dis = int(rng.random() * self.distractor_frac * (n - used))
        samples = rng.integers(0, len(self.digit_label), size=used + n_dis)
        di[cells[:used + n_dis]] = samples
        cd[cells[:used + n_dis]] = self.digit_label[samples]
        ck[cells[:n_single]] = letters[:n_single]
        num_cells = cells[n_single:used].reshape(n_num, N_PARTS)
        for j in range(n_num):
            ck[num_cells[j]] = letters[n_single + j]
            cp[num_cells[j]] = np.arange(1, N_PARTS + 1)
        single_cells = cells[:n_single]
        if qtype == "single":
            pick = [int(rng.integers(n_single))]
        elif qtype in ("multi", "max"):
            pick = [int(i) for i in rng.choice(n_single, size=N_MULTI, replace=False)]
        if qtype == "number":
            j = int(rng.integers(n_num))
            keys = [int(letters[n_single + j])]
            targets = [int(c) for c in num_cells[j]]
            digits = [int(cd[c]) for c in targets]
        else:
            targets = [int(single_cells[i]) for i in pick]
            keys = [int(ck[c]) for c in targets]
            digits = [int(cd[c]) for c in targets]
            if qtype == "max":
                digits = [max(digits)]
        return Document(grid, ck, cd, cp, di, qtype, keys, digits, targets, self.digit_split,
                        noise_seed=int(rng.integers(2**31)))

    def render(self, doc: Document) -> np.ndarray:
        """The page as a uint8 RGB array (H, W, 3), black ink on white paper."""
        return ink_to_rgb(render_ink(doc, self.digit_ink))


def render_ink(doc: Document, digit_ink: np.ndarray, blank_noise: float = 0.15) -> np.ndarray:
    """Ink in [0, 1] of shape (S*16, S*16) for ``doc`` (deterministic given ``doc.noise_seed``)."""
    s, glyphs = doc.grid, printed_glyphs()
    rng = np.random.default_rng(doc.noise_seed)
    ink = np.zeros((s * s, CELL, CELL), np.float32)
    if blank_noise > 0:
        ink += (rng.random(ink.shape) < 0.03) * rng.random(ink.shape).astype(np.float32) * blank_noise * 4
    for c in np.flatnonzero(doc.digit_index >= 0):
        ink[c] = 0.0
        ink[c, 0:8, 8:16] = digit_ink[doc.digit_index[c]]
        if doc.cell_key[c] != NO_KEY:
            ink[c, 0:8, 0:8] = glyphs[LETTERS[doc.cell_key[c]]]
        if doc.cell_part[c] != NO_PART:
            ink[c, 8:16, 0:8] = glyphs[str(int(doc.cell_part[c]))]
    ink = np.clip(ink, 0.0, 1.0).reshape(s, s, CELL, CELL).transpose(0, 2, 1, 3)
    return ink.reshape(s * CELL, s * CELL)


def ink_to_rgb(ink: np.ndarray) -> np.ndarray:
    """Ink in [0, 1] -> uint8 RGB, black on white."""
    g = np.round(255.0 * (1.0 - ink)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
