"""Freed KV really admits more requests (tiny random Qwen2-VL, CPU).

SGLang latches ``batch_is_full`` when a prefill pass runs out of tokens and clears it only when a
request leaves; compressed requests return most of their prompt right after prefill, so the plugin
reopens admission after each compaction (``scheduler_hooks.reopen_admission_after_compaction``). Here more
requests must run at once than the pool can hold with uncompressed prompts: all twelve at once,
where three uncompressed prompts fit (measured with the hook disabled: six).
"""
from __future__ import annotations

import concurrent.futures as cf
import re

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from vlcache_sglang.tooling.serving import running_server, vlcache_state

pytestmark = pytest.mark.server
POOL = 4000
MAX_NEW = 48
N_REQUESTS = 12
IMAGE = (896, 896)  # 1,024 visual tokens: three uncompressed prompts fill the pool
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
          "Describe the picture.<|im_end|>\n<|im_start|>assistant\n")
RUNNING = re.compile(r"Decode batch.*?#running-req: (\d+)")


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache", max_total_tokens=POOL,
                        max_running_requests=32, extra_args=["--decode-log-interval", "1"]) as handle:
        yield handle


def one(server, i: int) -> dict:
    r = requests.post(f"{server.url}/generate", json={
        "text": PROMPT, "image_data": png_base64(make_test_image(500 + i, IMAGE)),
        "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                            "custom_params": {"vlcache": {"budget": 0.1}}},
    }, timeout=900)
    assert r.status_code == 200, r.text
    return r.json()["meta_info"]


def pool(server) -> dict:
    return vlcache_state(server.url)


def test_more_requests_run_at_once_than_fit_uncompressed(server):
    requests.post(f"{server.url}/flush_cache", timeout=60)  # the launch warm-up's prefix
    start = pool(server)
    offset = len(server.log_path.read_text(errors="replace"))
    with cf.ThreadPoolExecutor(N_REQUESTS) as ex:
        metas = list(ex.map(lambda i: one(server, i), range(N_REQUESTS)))
    prompt = metas[0]["prompt_tokens"]
    assert all(m["vlcache_kv_tokens_saved"][0] > 0.8 * prompt for m in metas), metas[0]
    peak = max(int(x) for x in RUNNING.findall(server.log_path.read_text(errors="replace")[offset:]))
    fit_uncompressed = POOL // (prompt + MAX_NEW)
    print(f"peak running {peak}, uncompressed prompts fit {fit_uncompressed}")
    assert fit_uncompressed == 3
    # measured: all 12 at once (3 runs); 6 without the reopen hook. All of them, as the README says
    assert peak == N_REQUESTS, (peak, fit_uncompressed)
    requests.post(f"{server.url}/flush_cache", timeout=60)
    end = pool(server)
    assert end["available_kv_tokens"] == start["available_kv_tokens"] == POOL
    assert end["compressed_requests_live"] == 0 and end["virtual_ids_live"] == 0 and end["cell_slots_live"] == 0
