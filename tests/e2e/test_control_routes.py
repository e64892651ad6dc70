"""SGLang's control routes and other generation APIs on a vlcache server (the route table:
``vlcache_sglang/sglang_routes.tsv``).

One server (tiny random Qwen2-VL, CPU, ``--vlcache-budget 0.1`` as the launch default) and the
routes a user of SGLang calls around generation:

- ``/pause_generation`` in each mode while compressed requests decode, then
  ``/continue_generation``: ``in_place`` keeps their compacted rows and their tokens; ``retract``
  releases everything (the pool and every store at start while paused) and each request is
  recomputed: prompt plus the tokens it had generated are prefilled again and planned together,
  and the rest is the Hugging Face reference of that plan (so too under ``prefix`` sharing, whose
  image prefix waits in the tree while paused); under ``compressed`` sharing the compacted prompt
  waits there and the request resumes from it: every token equals the unpaused run's. ``abort``
  ends them with nothing left.
  ``/slow_down`` (SGLang's own test knob) makes each forward sleep, so the pause lands mid-decode.
- a ``retract`` pause between prefill chunks with statistics pending: the request is prefilled
  again from the start and answers as if never paused.
- ``/update_weights_from_disk`` with other weights: SGLang flushes the tree, which drops the
  compressed prefixes with it; the next request is planned and decoded under the new weights
  (the HF reference of the new checkpoint applying the server's plan), its image encoded again
  (SGLang 0.5.23 kept the old embedding: ``scheduler_hooks.drop_stale_image_embeddings``); back
  through ``/update_weights_from_tensor`` (``/begin_weight_update`` .. ``/end_weight_update``),
  the first answer again. The reinforcement-learning
  loop (pause with ``retract``, update, continue) recomputes the retracted compressed requests
  under the new weights.
- ``/release_memory_occupation`` / ``/resume_memory_occupation`` (``kv_cache``): without
  ``--enable-memory-saver`` (refused at launch) SGLang only flushes; the compressed prefixes go.
- ``/v1/decisions`` with an image: the label probabilities are read at the last prompt position,
  in the prefill, so they equal the uncompressed HF model's even though the request compresses.
- ``/v1/responses``, ``/v1/messages``, ``/invocations`` answer what ``/v1/chat/completions`` does,
  each compressed; ``/vertex_generate`` what ``/generate`` does; SGLang's Ollama ``/api/chat``
  drops a message's ``images`` (stock), so it is served as a text-only request; ``/v1/completions``
  (text only) is served as stock.
- a background ``/v1/responses`` request (``--enable-response-store``) cancelled mid-decode leaves
  nothing; ``/server_info`` and its deprecated twin ``/get_server_info`` carry the same state.
"""
from __future__ import annotations

import concurrent.futures as cf
import time

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from tests.e2e.recompute import assert_recomputed_like_reference
from tests.e2e.plugin_state import assert_at_start, settle
from vlcache_sglang.tooling.serving import LIVE_STORES, running_server, vlcache_state, wait_for

pytestmark = pytest.mark.server
POOL = 6000
QUESTION = "What is the value of the key in this picture?"
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
DECODING = 3
MAX_NEW = 60
FORWARD_SLEEP_S = 0.05  # /slow_down: 60 decode steps take at least 3 s


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=POOL, max_running_requests=4,
                        extra_args=["--vlcache-budget", "0.1", "--chunked-prefill-size", "128",
                                    "--enable-response-store", "--stream-interval", "1"]) as handle:
        yield handle


def body(seed: int, max_new: int = MAX_NEW, size=(112, 112), extra_key: str | None = None, **vlcache) -> dict:
    """A fixed-length answer (``min_new_tokens`` masks EOS) with the plan returned; ``extra_key``
    keeps its radix entries apart from other requests'."""
    payload = {"text": PROMPT, "image_data": png_base64(make_test_image(seed, size)),
               "sampling_params": {"max_new_tokens": max_new, "min_new_tokens": max_new, "temperature": 0,
                                   "custom_params": {"vlcache": {"return_plan": True, **vlcache}}}}
    if extra_key is not None:
        payload["extra_key"] = extra_key
    return payload


