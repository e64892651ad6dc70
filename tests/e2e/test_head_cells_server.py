"""Head cells in a real SGLang server: ``--vlcache-cells head`` (tiny Qwen2-VL, 2 KV heads, CPU).

Each (layer, KV head) of a slot is a cell, so a per-head plan holds ``ceil(sum_{l,h} k_{l,h} / (L * H))``
slots instead of the union over each layer's heads. The server also runs ``--enable-mixed-chunk``
with ``--chunked-prefill-size 96``, so prompts arrive in chunks and decoding rows with per-head
lists ride in extend batches. Checked:

- budget 1.0 gives the full-cache reference's greedy tokens;
- layer plans (every head of a layer keeps the same positions) give the tokens of the Hugging
  Face reference applying the server's plan, as with layer cells;
- per-head plans (uniform and AdaKV-style adaptive) give the tokens of the reference that masks,
  per KV head, what that head dropped, and the request frees what the per-head sum frees, more
  than the union over heads would;
- ``prefix`` sharing: a repeat reuses the uncompressed image prefix and gets the same plan and tokens;
- mixed batches: per-head compressed requests decoding while others prefill in chunks give the
  tokens each gets alone;
- ``compressed`` sharing: turn 2 of a conversation extends over turn 1's per-head compressed KV
  and gives the tokens of the reference cut per head after each turn;
- a ``retract`` pause under ``compressed`` sharing with per-head plans: each request resumes over
  its own per-head compressed prompt from the tree and gives the unpaused tokens, holding per head
  what it held plus the tokens it had generated;
- the pool and every store are back at their start after each workload.
"""
from __future__ import annotations

import concurrent.futures as cf
import time

import pytest

from tests.conftest import make_test_image
from tests.e2e.test_compression import generate as generate_text
from tests.e2e.test_compression import mixed_soak
from tests.e2e.plugin_state import assert_at_start, settle
from vlcache_sglang.tooling.serving import flush_cache, running_server, vlcache_state

pytestmark = pytest.mark.server
MAX_NEW = 10
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")
QUESTION = "What is the value of the key in this picture?"
PER_HEAD = {"granularity": "head", "head_budget": "adaptive"}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=6000,
                        max_running_requests=8,
                        extra_args=["--vlcache-cells", "head", "--enable-mixed-chunk", "--chunked-prefill-size", "96"],
                        extra_env={"VLCACHE_DEBUG_CHECKS": "1"}) as handle:
        yield handle


def generate(server, image, q: str = QUESTION, max_new: int = MAX_NEW, sampling: dict | None = None,
             **vlcache) -> dict:
    return generate_text(server, PROMPT.format(q=q), image, max_new=max_new, sampling=sampling, **vlcache)


def assert_clean(end: dict) -> None:
    """Back at start (:func:`assert_at_start`), and no forward read freed KV or a stale row."""
    assert_at_start(end)
    assert end["freed_reads"] == 0 and end["stale_resolutions"] == 0


def reference(hf, image, kept=None, head_kept=None, q: str = QUESTION) -> list[int]:
    import torch

    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, processor = hf
    inputs = dict(processor(text=[PROMPT.format(q=q)], images=[image], return_tensors="pt"))
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    kept = None if kept is None else [torch.tensor(k) for k in kept]
    if head_kept is None:
        return greedy_with_plan(model, inputs, kept, MAX_NEW, eos)
    head_kept = [[torch.tensor(h) for h in layer] for layer in head_kept]
    return greedy_with_plan(model, inputs, kept, MAX_NEW, eos, head_kept=head_kept)


