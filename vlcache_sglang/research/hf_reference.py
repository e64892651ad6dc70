"""Hugging Face reference for a compression plan: prefill with full attention, keep per layer the
plan's positions, decode greedily. What the server must reproduce token for token.

The first output token comes from the prefill logits (full cache), as in SGLang; each later
token attends, in layer ``l``, to ``plan.kept[l]`` plus the generated tail. Keys are stored
after RoPE, so cropping moves no position.

The pieces are public so that one prefill can serve many plans (``vlcache_sglang.research.hf_eval``):
:func:`prefill` -> :func:`crop_cache_positions` -> :func:`decode_steps` (greedy or
teacher forced); :func:`greedy_with_plan` chains them for one plan.

Per-KV-head plans (``head_kept[l][h]``, what a server with ``--vlcache-cells head`` holds): each
layer's cache is cropped to the union over its heads and, at every decode step, KV head ``h``'s
query group is masked off the union positions ``h`` dropped (:func:`head_masks_for`; an attention
function registered with transformers' ``AttentionInterface`` for the text model while decoding).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from vlcache_sglang.research.tinyvlm.kvcache import decode_positions, rope_positions


@dataclass
class Prefill:
    """A batch-of-one full-attention prefill: its cache, prefill logits and M-RoPE deltas."""

    cache: DynamicCache
    logits: torch.Tensor  # [vocab] logits of the last prompt position (full cache)
    rope_deltas: torch.Tensor  # [1, 1]
    prompt_len: int

    @property
    def first_token(self) -> int:
        """The first generated token (greedy, from the prefill logits, as SGLang does)."""
        return int(self.logits.argmax(-1))


def crop_cache_positions(cache: DynamicCache, kept: Sequence[torch.Tensor], config) -> DynamicCache:
    """A new cache holding, in layer ``l``, only the prompt positions ``kept[l]`` (batch of one)."""
    new = DynamicCache(config=config)
    for layer, positions in enumerate(kept):
        k, v = cache.layers[layer].keys, cache.layers[layer].values
        idx = torch.as_tensor(positions, dtype=torch.long, device=k.device).sort().values
        new.update(k.index_select(2, idx), v.index_select(2, idx), layer)
    return new


HEAD_MASK_ATTENTION = "vlcache_head_mask"


def head_masks_for(head_kept: Sequence[Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer the union of its heads' kept positions (what the cache is cropped to) and the
    boolean ``[Hkv, len(union)]`` mask of what each head keeps among them."""
    unions, masks = [], []
    for heads in head_kept:
        heads = [torch.as_tensor(h, dtype=torch.long) for h in heads]
        union = torch.unique(torch.cat(heads))
        unions.append(union)
        masks.append(torch.stack([torch.isin(union, h) for h in heads]))
    return unions, masks


def _head_masked_sdpa(module, query, key, value, attention_mask, vlcache_head_masks=None, **kwargs):
    """SDPA where KV head ``h`` of layer ``module.layer_idx`` sees only the cropped prompt positions
    it keeps (``vlcache_head_masks[l]``, ``[Hkv, U_l]``) and every generated token after them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = getattr(module, "layer_idx", None)
    if vlcache_head_masks is not None and layer is not None:
        keep = vlcache_head_masks[layer].to(key.device)
        allowed = torch.ones(keep.shape[0], key.shape[-2], dtype=torch.bool, device=key.device)
        allowed[:, :keep.shape[1]] = keep
        allowed = allowed.repeat_interleave(query.shape[1] // keep.shape[0], 0)[None, :, None, :]
        if attention_mask is None:
            attention_mask = allowed
        elif attention_mask.dtype == torch.bool:
            attention_mask = attention_mask[..., :key.shape[-2]] & allowed
        else:
            attention_mask = attention_mask[..., :key.shape[-2]].masked_fill(~allowed, -math.inf)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextmanager
def head_masked_attention(model) -> Iterator[None]:
    """While inside, the text model attends through :func:`_head_masked_sdpa` (pass
    ``vlcache_head_masks=`` to the forward); the previous implementation is restored on exit."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(HEAD_MASK_ATTENTION, _head_masked_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(HEAD_MASK_ATTENTION, sdpa_mask)
    config = model.config.text_config
    before = config._attn_implementation
    config._attn_implementation = HEAD_MASK_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


