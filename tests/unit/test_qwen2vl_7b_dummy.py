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
    """Two 7B servers at --mem-fraction-static 0.4 each: weights and the default pool (64
    uncompressed 2K-token requests, plugin tables included) fit in each one's share."""
    import gpu_server_speed as speed

    from vlcache_sglang.backend.memory_budget import table_bytes_per_slot

    pool = speed.pool_tokens(image_side_for(2048)[1], requests=64, max_new=64)
    assert pool == 64 * (2025 + speed.TEXT_TOKENS + 64) == 137_792
    cell = 2 * 28 * 4 * 128 * 2 + table_bytes_per_slot(28, graph_buffers=True)
    weights = PUBLISHED_PARAMETERS * 2
    share = 0.4 * H200_BYTES
    assert weights + pool * cell < 0.5 * share  # half the share is left for activations and graphs
    # the 8K phase: the stock pool holds only a few of the 64 requests, the capacity figure
    assert pool // (8100 + speed.TEXT_TOKENS + 64) == 16