def generate(server, payload: dict) -> dict:
    r = requests.post(f"{server.url}/generate", json=payload, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()


def post(server, route: str, payload: dict | None = None) -> requests.Response:
    r = requests.post(f"{server.url}{route}", json=payload if payload is not None else {}, timeout=600)
    assert r.status_code == 200, f"{route}: {r.status_code} {r.text}"
    return r


def stops(processor, model) -> list[int]:
    """What ``min_new_tokens`` masks for the whole answer (the request's and tokenizer's EOS ids)."""
    return sorted(set(model.generation_config.eos_token_id) | {processor.tokenizer.eos_token_id})


@pytest.fixture
def slow_forwards(server):
    post(server, "/slow_down", {"forward_sleep_time": FORWARD_SLEEP_S})
    try:
        yield
    finally:
        post(server, "/slow_down", {"forward_sleep_time": None})


@pytest.fixture(scope="module")
def unpaused(server):
    """The answers of the decoding workload when nothing interrupts it."""
    assert_at_start(settle(server))
    outs = [generate(server, body(10 + i)) for i in range(DECODING)]
    assert_at_start(settle(server))
    return outs


def paused_workload(server, mode: str, while_paused=None, isolated: bool = False,
                    **vlcache) -> tuple[list[dict], dict]:
    """Start the decoding workload (request options ``vlcache``; with ``isolated`` each request
    under its own ``extra_key``, so none reads another's tree entries), pause in ``mode`` once all
    are compacted and decoding, run ``while_paused``, continue. Returns the answers and the
    plugin's state during the pause."""
    with cf.ThreadPoolExecutor(DECODING) as ex:
        futures = [ex.submit(generate, server, body(10 + i, extra_key=f"request-{i}" if isolated else None, **vlcache))
                   for i in range(DECODING)]
        wait_for(lambda: vlcache_state(server.url)["compressed_requests_live"] == DECODING, "all compacted")
        time.sleep(0.3)  # a few decode steps in
        post(server, "/pause_generation", {"mode": mode})
        assert not any(f.done() for f in futures) or mode == "abort"
        state = vlcache_state(server.url)
        if while_paused is not None:
            while_paused()
        post(server, "/continue_generation")
        return [f.result() for f in futures], state


def test_an_in_place_pause_keeps_the_compacted_rows_and_their_tokens(server, unpaused, slow_forwards):
    outs, paused = paused_workload(server, "in_place")
    assert paused["compressed_requests_live"] == DECODING and paused["virtual_ids_live"] > 0, paused
    for o, ref in zip(outs, unpaused):
        assert o["meta_info"]["num_retractions"] == 0
        assert o["output_ids"] == ref["output_ids"]
    assert_at_start(settle(server))


def assert_each_recomputed(hf, outs: list[dict], unpaused: list[dict], resumed: bool = False) -> None:
    """Each request was retracted once and recomputed: its first k tokens are the unpaused run's,
    the rest the HF reference of its plan over prompt + k (with ``resumed``, of its first plan, the
    unpaused run's, then the last: the re-prefill read its own compressed entry)."""
    model, processor = hf
    for i, o in enumerate(outs):
        meta = o["meta_info"]
        assert meta["num_retractions"] == 1 and len(o["output_ids"]) == MAX_NEW, meta
        assert meta["vlcache_planned_tokens"][0] > meta["prompt_tokens"], meta  # planned over prompt + k
        assert o["output_ids"][:meta["vlcache_planned_tokens"][0] - meta["prompt_tokens"]] == \
            unpaused[i]["output_ids"][:meta["vlcache_planned_tokens"][0] - meta["prompt_tokens"]]
        first = unpaused[i]["meta_info"]["vlcache_kept_positions"][0] if resumed else None
        assert_recomputed_like_reference(hf, o, PROMPT, make_test_image(10 + i), MAX_NEW,
                                         suppressed_tokens=stops(processor, model), resumed_from=first)


def test_a_retract_pause_releases_everything_and_each_request_recomputes(server, hf, unpaused, slow_forwards):
    outs, paused = paused_workload(server, "retract")
    assert_at_start(paused)  # the retracted rows, their plans and cells are gone while paused
    assert_each_recomputed(hf, outs, unpaused)
    assert_at_start(settle(server))


def retract_paused_under(server, sharing: str) -> tuple[list[dict], dict]:
    """The retract pause with each request under its own ``extra_key``. SGLang's retract releases
    a request as if it finished (release_kv_cache): what may enter the tree goes there, evictable,
    while no request, row, plan or statistic of the plugin stays live."""
    outs, paused = paused_workload(server, "retract", isolated=True, sharing=sharing)
    live = {k: paused[k] for k in LIVE_STORES if k not in ("virtual_ids_live", "cell_slots_live")}
    assert live == dict.fromkeys(live, 0), paused
    assert paused["evictable_kv_tokens"] > 0, paused
    assert paused["available_kv_tokens"] + paused["evictable_kv_tokens"] == POOL, paused
    assert (paused["virtual_ids_live"] > 0) == (sharing == "compressed"), paused
    return outs, paused


def test_a_retract_pause_under_prefix_sharing_reads_the_image_back_and_recomputes(
        server, hf, unpaused, slow_forwards):
    # the uncompressed prefix before the statistics window is in the tree and read back (exact);
    # the rest is prefilled again and planned with the generated tokens
    outs, _ = retract_paused_under(server, "prefix")
    for o in outs:
        meta = o["meta_info"]
        assert 0 < meta["vlcache_reused_tokens"][0] < meta["prompt_tokens"], meta
    assert_each_recomputed(hf, outs, unpaused)
    assert_at_start(settle(server))


def test_a_retract_pause_under_compressed_sharing_resumes_as_if_never_paused(server, hf, unpaused, slow_forwards):
    # the compacted prompt is in the tree: the re-prefill reads all of it, recomputes the generated
    # tokens against it as they were decoded, and keeps what it holds (no second plan), so every
    # token equals the unpaused run's (request_info.resumed, policy.keep_everything)
    resumed_before = vlcache_state(server.url)["resumed_after_retraction"]
    outs, _ = retract_paused_under(server, "compressed")
    assert vlcache_state(server.url)["resumed_after_retraction"] == resumed_before + DECODING
    for o, ref in zip(outs, unpaused):
        meta = o["meta_info"]
        m, planned = meta["prompt_tokens"], meta["vlcache_planned_tokens"][0]
        assert meta["num_retractions"] == 1 and meta["vlcache_reused_tokens"][0] >= m, meta
        assert "resumed after retraction" in meta["vlcache_notes"][0]
        assert o["output_ids"] == ref["output_ids"]
        first = ref["meta_info"]["vlcache_kept_positions"][0]  # the plan it was decoding under
        assert meta["vlcache_kept_positions"][0] == [[*layer, *range(m, planned)] for layer in first]
    assert_each_recomputed(hf, outs, unpaused, resumed=True)  # the HF replay of both plans agrees
    assert_at_start(settle(server))


def test_an_abort_pause_ends_every_request_with_nothing_left(server, slow_forwards):
    outs, _ = paused_workload(server, "abort")
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort"] * DECODING
    assert all(len(o["output_ids"]) < MAX_NEW for o in outs)
    assert_at_start(settle(server))


def test_a_retract_pause_between_prefill_chunks_answers_as_if_never_paused(server, slow_forwards):
    # 1,024 visual tokens in 128-token chunks: statistics stay pending across 9 chunks
    chunked = body(30, max_new=8, size=(896, 896))
    with cf.ThreadPoolExecutor(1) as ex:
        future = ex.submit(generate, server, chunked)
        wait_for(lambda: vlcache_state(server.url)["pending_statistics"] > 0, "statistics pending")
        post(server, "/pause_generation", {"mode": "retract"})
        assert not future.done()
        assert_at_start(vlcache_state(server.url))
        post(server, "/continue_generation")
        out = future.result()
    assert_at_start(settle(server))
    ref = generate(server, chunked)
    assert out["meta_info"]["num_retractions"] == 1
    assert out["output_ids"] == ref["output_ids"]
    assert out["meta_info"]["vlcache_kept_positions"] == ref["meta_info"]["vlcache_kept_positions"]
    assert_at_start(settle(server))


def update_weights(server, model_path) -> None:
    r = post(server, "/update_weights_from_disk", {"model_path": str(model_path)})
    assert r.json()["success"], r.text


def update_weights_from_tensors(server, model_path) -> None:
    """The same checkpoint through ``/update_weights_from_tensor`` in a weight-update session. The
    tensors travel as shared-memory handles (torch's ``file_system`` strategy: the default passes
    file descriptors, which only a process sharing the server's authkey may fetch)."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file
    from sglang.srt.utils import MultiprocessingSerializer

    named = list(load_file(model_path / "model.safetensors").items())
    strategy = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        payload = MultiprocessingSerializer.serialize(named, output_str=True)
        post(server, "/begin_weight_update")
        assert post(server, "/update_weights_from_tensor", {"serialized_named_tensors": [payload]}).json()["success"]
        post(server, "/end_weight_update")
    finally:
        mp.set_sharing_strategy(strategy)


def expected_under_plan(hf_pair, out: dict, seed: int, max_new: int) -> list[int]:
    """The HF reference of ``hf_pair`` applying ``out``'s plan (a fixed-length answer)."""
    import torch

    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, processor = hf_pair
    kept = [torch.tensor(k) for k in out["meta_info"]["vlcache_kept_positions"][0]]
    inputs = dict(processor(text=[PROMPT], images=[make_test_image(seed)], return_tensors="pt"))
    assert inputs["input_ids"].shape[1] == out["meta_info"]["prompt_tokens"]
    return greedy_with_plan(model, inputs, kept, max_new, (), suppressed_tokens=stops(processor, model))


def test_a_weight_update_drops_compressed_prefixes_and_serves_the_new_weights(
        server, tiny_model_dir, other_weights, hf, hf_other):
    assert_at_start(settle(server))
    shared = body(40, max_new=12, sharing="compressed")
    before = generate(server, shared)
    assert vlcache_state(server.url)["evictable_kv_tokens"] > 0  # the compressed prompt is cached
    assert generate(server, shared)["meta_info"]["cached_tokens"] > 0
    try:
        update_weights(server, other_weights)
        assert_at_start(vlcache_state(server.url))  # SGLang's flush took the compressed prefixes
        encoded = vlcache_state(server.url)["images_encoded"]
        after = generate(server, shared)
        assert after["meta_info"]["cached_tokens"] == 0
        # the image seen before the update goes through the new vision tower (SGLang 0.5.23 kept
        # its old embedding: scheduler_hooks.drop_stale_image_embeddings)
        assert vlcache_state(server.url)["images_encoded"] == encoded + 1
        assert after["output_ids"] == expected_under_plan(hf_other, after, 40, 12)
        assert after["output_ids"] != before["output_ids"]  # other weights, other answer
        # back through the tensor route: the same flush, and the image (seen under the other
        # weights) goes through the vision tower again
        update_weights_from_tensors(server, tiny_model_dir)
        assert_at_start(vlcache_state(server.url))
        again = generate(server, shared)
        assert again["meta_info"]["cached_tokens"] == 0 and again["output_ids"] == before["output_ids"]
    finally:
        update_weights(server, tiny_model_dir)
    assert before["output_ids"] == expected_under_plan(hf, before, 40, 12)
    assert_at_start(settle(server))


def test_pause_update_continue_recomputes_under_the_new_weights(
        server, tiny_model_dir, other_weights, hf_other, slow_forwards):
    """The reinforcement-learning loop: pause (retract), load the new policy, continue."""
    try:
        outs, paused = paused_workload(server, "retract", lambda: update_weights(server, other_weights))
        assert_at_start(paused)
        model, processor = hf_other
        for i, o in enumerate(outs):
            assert o["meta_info"]["num_retractions"] == 1
            assert_recomputed_like_reference(hf_other, o, PROMPT, make_test_image(10 + i), MAX_NEW,
                                             suppressed_tokens=stops(processor, model))
    finally:
        update_weights(server, tiny_model_dir)
    assert_at_start(settle(server))


def test_releasing_the_kv_memory_drops_compressed_prefixes(server):
    assert_at_start(settle(server))
    shared = body(41, max_new=12, sharing="compressed")
    before = generate(server, shared)
    assert vlcache_state(server.url)["evictable_kv_tokens"] > 0
    post(server, "/release_memory_occupation", {"tags": ["kv_cache"]})
    assert_at_start(vlcache_state(server.url))
    post(server, "/resume_memory_occupation", {"tags": ["kv_cache"]})
    after = generate(server, shared)
    assert after["meta_info"]["cached_tokens"] == 0 and after["output_ids"] == before["output_ids"]
    assert_at_start(settle(server))


# -- other generation APIs --------------------------------------------------------------------
def model_name(server) -> str:
    return requests.get(f"{server.url}/v1/models", timeout=60).json()["data"][0]["id"]


def compressed_by(server, call) -> tuple[object, int]:
    """``call()``'s result and how many requests the plugin compressed for it."""
    before = vlcache_state(server.url)["requests_compressed"]
    result = call()
    assert_at_start(settle(server))
    return result, vlcache_state(server.url)["requests_compressed"] - before


def test_other_generation_apis_answer_as_chat_and_compress(server):
    assert_at_start(settle(server))
    name, png = model_name(server), png_base64(make_test_image(50))
    url = f"data:image/png;base64,{png}"
    chat = {"model": name, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTION}]}]}
    reference, n = compressed_by(server, lambda: post(server, "/v1/chat/completions", chat).json())
    text = reference["choices"][0]["message"]["content"]
    assert n == 1 and text and reference["usage"]["completion_tokens"] == 12

    # /invocations (SageMaker) is the chat route under another name
    out, n = compressed_by(server, lambda: post(server, "/invocations", chat).json())
    assert n == 1 and out["choices"][0]["message"]["content"] == text
    # /v1/responses: SGLang keeps 2 of max_output_tokens as headroom (protocol.py), so 14 asks for 12
    responses = {"model": name, "temperature": 0, "max_output_tokens": 14,
                 "input": [{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                                        {"type": "input_text", "text": QUESTION}]}]}
    out, n = compressed_by(server, lambda: post(server, "/v1/responses", responses).json())
    assert n == 1 and out["output"][0]["content"][0]["text"] == text, out
    # /v1/messages (Anthropic)
    messages = {"model": name, "temperature": 0, "max_tokens": 12,
                "messages": [{"role": "user", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                    {"type": "text", "text": QUESTION}]}]}
    out, n = compressed_by(server, lambda: post(server, "/v1/messages", messages).json())
    assert n == 1 and out["content"][0]["text"] == text, out

    # /vertex_generate (Vertex AI) is /generate with instances and parameters
    plain = body(50, max_new=12)
    generated, n = compressed_by(server, lambda: generate(server, plain))
    assert n == 1
    vertex = {"instances": [{"text": plain["text"], "image_data": plain["image_data"]}],
              "parameters": {"sampling_params": plain["sampling_params"]}}
    out, n = compressed_by(server, lambda: post(server, "/vertex_generate", vertex).json())
    assert n == 1 and out["predictions"][0]["output_ids"] == generated["output_ids"]


