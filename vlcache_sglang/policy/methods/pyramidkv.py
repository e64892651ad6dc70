"""PyramidKV (Cai et al., 2024, arXiv 2406.02069): SnapKV scores with pyramid layer budgets.

Budgets decrease linearly with depth (``budgets.pyramid_budgets``, kvpress formula); scoring,
pooling and the force-kept window are SnapKV's.
"""

from __future__ import annotations

from vlcache_sglang.policy.methods.base import Method, window_attention

METHOD = Method(
    name="pyramidkv",
    score=window_attention,
    default_budget="pyramid",
    rows="window",
    window_mode="last_w",
    default_pool_kernel=5,
    default_protect_window=True,
    reference="PyramidKV, Cai et al., 2024 (arXiv 2406.02069)",
)
