"""The Qwen2-VL-7B-shaped dummy model of the GPU speed benchmark: shapes, image sizes, memory.

No weights and no GPU: the architecture is built on the meta device, the processor runs on the
two image sizes the benchmark sends, and the benchmark's default pool is checked against an
H200 holding both of its servers.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import make_test_image
from vlcache_sglang.fixtures.qwen2vl_7b_dummy import (QWEN2_VL_7B, REHEARSAL, image_side_for, parameter_count,
                                                      write_dummy_model)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

# Qwen/Qwen2-VL-7B-Instruct's model.safetensors.index.json: "total_size": 16582751232 bytes of bf16
PUBLISHED_PARAMETERS = 16_582_751_232 // 2
H200_BYTES = 139 << 30  # what the lent H200 reports (about 139 GiB)


@pytest.fixture(scope="module")
def model_7b(tmp_path_factory) -> Path:
    return write_dummy_model(tmp_path_factory.mktemp("q7b"), "7b")


def test_architecture_is_qwen2_vl_7b(model_7b):
    import json

    assert parameter_count(model_7b) == PUBLISHED_PARAMETERS == 8_291_375_616
    text = json.loads((model_7b / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["num_attention_heads"], text["num_key_value_heads"]) == (28, 28, 4)
    assert text["hidden_size"] // text["num_attention_heads"] == 128
    assert text["rope_parameters"]["mrope_section"] == [16, 24, 24]  # the 7B's M-RoPE split of 64 pairs
    assert not list(model_7b.glob("*.safetensors")), "weights-free: SGLang's --load-format dummy fills them"


def test_rehearsal_keeps_the_geometry():
    for key in ("patch_size", "merge_size", "temporal_patch_size", "max_positions"):
        assert REHEARSAL[key] == QWEN2_VL_7B[key]
    assert REHEARSAL["heads"] // REHEARSAL["kv_heads"] == QWEN2_VL_7B["heads"] // QWEN2_VL_7B["kv_heads"] == 7
    assert REHEARSAL["hidden"] // REHEARSAL["heads"] == QWEN2_VL_7B["hidden"] // QWEN2_VL_7B["heads"] == 128


@pytest.mark.parametrize("asked, side, tokens", [(2048, 1260, 2025), (8192, 2520, 8100), (256, 448, 256)])
def test_image_sizes_give_the_visual_tokens_the_benchmark_reports(model_7b, asked, side, tokens):
    from transformers import AutoProcessor

    assert image_side_for(asked) == (side, tokens)
    proc = AutoProcessor.from_pretrained(model_7b)
    out = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[make_test_image(1, (side, side))],
               return_tensors="pt")
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == pad).sum()) == tokens  # the processor did not resize the image


def test_default_pool_fits_both_servers_on_an_h200():
    """Two 7B servers at the --mem-fraction-static the benchmark picks for an H200: weights and the
    default pool (64 uncompressed 2K-token requests, plugin tables included) fit in each one's share."""
    import gpu_server_speed as speed

    from vlcache_sglang.backend.memory_budget import table_bytes_per_slot

    pool = speed.pool_tokens(image_side_for(2048)[1], requests=64, max_new=64)
    assert pool == 64 * (2025 + speed.TEXT_TOKENS + 64) == 137_792
    cell = 2 * 28 * 4 * 128 * 2 + table_bytes_per_slot(28, graph_buffers=True)
    weights = PUBLISHED_PARAMETERS * 2
    share = speed.together_mem_fraction(H200_BYTES, weights, pool * cell) * H200_BYTES
    assert weights + pool * cell < 0.5 * share  # half the share is left for activations and graphs
    # the 8K phase: the stock pool holds only a few of the 64 requests, the capacity figure
    assert pool // (8100 + speed.TEXT_TOKENS + 64) == 16


H100_FREE = 79 << 30  # an H100 80GB reports about 79.2 GiB; a CUDA context takes a little


def _speed_memory(model_7b):
    import gpu_server_speed as speed

    pool = speed.pool_tokens(image_side_for(2048)[1], requests=64, max_new=64)
    return speed, *speed.server_memory(model_7b, "bfloat16", pool), pool


