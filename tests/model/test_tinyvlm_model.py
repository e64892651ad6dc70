"""The shipped tiny document-VQA model (models/tinyvlm-docvqa): accuracy and decode-time dependence.

The held-out set is the one of ``python -m vlcache_sglang.research.tinyvlm.evaluate --grids 16 --n 64`` (same seeds,
held-out digits), so these tests evaluate the items of the 256-visual-token rows of docs/tinyvlm.md. The
issue's bars are asserted as such (xfail where the shipped checkpoint misses them); the regression pins
hold every measured figure of those rows to within two items of 64 (``PINS``; the counts are printed).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlcache_sglang.research.tasks.docvqa import QTYPES

MODEL = Path(__file__).resolve().parents[2] / "models" / "tinyvlm-docvqa"
N = 64            # items per question type
GRID = 16         # 256 visual tokens
SEED = 20_000     # evaluate.py's default seed

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="models/tinyvlm-docvqa not present")


@pytest.fixture(scope="module")
def loaded():
    from vlcache_sglang.research.tinyvlm.assets import Prompter
    from vlcache_sglang.research.tinyvlm.evaluate import load_model

    torch.set_num_threads(1)
    model, tok = load_model(MODEL)
    return model, tok, Prompter(tok)


@pytest.fixture(scope="module")
def results(loaded):
    from vlcache_sglang.research.tinyvlm.evaluate import batch_size_for, evaluate_items, items_from_generator

    model, _, prompter = loaded
    return {q: evaluate_items(model, prompter, items_from_generator(SEED + 100 * GRID + j, q, GRID, N),
                              batch_size=batch_size_for(GRID))
            for j, q in enumerate(QTYPES)}


def test_reloaded_tokenizer_gives_the_training_ids(loaded):
    from vlcache_sglang.research.tinyvlm.assets import Prompter, build_tokenizer

    _, _, saved = loaded
    fresh = Prompter(build_tokenizer())
    for q in QTYPES:
        assert saved.prompt_ids(q, [0, 10, 25], 4) == fresh.prompt_ids(q, [0, 10, 25], 4)
        assert saved.answer_ids(q, [1, 2, 3]) == fresh.answer_ids(q, [1, 2, 3])


def test_noop_crop_equals_generate(loaded):
    """The cropping evaluation with nothing removed reproduces model.generate (positions are right)."""
    from vlcache_sglang.research.tinyvlm.assets import patchify
    from vlcache_sglang.research.tinyvlm.evaluate import items_from_generator
    from vlcache_sglang.research.tinyvlm.kvcache import crop_cache, greedy_from_cache, prefill

    model, _, prompter = loaded
    for q in ("single", "multi"):
        items = items_from_generator(91_000, q, 12, 4)
        ids = torch.tensor([prompter.prompt_ids(q, it.keys, 144) for it in items])
        pv, thw = patchify(np.stack([it.rgb for it in items]))
        steps = len(prompter.answer_ids(q, items[0].answer_digits))
        with torch.no_grad():
            # mm_token_type_ids as the real processor returns them (without them M-RoPE positions are wrong)
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                               image_grid_thw=thw, mm_token_type_ids=(ids == prompter.image_pad).int(),
                               max_new_tokens=steps, do_sample=False)[:, ids.shape[1]:]
            cache, logits, deltas, _ = prefill(model, ids, pv, thw, prompter.image_pad)
            vs = int((ids[0] == prompter.image_pad).nonzero()[0])
            mine = greedy_from_cache(model, crop_cache(cache, torch.arange(144).expand(4, -1), vs, 144,
                                                       model.config.text_config),
                                     logits.argmax(-1), ids.shape[1], deltas, steps)
        assert torch.equal(g[:, :steps], mine[:, :g.shape[1]])


# Bars of project issue 11 that the shipped checkpoint does not reach yet (measured in docs/tinyvlm.md).
# They stay here as xfail so that a better checkpoint turns them into passes; the regression guards
# below pin what the shipped model does reach.
DROP_BAR_MISSED = {"single"}                   # (a): target cells dropped -> single still 69 % (bar 50 %)
GAP_BAR_MISSED = {"number"}                    # (b): top10 - rand10 = 48 points at 256 tokens (bar 50)
FULL_BAR_MISSED = {"multi", "number", "max"}   # full-cache accuracy below 90 %


def test_full_cache_single_lookup(results):
    """Issue bar: single lookups at 256 visual tokens with the full cache, at least 95 %."""
    assert results["single"]["exact"]["full"] >= 0.95, results["single"]


@pytest.mark.parametrize("qtype", QTYPES)
def test_full_cache_accuracy(results, qtype, request):
    if qtype in FULL_BAR_MISSED:
        request.applymarker(pytest.mark.xfail(reason="full-cache accuracy below 90 % in the shipped checkpoint",
                                              strict=False))
    assert results[qtype]["exact"]["full"] >= 0.9, results[qtype]


# Pins (items correct out of N = 64), measured on the shipped checkpoint: the docs/tinyvlm.md rows at 256
# visual tokens. Each check allows SLACK items of drift (float noise across CPUs), no more.
MEASURED = {  # qtype: (full, drop_targets, top10, rand10)
    "single": (61, 44, 50, 8),
    "multi": (43, 16, 37, 1),
    "number": (33, 2, 31, 0),
    "max": (55, 23, 51, 14),
}
SLACK = 2


def _counts(results, qtype) -> dict:
    counts = {c: round(results[qtype]["exact"][c] * N) for c in ("full", "drop_targets", "top10", "rand10")}
    print(f"{qtype}: items correct of {N}: {counts}")
    return counts


@pytest.mark.parametrize("qtype", QTYPES)
def test_full_cache_pin(results, qtype):
    """Pin: full-cache accuracy at most SLACK items below the measured count."""
    assert _counts(results, qtype)["full"] >= MEASURED[qtype][0] - SLACK, results[qtype]


@pytest.mark.parametrize("qtype", QTYPES)
def test_dropping_the_target_cells_breaks_the_answer(results, qtype, request):
    """(a) with only the target cells' KV removed after prefill, accuracy is at most 50 %."""
    if qtype in DROP_BAR_MISSED:
        request.applymarker(pytest.mark.xfail(reason="a partial copy of the answer survives in the text KV",
                                              strict=False))
    assert results[qtype]["exact"]["drop_targets"] <= 0.5, results[qtype]


