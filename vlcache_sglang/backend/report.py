"""What a request's response says about its compression (``meta_info["vlcache_*"]``).

Entries go into the scheduler's ``Req.customized_info`` (one value per key, as SGLang's output
streamer expects for request-level keys: see the ``is_request_level_customized_info_key`` hook).
"""
from __future__ import annotations

from typing import Any

from vlcache_sglang.policy import CompressionPlan

NOT_COMPRESSED_KEY = "vlcache_not_compressed"


def report(req: Any, values: dict[str, Any]) -> None:
    """Attach per-request figures to the response's ``meta_info``."""
    if req is None:
        return
    if req.customized_info is None:
        req.customized_info = {}
    for key, value in values.items():
        req.customized_info[key] = [value]


def already_reported_not_compressed(req: Any) -> bool:
    return req is not None and NOT_COMPRESSED_KEY in (req.customized_info or {})


def not_compressed(req: Any, reason: str) -> None:
    """A request that asked for compression was served as stock, with the reason code."""
    report(req, {NOT_COMPRESSED_KEY: reason, "vlcache_kept_ratio": 1.0, "vlcache_kv_tokens_saved": 0})


def compressed(req: Any, plan: CompressionPlan, kept: list, kept_counts: list[int], tokens_saved: int,
               prompt_len: int, num_layers: int, *, reused_tokens: int, incomplete: bool, return_plan: bool,
               head_kept: list | None = None) -> None:
    """The figures of a compacted request (and its kept positions when it asked for them:
    ``kept`` per layer, ``head_kept`` per layer and KV head when the heads' sets differ)."""
    values: dict[str, Any] = {
        "vlcache_kept_ratio": sum(kept_counts) / (prompt_len * num_layers),
        "vlcache_kv_tokens_saved": tokens_saved,
        "vlcache_method": plan.method,
        "vlcache_layer_budgets": list(plan.budgets),
        # what the plan was built over: the prompt, plus, when SGLang retracted the request and
        # recomputes it, the tokens it had generated (they are re-prefilled and planned with it)
        "vlcache_planned_tokens": prompt_len,
        # of those, how many the prefill read from the radix tree (its prefix match; SGLang's own
        # ``cached_tokens`` counts a retracted request's first prefill only)
        "vlcache_reused_tokens": reused_tokens,
        "vlcache_notes": "; ".join(plan.notes),
    }
    if incomplete:
        values["vlcache_incomplete_statistics"] = True
    if return_plan:
        values["vlcache_kept_positions"] = [k.tolist() for k in kept]
        if head_kept is not None:  # per layer, per KV head
            values["vlcache_head_kept_positions"] = [[h.tolist() for h in heads] for heads in head_kept]
    report(req, values)
