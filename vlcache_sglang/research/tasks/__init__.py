"""Synthetic document-VQA task (scikit-learn handwritten digits, PIL glyphs) and its datasets."""
from __future__ import annotations


def demo_example(seed: int = 0, grid: int = 16, qtype: str = "single"):
    """A held-out page (PIL image, 256 visual tokens at grid 16), its question and gold answer."""
    from PIL import Image

    from vlcache_sglang.research.tasks.docvqa import DocGenerator

    gen = DocGenerator(seed, digit_split="heldout")
    doc = gen.sample(grid, qtype)
    return Image.fromarray(gen.render(doc)), doc.question, doc.answer
