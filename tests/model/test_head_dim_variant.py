"""The head-dim-64 variant of the bundled model loads in HF with the same weight tensors and
generates; SGLang's FlashInfer backend can serve it (head dim 32 it cannot: the H200 run)."""
from __future__ import annotations

import json

import pytest

from vlcache_sglang.bundled import bundled_model_dir
from vlcache_sglang.research.tinyvlm.variants import head_dim_variant


@pytest.fixture(scope="module")
def bundled():
    return bundled_model_dir()


def test_variant_regroups_heads_and_keeps_every_weight(tmp_path, bundled):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    out = head_dim_variant(bundled, tmp_path / "hd64")
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["hidden_size"] // text["num_attention_heads"], text["num_key_value_heads"]) == (64, 1)
    assert sum(text["rope_parameters"]["mrope_section"]) == 32
    base = Qwen2VLForConditionalGeneration.from_pretrained(bundled, dtype=torch.float32)
    model = Qwen2VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)  # no missing keys
    for (name, a), (_, b) in zip(base.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert model.model.language_model.layers[0].self_attn.head_dim == 64
    ids = torch.tensor([[420, 5, 6, 7]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_impossible_regroupings_are_refused(tmp_path, bundled):
    with pytest.raises(ValueError, match="multiple"):
        head_dim_variant(bundled, tmp_path / "x", head_dim=48)
    with pytest.raises(ValueError, match="KV heads"):
        head_dim_variant(bundled, tmp_path / "y", head_dim=128)
