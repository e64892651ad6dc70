"""What the backend must know per request that SGLang's ForwardBatch does not carry.

A hook on ``ForwardBatch.init_new`` (see :mod:`vlcache_sglang.plugin`) calls
:func:`collect_request_info` with the ScheduleBatch, whose ``reqs`` have the prompt, the image
spans, the chunking state and the request's ``custom_params``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from vlcache_sglang.policy import PolicyConfig, locate_window
from vlcache_sglang.policy_resolution import resolve_policy
from vlcache_sglang.settings import CompressionSettings, SettingsError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestInfo:
    rid: str
    req_pool_idx: int
    prompt_len: int  # tokens the plan covers: the whole sequence once its prefill ends
    image_spans: tuple[tuple[int, int], ...]  # inclusive visual-token runs
    is_last_chunk: bool
    protected_len: int  # prefix owned by the radix tree (matched at admission): never moved
    policy: PolicyConfig | None  # None: leave this request exactly as the stock backend would
    req: Any = field(default=None, compare=False, repr=False)  # the scheduler's Req (for meta_info)

    @property
    def compresses(self) -> bool:
        return self.policy is not None


def _image_spans(req) -> tuple[tuple[int, int], ...]:
    mm = getattr(req, "multimodal_inputs", None)
    spans: list[tuple[int, int]] = []
    for item in getattr(mm, "mm_items", None) or []:
        for start, end in item.offsets or []:
            spans.append((int(start), int(end)))
    return tuple(sorted(spans))


def compression_policy(req, prompt_len: int, spans, settings: CompressionSettings) -> PolicyConfig | None:
    """The policy this request is compressed with, or None when it is served as stock."""
    try:
        policy = resolve_policy(settings, req.sampling_params.custom_params)
    except SettingsError as exc:  # already rejected over HTTP; offline Engine users land here
        logger.warning("vlcache: request %s served uncompressed: %s", req.rid, exc)
        return None
    if policy.alpha >= 1.0 or policy.method == "full" or not locate_window(prompt_len, spans, policy).compress:
        return None  # budget 1.0, method full, text-only (by default) or too short: stock behaviour
    return policy


def prefix_match_cap(req, settings: CompressionSettings) -> int | None:
    """For a compressing request, how far a radix prefix may be reused: up to the statistics
    window, so that the window's queries are recomputed (and measured) while the image before it
    is still shared. None for requests served as stock."""
    prompt_len = len(req.origin_input_ids) + len(req.output_ids)
    spans = _image_spans(req)
    policy = compression_policy(req, prompt_len, spans, settings)
    if policy is None:
        return None
    return locate_window(prompt_len, spans, policy).start


def request_info(req, settings: CompressionSettings) -> RequestInfo:
    prompt_len = len(req.full_untruncated_fill_ids)
    spans = _image_spans(req)
    policy = compression_policy(req, prompt_len, spans, settings)
    return RequestInfo(
        rid=req.rid, req_pool_idx=int(req.kv.req_pool_idx), prompt_len=prompt_len, image_spans=spans,
        is_last_chunk=req.extend_end == prompt_len, protected_len=int(req.kv.cache_protected_len), policy=policy,
        req=req,
    )


def collect_request_info(schedule_batch, settings: CompressionSettings) -> list[RequestInfo]:
    """Per-request info of an extend batch; opts compressing requests out of the radix tree
    (their prompt slots are about to be rewritten; sharing them is the tree's job)."""
    infos = [request_info(req, settings) for req in schedule_batch.reqs]
    for req, info in zip(schedule_batch.reqs, infos):
        if info.compresses:
            req.skip_radix_cache_insert = True
    return infos