def test_server_memory_is_the_weights_and_the_vlcache_pool(model_7b):
    from vlcache_sglang.backend.memory_budget import table_bytes_per_slot

    speed, weights, pool_bytes, pool = _speed_memory(model_7b)
    assert weights == PUBLISHED_PARAMETERS * 2
    assert pool_bytes == pool * (2 * 28 * 4 * 128 * 2 + table_bytes_per_slot(28, graph_buffers=True))


def _profiled_pool(free: int, weights: int, pool: int, reserve: int, f: float, later: bool) -> float:
    """SGLang 0.5.23's profile (``free_at_profile - B x (1 - f)``) for one of two servers started
    together: ``later``, it profiles after the other loaded its weights and allocated its pool and
    working memory (both saw ``free`` before loading: B = free)."""
    at_profile = free - 2 * weights - (pool + 2 * reserve if later else reserve)
    return at_profile - free * (1 - f)


@pytest.mark.parametrize("gpu, free", [("h100", H100_FREE), ("h200", H200_BYTES)])
def test_together_fraction_gives_both_servers_the_whole_pool(model_7b, gpu, free):
    """Whichever server profiles last, the fraction chosen leaves it the requested pool, and 0.02
    less would not; on an H100 the old fixed 0.4 left the later server no pool at all."""
    speed, weights, pool_bytes, _ = _speed_memory(model_7b)
    reserve = speed.WORKING_RESERVE_BYTES
    f = speed.together_mem_fraction(free, weights, pool_bytes)
    for later in (False, True):
        assert _profiled_pool(free, weights, pool_bytes, reserve, f, later) >= pool_bytes
    assert _profiled_pool(free, weights, pool_bytes, reserve, f - 0.02, True) < pool_bytes
    # both physically fit, with room left for what the reserve does not cover
    assert 2 * (weights + pool_bytes + reserve) < 0.7 * free
    if gpu == "h100":
        assert 0.62 <= f <= 0.7
        assert _profiled_pool(free, weights, pool_bytes, reserve, 0.4, True) < 0
    else:
        assert f <= 0.4


def test_together_refuses_a_gpu_too_small_for_both(model_7b):
    speed, weights, pool_bytes, _ = _speed_memory(model_7b)
    with pytest.raises(ValueError, match=r"--no-together.*--pool-requests"):
        speed.together_mem_fraction(40 << 30, weights, pool_bytes)  # an A100 40GB


def _report(pool_stock: int, pool_vlcache: int, requested: int = 1000) -> dict:
    import gpu_server_speed as speed

    side = {"ok": 4, "planned": 4, "sent": 4, "peak_running": 4, "requests_per_s": 1.0,
            "output_tokens_per_s": 10.0, "ttft_median_s": 0.1, "itl_median_s": 0.01, "decode_step_s_by_batch": {}}
    pools = {"stock": pool_stock, "vlcache": pool_vlcache}
    return {"scale": "7b", "device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "budget": 0.1,
            "stock_backend": "flashinfer", "max_total_tokens": requested, "max_new": 8, "together": True,
            "mem_fraction_static": 0.4, "pools": pools,
            "pool_mismatch": speed.pool_mismatch(requested, pools, 0.4),
            "phases": {k: {"visual_tokens": 2025, "kind": k.split("-")[1], "stock": dict(side), "vlcache": dict(side)}
                       for k in ("2025-single", "2025-batch")}}


def test_pools_that_differ_from_the_request_are_not_compared():
    import gpu_server_speed as speed

    same = _report(1000, 1000)
    assert same["pool_mismatch"] is None
    assert {r["phase"] for r in speed.pairs(same)} == {"2025-single", "2025-batch"}
    short = _report(1000, 612)
    assert "vlcache 612" in short["pool_mismatch"] and "stock" not in short["pool_mismatch"].split("(")[1]
    assert "--mem-fraction-static (it was 0.4)" in short["pool_mismatch"] and "--no-together" in short["pool_mismatch"]
    assert {r["phase"] for r in speed.pairs(short)} == {"2025-single"}  # capacity and throughput dropped
    md = speed.markdown(short)
    assert "peak running requests" not in md and "pool mismatch: pools differ" in md
    assert "(--mem-fraction-static 0.4 each, both up together)" in md
