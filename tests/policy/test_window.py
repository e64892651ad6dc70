"""locate_window: post-vision span, fallbacks, text-only prompts, method-fixed windows."""

from __future__ import annotations

import pytest
import torch

from vlcache_sglang.policy import PolicyConfig, locate_window

CFG = PolicyConfig(window_size=8)


def test_single_image_post_vision_span() -> None:
    w = locate_window(100, [(5, 60)], CFG)
    assert (w.start, w.end, w.mode, w.compress, w.fell_back) == (61, 100, "post_vision", True, False)
    assert w.length == 39 and torch.equal(w.positions(), torch.arange(61, 100))


def test_several_images_and_video_frames_use_the_last_visual_token() -> None:
    frames = [(10 + 20 * i, 25 + 20 * i) for i in range(8)]  # 8 frames, text between
    w = locate_window(200, list(reversed(frames)) + [(2, 4)], CFG)
    assert w.start == frames[-1][1] + 1 and w.end == 200 and w.mode == "post_vision"
    assert locate_window(200, torch.tensor(frames), CFG) == w


def test_image_at_the_very_end_falls_back_and_says_so() -> None:
    w = locate_window(100, [(3, 10), (50, 99)], CFG)
    assert (w.start, w.end, w.mode, w.fell_back, w.compress) == (92, 100, "last_w", True, True)
    assert "no text after the last visual token" in w.reason


def test_text_only_default_is_identity() -> None:
    w = locate_window(100, [], CFG)
    assert not w.compress and w.mode == "none" and w.length == 0 and "text-only" in w.reason
    w2 = locate_window(100, None, CFG.replace(text_only="last_w"))
    assert (w2.start, w2.end, w2.compress, w2.fell_back) == (92, 100, True, True)


def test_last_w_mode_and_short_prompts() -> None:
    assert locate_window(100, [(0, 10)], CFG.replace(window_mode="last_w")).start == 92
    w = locate_window(5, [(0, 1)], CFG.replace(window_mode="last_w"))
    assert (w.start, w.end) == (0, 5)
    short = locate_window(20, [(0, 5)], CFG.replace(min_prompt_len=32))
    assert not short.compress and "min_prompt_len" in short.reason


def test_max_window_caps_the_post_vision_span() -> None:
    w = locate_window(100, [(0, 9)], CFG.replace(max_window=16))
    assert (w.start, w.end) == (84, 100) and "capped" in w.reason


def test_snapkv_and_pyramidkv_fix_a_last_w_window() -> None:
    for method in ("snapkv", "pyramidkv"):
        w = locate_window(100, [(0, 40)], CFG.replace(method=method))
        assert (w.start, w.mode, w.fell_back) == (92, "last_w", False)


@pytest.mark.parametrize("spans", [[(5, 3)], [(-1, 3)], [(90, 100)], [(1, 2, 3)]])
def test_bad_spans(spans) -> None:
    with pytest.raises(ValueError, match="span"):
        locate_window(100, spans, CFG)
