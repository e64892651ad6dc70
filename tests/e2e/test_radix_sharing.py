"""Sharing compressed image prefixes through SGLang's radix tree (real server, trained model, CPU).

- multi-turn: turn 2 is served from turn 1's compressed KV (no image re-encode, nothing of turn 1
  recomputed) and gives the tokens of a Hugging Face recomputation with the same decisions;
- input logprobs from inside a cached compressed image (``logprob_start_len``): the Hugging Face
  reference of both plans; ``extra_key`` and ``cache_salt`` keep compressed prefixes apart;
- ten questions on one image, per sharing mode: what is reused, how often the image is encoded,
  and what ``prefix`` sharing guarantees (the same plan and tokens as unshared compression);
- a long mixed workload under a small pool: evictions happen, no forward reads freed KV, and the
  allocator, the tree and the virtual-id tables return to their starting values.
"""
from __future__ import annotations

import concurrent.futures as cf
import random

import pytest
import requests
import torch
from PIL import Image

from tests.conftest import png_base64

from tests.e2e.plugin_state import assert_at_start, settle
from vlcache_sglang.bundled import bundled_model_dir
from vlcache_sglang.research.hf_eval.items import ChatPrompter
from vlcache_sglang.tooling.serving import flush_cache, running_server, vlcache_state
from vlcache_sglang.research.tasks.shared_page import questions_on_one_page

pytestmark = pytest.mark.server
MAX_NEW = 12
POOL = 3000  # tokens: about ten 285-token prompts, so the workload below must evict


@pytest.fixture(scope="module")
def server():
    # policy defaults (not the bundled model's tuned file), so the figures do not move with tuning
    with running_server(bundled_model_dir(), attention_backend="vlcache", max_total_tokens=POOL,
                        max_running_requests=6,
                        # lpm orders waiting requests by the prefix each matches in the tree (compressed
                        # and virtual-id prefixes included): the sharing tests below run under it
                        extra_args=["--vlcache-config", "none", "--schedule-policy", "lpm"],
                        extra_env={"VLCACHE_DEBUG_CHECKS": "1"}) as handle:
        yield handle


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(bundled_model_dir())


@pytest.fixture(scope="module")
def prompter(processor):
    return ChatPrompter(processor)


def png(rgb) -> str:
    return png_base64(Image.fromarray(rgb))


