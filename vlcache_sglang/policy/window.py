"""Locating the statistics window of a prompt (VL-Cache Sec. 3: the post-vision window).

With ``v`` the first language token after the last visual token, the post-vision window is
``P = {v, ..., m-1}`` (docs/policy.md, Window). Every window this module returns is a
suffix ``[start, m)`` of the prompt, so "keep the window" and "keep the recent tokens" are
both suffix operations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from vlcache_sglang.policy.config import PolicyConfig

__all__ = ["WindowSpec", "locate_window", "normalize_spans"]


@dataclass(frozen=True)
class WindowSpec:
    """The query rows whose attention feeds the statistics, as ``[start, end)``.

    Attributes:
        prompt_len: ``m``.
        start, end: window rows ``start <= t < end`` (``end == m``; empty when not compressing).
        mode: ``"post_vision"``, ``"last_w"`` or ``"none"``.
        compress: False means the plan is the identity (text-only prompt under
            ``text_only="identity"``, or a prompt shorter than ``min_prompt_len``).
        fell_back: the requested window could not be used and a last-w window was taken.
        reason: human-readable note on why this window (empty when nothing notable).
    """

    prompt_len: int
    start: int
    end: int
    mode: str
    compress: bool
    fell_back: bool = False
    reason: str = ""

    @property
    def length(self) -> int:
        """Number of window rows."""
        return self.end - self.start

    def positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Window row positions as an int64 tensor."""
        return torch.arange(self.start, self.end, dtype=torch.int64, device=device)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)


def normalize_spans(image_spans: Iterable[Sequence[int]] | torch.Tensor | None,
                    prompt_len: int) -> list[tuple[int, int]]:
    """Validate inclusive ``(start, end)`` spans (SGLang ``MultimodalDataItem.offsets``), sorted."""
    if image_spans is None:
        return []
    if isinstance(image_spans, torch.Tensor):
        image_spans = image_spans.reshape(-1, 2).tolist()
    out: list[tuple[int, int]] = []
    for span in image_spans:
        if len(span) != 2:
            raise ValueError(f"image span {span!r}: expected an inclusive (start, end) pair")
        s, e = int(span[0]), int(span[1])
        if not 0 <= s <= e < prompt_len:
            raise ValueError(
                f"image span ({s}, {e}): need 0 <= start <= end < prompt_len ({prompt_len})")
        out.append((s, e))
    return sorted(out)


def locate_window(prompt_len: int, image_spans: Iterable[Sequence[int]] | torch.Tensor | None,
                  cfg: "PolicyConfig") -> WindowSpec:
    """Find the statistics window of a prompt of ``prompt_len`` tokens.

    ``image_spans`` are inclusive visual-token runs (several images and video frames alike;
    only the last visual token matters). Rules, in order:

    * ``prompt_len < cfg.min_prompt_len`` (or 0): no compression.
    * No visual tokens: ``cfg.text_only == "identity"`` -> no compression; ``"last_w"`` -> the
      last ``w`` tokens (``fell_back=True``).
    * The method fixes its own window (SnapKV, PyramidKV: last ``w``), or
      ``cfg.window_mode == "last_w"``: the last ``w`` tokens.
    * ``"post_vision"``: ``[v, m)`` with ``v`` = last visual token + 1, capped to its last
      ``cfg.max_window`` tokens; an image at the very end (``v == m``) falls back to the last
      ``w`` tokens and says so.
    """
    from vlcache_sglang.policy.methods import get_method

    m = int(prompt_len)
    if m < 0:
        raise ValueError(f"prompt_len: {m} must be >= 0")
    spans = normalize_spans(image_spans, m)
    w = min(cfg.window_size, m)

    def none(reason: str) -> WindowSpec:
        return WindowSpec(m, m, m, "none", compress=False, reason=reason)

    def last_w(fell_back: bool, reason: str) -> WindowSpec:
        return WindowSpec(m, m - w, m, "last_w", compress=True, fell_back=fell_back, reason=reason)

    if m == 0 or m < cfg.min_prompt_len:
        return none(f"prompt of {m} tokens is shorter than min_prompt_len={cfg.min_prompt_len}"
                    if m else "empty prompt")
    if not spans:
        if cfg.text_only == "identity":
            return none("text-only prompt (text_only='identity'): left uncompressed")
        return last_w(True, f"text-only prompt: last {w} tokens (text_only='last_w')")
    forced = get_method(cfg.method).window_mode
    if forced == "last_w":
        return last_w(False, f"method {cfg.method!r} scores with the last {w} tokens")
    if cfg.window_mode == "last_w":
        return last_w(False, "")
    v = max(e for _, e in spans) + 1
    if v >= m:
        return last_w(True, f"no text after the last visual token (ends at {v - 1}): "
                            f"fell back to the last {w} tokens")
    start = v
    reason = ""
    if cfg.max_window is not None and m - v > cfg.max_window:
        start = m - cfg.max_window
        reason = f"post-vision span of {m - v} tokens capped to its last {cfg.max_window}"
    return WindowSpec(m, start, m, "post_vision", compress=True, reason=reason)
