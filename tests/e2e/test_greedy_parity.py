"""Correctness anchor: with nothing compressed, `--attention-backend vlcache` produces exactly
the stock `torch_native` backend's greedy tokens, and both equal Hugging Face `generate`.

Two servers run one after the other (never at once); every prompt is distinct, so the radix
cache cannot turn one backend's run into a prefix hit the other did not get.
"""
from __future__ import annotations

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from vlcache_sglang.serving import running_server

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


def server_greedy(model_dir, backend, cases):
    results = []
    with running_server(model_dir, attention_backend=backend) as server:
        for kind, prompt, image in cases:
            payload = {"text": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}}
            if image is not None:
                payload["image_data"] = png_base64(image)
            r = requests.post(f"{server.url}/generate", json=payload, timeout=120)
            assert r.status_code == 200, r.text
            results.append(r.json()["output_ids"])
    return results


def test_vlcache_equals_torch_native_equals_hf(tiny_model_dir, cases):
    processor, items = cases
    reference = hf_greedy(tiny_model_dir, processor, items)
    stock = server_greedy(tiny_model_dir, "torch_native", items)
    ours = server_greedy(tiny_model_dir, "vlcache", items)
    for (kind, prompt, _), ref, a, b in zip(items, reference, stock, ours):
        assert len(ref) > 0
        assert a == ref, f"torch_native differs from HF on {kind} prompt {prompt[:40]!r}"
        assert b == a, f"vlcache differs from torch_native on {kind} prompt {prompt[:40]!r}"
