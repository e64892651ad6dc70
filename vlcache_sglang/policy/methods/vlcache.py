"""VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317): post-vision attention + sparsity budgets.

Score (Sec. 3): ``s[l, j] = sum_{q in P} A_l[q, j]``, summed over query heads (per KV head
under head granularity); visual and text keys compete in one ranking. Budget (Sec. 2):
``beta[l] = clip((1 - gamma[l]) / Z * alpha * L, clip_min, clip_max)``.
"""

from __future__ import annotations

from vlcache_sglang.policy.methods.base import Method, window_attention

METHOD = Method(
    name="vlcache",
    score=window_attention,
    default_budget="adaptive",
    rows="window",
    reference="VL-Cache, Tu et al., ICLR 2025 (arXiv 2410.23317)",
)
