"""Chunked prefill with the image split across chunks gives the same plan as one chunk.

Two servers, one after the other: the default chunk size (the whole prompt in one chunk) and
`--chunked-prefill-size 32` (a ~160-token prompt in 5+ chunks, the image across several). The
statistics accumulate chunk by chunk against all keys so far, so the kept positions per layer
must be identical, and so must the greedy tokens.
"""
from __future__ import annotations

import re

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from vlcache_sglang.serving import running_server

pytestmark = pytest.mark.server
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "What is the value of the key in this picture?<|im_end|>\n<|im_start|>assistant\n")
CASES = [("vlcache", 0.2, 41), ("vlcache", 0.1, 42), ("h2o", 0.2, 43), ("snapkv", 0.2, 44)]


def run_cases(model_dir, extra_args):
    out = []
    with running_server(model_dir, attention_backend="vlcache", extra_args=extra_args) as server:
        for method, budget, seed in CASES:
            r = requests.post(f"{server.url}/generate", json={
                "text": PROMPT, "image_data": png_base64(make_test_image(seed, (336, 280))),
                "sampling_params": {"max_new_tokens": 8, "temperature": 0, "custom_params": {
                    "vlcache": {"method": method, "budget": budget, "window_size": 16, "return_plan": True}}},
            }, timeout=300)
            assert r.status_code == 200, r.text
            body = r.json()
            out.append((body["meta_info"]["vlcache_kept_positions"][0], body["output_ids"],
                        body["meta_info"]["prompt_tokens"]))
        log = server.log_path.read_text(errors="replace")
    new_tokens = [int(x) for x in re.findall(r"Prefill batch.*?#new-token: (\d+)", log)]
    return out, new_tokens


def test_chunked_prefill_keeps_the_same_tokens_as_one_chunk(tiny_model_dir):
    whole, whole_batches = run_cases(tiny_model_dir, [])
    chunked, chunk_batches = run_cases(tiny_model_dir, ["--chunked-prefill-size", "32"])
    assert max(whole_batches) > 128 and max(chunk_batches) <= 32  # really one chunk vs many
    for (method, budget, _), (kept_a, ids_a, m), (kept_b, ids_b, _) in zip(CASES, whole, chunked):
        assert m > 32 * 4, "the prompt must span several chunks"
        assert kept_a == kept_b, f"{method} {budget}: kept positions differ under chunked prefill"
        assert ids_a == ids_b
