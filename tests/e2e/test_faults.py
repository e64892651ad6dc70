"""Faults inside a real SGLang server, each provoked on purpose (issue 20, items 4, 5 and 6).

One server (tiny random Qwen2-VL, CPU) with a small pool, small prefill chunks and optimistic
admission:

- retraction: SGLang reserves ``max_new_tokens * new_token_ratio`` per running request, but a
  request with ``ignore_eos`` always reserves ratio 1.0 (``_get_running_request_total_token_offset``),
  so fixed-length answers never overcommit and never retract. Here the answers are fixed-length
  through ``min_new_tokens == max_new_tokens`` (EOS masked, ``ignore_eos`` off) and
  ``SGLANG_INIT_NEW_TOKEN_RATIO`` is tiny, so admission overcommits and ``check_decode_mem`` fails
  mid-decode: ``retract_decode`` runs, the request's ``meta_info["num_retractions"]`` counts it.
  A retracted compressed request is recomputed: SGLang re-prefills prompt + generated tokens and
  the plugin plans over all of them (``vlcache_planned_tokens``); its remaining tokens are those of
  the Hugging Face reference that prefills the same tokens and applies the same plan. Under
  ``compressed`` sharing it resumes from its own compressed prompt when that is still in the tree
  (the tokens it gets alone), else it is recomputed (the HF replay of what it read back).
- aborts at each stage (queued, between prefill chunks with statistics pending, right after
  compaction, mid-decode) and ``max_new_tokens=0``: the stage is observed before the abort, and
  every store is back at its start afterwards.
- a batch mixing budgets, methods and sharing modes gives each request its tokens alone.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import re
import threading

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from tests.e2e.recompute import assert_recomputed_like_reference
from tests.e2e.plugin_state import assert_at_start, settle
from vlcache_sglang.tooling.serving import running_server, vlcache_state, wait_for

pytestmark = pytest.mark.server
POOL = 1500
MAX_RUNNING = 6
CHUNK = 128
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "What is the value of the key in this picture?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=POOL,
                        max_running_requests=MAX_RUNNING,
                        extra_args=["--chunked-prefill-size", str(CHUNK), "--decode-log-interval", "1",
                                    "--stream-interval", "1"],
                        extra_env={"SGLANG_INIT_NEW_TOKEN_RATIO": "0.01"}) as handle:
        yield handle


def payload(seed, size=(112, 112), max_new=10, rid=None, fixed=False, **vlcache):
    body = {"text": PROMPT, "image_data": png_base64(make_test_image(seed, size)),
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0,
                                "custom_params": {"vlcache": {"budget": 0.1, **vlcache}}}}
    if fixed:  # a fixed length without ignore_eos (which would make admission reserve it all)
        body["sampling_params"]["min_new_tokens"] = max_new
    if rid is not None:
        body["rid"] = rid
    return body


def post(server, body, timeout=600) -> dict:
    r = requests.post(f"{server.url}/generate", json=body, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def log_since(server, offset: int) -> str:
    return server.log_path.read_text(errors="replace")[offset:]


def log_offset(server) -> int:
    return len(server.log_path.read_text(errors="replace"))


def abort(server, rid: str) -> None:
    assert requests.post(f"{server.url}/abort_request", json={"rid": rid}, timeout=30).status_code == 200


# -- item 4: retraction ----------------------------------------------------------------------
RETRACT_N = 6
RETRACT_NEW = 300  # 6 x 300 generated tokens cannot fit a 1,500-token pool


def test_decode_out_of_memory_retracts_and_the_retracted_request_recomputes(server, hf):
    assert_at_start(settle(server))
    offset = log_offset(server)
    bodies = [payload(700 + i, max_new=RETRACT_NEW, fixed=True, return_plan=True) for i in range(RETRACT_N)]
    with cf.ThreadPoolExecutor(RETRACT_N) as ex:
        outs = list(ex.map(lambda b: post(server, b), bodies))
    log = log_since(server, offset)
    assert "KV cache pool is full. Retract requests." in log, log[-3000:]
    retracted = [(b, o) for b, o in zip(bodies, outs) if o["meta_info"]["num_retractions"] > 0]
    assert retracted, [o["meta_info"]["num_retractions"] for o in outs]
    for o in outs:  # every request, retracted or not, finishes with its whole answer
        assert o["meta_info"]["finish_reason"]["type"] == "length"
        assert len(o["output_ids"]) == RETRACT_NEW
        assert o["meta_info"]["vlcache_kv_tokens_saved"][0] > 0
    assert_at_start(settle(server))

    # the documented recompute: prompt + the k tokens generated before the (last) retraction are
    # prefilled again and planned together; the rest is the reference decode under that plan.
    # min_new_tokens == max_new_tokens: SGLang masks every stop token for the whole answer
    # (penaltylib/min_new_tokens.py: the request's eos ids and the tokenizer's), so must the reference
    model, processor = hf
    body, out = retracted[0]
    stops = sorted(set(model.generation_config.eos_token_id) | {processor.tokenizer.eos_token_id})
    seed = 700 + bodies.index(body)
    assert_recomputed_like_reference(hf, out, PROMPT, make_test_image(seed, (112, 112)), RETRACT_NEW,
                                     suppressed_tokens=stops, where=f"; server log {server.log_path}")


def test_decode_out_of_memory_under_compressed_sharing_resumes_or_recomputes(server, hf):
    # each request under its own extra_key, so only its own compressed prompt can be read back.
    # Retracted under pressure, a request either finds that prompt still in the tree and resumes
    # (the tokens it gets alone), or finds it evicted, wholly or in part, and is recomputed (the HF
    # replay of what it read back, then its new plan)
    assert_at_start(settle(server))
    offset = log_offset(server)
    bodies = [{**payload(700 + i, max_new=RETRACT_NEW, fixed=True, return_plan=True, sharing="compressed"),
               "extra_key": f"oom-{i}"} for i in range(RETRACT_N)]
    with cf.ThreadPoolExecutor(RETRACT_N) as ex:
        outs = list(ex.map(lambda b: post(server, b), bodies))
    assert "KV cache pool is full. Retract requests." in log_since(server, offset)
    retracted = [i for i, o in enumerate(outs) if o["meta_info"]["num_retractions"] > 0]
    assert retracted, [o["meta_info"]["num_retractions"] for o in outs]
    assert all(len(o["output_ids"]) == RETRACT_NEW for o in outs)
    assert_at_start(settle(server))
    model, processor = hf
    stops = sorted(set(model.generation_config.eos_token_id) | {processor.tokenizer.eos_token_id})
    outcomes = []
    for i in retracted:
        alone = post(server, bodies[i])  # a fresh tree: its first plan, never retracted
        assert alone["meta_info"]["num_retractions"] == 0
        assert_at_start(settle(server))
        meta = outs[i]["meta_info"]
        if "resumed after retraction" in meta["vlcache_notes"][0]:
            outcomes.append("resumed")
            assert meta["vlcache_reused_tokens"][0] >= meta["prompt_tokens"]
            assert outs[i]["output_ids"] == alone["output_ids"]
        else:
            outcomes.append(f"recomputed, reused {meta['vlcache_reused_tokens'][0]}")
            assert_recomputed_like_reference(hf, outs[i], PROMPT, make_test_image(700 + i, (112, 112)), RETRACT_NEW,
                                             suppressed_tokens=stops, where=f"; server log {server.log_path}",
                                             resumed_from=alone["meta_info"]["vlcache_kept_positions"][0])
    print("retracted under compressed sharing:", outcomes)


# -- item 5: aborts at each stage ------------------------------------------------------------
def streamed(server, body, stop_after: int, on_abort=None) -> list[dict]:
    """Stream ``body``; after ``stop_after`` chunks abort it by rid. Returns the chunks.

    ``on_abort`` (if given) is called just before the abort is sent, to observe the server's stage.
    """
    body = {**body, "stream": True}
    chunks = []
    with requests.post(f"{server.url}/generate", json=body, stream=True, timeout=600) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunks.append(json.loads(line[5:]))
            if len(chunks) == stop_after:
                if on_abort is not None:
                    on_abort()
                abort(server, body["rid"])
    return chunks


def test_abort_while_queued(server):
    assert_at_start(settle(server))
    rids = [f"busy-{i}" for i in range(MAX_RUNNING)]
    queue_one = re.compile(r"Decode batch, #running-req: 6,.*#queue-req: 1")
    with cf.ThreadPoolExecutor(MAX_RUNNING + 1) as ex:
        busy = [ex.submit(post, server, payload(800 + i, max_new=200, rid=rid, fixed=True))
                for i, rid in enumerate(rids)]
        # every running slot is taken (all six compacted and decoding) before the seventh arrives
        wait_for(lambda: vlcache_state(server.url)["compressed_requests_live"] == MAX_RUNNING, "6 running")
        offset = log_offset(server)
        queued = ex.submit(post, server, payload(899, max_new=60, rid="queued", fixed=True))
        # SGLang's own decode log sees it waiting behind the six
        wait_for(lambda: queue_one.search(log_since(server, offset)), "the seventh request queued")
        abort(server, "queued")
        q = queued.result()
        assert not any(f.done() for f in busy)  # the abort came while all six still ran
        outs = [f.result() for f in busy]
    assert q["meta_info"]["finish_reason"]["type"] == "abort"
    assert q["meta_info"]["completion_tokens"] == 0 and "vlcache_kv_tokens_saved" not in q["meta_info"]
    assert all(len(o["output_ids"]) == 200 for o in outs)
    assert_at_start(settle(server))


def test_abort_between_prefill_chunks_with_statistics_pending(server):
    assert_at_start(settle(server))
    start = vlcache_state(server.url)
    # 1,024 visual tokens: 9 chunks, so an abort sent once statistics are pending lands before the
    # last chunk even on a loaded machine (with 576 tokens, 5 chunks, CI once saw it land after)
    body = payload(810, size=(896, 896), max_new=8, rid="chunked")
    seen = {}

    def poll():
        state = vlcache_state(server.url)
        if state["pending_statistics"] > 0:
            seen.update(state)
            abort(server, "chunked")
            return True
        return False

    with cf.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(post, server, body)
        wait_for(poll, "statistics pending between prefill chunks", interval=0.0)
        out = fut.result()
    assert seen["pending_statistics"] == 1 and seen["compressed_requests_live"] == 0
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] == 0
    end = settle(server)
    assert end["requests_compressed"] == start["requests_compressed"]  # it never reached its plan
    assert_at_start(end)


def test_abort_right_after_compaction(server):
    assert_at_start(settle(server))
    start = vlcache_state(server.url)
    seen = {}
    chunks = streamed(server, payload(820, max_new=200, rid="compacted", fixed=True), stop_after=1,
                      on_abort=lambda: seen.update(vlcache_state(server.url)))
    first, last = chunks[0]["meta_info"], chunks[-1]["meta_info"]
    # the stage, from the server's own counters when the abort is sent: the request is compacted
    # (its plan counted, its compressed row live) and still decoding. The first chunk's token count
    # is not the stage: SGLang's tokenizer drains every queued output into one chunk
    # (TokenizerManager._wait_one_response), so under load it may already carry two tokens.
    assert seen["requests_compressed"] == start["requests_compressed"] + 1
    assert seen["compressed_requests_live"] == 1 and seen["pending_statistics"] == 0
    assert first["finish_reason"] is None and first["vlcache_kv_tokens_saved"][0] > 0
    assert last["finish_reason"]["type"] == "abort"
    assert last["completion_tokens"] < 200
    end = settle(server)
    assert end["requests_compressed"] == start["requests_compressed"] + 1
    assert_at_start(end)


def test_abort_mid_decode(server):
    assert_at_start(settle(server))
    chunks = streamed(server, payload(830, max_new=200, rid="decoding", fixed=True), stop_after=20)
    # the stage reached: at least 20 tokens decoded (SGLang may coalesce two tokens into one chunk)
    assert chunks[19]["meta_info"]["completion_tokens"] >= 20
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"]["type"] == "abort" and 20 <= last["completion_tokens"] < 200
    assert_at_start(settle(server))


def test_max_new_tokens_zero(server):
    assert_at_start(settle(server))
    out = post(server, payload(840, max_new=0))
    assert out["output_ids"] == [] and out["meta_info"]["completion_tokens"] == 0
    assert_at_start(settle(server))


# -- item 6: one batch, many settings ---------------------------------------------------------
# five compressing settings and one stock request (budget 1.0); SnapKV's default 50-token window
# would cover the whole 38-token prompt, so it gets a 16-token one (and no ``prefix`` sharing:
# that keeps the image whole, and the window is all of the rest: nothing would be freed)
MIXED = [dict(budget=0.1, method="vlcache", sharing="off"),
         dict(budget=0.3, method="snapkv", sharing="off", window_size=16),
         dict(budget=0.2, method="h2o", sharing="compressed"), dict(budget=1.0, method="vlcache"),
         dict(budget=0.2, method="streamingllm", sharing="prefix"), dict(budget=0.5, method="random")]
RUNNING = re.compile(r"Decode batch.*?#running-req: (\d+)")


def test_mixed_batch_gives_each_request_its_tokens_alone(server):
    assert_at_start(settle(server))
    bodies = [payload(900 + i, max_new=24, fixed=True, return_plan=True, **cfg) for i, cfg in enumerate(MIXED)]
    offset = log_offset(server)
    gate = threading.Barrier(len(bodies))

    def together(b):
        gate.wait()
        return post(server, b)

    with cf.ThreadPoolExecutor(len(bodies)) as ex:
        batched = list(ex.map(together, bodies))
    peak = max(int(x) for x in RUNNING.findall(log_since(server, offset)))
    assert peak == len(bodies), peak  # all six decoded in the same forwards
    alone = []
    for b in bodies:
        settle(server)
        alone.append(post(server, b))
    for cfg, x, y in zip(MIXED, batched, alone):
        assert x["output_ids"] == y["output_ids"], cfg
        # the same plan; the freed slots may differ by the few prompt-head tokens
        # ("<|im_start|>user\n<|vision_start|>") a batch mate's tree entry already owns. A stock
        # request reports nothing; batched with compressed ones, SGLang pads the key to [].
        plans = [o["meta_info"].get("vlcache_kept_positions") or None for o in (x, y)]
        assert plans[0] == plans[1], cfg
    report = [(cfg["method"], o["meta_info"].get("vlcache_kv_tokens_saved"),
               o["meta_info"].get("vlcache_not_compressed"), o["meta_info"].get("vlcache_notes"))
              for cfg, o in zip(MIXED, batched)]
    assert sum(bool(r[1]) and r[1][0] > 0 for r in report) == 5, report
    assert_at_start(settle(server))
