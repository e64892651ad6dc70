"""What the backend must know per request that SGLang's ForwardBatch does not carry.

A request's compression is decided once (:func:`request_spec`: its ``custom_params`` parsed, its
policy resolved, its statistics window located) and kept on the scheduler's ``Req`` until its
planned length changes (a retracted request is recomputed over prompt + generated tokens). Two
scheduler hooks read it (:mod:`vlcache_sglang.scheduler_hooks`): the prefix match
(:func:`prepare_prefix_match`) and ``ForwardBatch.init_new``, which calls
:func:`collect_request_info` with the ScheduleBatch, whose ``reqs`` have the prompt, the image
spans, the chunking state and the request's ``custom_params``.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlcache_sglang.policy import PolicyConfig, WindowSpec, get_method, locate_window
from vlcache_sglang.policy_resolution import resolve_request
from vlcache_sglang.settings import CompressionSettings, SettingsError

if TYPE_CHECKING:
    from vlcache_sglang.backend.runtime import Runtime

logger = logging.getLogger(__name__)

#: ``Req`` attributes the plugin writes (declared in :mod:`vlcache_sglang.hooks`)
SPEC_ATTR = "_vlcache_spec"
USER_EXTRA_KEY_ATTR = "_vlcache_user_extra_key"
#: Radix namespaces of compressed KV begin with this; requests may not name it (a 400 on arrival:
#: :func:`vlcache_sglang.launch_hooks.check_generate_request`)
NAMESPACE_PREFIX = "vlcache:"

#: Reason codes in ``meta_info["vlcache_not_compressed"]`` (and the ``not_compressed`` counters)
#: for a request whose policy asked for compression but which was served as stock.
NOT_COMPRESSED_REASONS = {
    "invalid_settings": "its custom_params were invalid (offline Engine; HTTP answers 400)",
    "short_prompt": "the prompt is shorter than the policy's min_prompt_len",
    "text_only": "no image or video tokens and text_only='identity'",
    "budget_covers_prompt": "every layer's budget already covers the whole prompt",
    "audio_input": "the prompt has audio items: VL-Cache scores and budgets are defined for visual tokens",
    "virtual_ids_exhausted": "the virtual-id table was full (raise VLCACHE_VIRTUAL_IDS_PER_SLOT)",
    "uneven_heads_across_ranks": "head cells under tensor parallelism: one rank's heads keep fewer cells than "
                                 "another rank needs slots",
}


@dataclass(frozen=True)
class RequestSpec:
    """A request's compression, decided once per planned length."""

    prompt_len: int
    image_spans: tuple[tuple[int, int], ...]
    policy: PolicyConfig | None  # None: served exactly as the stock backend would
    not_compressed: str | None  # reason code when it asked for compression and is served as stock
    window: WindowSpec | None  # the statistics window (compressing requests)
    sharing: str  # the sharing it asked for ("off" when its settings are invalid)
    return_plan: bool  # the response carries the kept positions


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
    window: WindowSpec | None = None  # located from the policy when not given
    return_plan: bool = False
    #: a retracted request re-prefilled under ``compressed`` sharing over its own compacted prompt
    #: from the tree (the match covers the whole prompt): it resumes, keeping what it holds
    resumed: bool = False

    def __post_init__(self) -> None:
        if self.window is None and self.policy is not None:
            object.__setattr__(self, "window", locate_window(self.prompt_len, self.image_spans, self.policy))

    @property
    def compaction_protected(self) -> int:
        """Positions compaction leaves in place: the tree-owned prefix, and under ``prefix``
        sharing everything before the statistics window (it enters the tree uncompressed)."""
        if self.sharing == "prefix" and self.window is not None:
            return max(self.protected_len, self.window.start)
        return self.protected_len

    @property
    def window_floor(self) -> int:
        """Under ``compressed`` sharing the matched prefix may pass the post-vision start (a later
        turn, a repeated question): the window is then the newly computed rows."""
        return self.protected_len if self.sharing == "compressed" else 0

    @property
    def compresses(self) -> bool:
        return self.policy is not None


def _media(req) -> tuple[tuple[tuple[int, int], ...], bool]:
    """The prompt's image and video token runs (inclusive), and whether it carries audio items."""
    mm = getattr(req, "multimodal_inputs", None)
    spans: list[tuple[int, int]] = []
    audio = False
    for item in getattr(mm, "mm_items", None) or []:
        if getattr(getattr(item, "modality", None), "name", "IMAGE") == "AUDIO":
            audio = True  # an omni model's audio clip: not visual tokens, not a span
            continue
        for start, end in item.offsets or []:
            spans.append((int(start), int(end)))
    return tuple(sorted(spans)), audio


