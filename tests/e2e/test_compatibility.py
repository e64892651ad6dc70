"""Scheduler flags users combine with compression, in one real server (tiny random Qwen2-VL, CPU):

- ``--enable-mixed-chunk`` with ``--disable-overlap-schedule`` (where a mixed decode row looks
  exactly like a last prefill chunk): decoding requests ride in extend batches (counted, so the
  test knows mixing happened), are never planned again, and every request's greedy tokens equal
  the same request served alone;
- ``--disable-radix-cache``: compression with the tree disabled (every other server module
  runs the vlcache radix tree), and the ``input_embeds`` it allows, served as stock;
- ``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY=2``: SGLang's busy memory check runs (and logs)
  every iteration and holds with compressed requests live;
- ``--enable-metrics``: requests left uncompressed carry a reason code in ``meta_info`` and in
  ``vlcache_requests_not_compressed_total{reason}``;
- the GPU machine's serving profile (``vlcache_sglang.tooling.gpu_kit.GPU_SERVER_ENV/ARGS``: SGLang's
  pure-torch fused ops, torch sampler, SDPA vision attention), rehearsed here;
- ``VLCACHE_DEBUG_CHECKS=1``: freed-KV reads are counted (none) and plans from incomplete
  statistics would raise;
- ``VLCACHE_KERNEL_LAUNCHES=<file>``: a launch file reaches the scheduler's backend, which reports
  it in ``/server_info`` (on the CPU the kernels are not launched; the CUDA effect is unit-tested).
The pool and every plugin store end where they started.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import pytest
import requests

from tests.conftest import make_test_image
from tests.e2e.test_compression import PROMPT, generate
from vlcache_sglang.tooling.gpu_kit import GPU_SERVER_ARGS, GPU_SERVER_ENV
from tests.e2e.plugin_state import assert_at_start, settle
from vlcache_sglang.tooling.serving import flush_cache, running_server, vlcache_state, wait_for

pytestmark = pytest.mark.server
MAX_NEW = 24
LONG = 160  # decode steps of the request the others' prefills are mixed with


LAUNCHES = {"schema": 1, "stats": {"block_m": 8, "block_n": 128, "pack_heads": True},
            "decode": {"block_n": 32, "programs_per_sm": 4.0, "num_warps": 8, "num_stages": 3,
                       "fused_merge": True}}


@pytest.fixture(scope="module")
def launch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("launches") / "tuned.json"
    path.write_text(json.dumps(LAUNCHES))
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir, launch_file):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=6000, max_running_requests=8,
                        extra_args=["--enable-mixed-chunk", "--disable-overlap-schedule", "--disable-radix-cache",
                                    "--chunked-prefill-size", "96",
                                    "--enable-metrics", "--min-free-slots-delay", "1",
                                    "--vlcache-budget", "0.1", "--vlcache-config", "none", *GPU_SERVER_ARGS],
                        extra_env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "2",
                                   "VLCACHE_DEBUG_CHECKS": "1", "VLCACHE_KERNEL_LAUNCHES": str(launch_file),
                                   **GPU_SERVER_ENV}) as handle:
        yield handle


def test_mixed_chunks_give_the_unmixed_tokens(server):
    start = settle(server)
    assert_at_start(start)
    assert start["debug_checks"] is True and start["radix_cache_disabled"] is True
    cases = [(PROMPT.format(q=f"Question {i}: what is written here?"), make_test_image(70 + i)) for i in range(6)]
    lengths = [LONG] + [MAX_NEW] * (len(cases) - 1)  # the first one still decodes while the others prefill
    fixed = {"ignore_eos": True}

    def ask(i):
        return generate(server, *cases[i], max_new=lengths[i], sampling=fixed)

    alone = []
    for i in range(len(cases)):  # one at a time: nothing to mix with
        alone.append(ask(i))
        flush_cache(server.url)
    assert all(o["meta_info"]["vlcache_kept_ratio"][0] < 0.5 for o in alone)
    mixed_before = vlcache_state(server.url)["mixed_decode_rows"]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        first = pool.submit(ask, 0)
        wait_for(lambda: vlcache_state(server.url)["compressed_requests_live"] >= 1, "the first compacted, decoding")
        rest = list(pool.map(ask, range(1, len(cases))))  # their prefills meet its decode steps
        together = [first.result()] + rest
    end = settle(server, flush=False)
    assert end["mixed_decode_rows"] > mixed_before, "no decode step was mixed into a prefill batch"
    assert [o["output_ids"] for o in together] == [o["output_ids"] for o in alone]
    assert [o["meta_info"]["vlcache_kept_ratio"] for o in together] == \
        [o["meta_info"]["vlcache_kept_ratio"] for o in alone]
    assert end["freed_reads"] == 0 and end["plans_from_incomplete_statistics"] == 0 and end["stale_resolutions"] == 0
    assert_at_start(settle(server))


def test_busy_memory_check_ran_and_held(server):
    log = server.log_path.read_text(errors="replace")
    assert "[Mem Check (BUSY)]" in log  # level 2 logs every busy iteration: the check really ran
    assert "Mem Leak Detected" not in log


def test_uncompressed_requests_say_why(server):
    before = vlcache_state(server.url)["not_compressed"]
    text = generate(server, "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                    max_new=4)
    assert text["meta_info"]["vlcache_not_compressed"] == ["text_only"]
    assert text["meta_info"]["vlcache_kept_ratio"] == [1.0]
    after = vlcache_state(server.url)["not_compressed"]
    assert after.get("text_only", 0) == before.get("text_only", 0) + 1
    metrics = requests.get(f"{server.url}/metrics", timeout=60).text
    line = [ln for ln in metrics.splitlines()
            if ln.startswith("vlcache_requests_not_compressed_total") and 'reason="text_only"' in ln]
    assert line and float(line[0].split()[-1]) >= 1.0, metrics[-2000:]
    # a compressed request carries no reason code
    image = generate(server, PROMPT.format(q="What is written here?"), make_test_image(5), max_new=4)
    assert "vlcache_not_compressed" not in image["meta_info"]


def test_input_embeds_are_served_as_stock_saying_why(server, tiny_model_dir):
    """``input_embeds`` (SGLang needs ``--disable-radix-cache`` for them) reach the scheduler as
    placeholder ids with no image spans: served as stock and reported ``text_only``. Stock SGLang
    0.5.23's Qwen2-VL does not use the embeddings (``general_mm_embed_routine`` overwrites them with
    those of the placeholder ids: ``torch_native`` answers the same), so the tokens are those of
    the placeholder-id prompt."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    text = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text)["input_ids"]
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as weights:
        embeds = weights.get_tensor("model.embed_tokens.weight")[ids].tolist()
    sampling = {"max_new_tokens": 6, "temperature": 0, "custom_params": {"vlcache": {"budget": 0.1}}}

    def post(**prompt) -> dict:
        r = requests.post(f"{server.url}/generate", timeout=300, json={**prompt, "sampling_params": sampling})
        assert r.status_code == 200, r.text
        return r.json()

    by_embeds, by_placeholders = post(input_embeds=embeds), post(input_ids=[1] * len(ids))
    assert by_embeds["meta_info"]["vlcache_not_compressed"] == ["text_only"]
    assert by_embeds["output_ids"] == by_placeholders["output_ids"]


def test_the_backend_reports_the_kernel_launches_it_was_given(server, launch_file):
    state = vlcache_state(server.url)
    assert state["kernel_launches"] == {"source": str(launch_file), "stats": LAUNCHES["stats"],
                                        "decode": LAUNCHES["decode"]}
