"""Compression inside a real SGLang server (tiny random Qwen2-VL, CPU, radix cache on).

- the server's greedy tokens equal the Hugging Face reference that applies the server's own plan
  (each layer's cache cut to the kept positions after prefill), for VL-Cache and baselines;
- an image at the very end of the prompt still compresses (requests the policy leaves alone are
  compared with a ``torch_native`` server in test_greedy_parity.py);
- memory really returns: per-request savings are reported, and after a mixed, concurrent workload
  with aborts the allocator, the tree and the compressor's own tables are back where they started.
"""
from __future__ import annotations

import concurrent.futures as cf
import random

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from tests.e2e.plugin_state import assert_at_start, settle
from vlcache_sglang.tooling.serving import running_server, vlcache_state

pytestmark = pytest.mark.server
MAX_NEW = 10
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=6000,
                        max_running_requests=8, extra_args=["--enable-metrics"]) as handle:
        yield handle


def generate(server, text, image=None, max_new=MAX_NEW, sampling: dict | None = None, **vlcache):
    """Greedy ``/generate``; ``vlcache`` keywords go to ``custom_params``, ``sampling`` to the sampling params."""
    payload = {"text": text, "sampling_params": {"max_new_tokens": max_new, "temperature": 0, **(sampling or {})}}
    if vlcache:
        payload["sampling_params"]["custom_params"] = {"vlcache": vlcache}
    if image is not None:
        payload["image_data"] = png_base64(image)
    r = requests.post(f"{server.url}/generate", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def pool_state(server) -> dict:
    return vlcache_state(server.url)


CASES = [("vlcache", 0.3, 21), ("vlcache", 0.1, 22), ("snapkv", 0.2, 23), ("pyramidkv", 0.2, 24),
         ("h2o", 0.2, 25), ("streamingllm", 0.2, 26), ("random", 0.3, 27)]


@pytest.mark.parametrize("method,budget,seed", CASES)
def test_server_tokens_equal_hf_with_the_same_plan(server, hf, method, budget, seed):
    import torch

    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, processor = hf
    image = make_test_image(seed, (336, 280))
    text = PROMPT.format(q="What is the value of the key in this picture?")
    # a 16-token observation window (a policy field passed per request) keeps SnapKV/PyramidKV's
    # protected window well inside the budget of a ~160-token prompt
    body = generate(server, text, image, method=method, budget=budget, window_size=16, return_plan=True)
    meta = body["meta_info"]
    kept = [torch.tensor(k) for k in meta["vlcache_kept_positions"][0]]
    m = meta["prompt_tokens"]
    assert len(kept) == model.config.text_config.num_hidden_layers
    assert meta["vlcache_kv_tokens_saved"][0] > 0
    assert [len(k) for k in kept] == meta["vlcache_layer_budgets"][0]
    assert meta["vlcache_kept_ratio"][0] == pytest.approx(sum(len(k) for k in kept) / (m * len(kept)))
    assert abs(meta["vlcache_kept_ratio"][0] - budget) < 0.05 or method == "pyramidkv"
    assert all(int(k.max()) < m for k in kept)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == m
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = greedy_with_plan(model, dict(inputs), kept, MAX_NEW, eos)
    assert body["output_ids"] == expected
    # and the compression changed something relative to the full cache (the test can fail)
    full = greedy_with_plan(model, dict(inputs), None, MAX_NEW, eos)
    kept_everything = all(k.numel() == m for k in kept)
    assert not kept_everything and (full != expected or budget >= 0.2)


def test_an_image_at_the_very_end_still_compresses(server):
    # (requests the policy leaves alone, budget 1.0, text-only and short prompts, are compared with
    # a torch_native server's tokens in test_greedy_parity.py)
    # an image at the very end of the prompt: the post-vision window is the one <|vision_end|>
    # token (the no-text-at-all fallback is covered in tests/policy/test_window.py); it still
    # compresses and answers
    end = "<|im_start|>user\nLook:<|vision_start|><|image_pad|><|vision_end|>"
    c = generate(server, end, make_test_image(31), budget=0.2, method="vlcache")
    assert len(c["output_ids"]) > 0 and c["meta_info"]["vlcache_kept_ratio"][0] < 0.5


def test_radix_prefix_is_reused_only_up_to_the_window(server):
    """Under ``prefix`` sharing a compressing request shares the cached image prefix but recomputes
    its window rows, so its plan is the one it gets with no cache at all."""
    image = make_test_image(61, (336, 280))
    text = PROMPT.format(q="What is the value of the key in this picture?")
    cold = generate(server, text, image, budget=0.1, return_plan=True, sharing="prefix")
    assert cold["meta_info"]["cached_tokens"] < 16
    generate(server, text, image, budget=1.0)  # stock: the whole prompt enters the tree
    warm = generate(server, text, image, budget=0.1, return_plan=True, sharing="prefix")
    m = warm["meta_info"]["prompt_tokens"]
    cached = warm["meta_info"]["cached_tokens"]
    # the image (120 visual tokens) is reused; the ~18-token question after it is recomputed
    assert 120 < cached <= m - 10, (cached, m)
    assert "incomplete" not in warm["meta_info"]["vlcache_notes"][0]
    assert warm["meta_info"]["vlcache_kept_positions"] == cold["meta_info"]["vlcache_kept_positions"]
    assert warm["output_ids"] == cold["output_ids"]


def test_prometheus_counters_with_enable_metrics(server):
    import re

    generate(server, PROMPT.format(q="Count."), make_test_image(51, (224, 168)), budget=0.2)
    text = requests.get(f"{server.url}/metrics", timeout=60).text
    saved = re.search(r"^vlcache_kv_tokens_saved_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    requests_total = re.search(r"^vlcache_requests_compressed_total(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    assert saved and float(saved.group(1)) > 0, text[-2000:]
    assert requests_total and float(requests_total.group(1)) >= 1


def _mixed_request(server, i: int, rng: random.Random, vlcache: dict | None = None):
    budget = rng.choice([1.0, 0.5, 0.2, 0.1])
    method = rng.choice(["vlcache", "snapkv", "h2o", "streamingllm"])
    with_image = rng.random() < 0.75
    image = make_test_image(1000 + i % 40, rng.choice([(112, 112), (224, 168)])) if with_image else None
    text = PROMPT.format(q=f"Question {i % 13}: what is shown?") if with_image else f"Tell me about {i}."
    payload = {"text": text, "rid": f"mixed-{i}", "sampling_params": {
        "max_new_tokens": rng.choice([2, 6, 12]), "temperature": 0,
        "custom_params": {"vlcache": {"budget": budget, "method": method, **(vlcache or {})}}}}
    if image is not None:
        payload["image_data"] = png_base64(image)
    abort = rng.random() < 0.1
    if abort:  # a streaming client that hangs up after the first chunk: SGLang aborts the request
        payload["stream"] = True
        payload["sampling_params"]["max_new_tokens"] = 64
        with requests.post(f"{server.url}/generate", json=payload, stream=True, timeout=300) as r:
            for _ in r.iter_lines():
                break
        return "aborted"
    r = requests.post(f"{server.url}/generate", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return "ok"


def mixed_soak(server, n: int, workers: int, seed: int, abort_every: int,
               vlcache: dict | None = None) -> tuple[list[str], dict]:
    """``n`` random requests (images and text, budgets, methods, streaming hang-ups) from
    ``workers`` clients, an explicit abort every ``abort_every``; ``vlcache``: policy fields every
    request adds. Returns the outcomes and the plugin's state once nothing is live any more."""
    rng = random.Random(seed)
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_mixed_request, server, i, random.Random(rng.random()), vlcache) for i in range(n)]
        # explicit aborts of requests still queued or running
        for i in range(0, n, abort_every):
            requests.post(f"{server.url}/abort_request", json={"rid": f"mixed-{i + 7}"}, timeout=30)
        outcomes = [f.result() for f in futures]
    return outcomes, settle(server, flush=False)


def test_no_leak_after_mixed_concurrent_workload_with_aborts(server):
    start = pool_state(server)
    n = 500
    outcomes, state = mixed_soak(server, n, workers=8, seed=0, abort_every=50)
    assert outcomes.count("ok") > n * 0.8
    assert state["requests_compressed"] > start["requests_compressed"] + 100
    assert state["kv_tokens_saved"] > start["kv_tokens_saved"]
    assert state["compressed_requests_live"] == 0 and state["pending_statistics"] == 0
    assert state["resolved_rows_live"] == 0 and state["row_flags_live"] == 0
    assert state["available_kv_tokens"] + state["evictable_kv_tokens"] == state["max_total_num_tokens"]
    assert_at_start(settle(server))
