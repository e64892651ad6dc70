"""Chunked prefill with the image split across chunks gives the same plan as one chunk.

Two servers, one after the other: the default chunk size (the whole prompt in one chunk) and
`--chunked-prefill-size 32` (a ~160-token prompt in 5+ chunks, the image across several). The
statistics accumulate chunk by chunk against all keys so far, so the kept positions per layer
must be identical, and so must the greedy tokens.

The same holds with radix sharing (``prefix``: the image prefix enters the tree uncompressed and
a repeat recomputes only the window; ``compressed``: a repeat reuses the compressed prefix under
its policy's namespace): each sharing case is sent twice, cold then warm (the second reuses the
first's prefix, also across chunk boundaries), and the kept sets, tokens and reused-prefix
lengths of both requests equal those of one chunk.
"""
from __future__ import annotations

import re
import time

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from vlcache_sglang.tooling.serving import running_server

pytestmark = pytest.mark.server
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "What is the value of the key in this picture?<|im_end|>\n<|im_start|>assistant\n")
CASES = [("vlcache", 0.2, 41), ("vlcache", 0.1, 42), ("h2o", 0.2, 43), ("snapkv", 0.2, 44)]
# (sharing, method, budget, image seed): each sent cold, then warm
SHARING_CASES = [("prefix", "vlcache", 0.1, 45), ("compressed", "vlcache", 0.1, 46), ("prefix", "snapkv", 0.2, 47),
                 ("compressed", "h2o", 0.2, 48)]


def _generate(server, method, budget, seed, **extra):
    r = requests.post(f"{server.url}/generate", json={
        "text": PROMPT, "image_data": png_base64(make_test_image(seed, (336, 280))),
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "custom_params": {
            "vlcache": {"method": method, "budget": budget, "window_size": 16, "return_plan": True, **extra}}},
    }, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _flush(server):
    for _ in range(300):  # refused (400) while a just-answered request is still in its batch
        if requests.post(f"{server.url}/flush_cache", timeout=60).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("flush_cache refused")


def run_cases(model_dir, extra_args):
    out, shared = [], []
    with running_server(model_dir, attention_backend="vlcache", extra_args=extra_args) as server:
        for method, budget, seed in CASES:
            body = _generate(server, method, budget, seed)
            out.append((body["meta_info"]["vlcache_kept_positions"][0], body["output_ids"],
                        body["meta_info"]["prompt_tokens"]))
        for sharing, method, budget, seed in SHARING_CASES:
            _flush(server)
            bodies = [_generate(server, method, budget, seed, sharing=sharing) for _ in range(2)]
            shared.append([(b["meta_info"]["vlcache_kept_positions"][0], b["output_ids"],
                            b["meta_info"]["cached_tokens"], b["meta_info"]["vlcache_kv_tokens_saved"][0])
                           for b in bodies])
        log = server.log_path.read_text(errors="replace")
    new_tokens = [int(x) for x in re.findall(r"Prefill batch.*?#new-token: (\d+)", log)]
    return out, shared, new_tokens


def test_chunked_prefill_keeps_the_same_tokens_as_one_chunk(tiny_model_dir):
    whole, whole_shared, whole_batches = run_cases(tiny_model_dir, [])
    chunked, chunked_shared, chunk_batches = run_cases(tiny_model_dir, ["--chunked-prefill-size", "32"])
    assert max(whole_batches) > 128 and max(chunk_batches) <= 32  # really one chunk vs many
    for (method, budget, _), (kept_a, ids_a, m), (kept_b, ids_b, _) in zip(CASES, whole, chunked):
        assert m > 32 * 4, "the prompt must span several chunks"
        assert kept_a == kept_b, f"{method} {budget}: kept positions differ under chunked prefill"
        assert ids_a == ids_b
    for (sharing, method, budget, _), one, many in zip(SHARING_CASES, whole_shared, chunked_shared):
        case = f"{sharing} {method} {budget}"
        (_, _, cold_cached, cold_saved), (_, _, warm_cached, _) = one
        assert cold_cached < 16 and warm_cached > 120, f"{case}: the repeat must reuse the image prefix"
        # under prefix sharing the prefix before the window enters the tree uncompressed: no slot
        # is freed; compressed sharing frees the dropped positions
        assert cold_saved > 0 or sharing == "prefix"
        if sharing == "prefix":  # the window is recomputed: the repeat's plan is the cold one's
            assert one[0][:2] == one[1][:2], f"{case}: the warm plan or tokens differ from the cold ones"
        for turn, (a, b) in enumerate(zip(one, many)):
            assert a[0] == b[0], f"{case} request {turn}: kept positions differ under chunked prefill"
            assert a[1] == b[1], f"{case} request {turn}: tokens differ under chunked prefill"
            assert a[2] == b[2], f"{case} request {turn}: reused prefix differs ({a[2]} vs {b[2]})"