@torch.no_grad()
def prefill(model, inputs: dict) -> Prefill:
    """Full-attention prefill of processor ``inputs`` (batch of one: images and/or videos) with the
    model's M-RoPE positions."""
    input_ids = inputs["input_ids"]
    if input_ids.shape[0] != 1:
        raise ValueError(f"prefill takes a batch of one prompt, got {input_ids.shape[0]}")
    image_grid_thw, video_grid_thw = inputs.get("image_grid_thw"), inputs.get("video_grid_thw")
    if image_grid_thw is not None or video_grid_thw is not None:
        pos, deltas = rope_positions(model, input_ids, image_grid_thw, model.config.image_token_id,
                                     video_grid_thw, model.config.video_token_id)
    else:
        pos = torch.arange(input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        deltas = torch.zeros(1, 1, dtype=torch.long)
    cache = DynamicCache(config=model.config.text_config)
    out = model(input_ids=input_ids, pixel_values=inputs.get("pixel_values"), image_grid_thw=image_grid_thw,
                pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=video_grid_thw,
                position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return Prefill(cache, out.logits[0, -1], deltas, int(input_ids.shape[1]))


def masked_logits(logits: torch.Tensor, suppressed_tokens: Sequence[int]) -> torch.Tensor:
    """``logits`` with ``suppressed_tokens`` at -inf (a copy; unchanged when there are none)."""
    if not suppressed_tokens:
        return logits
    out = logits.clone()
    out[list(suppressed_tokens)] = -math.inf
    return out


@torch.no_grad()
def decode_steps(model, cache: DynamicCache, first_token: int, prompt_len: int, rope_deltas: torch.Tensor,
                 max_new_tokens: int, eos_token_ids: Sequence[int] = (),
                 forced: Sequence[int] | None = None,
                 suppressed_tokens: Sequence[int] = (),
                 head_masks: Sequence[torch.Tensor] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Decode from ``cache`` (consumed: it grows), the first token given: the tokens, and per decode
    step ``i`` (which reads token ``i``) the next-token logits ``[vocab]``. Greedy, stopping after
    an EOS token or ``max_new_tokens`` tokens like SGLang; with ``forced`` (teacher forcing) token
    ``i + 1`` is ``forced[i + 1]`` instead of the argmax. ``suppressed_tokens`` are never chosen
    (SGLang's ``min_new_tokens`` masks the stop tokens so; the logits returned are unmasked).
    ``head_masks`` (:func:`head_masks_for`, over a cache cropped to the unions): per-head plans."""
    if head_masks is not None:
        with head_masked_attention(model):
            return _decode_steps(model, cache, first_token, prompt_len, rope_deltas, max_new_tokens, eos_token_ids,
                                 forced, suppressed_tokens, {"vlcache_head_masks": list(head_masks)})
    return _decode_steps(model, cache, first_token, prompt_len, rope_deltas, max_new_tokens, eos_token_ids,
                         forced, suppressed_tokens, {})


def _decode_steps(model, cache, first_token, prompt_len, rope_deltas, max_new_tokens, eos_token_ids, forced,
                  suppressed_tokens, extra: dict) -> tuple[list[int], list[torch.Tensor]]:
    if forced is not None and (not forced or forced[0] != first_token):
        raise ValueError("forced tokens must start with first_token")
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    current = torch.tensor([first_token], device=rope_deltas.device)
    for step in range(max_new_tokens):
        tokens.append(int(current))
        if int(current) in eos_token_ids or step == max_new_tokens - 1:
            break
        # generated token `step` sits at prompt position m + step (plus the image's M-RoPE delta)
        position = decode_positions(prompt_len, rope_deltas, step, 1)
        o = model(input_ids=current[:, None], position_ids=position, past_key_values=cache, use_cache=True, **extra)
        logits.append(o.logits[0, -1])
        if forced is None:
            current = masked_logits(logits[-1], suppressed_tokens).argmax(-1, keepdim=True)
        else:
            current = torch.tensor([forced[step + 1]], device=current.device)
    return tokens, logits


def decode_greedy(model, cache: DynamicCache, first_token: int, prompt_len: int, rope_deltas: torch.Tensor,
                  max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens from ``cache`` (consumed), the first token given; see :func:`decode_steps`."""
    return decode_steps(model, cache, first_token, prompt_len, rope_deltas, max_new_tokens, eos_token_ids)[0]


def teacher_forced_logits(model, cache: DynamicCache, tokens: Sequence[int], prompt_len: int,
                          rope_deltas: torch.Tensor, head_masks: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """``[len(tokens) - 1, vocab]``: the next-token logits of decode steps ``0 .. len(tokens) - 2``
    when ``tokens`` (generated tokens 0, 1, ...) are fed to ``cache`` (consumed) one at a time.
    One token per forward: the layers' caches may differ in length, which one multi-token mask
    cannot express."""
    if len(tokens) < 2:
        raise ValueError("teacher_forced_logits needs at least two tokens")
    _, logits = decode_steps(model, cache, tokens[0], prompt_len, rope_deltas, len(tokens), forced=tokens,
                             head_masks=head_masks)
    return torch.stack(logits)


@torch.no_grad()
def greedy_with_plan(model, inputs: dict, kept: Sequence[torch.Tensor] | None, max_new_tokens: int,
                     eos_token_ids: Sequence[int] = (), suppressed_tokens: Sequence[int] = (),
                     head_kept: Sequence[Sequence[torch.Tensor]] | None = None) -> list[int]:
    """Greedy tokens of ``model`` on processor ``inputs`` with each layer's cache cut to ``kept``
    after prefill (``kept=None``: full cache). Stops after an EOS token, like SGLang; never picks
    ``suppressed_tokens`` (a request whose ``min_new_tokens`` covers the answer). ``head_kept``
    (``[l][h]``): a per-head plan instead (``kept``, if given, must be its per-layer union)."""
    pre = prefill(model, inputs)
    cache, masks = _planned_cache(model, pre, kept, head_kept)
    first = int(masked_logits(pre.logits, suppressed_tokens).argmax())
    return decode_steps(model, cache, first, pre.prompt_len, pre.rope_deltas, max_new_tokens,
                        eos_token_ids, suppressed_tokens=suppressed_tokens, head_masks=masks)[0]


def _planned_cache(model, pre: Prefill, kept, head_kept) -> tuple[DynamicCache, list[torch.Tensor] | None]:
    """The prefill cache cut to a layer plan (``kept``) or a per-head plan (the unions + masks)."""
    config = model.config.text_config
    if head_kept is None:
        return (pre.cache if kept is None else crop_cache_positions(pre.cache, kept, config)), None
    unions, masks = head_masks_for(head_kept)
    if kept is not None and any(not torch.equal(torch.as_tensor(k).sort().values.long(), u)
                                for k, u in zip(kept, unions)):
        raise ValueError("kept is not the union of head_kept over each layer's heads")
    return crop_cache_positions(pre.cache, unions, config), masks


@torch.no_grad()
def greedy_disagreements(model, inputs: dict, kept: Sequence[torch.Tensor] | None,
                         tokens: Sequence[int], suppressed_tokens: Sequence[int] = (),
                         head_kept: Sequence[Sequence[torch.Tensor]] | None = None) -> list[tuple[int, int, float]]:
    """Where ``tokens`` (an engine's greedy answer to ``inputs`` under the plan ``kept``) are not
    the reference's greedy choice when the reference is fed those same tokens (teacher forcing):
    ``(step, reference token, margin)`` per such step, ``margin`` = reference logit of its own
    choice minus that of the engine's token (>= 0). Two correct engines differ only at numerical ties (margins of
    float noise); a wrong cache differs by real margins. ``suppressed_tokens``: as in
    :func:`greedy_with_plan` (and ``head_kept``)."""
    pre = prefill(model, inputs)
    cache, masks = _planned_cache(model, pre, kept, head_kept)
    steps = [pre.logits]
    if len(tokens) > 1:
        steps += list(teacher_forced_logits(model, cache, tokens, pre.prompt_len, pre.rope_deltas, masks))
    out = []
    for i, (logits, token) in enumerate(zip(steps, tokens)):
        best = int(masked_logits(logits, suppressed_tokens).argmax())
        if best != int(token):
            out.append((i, best, float(logits[best] - logits[int(token)])))
    return out
