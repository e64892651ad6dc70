"""The synthetic document-VQA task: determinism, content, geometry, datasets (no model needed)."""
from __future__ import annotations

import numpy as np
import pytest

from vlcache_sglang.research.tasks.docvqa import CELL, LETTERS, NO_KEY, QTYPES, DocGenerator


@pytest.mark.parametrize("qtype", QTYPES)
def test_documents_are_deterministic_and_consistent(qtype):
    a, b = DocGenerator(7, "heldout"), DocGenerator(7, "heldout")
    for _ in range(5):
        da, db = a.sample(16, qtype), b.sample(16, qtype)
        assert da.question == db.question and da.answer == db.answer and da.target_cells == db.target_cells
        assert np.array_equal(a.render(da), b.render(db))
        # the answer is read from the target cells
        digits = [int(da.cell_digit[c]) for c in da.target_cells]
        assert da.answer_digits == ([max(digits)] if qtype == "max" else digits)
        keys = [int(da.cell_key[c]) for c in da.target_cells]
        assert all(k != NO_KEY for k in keys)
        assert all(LETTERS[k] in da.question for k in set(keys))
        if qtype == "number":
            assert list(da.cell_part[da.target_cells]) == [1, 2, 3]
        # each letter names one key only
        keyed = da.cell_key[(da.cell_key != NO_KEY) & (da.cell_part == 0)]
        assert len(set(keyed.tolist())) == len(keyed)


@pytest.mark.parametrize("grid", [16, 32, 64])
def test_page_geometry(grid):
    gen = DocGenerator(0)
    d = gen.sample(grid, "single")
    rgb = gen.render(d)
    assert rgb.shape == (grid * CELL, grid * CELL, 3) and rgb.dtype == np.uint8
    r, c = divmod(d.target_cells[0], grid)
    cell = rgb[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL, 0]
    assert (cell[:8, :8] < 128).any() and (cell[:8, 8:] < 128).any()   # key letter and digit drawn


def test_patchify_and_prompt_match_the_real_processor():
    from PIL import Image

    from vlcache_sglang.research.tinyvlm.assets import Prompter, build_processor, build_tokenizer, patchify

    tok = build_tokenizer()
    proc, prompter = build_processor(tok), Prompter(tok)
    gen = DocGenerator(3, "heldout")
    for q in QTYPES:
        d = gen.sample(12, q)
        rgb = gen.render(d)
        inp = proc(text=[prompter.chat_text(d.question)], images=[Image.fromarray(rgb)], return_tensors="pt")
        pv, thw = patchify(rgb[None])
        assert inp["image_grid_thw"].tolist() == thw.tolist() == [[1, 24, 24]]
        assert float((inp["pixel_values"] - pv).abs().max()) < 1e-5
        assert inp["input_ids"][0].tolist() == prompter.prompt_ids(q, d.keys, 144)
        ans = prompter.answer_ids(q, d.answer_digits)
        assert tok.decode(ans) == d.answer + "<|im_end|>"


def test_datasets_roundtrip_and_offline_hub_error(tmp_path, monkeypatch):
    from vlcache_sglang.research.tasks.datasets_io import build_all, load_eval_dataset

    paths = build_all(tmp_path, [8], 2)
    cal, held = load_eval_dataset(paths["calibration"]), load_eval_dataset(paths["heldout"])
    assert len(cal) == len(held) == 2 * len(QTYPES)
    assert set(cal["id"]).isdisjoint(held["id"])
    assert cal[0]["image"].size == (8 * CELL, 8 * CELL)
    again = load_eval_dataset(build_all(tmp_path / "again", [8], 2)["heldout"])
    assert again["answer"] == held["answer"] and again["question"] == held["question"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="network access"):
        load_eval_dataset("lmms-lab/DocVQA")