def test_ollama_chat_drops_images_and_is_served_as_text(server):
    """SGLang's Ollama protocol reads a message's ``images`` and its serving never passes them on:
    the request reaches the plugin as text only (``not_compressed.text_only``)."""
    assert_at_start(settle(server))
    before = vlcache_state(server.url)
    ollama = {"model": model_name(server), "stream": False, "options": {"num_predict": 4, "temperature": 0},
              "messages": [{"role": "user", "content": QUESTION, "images": [png_base64(make_test_image(51))]}]}
    out = post(server, "/api/chat", ollama).json()
    assert_at_start(settle(server))
    after = vlcache_state(server.url)
    assert after["requests_compressed"] == before["requests_compressed"]
    assert after["not_compressed"].get("text_only", 0) == before["not_compressed"].get("text_only", 0) + 1
    assert after["images_encoded"] == before["images_encoded"] and out["eval_count"] == 4


def test_decisions_over_an_image_equal_the_uncompressed_model(server, hf):
    """``/v1/decisions`` scores answer labels at the last prompt position, in the prefill, before
    any compaction: its probabilities are the full model's, whatever the budget. (Its yes/no
    questions need ``yes`` and ``no`` to be single tokens, which the tiny fixture's are not.)"""
    import torch

    assert_at_start(settle(server))
    model, processor = hf
    image = make_test_image(52)
    request = {"model": model_name(server), "input": QUESTION,
               "questions": [{"id": "key", "type": "score", "question": "How clearly is the key shown?",
                              "levels": ["not at all", "partly", "fully"]},
                             {"id": "colour", "type": "choice", "question": "Which colour is it?",
                              "options": [{"name": "red"}, {"name": "blue"}, {"name": "green"}]}]}
    # SGLang replays prompt ids only without images: the text-only request shows the server's
    # wording and label ids; the template puts the image first in the user turn
    text_only = post(server, "/v1/decisions", {**request, "return_prompt_token_ids": True}).json()["answers"]
    with_image = {**request, "images": [f"data:image/png;base64,{png_base64(image)}"]}
    out, n = compressed_by(server, lambda: post(server, "/v1/decisions", with_image).json())
    assert n == 2, out  # each question is a prefill-only request over the image, compressed
    prompt_tokens = 0
    for qid, answer in out["answers"].items():
        text = processor.tokenizer.decode(text_only[qid]["prompt_token_ids"])
        text = text.replace("<|im_start|>user\n", "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>", 1)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        prompt_tokens += inputs["input_ids"].shape[1]
        with torch.no_grad():
            logprobs = model(**inputs).logits[0, -1].float().log_softmax(-1)
        labels = logprobs[text_only[qid]["label_token_ids"]]
        assert answer["label_mass"] == pytest.approx(float(labels.exp().sum()), rel=1e-3)
        assert list(answer["probabilities"].values()) == pytest.approx(labels.softmax(-1).tolist(), abs=1e-4)
        # and the image moved them (the comparison can tell a prompt without it)
        assert max(abs(a - b) for a, b in zip(answer["probabilities"].values(),
                                              text_only[qid]["probabilities"].values())) > 1e-3
    assert out["usage"]["prompt_tokens"] == prompt_tokens  # the reference read the server's prompts