def next_turn(previous: str, answer: str, question: str) -> str:
    return f"{previous}{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def generate(server, text, image_b64, max_new=MAX_NEW, fields: dict | None = None, **vlcache):
    """``fields``: request fields beside the sampling parameters (``extra_key``, logprobs, ...)."""
    payload = {"text": text, "image_data": image_b64, **(fields or {}),
               "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                   "custom_params": {"vlcache": vlcache}}}
    r = requests.post(f"{server.url}/generate", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def state(server) -> dict:
    return vlcache_state(server.url)


def flush(server) -> None:
    flush_cache(server.url)


def test_vlcache_radix_cache_is_selected_by_the_backend(server):
    assert state(server)["radix_cache"] == "VLCacheRadixCache"


def test_turn_two_reuses_turn_one_compressed_and_matches_hf(server, processor, prompter):
    from transformers import Qwen2VLForConditionalGeneration

    from vlcache_sglang.research.hf_multiturn import greedy_after_turns

    flush(server)
    rgb, qa = questions_on_one_page(seed=3, n=2)
    image = png(rgb)
    text1 = prompter.text(qa[0][0])
    before = state(server)["images_encoded"]
    one = generate(server, text1, image, budget=0.1, return_plan=True, sharing="compressed")
    encoded = state(server)["images_encoded"]
    assert encoded == before + 1  # turn 1 ran its (new) image through the vision tower, once
    text2 = next_turn(text1, one["text"], qa[1][0])
    two = generate(server, text2, image, budget=0.1, return_plan=True, sharing="compressed")
    m1, m2 = one["meta_info"]["prompt_tokens"], two["meta_info"]["prompt_tokens"]
    n1 = len(one["output_ids"])
    # turn 1's compressed prompt and (part of) its answer are reused: nothing of the image recomputed
    assert m1 < two["meta_info"]["cached_tokens"] <= m1 + n1 - 1, (two["meta_info"]["cached_tokens"], m1, n1)
    assert state(server)["images_encoded"] == encoded  # the image was not encoded again
    assert two["meta_info"]["vlcache_kv_tokens_saved"][0] > 0  # turn 2 compressed its own tokens
    assert two["meta_info"]["vlcache_reused_tokens"] == [two["meta_info"]["cached_tokens"]]  # what its plan built on

    kept1 = [torch.tensor(k) for k in one["meta_info"]["vlcache_kept_positions"][0]]
    kept2 = [torch.tensor(k) for k in two["meta_info"]["vlcache_kept_positions"][0]]
    # turn 2 keeps, of turn 1's prompt, only positions turn 1 kept in that layer
    for a, b in zip(kept1, kept2):
        assert set(b[b < m1].tolist()) <= set(a.tolist())
    model = Qwen2VLForConditionalGeneration.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    inputs = processor(text=[text2], images=[rgb], return_tensors="pt")
    assert inputs["input_ids"].shape[1] == m2
    cached = two["meta_info"]["cached_tokens"]
    # the reused part of turn 1's answer is token for token what turn 2's prompt holds there (the
    # answer's text re-tokenizes differently after that, so the server recomputes from there)
    assert inputs["input_ids"][0, m1:cached].tolist() == one["output_ids"][:cached - m1]
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = greedy_after_turns(model, dict(inputs), [(m1, kept1), (m2, kept2)], MAX_NEW, eos)
    assert two["output_ids"] == expected


def test_logprobs_from_inside_a_cached_compressed_image(server, processor, prompter):
    """``logprob_start_len`` caps SGLang's prefix match, here inside turn 1's compressed image: the
    request reuses exactly that much of it, computes (and reports logprobs for) the rest over what
    turn 1 kept there, and its tokens are the Hugging Face reference of those two plans."""
    from transformers import Qwen2VLForConditionalGeneration

    from vlcache_sglang.research.hf_multiturn import greedy_after_turns

    flush(server)
    rgb, qa = questions_on_one_page(seed=4, n=1)
    image, text = png(rgb), prompter.text(qa[0][0])
    inputs = processor(text=[text], images=[rgb], return_tensors="pt")
    pads = (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero()
    start = int(pads[len(pads) // 2])  # the middle of the image
    one = generate(server, text, image, budget=0.1, return_plan=True, sharing="compressed")
    two = generate(server, text, image, budget=0.1, return_plan=True, sharing="compressed",
                   fields={"return_logprob": True, "logprob_start_len": start})
    m = two["meta_info"]["prompt_tokens"]
    assert two["meta_info"]["cached_tokens"] == start == two["meta_info"]["vlcache_reused_tokens"][0]
    assert len(two["meta_info"]["input_token_logprobs"]) == m - start
    assert two["meta_info"]["vlcache_kv_tokens_saved"][0] > 0
    kept1 = [torch.tensor(k) for k in one["meta_info"]["vlcache_kept_positions"][0]]
    kept2 = [torch.tensor(k) for k in two["meta_info"]["vlcache_kept_positions"][0]]
    for a, b in zip(kept1, kept2):  # of the reused part, only what turn 1 kept
        assert set(b[b < start].tolist()) <= set(a.tolist())
    model = Qwen2VLForConditionalGeneration.from_pretrained(bundled_model_dir(), dtype=torch.float32).eval()
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    turns = [(start, [k[k < start] for k in kept1]), (m, kept2)]
    assert two["output_ids"] == greedy_after_turns(model, dict(inputs), turns, MAX_NEW, eos)


def test_extra_key_and_cache_salt_keep_compressed_prefixes_apart(server, prompter):
    """A compressed prefix is reused only under the same ``extra_key`` and ``cache_salt`` (the plugin
    adds its namespace to the user's key; the salt is a separate part of SGLang's radix key)."""
    flush(server)
    rgb, qa = questions_on_one_page(seed=6, n=1)
    image, text = png(rgb), prompter.text(qa[0][0])

    def cached(**fields) -> int:
        out = generate(server, text, image, budget=0.1, sharing="compressed", fields=fields)
        assert out["meta_info"]["vlcache_kept_ratio"][0] < 0.5  # compressed (or read compressed)
        return out["meta_info"]["cached_tokens"]

    assert cached(extra_key="tenant-a") == 0
    assert cached(extra_key="tenant-a") > 0
    assert cached(extra_key="tenant-b") == 0
    assert cached() == 0
    assert cached(extra_key="tenant-a", cache_salt="s1") == 0
    assert cached(extra_key="tenant-a", cache_salt="s1") > 0
    assert cached(lora_id="adapter-1") == 0  # without LoRA, SGLang appends lora_id to the key
    assert cached(lora_id="adapter-1") > 0
    # a stock request cannot name the namespace to reach the compressed KV (a 400, tests/e2e/test_clients.py)
    stock = generate(server, text, image, budget=1.0, fields={"extra_key": "tenant-a"})
    assert stock["meta_info"]["cached_tokens"] == 0 and not stock["meta_info"].get("vlcache_kept_ratio")


def ask_all(server, image, questions, prompter, **vlcache):
    return [generate(server, prompter.text(q), image, return_plan=True, **vlcache) for q in questions]


def test_ten_questions_on_one_image_per_sharing_mode(server, processor, prompter):
    rgb, qa = questions_on_one_page(seed=1, n=10)
    image = png(rgb)
    questions = [q for q, _ in qa]
    runs, encodes = {}, {}
    for mode in ("off", "prefix", "compressed"):
        flush(server)
        before = state(server)["images_encoded"]
        runs[mode] = ask_all(server, image, questions, prompter, budget=0.1, sharing=mode)
        encodes[mode] = state(server)["images_encoded"] - before
    acc = {mode: sum(r["text"].strip() == a for r, (_, a) in zip(out, qa)) for mode, out in runs.items()}
    cached = {mode: [r["meta_info"]["cached_tokens"] for r in out] for mode, out in runs.items()}
    print(f"\nten questions, budget 0.1: correct {acc}, images encoded {encodes}, cached {cached}")
    # SGLang's own multimodal embedding cache already runs the vision tower once per image in every
    # mode; what sharing saves is the language model's prefill over the image tokens (cached_tokens)
    assert encodes == {"off": 1, "prefix": 0, "compressed": 0}, encodes
    ids = prompter.inputs(Image.fromarray(rgb), questions[0])["input_ids"][0]
    last_visual = int((ids == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).nonzero().max())
    # questions 2-10 reuse the image: no visual token is prefilled again
    assert all(c > last_visual for c in cached["prefix"][1:] + cached["compressed"][1:])
    assert all(c < last_visual for c in cached["off"])
    # prefix sharing: each question still selects from the full image, exactly as unshared
    for off, pre in zip(runs["off"], runs["prefix"]):
        assert pre["meta_info"]["vlcache_kept_positions"] == off["meta_info"]["vlcache_kept_positions"]
        assert pre["output_ids"] == off["output_ids"]
    # compressed sharing: the first question is unshared; later ones read its compressed image
    assert runs["compressed"][0]["output_ids"] == runs["off"][0]["output_ids"]
    saved = [r["meta_info"]["vlcache_kv_tokens_saved"][0] for r in runs["compressed"][1:]]
    assert max(saved) < runs["off"][1]["meta_info"]["vlcache_kv_tokens_saved"][0]


def _conversation(server, prompter, pages, rng: random.Random, i: int) -> str:
    rgb, image, qa = pages[rng.randrange(len(pages))]
    mode = rng.choice(["compressed", "compressed", "prefix", "off"])
    budget = rng.choice([1.0, 0.2, 0.1, 0.1])
    method = rng.choice(["vlcache", "vlcache", "snapkv", "h2o"])
    text = prompter.text(qa[rng.randrange(len(qa))][0])
    if rng.random() < 0.1:  # a client that hangs up mid-stream: SGLang aborts the request
        payload = {"text": text, "image_data": image, "stream": True, "rid": f"abort-{i}",
                   "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                       "custom_params": {"vlcache": {"budget": budget, "sharing": mode}}}}
        with requests.post(f"{server.url}/generate", json=payload, stream=True, timeout=300) as r:
            for _ in r.iter_lines():
                break
        return "aborted"
    for _ in range(rng.choice([1, 1, 2, 3])):  # multi-turn chains extend their own cached turns
        out = generate(server, text, image, max_new=rng.choice([2, 6, 12]), budget=budget, method=method,
                       sharing=mode)
        text = next_turn(text, out["text"], qa[rng.randrange(len(qa))][0])
    return "ok"


def test_small_pool_long_mixed_workload_evicts_and_leaks_nothing(server, prompter):
    flush(server)
    start = state(server)
    pages = []
    for seed in range(5):
        rgb, qa = questions_on_one_page(seed=100 + seed, n=6)
        pages.append((rgb, png(rgb), qa))
    rng = random.Random(7)
    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(_conversation, server, prompter, pages, random.Random(rng.random()), i)
                   for i in range(90)]
        outcomes = [f.result() for f in futures]
    assert outcomes.count("ok") > 60
    now = settle(server, flush=False)
    assert now["debug_checks"] is True  # the read check was on (VLCACHE_DEBUG_CHECKS=1) ...
    assert now["freed_reads"] == 0 and now["stale_resolutions"] == 0  # ... no forward read freed KV or a stale row
    assert now["evicted_slots"] > start["evicted_slots"]  # the pool was small enough to evict
    assert now["compressed_requests_live"] == 0 and now["pending_statistics"] == 0
    assert now["resolved_rows_live"] == 0 and now["row_flags_live"] == 0
    assert now["request_states_live"] == 0  # readers of compressed tree entries kept none either
    assert now["virtual_ids_live"] > 0  # compressed entries are in the tree ...
    assert now["available_kv_tokens"] + now["evictable_kv_tokens"] == now["max_total_num_tokens"]
    assert_at_start(settle(server))  # ... and flushing it returns everything
