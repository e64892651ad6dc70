"""Shared fixtures: the tiny random Qwen2-VL (built offline once per machine) and test images."""
from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("VLCACHE_CACHE", Path.home() / ".cache" / "vlcache-sglang"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The 2-layer random-weight Qwen2-VL fixture (deterministic; rebuilt only when missing)."""
    from vlcache_sglang.fixtures.tiny_random import build_tiny_random

    return build_tiny_random(CACHE / "fixtures" / "tiny-qwen2vl-random-v1")


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    """The same fixture in Hugging Face transformers (float32, eval), with its processor: the
    reference the server modules compare against (loaded once per module that asks for it)."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def other_weights(tiny_model_dir, tmp_path_factory):
    """A copy of the fixture with every weight matrix moved by half its spread (seeded): the same
    architecture and tokenizer, other answers."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("other-weights") / "tiny-qwen2vl-other"
    shutil.copytree(tiny_model_dir, out)
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    moved = {k: (v + 0.5 * v.std() * torch.randn(v.shape, generator=g)) if v.dim() > 1 else v
             for k, v in weights.items()}
    save_file(moved, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def hf_other(other_weights):
    """:func:`hf` of :func:`other_weights`."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(other_weights, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(other_weights)


@pytest.fixture(scope="module")
def parse_server_args(tiny_model_dir):
    """``make(*flags)``: SGLang's real ``ServerArgs`` for a vlcache launch of the tiny fixture on the
    CPU with these flags, as the launcher parses them (not resolved)."""
    import argparse

    from sglang.srt.server_args import ServerArgs, add_attention_backend_choices

    add_attention_backend_choices(["vlcache"])  # what the plugin's register() adds (no hooks here)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)

    def make(*flags: str):
        return ServerArgs.from_cli_args(parser.parse_args(
            ["--model-path", str(tiny_model_dir), "--attention-backend", "vlcache", "--device", "cpu", *flags]))

    return make


def make_test_image(seed: int, size: tuple[int, int] = (112, 112)):
    """A deterministic RGB image with structure (blocks of colour), as a PIL image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(size[1] // 14 + 1, size[0] // 14 + 1, 3), dtype=np.uint8)
    arr = np.kron(blocks, np.ones((14, 14, 1), dtype=np.uint8))[: size[1], : size[0]]
    return Image.fromarray(arr, "RGB")


def png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def real_kv_pool(layers: int, kv_heads: int, head_dim: int, size: int, *, heads_per_unit: int = 1):
    """SGLang's real MHA pool (randomised, rehomed into the plugin's storage), its token allocator
    and a :class:`VirtualKV` over them with the free filter installed: ``(pool, kv, allocator, vkv)``."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from vlcache_sglang.backend.cell_store import rehome_pool_buffers
    from vlcache_sglang.backend.virtual_kv import VirtualKV, install_free_filter

    kv_pool = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=kv_heads, head_dim=head_dim,
                               layer_num=layers, device="cpu", enable_memory_saver=False)
    kv = rehome_pool_buffers(kv_pool)
    kv.k.copy_(torch.randn_like(kv.k))
    kv.v.copy_(torch.randn_like(kv.v))
    allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", kv_pool, need_sort=False)
    vkv = VirtualKV(kv.rows_per_layer, layers, capacity=4 * kv.rows_per_layer, heads_per_unit=heads_per_unit)
    install_free_filter(allocator, vkv)
    return kv_pool, kv, allocator, vkv