def test_cancelling_a_background_response_releases_it(server, slow_forwards):
    assert_at_start(settle(server))
    url = f"data:image/png;base64,{png_base64(make_test_image(53))}"
    background = {"model": model_name(server), "temperature": 0, "max_output_tokens": 400, "background": True,
                  "store": True, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": url},
                                                                       {"type": "input_text", "text": QUESTION}]}]}
    started = post(server, "/v1/responses", background).json()
    assert started["status"] in ("queued", "in_progress"), started
    wait_for(lambda: vlcache_state(server.url)["compressed_requests_live"] == 1, "the response compacted")
    cancelled = post(server, f"/v1/responses/{started['id']}/cancel").json()
    assert cancelled["status"] == "cancelled", cancelled
    stored = requests.get(f"{server.url}/v1/responses/{started['id']}", timeout=60).json()
    assert stored["status"] == "cancelled", stored
    assert_at_start(settle(server))


def test_text_completions_are_served_as_stock(server):
    """``/v1/completions`` takes text prompts only: served as stock (``text_only``), its tokens
    those of ``/generate`` on the same text."""
    assert_at_start(settle(server))
    text = "<|im_start|>user\nWhat is the value of the key?<|im_end|>\n<|im_start|>assistant\n"
    before = vlcache_state(server.url)["not_compressed"].get("text_only", 0)
    completion = post(server, "/v1/completions", {"model": model_name(server), "prompt": text, "max_tokens": 8,
                                                  "temperature": 0}).json()
    generated = generate(server, {"text": text, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert completion["choices"][0]["text"] == generated["text"]
    assert_at_start(settle(server))
    assert vlcache_state(server.url)["not_compressed"].get("text_only", 0) == before + 2


def test_both_server_info_routes_carry_the_plugin_state(server):
    assert_at_start(settle(server))
    current = requests.get(f"{server.url}/server_info", timeout=60).json()["internal_states"][0]["vlcache"]
    deprecated = requests.get(f"{server.url}/get_server_info", timeout=60).json()["internal_states"][0]["vlcache"]
    assert deprecated == current
    assert_at_start(current)
