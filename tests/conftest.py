"""Shared fixtures: the tiny random Qwen2-VL (built offline once per machine) and test images."""
from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("VLCACHE_CACHE", Path.home() / ".cache" / "vlcache-sglang"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The 2-layer random-weight Qwen2-VL fixture (deterministic; rebuilt only when missing)."""
    from vlcache_sglang.fixtures.tiny_random import build_tiny_random

    return build_tiny_random(CACHE / "fixtures" / "tiny-qwen2vl-random-v1")


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
