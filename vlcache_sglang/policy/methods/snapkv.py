"""SnapKV (Li et al., 2024, arXiv 2404.14469): last-w observation window, pooled, per head.

Score: attention of the last ``w`` queries summed over the window rows and over each KV head's
query group, then 1-D average pooling (kernel 5) over the keys before the window. The window
itself is force-kept and counts in the budget (as in kvpress ``SnapKVPress``).
"""

from __future__ import annotations

from vlcache_sglang.policy.methods.base import Method, window_attention

METHOD = Method(
    name="snapkv",
    score=window_attention,
    default_budget="uniform",
    rows="window",
    window_mode="last_w",
    default_pool_kernel=5,
    default_protect_window=True,
    reference="SnapKV, Li et al., 2024 (arXiv 2404.14469)",
)