def held_slots(head_kept: list[list[list[int]]]) -> int:
    """Slots a per-head plan holds with head cells: ``ceil(sum_{l,h} k_{l,h} / (L * H))``."""
    layers, heads = len(head_kept), len(head_kept[0])
    return -(-sum(len(h) for layer in head_kept for h in layer) // (layers * heads))


def test_budget_one_gives_the_full_cache_tokens(server, hf):
    image = make_test_image(41, (336, 280))
    out = generate(server, image, budget=1.0)
    assert out["output_ids"] == reference(hf, image)
    assert out["meta_info"].get("vlcache_kv_tokens_saved", [0])[0] == 0


def test_server_info_names_the_cells_and_kept_ratio_counts_them(server):
    """``/server_info`` says which cells the server holds (``tune.py --cells`` checks it), and a
    per-head plan's ``vlcache_kept_ratio`` is the share the heads hold, not the layers' union."""
    assert vlcache_state(server.url)["cells"] == "head"
    out = generate(server, make_test_image(45, (336, 280)), budget=0.1, granularity="head", return_plan=True)
    meta = out["meta_info"]
    head_kept = meta["vlcache_head_kept_positions"][0]
    cells = sum(len(h) for layer in head_kept for h in layer)
    assert meta["vlcache_kept_ratio"][0] == pytest.approx(
        cells / (len(head_kept) * len(head_kept[0]) * meta["vlcache_planned_tokens"][0]))


def test_layer_plans_on_head_cells_equal_the_reference(server, hf):
    image = make_test_image(42, (336, 280))
    out = generate(server, image, budget=0.1, return_plan=True)
    meta = out["meta_info"]
    assert meta["vlcache_kv_tokens_saved"][0] > 0
    assert out["output_ids"] == reference(hf, image, meta["vlcache_kept_positions"][0])


@pytest.mark.parametrize("head_budget,seed", [("uniform", 43), ("adaptive", 44)])
def test_per_head_plans_are_served_per_head(server, hf, head_budget, seed):
    image = make_test_image(seed, (336, 280))
    assert_at_start(settle(server))
    out = generate(server, image, budget=0.1, granularity="head", head_budget=head_budget, return_plan=True)
    meta = out["meta_info"]
    head_kept = meta["vlcache_head_kept_positions"][0]
    union = meta["vlcache_kept_positions"][0]
    assert len(head_kept[0]) == 2 and any(a != b for a, b in head_kept)  # the heads disagree somewhere
    # sharing off: no position is protected, so the request holds exactly the per-head sum
    assert meta["vlcache_kv_tokens_saved"][0] == meta["prompt_tokens"] - held_slots(head_kept)
    assert held_slots(head_kept) < -(-sum(len(k) for k in union) // len(union))  # layer cells hold the union
    assert out["output_ids"] == reference(hf, image, union, head_kept)
    assert_clean(settle(server))


def test_prefix_sharing_reuses_the_image_prefix_with_the_same_plan(server, hf):
    image = make_test_image(46, (336, 280))
    assert_at_start(settle(server))
    cold, warm = (generate(server, image, budget=0.1, sharing="prefix", window_size=16, return_plan=True,
                           **PER_HEAD) for _ in range(2))
    assert cold["meta_info"]["cached_tokens"] == 0 and warm["meta_info"]["cached_tokens"] > 0
    plan = cold["meta_info"]["vlcache_head_kept_positions"][0]
    assert warm["meta_info"]["vlcache_head_kept_positions"][0] == plan
    assert warm["meta_info"]["vlcache_kv_tokens_saved"][0] > 0
    expected = reference(hf, image, cold["meta_info"]["vlcache_kept_positions"][0], plan)
    assert cold["output_ids"] == warm["output_ids"] == expected
    assert_clean(settle(server))


def test_mixed_batches_give_the_tokens_of_each_request_alone(server):
    assert_at_start(settle(server))
    cases = [(make_test_image(80 + i, (336, 280)), f"Question {i}: what is written here?") for i in range(5)]
    lengths = [96] + [MAX_NEW] * (len(cases) - 1)  # the first one decodes while the others prefill

    def ask(i):
        return generate(server, cases[i][0], cases[i][1], max_new=lengths[i], budget=0.1, **PER_HEAD,
                        sampling={"ignore_eos": True})

    alone = []
    for i in range(len(cases)):
        alone.append(ask(i))
        flush_cache(server.url)
    assert all(o["meta_info"]["vlcache_kv_tokens_saved"][0] > 0 for o in alone)
    mixed_before = vlcache_state(server.url)["mixed_decode_rows"]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        first = pool.submit(ask, 0)
        deadline = time.monotonic() + 60  # wait until it is compacted, i.e. decoding
        while vlcache_state(server.url)["compressed_requests_live"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        rest = list(pool.map(ask, range(1, len(cases))))
        together = [first.result(), *rest]
    assert vlcache_state(server.url)["mixed_decode_rows"] > mixed_before  # per-head rows rode in extends
    assert [o["output_ids"] for o in together] == [o["output_ids"] for o in alone]
    assert_clean(settle(server))


def next_turn(previous: str, answer: str, question: str) -> str:
    return f"{previous}{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def held_sets(meta: dict) -> list[list[list[int]]]:
    """Per layer, per KV head, the positions a request holds (the layer's set for every head when
    the heads agree and the server reported no per-head sets)."""
    if "vlcache_head_kept_positions" in meta:
        return meta["vlcache_head_kept_positions"][0]
    return [[k, k] for k in meta["vlcache_kept_positions"][0]]


@pytest.mark.parametrize("policy,seed", [(PER_HEAD, 47), ({}, 48)], ids=["per-head", "layer-plan"])
def test_turn_two_reuses_turn_one_compressed_per_head_and_matches_hf(server, hf, policy, seed):
    """``compressed`` sharing with head cells: turn 2 extends over turn 1's per-head compressed
    KV from the tree (its statistics read each head's own keys), keeps per head only what that
    head held, and gives the tokens of the reference cut per head after each turn."""
    import torch

    from vlcache_sglang.research.hf_multiturn import greedy_after_turns

    model, processor = hf
    image = make_test_image(seed, (336, 280))
    assert_at_start(settle(server))
    text1 = PROMPT.format(q=QUESTION)
    one = generate_text(server, text1, image, max_new=MAX_NEW, budget=0.1, sharing="compressed", return_plan=True,
                        **policy)
    text2 = next_turn(text1, one["text"], "And what is the colour of the key?")
    two = generate_text(server, text2, image, max_new=MAX_NEW, budget=0.1, sharing="compressed", return_plan=True,
                        **policy)
    m1, m2 = one["meta_info"]["prompt_tokens"], two["meta_info"]["prompt_tokens"]
    cached = two["meta_info"]["cached_tokens"]
    # turn 1's whole compressed prompt came from the tree, and its answer as far as it re-tokenizes
    # to the same ids (the random model's byte tokens often do not: then cached == m1)
    assert m1 <= cached < m2
    assert one["meta_info"]["vlcache_kv_tokens_saved"][0] > 0 and two["meta_info"]["vlcache_kv_tokens_saved"][0] > 0
    kept1, kept2 = held_sets(one["meta_info"]), held_sets(two["meta_info"])
    if policy:
        assert any(a != b for a, b in kept1)  # the heads disagree: turn 2 read per-head prefixes
    for heads1, heads2 in zip(kept1, kept2):  # a head keeps of turn 1's prompt only what it held
        for a, b in zip(heads1, heads2):
            assert {p for p in b if p < m1} <= set(a)
    inputs = dict(processor(text=[text2], images=[image], return_tensors="pt"))
    assert inputs["input_ids"].shape[1] == m2
    assert inputs["input_ids"][0, m1:cached].tolist() == one["output_ids"][:cached - m1]
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    turns = [(m1, [[torch.tensor(h) for h in heads] for heads in kept1]),
             (m2, [[torch.tensor(h) for h in heads] for heads in kept2])]
    assert two["output_ids"] == greedy_after_turns(model, inputs, turns, MAX_NEW, eos, per_head=True)
    assert_clean(settle(server))


def test_a_retract_pause_under_compressed_sharing_resumes_per_head(server):
    from tests.e2e.test_control_routes import DECODING, body, paused_workload, post
    from tests.e2e.test_control_routes import generate as generate_fixed

    options = dict(PER_HEAD, budget=0.1, sharing="compressed")
    assert_at_start(settle(server))
    unpaused = [generate_fixed(server, body(10 + i, extra_key=f"request-{i}", **options)) for i in range(DECODING)]
    assert_at_start(settle(server))
    resumed_before = vlcache_state(server.url)["resumed_after_retraction"]
    post(server, "/slow_down", {"forward_sleep_time": 0.05})
    try:
        outs, _ = paused_workload(server, "retract", isolated=True, **options)
    finally:
        post(server, "/slow_down", {"forward_sleep_time": None})
    assert vlcache_state(server.url)["resumed_after_retraction"] == resumed_before + DECODING
    for o, ref in zip(outs, unpaused):
        meta = o["meta_info"]
        m, planned = meta["prompt_tokens"], meta["vlcache_planned_tokens"][0]
        assert meta["num_retractions"] == 1 and meta["vlcache_reused_tokens"][0] >= m, meta
        assert o["output_ids"] == ref["output_ids"]
        first = ref["meta_info"]["vlcache_head_kept_positions"][0]  # per layer, per KV head
        assert meta["vlcache_head_kept_positions"][0] == [[[*h, *range(m, planned)] for h in layer] for layer in first]
    assert_clean(settle(server))


def test_mixed_soak_with_per_head_plans_ends_at_the_start(server):
    start = settle(server)
    outcomes, _ = mixed_soak(server, 120, workers=6, seed=3, abort_every=30, vlcache=PER_HEAD)
    assert outcomes.count("ok") > 120 * 0.8
    end = settle(server)
    assert end["requests_compressed"] > start["requests_compressed"] + 30
    assert_clean(end)