@pytest.mark.parametrize("qtype", QTYPES)
def test_dropping_the_target_cells_pin(results, qtype):
    """Pin for (a): with the target cells' KV removed, at most SLACK items more correct than measured."""
    assert _counts(results, qtype)["drop_targets"] <= MEASURED[qtype][1] + SLACK, results[qtype]


@pytest.mark.parametrize("qtype", QTYPES)
def test_attention_top10_beats_random10(results, qtype, request):
    """(b) keeping the top 10 % of visual tokens by post-question attention beats a random 10 % by >= 50 points."""
    if qtype in GAP_BAR_MISSED:
        request.applymarker(pytest.mark.xfail(reason="gap measured at 40-50 points", strict=False))
    e = results[qtype]["exact"]
    assert e["top10"] - e["rand10"] >= 0.5, results[qtype]


@pytest.mark.parametrize("qtype", QTYPES)
def test_attention_top10_and_random10_pins(results, qtype):
    """Pins for (b): top 10 % at most SLACK items below its measured count, random 10 % at most SLACK
    above (so the gap is within 2 * SLACK items of the measured one)."""
    c = _counts(results, qtype)
    _, _, top10, rand10 = MEASURED[qtype]
    assert c["top10"] >= top10 - SLACK and c["rand10"] <= rand10 + SLACK, results[qtype]
