"""What the backend must know per request that SGLang's ForwardBatch does not carry.

A hook on ``ForwardBatch.init_new`` (see :mod:`vlcache_sglang.plugin`) calls
:func:`collect_request_info` with the ScheduleBatch, whose ``reqs`` have the prompt, the image
spans, the chunking state and the request's ``custom_params``.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

from vlcache_sglang.backend import state
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
    sharing: str = "off"  # effective radix sharing: "compressed", "prefix" or "off" (see settings)
    req: Any = field(default=None, compare=False, repr=False)  # the scheduler's Req (for meta_info)
    #: why a request that asked for compression is served as stock (a code of
    #: :data:`NOT_COMPRESSED_REASONS`), None when it compresses or never asked
    not_compressed: str | None = None

    @property
    def compaction_protected(self) -> int:
        """Positions compaction leaves in place: the tree-owned prefix, and under ``prefix``
        sharing everything before the statistics window (it enters the tree uncompressed)."""
        if self.sharing == "prefix" and self.policy is not None:
            start = locate_window(self.prompt_len, self.image_spans, self.policy).start
            return max(self.protected_len, start)
        return self.protected_len

    @property
    def window_floor(self) -> int:
        """Under ``compressed`` sharing the matched prefix may pass the post-vision start (a later
        turn, a repeated question): the window is then the newly computed rows."""
        return self.protected_len if self.sharing == "compressed" else 0

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


#: Reason codes in ``meta_info["vlcache_not_compressed"]`` (and the ``not_compressed`` counters)
#: for a request whose policy asked for compression but which was served as stock.
NOT_COMPRESSED_REASONS = {
    "invalid_settings": "its custom_params were invalid (offline Engine; HTTP answers 400)",
    "short_prompt": "the prompt is shorter than the policy's min_prompt_len",
    "text_only": "no image or video tokens and text_only='identity'",
    "budget_covers_prompt": "every layer's budget already covers the whole prompt",
    "virtual_ids_exhausted": "the virtual-id table was full (raise VLCACHE_VIRTUAL_IDS_PER_SLOT)",
}


def compression_decision(req, prompt_len: int, spans, settings: CompressionSettings
                         ) -> tuple[PolicyConfig | None, str | None]:
    """(policy this request is compressed with, None when served as stock; the reason code when
    it asked for compression and is nevertheless served as stock)."""
    try:
        policy = resolve_policy(settings, req.sampling_params.custom_params)
    except SettingsError as exc:  # already rejected over HTTP; offline Engine users land here
        logger.warning("vlcache: request %s served uncompressed: %s", req.rid, exc)
        return None, "invalid_settings"
    if policy.alpha >= 1.0 or policy.method == "full":
        return None, None  # asked for nothing: stock behaviour
    window = locate_window(prompt_len, spans, policy)
    if not window.compress:
        return None, "short_prompt" if prompt_len < max(1, policy.min_prompt_len) else "text_only"
    return policy, None


def compression_policy(req, prompt_len: int, spans, settings: CompressionSettings) -> PolicyConfig | None:
    """The policy this request is compressed with, or None when it is served as stock."""
    return compression_decision(req, prompt_len, spans, settings)[0]


def effective_sharing(req, settings: CompressionSettings) -> str:
    """The request's sharing mode, ``off`` unless the ``vlcache`` radix cache runs."""
    if state.sharing_tree() is None:
        return "off"
    try:
        return settings.with_request(req.sampling_params.custom_params).sharing
    except SettingsError:
        return "off"


def policy_namespace(policy: PolicyConfig) -> str:
    """Radix namespace of KV compressed under ``policy``: every field that changes what is kept."""
    digest = hashlib.sha1(policy.to_json(indent=None).encode()).hexdigest()[:16]
    return f"vlcache:{digest}"


def prepare_prefix_match(req, settings: CompressionSettings) -> int | None:
    """Before a compressing request is matched against the tree: under ``compressed`` sharing put it
    in its policy's namespace (reuse anything cached under the same policy, no cap); otherwise cap
    the reusable prefix at the statistics window, so that the window's queries are recomputed (and
    measured) while the image before it is still shared. Returns the cap (None: no cap)."""
    prompt_len = len(req.origin_input_ids) + len(req.output_ids)
    spans = _image_spans(req)
    policy = compression_policy(req, prompt_len, spans, settings)
    if policy is None:
        return None
    if effective_sharing(req, settings) == "compressed":
        if not hasattr(req, "_vlcache_user_extra_key"):
            req._vlcache_user_extra_key = req.extra_key
        namespace = policy_namespace(policy)
        user = req._vlcache_user_extra_key
        req.extra_key = namespace if user is None else f"{user}|{namespace}"
        return None
    from vlcache_sglang.policy.methods import get_method

    if get_method(policy.method).rows == "all":
        return 0  # H2O scores every row: a reused prefix would leave its statistics incomplete
    return locate_window(prompt_len, spans, policy).start


def request_info(req, settings: CompressionSettings) -> RequestInfo:
    prompt_len = len(req.full_untruncated_fill_ids)
    spans = _image_spans(req)
    idx = int(req.kv.req_pool_idx)
    compressor = state.active_compressor()
    if compressor is not None and compressor.is_decoding(idx, req.rid):
        # a decoding request mixed into an extend batch (--enable-mixed-chunk): its prefill is
        # done (compacted or left alone); this forward only appends its next token
        policy, reason = None, None
    else:
        policy, reason = compression_decision(req, prompt_len, spans, settings)
    return RequestInfo(
        rid=req.rid, req_pool_idx=idx, prompt_len=prompt_len, image_spans=spans,
        is_last_chunk=req.extend_end == prompt_len, protected_len=int(req.kv.cache_protected_len), policy=policy,
        sharing=effective_sharing(req, settings) if policy is not None else "off", req=req,
        not_compressed=reason,
    )


def collect_request_info(schedule_batch, settings: CompressionSettings) -> list[RequestInfo]:
    """Per-request info of an extend batch. Without sharing, compressing requests stay out of the
    radix tree (their prompt slots are about to be rewritten); with the ``vlcache`` radix cache its
    ``checkpoint`` decides what of them may enter."""
    infos = [request_info(req, settings) for req in schedule_batch.reqs]
    for req, info in zip(schedule_batch.reqs, infos):
        if info.compresses and info.sharing == "off":
            req.skip_radix_cache_insert = True
    return infos