def decide(custom_params, prompt_len: int, spans, settings: CompressionSettings, rid: str = "?",
           audio: bool = False) -> RequestSpec:
    """Parse a request's overrides once and decide how it is served."""
    try:
        s, policy = resolve_request(settings, custom_params)
    except SettingsError as exc:  # already rejected over HTTP; offline Engine users land here
        logger.warning("vlcache: request %s served uncompressed: %s", rid, exc)
        return RequestSpec(prompt_len, spans, None, "invalid_settings", None, "off", False)
    return_plan = bool(((custom_params or {}).get("vlcache") or {}).get("return_plan"))
    if policy.alpha >= 1.0 or policy.method == "full":
        return RequestSpec(prompt_len, spans, None, None, None, s.sharing, return_plan)  # stock behaviour
    if audio:  # the paper's sparsity and scores are for images; an audio clip is served as stock
        return RequestSpec(prompt_len, spans, None, "audio_input", None, s.sharing, return_plan)
    window = locate_window(prompt_len, spans, policy)
    if not window.compress:
        reason = "short_prompt" if prompt_len < max(1, policy.min_prompt_len) else "text_only"
        return RequestSpec(prompt_len, spans, None, reason, None, s.sharing, return_plan)
    return RequestSpec(prompt_len, spans, policy, None, window, s.sharing, return_plan)


def request_spec(req, settings: CompressionSettings, prompt_len: int) -> RequestSpec:
    """The request's :class:`RequestSpec`, cached on the ``Req`` for its current length."""
    spec = getattr(req, SPEC_ATTR, None)
    if spec is None or spec.prompt_len != prompt_len:
        spans, audio = _media(req)
        spec = decide(req.sampling_params.custom_params, prompt_len, spans, settings, req.rid, audio)
        setattr(req, SPEC_ATTR, spec)
    return spec


def policy_namespace(policy: PolicyConfig) -> str:
    """Radix namespace of KV compressed under ``policy``: every field that changes what is kept."""
    digest = hashlib.sha1(policy.to_json(indent=None).encode()).hexdigest()[:16]
    return f"{NAMESPACE_PREFIX}{digest}"


def prepare_prefix_match(req, runtime: Runtime) -> int | None:
    """Before a compressing request is matched against the tree: under ``compressed`` sharing put it
    in its policy's namespace (reuse anything cached under the same policy, no cap); otherwise cap
    the reusable prefix at the statistics window, so that the window's queries are recomputed (and
    measured) while the image before it is still shared. Returns the cap (None: no cap)."""
    spec = request_spec(req, runtime.settings.compression, len(req.origin_input_ids) + len(req.output_ids))
    if spec.policy is None:
        return None
    if runtime.sharing_on and spec.sharing == "compressed":
        if not hasattr(req, USER_EXTRA_KEY_ATTR):
            setattr(req, USER_EXTRA_KEY_ATTR, req.extra_key)
        namespace = policy_namespace(spec.policy)
        user = getattr(req, USER_EXTRA_KEY_ATTR)
        req.extra_key = namespace if user is None else f"{user}|{namespace}"
        return None
    if get_method(spec.policy.method).rows == "all":
        return 0  # H2O scores every row: a reused prefix would leave its statistics incomplete
    return spec.window.start


def request_info(req, runtime: Runtime) -> RequestInfo:
    prompt_len = len(req.full_untruncated_fill_ids)
    idx = int(req.kv.req_pool_idx)
    spec = request_spec(req, runtime.settings.compression, prompt_len)
    policy, reason = spec.policy, spec.not_compressed
    compressor = runtime.compressor
    if compressor is not None and compressor.is_decoding(idx, req.rid):
        # a decoding request mixed into an extend batch (--enable-mixed-chunk): its prefill is
        # done (compacted or left alone); this forward only appends its next token
        compressor.counters.mixed_decode_rows += 1
        policy, reason = None, None
    sharing = spec.sharing if policy is not None and runtime.sharing_on else "off"
    protected = int(req.kv.cache_protected_len)
    # SGLang's retract releases a request as if it finished, so under compressed sharing its
    # compacted prompt (and any decoded tokens with it) waits in the tree and the re-prefill reads
    # it back: the tokens it had generated are then recomputed against the compressed prompt, as
    # they were decoded, and a new plan would only compress it further than an unretracted run
    resumed = (sharing == "compressed" and bool(getattr(req, "retracted_stain", False))
               and protected >= len(req.origin_input_ids))
    return RequestInfo(
        rid=req.rid, req_pool_idx=idx, prompt_len=prompt_len, image_spans=spec.image_spans,
        is_last_chunk=req.extend_end == prompt_len, protected_len=protected, policy=policy, sharing=sharing, req=req,
        not_compressed=reason, window=spec.window if policy is not None else None, return_plan=spec.return_plan,
        resumed=resumed,
    )


def collect_request_info(schedule_batch, runtime: Runtime) -> list[RequestInfo]:
    """Per-request info of an extend batch. Without sharing, compressing requests stay out of the
    radix tree (their prompt slots are about to be rewritten); with the ``vlcache`` radix cache its
    ``checkpoint`` decides what of them may enter."""
    infos = [request_info(req, runtime) for req in schedule_batch.reqs]
    for req, info in zip(schedule_batch.reqs, infos):
        if info.compresses and info.sharing == "off":
            req.skip_radix_cache_insert = True
    return infos

