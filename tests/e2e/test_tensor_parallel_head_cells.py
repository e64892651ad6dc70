"""Head cells under ``--tp-size 2`` (CPU, gloo, both cores): the tiny Qwen2-VL's 2 KV heads, one per rank.

Each rank holds the cells of its own KV head, so alone it would keep another number of slots
and virtual ids than the other rank, and SGLang's allocators (which every rank must keep
identical) would part. Every rank therefore keeps the slots of the rank that needs most and
gives a virtual id to every position some head keeps (``Compressor._rank_agreement``). Checked,
with ``VLCACHE_DEBUG_CHECKS=1`` comparing every plan and the pool after every compaction across
the ranks:

- per-head plans give the tokens of the Hugging Face reference that masks, per KV head, what
  that head dropped; the request frees ``m - max_r ceil(sum_l k_{l,r} / L)`` slots;
- a mixed soak with per-head plans ends with the pool and every store at the start, and the
  ranks never disagreed;
- ``compressed`` sharing, served with head cells at one rank, is refused per request with a 400
  naming ``--tp-size`` (no rank could report what a request reusing a per-head prefix keeps).
"""
from __future__ import annotations

import pytest
import requests

from tests.conftest import make_test_image
from tests.e2e.test_compression import mixed_soak
from tests.e2e.plugin_state import assert_at_start, settle
from tests.e2e.test_head_cells_server import PER_HEAD, generate, reference
from vlcache_sglang.tooling.serving import running_server, vlcache_state

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=4000, max_running_requests=8,
                        extra_args=["--tp-size", "2", "--vlcache-cells", "head"],
                        extra_env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1", "VLCACHE_DEBUG_CHECKS": "1"}) as handle:
        yield handle


# The ranks must free the same slots, each holding a cell on every rank: a rank whose heads keep
# fewer cells than the slots the other rank needs (more than L * H/N times fewer; the tiny model
# has L = 2, one head per rank) leaves the request whole (uneven_heads_across_ranks). A floor of
# 0.7 bounds the heads' imbalance below 2x, so these plans are served compressed.
@pytest.mark.parametrize("head_budget,seed", [("uniform", 51), ("adaptive", 52)])
def test_per_head_plans_at_two_ranks_follow_the_reference(server, hf, head_budget, seed):
    before = settle(server)  # an empty tree: no position is protected
    assert before["tp_size"] == 2
    image = make_test_image(seed, (336, 280))
    out = generate(server, image, budget=0.1, granularity="head", head_budget=head_budget, head_floor=0.7,
                   return_plan=True)
    meta = out["meta_info"]
    head_kept = meta["vlcache_head_kept_positions"][0]
    after = vlcache_state(server.url)
    assert after["tp_plans_checked"] >= before["tp_plans_checked"] + 2 and after["tp_plan_mismatches"] == 0
    layers = len(head_kept)
    per_rank = [sum(len(head_kept[layer][r]) for layer in range(layers)) for r in range(2)]
    assert meta["vlcache_kv_tokens_saved"][0] == meta["prompt_tokens"] - max(-(-n // layers) for n in per_rank)
    assert out["output_ids"] == reference(hf, image, meta["vlcache_kept_positions"][0], head_kept)


def test_mixed_soak_with_per_head_plans_at_two_ranks_ends_at_the_start(server):
    start = settle(server)
    outcomes, _ = mixed_soak(server, 60, workers=6, seed=11, abort_every=20, vlcache=PER_HEAD)
    assert outcomes.count("ok") > 60 * 0.7
    end = settle(server)
    assert end["requests_compressed"] > start["requests_compressed"] + 10
    assert end["tp_plan_mismatches"] == 0 and end["freed_reads"] == 0 and end["stale_resolutions"] == 0
    assert_at_start(end)


def test_compressed_sharing_is_refused_per_request_naming_the_tp_size(server):
    assert_at_start(settle(server))
    r = requests.post(f"{server.url}/generate", json={
        "text": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "sampling_params": {
            "max_new_tokens": 2, "custom_params": {"vlcache": {"budget": 0.1, "sharing": "compressed"}}}},
        timeout=60)
    assert r.status_code == 400 and "--tp-size 1" in r.text and "--vlcache-cells layer" in r.text
    assert_at_start(settle(server))
