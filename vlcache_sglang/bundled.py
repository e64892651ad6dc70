"""Where the bundled models live (no hub access at run time).

The trained document-VQA model ships in the repository under ``models/tinyvlm-docvqa``; until
it is present, the tiny random-weight fixture is built offline into the user cache instead.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINED_MODEL = REPO_ROOT / "models" / "tinyvlm-docvqa"
CACHE_DIR = Path(os.environ.get("VLCACHE_CACHE", Path.home() / ".cache" / "vlcache-sglang"))


def trained_model_dir() -> Path | None:
    return TRAINED_MODEL if (TRAINED_MODEL / "config.json").exists() else None


def tiny_random_model_dir() -> Path:
    from vlcache_sglang.fixtures.tiny_random import build_tiny_random

    return build_tiny_random(CACHE_DIR / "fixtures" / "tiny-qwen2vl-random-v1")


def bundled_model_dir() -> Path:
    """The model the README's main command serves: the trained one, else the random fixture."""
    return trained_model_dir() or tiny_random_model_dir()
