"""Tokenizer, processor, config and prompt/answer token ids of the tiny document-VQA Qwen2-VL.

Reuses :mod:`vlcache_sglang.fixtures.qwen2vl_assets` (offline BPE tokenizer with the Qwen2-VL special
tokens, chat template, processor and config factories). Geometry: vision patch 8, spatial merge 2, so
one LLM visual token per 16 x 16 px cell.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlcache_sglang.fixtures import qwen2vl_assets as qa
from vlcache_sglang.research.tasks.docvqa import LETTERS, QTYPES, answer_text, question_text, tokenizer_corpus

PATCH, MERGE, TEMPORAL = 8, 2, 2
CELL = PATCH * MERGE
MIN_PIXELS = 4 * CELL * CELL                 # at least 2 x 2 cells
MAX_PIXELS = 128 * 128 * CELL * CELL         # up to 16,384 visual tokens (a 2,048 px square page)
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class ModelSize:
    """Sizes of the tiny model (defaults: 1.3 M parameters, about 5 MB in float32)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 512
    rope_theta: float = 1_000_000.0
    vision_embed: int = 64
    vision_depth: int = 1
    vision_heads: int = 2


def build_tokenizer():
    """The offline byte-level BPE tokenizer, trained on the default corpus plus the task's phrases."""
    return qa.build_tokenizer(corpus=(qa.DEFAULT_CORPUS + " " + tokenizer_corpus(),))


def build_processor(tokenizer):
    """Qwen2VLProcessor with patch 8 / merge 2 and pixel limits that never resize a page of whole cells."""
    return qa.build_processor(tokenizer, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                              min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def build_config(tokenizer, size: ModelSize = ModelSize()):
    """A Qwen2VLConfig of the given size (sdpa attention)."""
    cfg = qa.make_config(tokenizer, hidden=size.hidden, layers=size.layers, heads=size.heads,
                         kv_heads=size.kv_heads, intermediate=size.intermediate, rope_theta=size.rope_theta,
                         max_positions=8192, vision_embed=size.vision_embed, vision_depth=size.vision_depth,
                         vision_heads=size.vision_heads, patch_size=PATCH, merge_size=MERGE,
                         temporal_patch_size=TEMPORAL)
    return cfg


def patchify(rgb: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) uint8 pages -> (pixel_values, image_grid_thw), exactly as Qwen2VLImageProcessor
    computes them for images whose sides are multiples of 16 (no resize). Much faster than the processor."""
    b, h, w, _ = rgb.shape
    x = (rgb.astype(np.float32) * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD
    x = x.transpose(0, 3, 1, 2)
    gh, gw = h // PATCH, w // PATCH
    x = x.reshape(b, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 2, 5, 3, 6, 1, 4, 7)
    x = np.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (TEMPORAL, PATCH, PATCH))
    x = x.reshape(b * gh * gw, 3 * TEMPORAL * PATCH * PATCH)
    thw = torch.tensor([[1, gh, gw]] * b, dtype=torch.long)
    return torch.from_numpy(np.ascontiguousarray(x)), thw


class Prompter:
    """Prompt and answer token ids built with the tokenizer's own chat template.

    Answer ids are assembled from token ids (``'Ġ7'``), never by re-encoding the answer string: a saved
    Qwen2 tokenizer can reload with a digit-splitting pre-tokenizer in another transformers release.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.digit_ids = [self._single(f"\u0120{d}") for d in range(10)]
        self.letter_ids = [self._single(f"\u0120{c}") for c in LETTERS]
        self.prefix_ids = {q: tokenizer(answer_text(q, []), add_special_tokens=False)["input_ids"] for q in QTYPES}
        self._prompt: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def _single(self, token: str) -> int:
        i = self.tok.convert_tokens_to_ids(token)
        if i is None or self.tok.convert_ids_to_tokens(i) != token:
            raise ValueError(f"tokenizer lacks the token {token!r}")
        return int(i)

    def chat_text(self, question: str) -> str:
        """The chat-template prompt text (one image placeholder, then the question)."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def prompt_ids(self, qtype: str, keys: list[int], n_visual: int) -> list[int]:
        """Prompt ids with the image placeholder expanded to ``n_visual`` tokens."""
        k = (qtype, tuple(keys))
        if k not in self._prompt:
            text = self.chat_text(question_text(qtype, [LETTERS[i] for i in keys]))
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            assert ids.count(self.image_pad) == 1
            self._prompt[k] = ids
        ids = self._prompt[k]
        j = ids.index(self.image_pad)
        return ids[:j] + [self.image_pad] * n_visual + ids[j + 1:]

    def answer_ids(self, qtype: str, digits: list[int]) -> list[int]:
        """``<prefix> d1 d2 ...<|im_end|>`` as token ids."""
        return self.prefix_ids[qtype] + [self.digit_ids[d] for d in digits] + [self.im_end]

    def digit_positions(self, qtype: str, n_digits: int) -> list[int]:
        """Indices (within the answer ids) of the digit tokens."""
        p = len(self.prefix_ids[qtype])
        return list(range(p, p + n_digits))

    def letter_positions(self, qtype: str, keys: list[int], n_visual: int) -> list[int]:
        """Positions of the question's key-letter tokens in the prompt (in key order)."""
        ids = self.prompt_ids(qtype, keys, n_visual)
        start = ids.index(self.image_pad) + n_visual
        out, pos = [], start
        for k in keys:
            pos = ids.index(self.letter_ids[k], pos)
            out.append(pos)
            pos += 1
        return out
