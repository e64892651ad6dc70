"""Evaluation items and the prompt path shared by the harness and the server.

:class:`ChatPrompter` builds the prompt text with the model's own chat template (one image,
then the question; generation prompt appended) and the processor inputs from that text, so an
SGLang ``/generate`` request carrying :meth:`ChatPrompter.text` and the same image sees the
same token ids as the harness (checked in ``tests/e2e/test_server_matches_harness.py``).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class EvalItem:
    """One question about one image, with its reference answer (exact match) and group."""

    id: str
    image: object  # PIL.Image.Image, RGB
    question: str
    answer: str
    qtype: str = "all"


def items_from_dataset(ds, n_per_qtype: int | None = None, qtypes: Sequence[str] | None = None) -> list[EvalItem]:
    """Items from a dataset with ``image``, ``question``, ``answer`` (and optional ``qtype``, ``id``)
    columns, e.g. :func:`vlcache_sglang.research.tasks.datasets_io.load_eval_dataset`; the first
    ``n_per_qtype`` rows of each question type, in ``qtypes`` order (default: order of appearance)."""
    missing = [c for c in ("image", "question", "answer") if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset lacks the columns {missing} (has {ds.column_names})")
    if n_per_qtype is not None and n_per_qtype < 1:
        raise ValueError(f"n_per_qtype must be >= 1, got {n_per_qtype}")
    have_qtype = "qtype" in ds.column_names
    all_qtypes = list(dict.fromkeys(ds["qtype"])) if have_qtype else ["all"]
    wanted = list(qtypes) if qtypes else all_qtypes
    unknown = [q for q in wanted if q not in all_qtypes]
    if unknown:
        raise ValueError(f"unknown question types {unknown}; the dataset has {all_qtypes}")
    counts = dict.fromkeys(wanted, 0)
    items: dict[str, list[EvalItem]] = {q: [] for q in wanted}
    for i, row in enumerate(ds):
        q = row["qtype"] if have_qtype else "all"
        if q not in counts or (n_per_qtype is not None and counts[q] >= n_per_qtype):
            continue
        counts[q] += 1
        items[q].append(EvalItem(str(row.get("id", i)), row["image"].convert("RGB"), row["question"],
                                 str(row["answer"]), q))
    return [it for q in wanted for it in items[q]]


class ChatPrompter:
    """Prompt text, processor inputs and stop tokens of a Qwen2-VL model directory's processor."""

    def __init__(self, processor, eos_token_ids: Iterable[int] = ()) -> None:
        self.processor = processor
        tok = processor.tokenizer
        eos = set(int(t) for t in eos_token_ids)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            eos.add(im_end)
        self.eos_token_ids = tuple(sorted(eos))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ChatPrompter":
        """The processor of ``model_dir`` and the EOS ids of its generation config (as SGLang stops)."""
        from transformers import AutoProcessor

        gen = Path(model_dir) / "generation_config.json"
        eos: list[int] = []
        if gen.exists():
            e = json.loads(gen.read_text()).get("eos_token_id")
            eos = [e] if isinstance(e, int) else list(e or [])
        return cls(AutoProcessor.from_pretrained(model_dir), eos)

    def text(self, question: str) -> str:
        """The chat-template prompt: one image, then the question, then the assistant turn."""
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def inputs(self, image, question: str) -> dict[str, torch.Tensor]:
        """Processor inputs (batch of one) of the prompt with ``image`` (PIL, converted to RGB)."""
        out = self.processor(text=[self.text(question)], images=[image.convert("RGB")], return_tensors="pt")
        return dict(out)

    def decode(self, tokens: Sequence[int]) -> str:
        """Generated tokens as text, special tokens skipped (what the server's API returns)."""
        return self.processor.tokenizer.decode(list(tokens), skip_special_tokens=True)


def exact_match(prediction: str, answer: str) -> bool:
    """The whole answer, surrounding whitespace ignored (as ``benchmarks/eval_server_accuracy.py``)."""
    return prediction.strip() == answer.strip()
