"""Correctness anchor: with nothing compressed, `--attention-backend vlcache` produces exactly
the stock `torch_native` backend's greedy tokens, and both equal Hugging Face `generate`; and the
requests the policy leaves alone even when asked to compress (budget 1.0, text-only prompts, prompts
shorter than ``min_prompt_len``) are exactly the stock tokens too.

Two servers run one after the other (never at once); the radix cache is flushed before every
request, so each is a cold prefill on both backends.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.conftest import make_test_image
from tests.e2e.test_compression import generate as compression_generate
from vlcache_sglang.tooling.serving import flush_cache, running_server

pytestmark = pytest.mark.server
MAX_NEW = 12
TEXT_PROMPTS = ["Hello world! What is in this image?", "The quick brown fox jumps over the lazy dog."]
IMAGE_CASES = [(11, (112, 112), "Describe the picture."), (12, (168, 112), "What is in this image?"),
               (13, (224, 224), "What is the value of the key?")]


def image_prompt(processor, question):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.fixture(scope="module")
def cases(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    out = [("text", p, None) for p in TEXT_PROMPTS]
    out += [("image", image_prompt(processor, q), make_test_image(seed, size)) for seed, size, q in IMAGE_CASES]
    return processor, out


def hf_greedy(model_dir, processor, cases):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    for kind, prompt, image in cases:
        inputs = processor(text=[prompt], images=[image] if image is not None else None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        results.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    return results


def left_alone(kind: str, index: int) -> dict:
    """A per-request policy asking for compression that the policy still leaves alone: text-only
    prompts at budget 0.1, image prompts at budget 1.0, and the first image prompt at budget 0.1
    with ``min_prompt_len`` above its length (a short prompt)."""
    if kind == "text":
        return {"budget": 0.1}
    if index == len(TEXT_PROMPTS):
        return {"budget": 0.1, "min_prompt_len": SHORT_PROMPT_FLOOR}
    return {"budget": 1.0}


SHORT_PROMPT_FLOOR = 64  # the first image case's prompt is shorter (asserted below)


def generate(url: str, prompt: str, image, vlcache: dict | None = None) -> dict:
    """One greedy request after a cache flush (so no request reuses another's cached prompt)."""
    flush_cache(url)
    return compression_generate(SimpleNamespace(url=url), prompt, image, max_new=MAX_NEW, **(vlcache or {}))


def server_greedy(model_dir, backend, cases, with_left_alone=False):
    """Each case's response; with ``with_left_alone`` also each case under :func:`left_alone`."""
    with running_server(model_dir, attention_backend=backend) as server:
        plain = [generate(server.url, prompt, image) for _, prompt, image in cases]
        if not with_left_alone:
            return plain, None, None
        asked = [generate(server.url, prompt, image, left_alone(kind, i))
                 for i, (kind, prompt, image) in enumerate(cases)]
        _, prompt, image = cases[len(TEXT_PROMPTS)]
        return plain, asked, generate(server.url, prompt, image, {"budget": 0.1})  # the short one, no floor


def test_vlcache_equals_torch_native_equals_hf(tiny_model_dir, cases):
    processor, items = cases
    reference = hf_greedy(tiny_model_dir, processor, items)
    stock, _, _ = server_greedy(tiny_model_dir, "torch_native", items)
    ours, asked, short_compressed = server_greedy(tiny_model_dir, "vlcache", items, with_left_alone=True)
    for i, ((kind, prompt, _), ref, a, b, c) in enumerate(zip(items, reference, stock, ours, asked)):
        assert len(ref) > 0
        assert a["output_ids"] == ref, f"torch_native differs from HF on {kind} prompt {prompt[:40]!r}"
        assert b["output_ids"] == a["output_ids"], f"vlcache differs from torch_native on {kind} prompt {prompt[:40]!r}"
        # asked to compress, left alone by the policy: still the stock tokens, and nothing freed
        policy = left_alone(kind, i)
        assert c["output_ids"] == a["output_ids"], f"vlcache with {policy} differs from torch_native on {kind} prompt"
        assert c["meta_info"].get("vlcache_kv_tokens_saved", [0])[0] == 0, (policy, c["meta_info"])
        assert c["meta_info"].get("vlcache_kept_ratio", [1.0])[0] == 1.0, (policy, c["meta_info"])
        if kind == "text" or i == len(TEXT_PROMPTS):
            # text-only and short prompts: left alone before any statistics, no plan at all, and
            # the response says why (they asked for 0.1)
            assert "vlcache_layer_budgets" not in c["meta_info"], (policy, c["meta_info"])
            reason = "text_only" if kind == "text" else "short_prompt"
            assert c["meta_info"]["vlcache_not_compressed"] == [reason], (policy, c["meta_info"])
        else:  # budget 1.0 asks for nothing: no reason code either
            assert "vlcache_not_compressed" not in c["meta_info"], (policy, c["meta_info"])
    short = asked[len(TEXT_PROMPTS)]["meta_info"]
    assert short["prompt_tokens"] < SHORT_PROMPT_FLOOR, short
    # the same short prompt at 0.1 without the floor does compress: the floor is what left it alone
    assert short_compressed["meta_info"]["vlcache_kept_ratio"][0] < 0.5, short_compressed["meta_info"]
