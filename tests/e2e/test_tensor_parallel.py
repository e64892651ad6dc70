"""Compression under ``--tp-size 2`` on SGLang's own CPU tensor parallelism (gloo; both cores,
``SGLANG_CPU_OMP_THREADS_BIND="0|1"``), tiny random Qwen2-VL (4 query / 2 KV heads: one KV head
per rank).

Each rank sees only its own heads' attention, so the statistics are all-gathered over SGLang's
attention TP group at plan time (:mod:`vlcache_sglang.backend.tensor_parallel`). With
``VLCACHE_DEBUG_CHECKS=1`` every plan, and the pool after every compaction, is compared across the
ranks through one more all-gather (``tp_plans_checked`` / ``tp_plan_mismatches``). Checked:

- budget 1.0: greedy tokens equal Hugging Face ``generate`` (what the one-rank server gives,
  tests/e2e/test_greedy_parity.py);
- budget 0.1 (VL-Cache) and a baseline (SnapKV): both ranks agree on every plan and pool count,
  and the tokens equal the HF reference applying the server's plan (what the one-rank server
  gives for its plan, tests/e2e/test_compression.py);
- radix sharing ``prefix`` and ``compressed`` at two ranks;
- ``/update_weights_from_disk`` to other weights and back: every rank reloads its shard and drops
  its own image-embedding cache, so an image seen before the update is encoded again and the
  answer is the new checkpoint's HF reference of the plan (the ranks agreeing on it);
- a mixed soak (images and text, budgets, methods, aborts) ends with the pool and the plugin's
  stores at their starting values, and the ranks never disagreed.
"""
from __future__ import annotations

import pytest
import requests

from tests.conftest import make_test_image
from tests.e2e.plugin_state import assert_at_start, settle
from tests.e2e.test_compression import PROMPT, generate, mixed_soak
from tests.e2e.test_control_routes import update_weights
from vlcache_sglang.tooling.serving import running_server, vlcache_state

pytestmark = pytest.mark.server
MAX_NEW = 10


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=4000, max_running_requests=8,
                        extra_args=["--tp-size", "2"],
                        extra_env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "VLCACHE_DEBUG_CHECKS": "1"}) as handle:
        yield handle


def reference(hf, text, image, kept):
    import torch

    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, processor = hf
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plan = None if kept is None else [torch.tensor(k) for k in kept]
    return greedy_with_plan(model, dict(inputs), plan, MAX_NEW, eos), inputs["input_ids"].shape[1]


def test_two_ranks_at_budget_one_give_the_one_rank_tokens(server, hf):
    state = vlcache_state(server.url)
    assert state["tp_size"] == 2 and state["debug_checks"] is True
    text, image = PROMPT.format(q="What is the value of the key in this picture?"), make_test_image(41, (224, 168))
    body = generate(server, text, image, max_new=MAX_NEW, budget=1.0)
    expected, _ = reference(hf, text, image, None)
    assert body["output_ids"] == expected


@pytest.mark.parametrize("method,budget,seed", [("vlcache", 0.1, 42), ("snapkv", 0.2, 43)])
def test_every_rank_plans_alike_and_tokens_follow_the_plan(server, hf, method, budget, seed):
    before = vlcache_state(server.url)
    text, image = PROMPT.format(q="What is the value of the key in this picture?"), make_test_image(seed, (336, 280))
    body = generate(server, text, image, max_new=MAX_NEW, method=method, budget=budget, window_size=16,
                    return_plan=True)
    meta = body["meta_info"]
    kept = meta["vlcache_kept_positions"][0]
    after = vlcache_state(server.url)
    assert after["tp_plans_checked"] >= before["tp_plans_checked"] + 2  # the plan and the pool, compared
    assert after["tp_plan_mismatches"] == 0
    assert meta["vlcache_kv_tokens_saved"][0] > 0
    expected, m = reference(hf, text, image, kept)
    assert meta["prompt_tokens"] == m and body["output_ids"] == expected
    full, _ = reference(hf, text, image, None)
    assert expected != full or budget >= 0.2  # the plan changed the answer: the comparison can fail


@pytest.mark.parametrize("sharing", ["prefix", "compressed"])
def test_radix_sharing_at_two_ranks(server, sharing):
    requests.post(f"{server.url}/flush_cache", timeout=60)
    image = make_test_image(44 if sharing == "prefix" else 45, (336, 280))
    text = PROMPT.format(q="What is the value of the key in this picture?")
    first = generate(server, text, image, max_new=MAX_NEW, budget=0.1, sharing=sharing, return_plan=True)
    again = generate(server, text, image, max_new=MAX_NEW, budget=0.1, sharing=sharing, return_plan=True)
    assert again["meta_info"]["cached_tokens"] > 100  # the image came from the tree
    if sharing == "prefix":  # each question still selects from the full image: same plan, same tokens
        assert again["meta_info"]["vlcache_kept_positions"] == first["meta_info"]["vlcache_kept_positions"]
        assert again["output_ids"] == first["output_ids"]
    state = vlcache_state(server.url)
    assert state["tp_plan_mismatches"] == 0 and state["freed_reads"] == 0 and state["stale_resolutions"] == 0


def test_a_weight_update_at_two_ranks_serves_the_new_weights_on_every_rank(
        server, tiny_model_dir, other_weights, hf, hf_other):
    assert_at_start(settle(server))
    text, image = PROMPT.format(q="What is the value of the key in this picture?"), make_test_image(46, (336, 280))

    def ask() -> dict:
        return generate(server, text, image, max_new=MAX_NEW, budget=0.1, sharing="compressed", return_plan=True)

    before = ask()
    assert ask()["meta_info"]["cached_tokens"] > 100  # the compressed image is in the tree
    try:
        update_weights(server, other_weights)
        assert_at_start(vlcache_state(server.url))  # SGLang's flush took the compressed prefixes
        encoded = vlcache_state(server.url)["images_encoded"]
        after = ask()
        assert after["meta_info"]["cached_tokens"] == 0
        assert vlcache_state(server.url)["images_encoded"] == encoded + 1  # through the new vision tower
        expected, _ = reference(hf_other, text, image, after["meta_info"]["vlcache_kept_positions"][0])
        assert after["output_ids"] == expected
        assert after["output_ids"] != before["output_ids"]  # other weights, other answer: the check can fail
    finally:
        update_weights(server, tiny_model_dir)
    assert ask()["output_ids"] == before["output_ids"]
    state = vlcache_state(server.url)
    assert state["tp_plan_mismatches"] == 0 and state["freed_reads"] == 0 and state["stale_resolutions"] == 0
    expected, _ = reference(hf, text, image, before["meta_info"]["vlcache_kept_positions"][0])
    assert before["output_ids"] == expected
    assert_at_start(settle(server))


def test_mixed_soak_at_two_ranks_ends_where_it_started(server):
    start = settle(server)
    assert_at_start(start)
    n = 60
    outcomes, state = mixed_soak(server, n, workers=6, seed=7, abort_every=20)
    assert outcomes.count("ok") > n * 0.7
    assert state["requests_compressed"] > start["requests_compressed"] + 10
    assert state["tp_plan_mismatches"] == 0 and state["freed_reads"] == 0 and state["stale_resolutions"] == 0
    assert_at_start(settle(server))
