"""Hugging Face reference for a compression plan: prefill with full attention, keep per layer the
plan's positions, decode greedily. What the server must reproduce token for token.

The first output token comes from the prefill logits (full cache), as in SGLang; each later
token attends, in layer ``l``, to ``plan.kept[l]`` plus the generated tail. Keys are stored
after RoPE, so cropping moves no position.

The pieces are public so that one prefill can serve many plans (``vlcache_sglang.research.hf_eval``):
:func:`prefill` -> :func:`crop_cache_positions` -> :func:`decode_steps` (greedy or
teacher forced); :func:`greedy_with_plan` chains them for one plan.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
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


def _masked(logits: torch.Tensor, suppressed_tokens: Sequence[int]) -> torch.Tensor:
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
                 suppressed_tokens: Sequence[int] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """Decode from ``cache`` (consumed: it grows), the first token given: the tokens, and per decode
    step ``i`` (which reads token ``i``) the next-token logits ``[vocab]``. Greedy, stopping after
    an EOS token or ``max_new_tokens`` tokens like SGLang; with ``forced`` (teacher forcing) token
    ``i + 1`` is ``forced[i + 1]`` instead of the argmax. ``suppressed_tokens`` are never chosen
    (SGLang's ``min_new_tokens`` masks the stop tokens so; the logits returned are unmasked)."""
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
        o = model(input_ids=current[:, None], position_ids=position, past_key_values=cache, use_cache=True)
        logits.append(o.logits[0, -1])
        if forced is None:
            current = _masked(logits[-1], suppressed_tokens).argmax(-1, keepdim=True)
        else:
            current = torch.tensor([forced[step + 1]], device=current.device)
    return tokens, logits


def decode_greedy(model, cache: DynamicCache, first_token: int, prompt_len: int, rope_deltas: torch.Tensor,
                  max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens from ``cache`` (consumed), the first token given; see :func:`decode_steps`."""
    return decode_steps(model, cache, first_token, prompt_len, rope_deltas, max_new_tokens, eos_token_ids)[0]


def teacher_forced_logits(model, cache: DynamicCache, tokens: Sequence[int], prompt_len: int,
                          rope_deltas: torch.Tensor) -> torch.Tensor:
    """``[len(tokens) - 1, vocab]``: the next-token logits of decode steps ``0 .. len(tokens) - 2``
    when ``tokens`` (generated tokens 0, 1, ...) are fed to ``cache`` (consumed) one at a time.
    One token per forward: the layers' caches may differ in length, which one multi-token mask
    cannot express."""
    if len(tokens) < 2:
        raise ValueError("teacher_forced_logits needs at least two tokens")
    _, logits = decode_steps(model, cache, tokens[0], prompt_len, rope_deltas, len(tokens), forced=tokens)
    return torch.stack(logits)


@torch.no_grad()
def greedy_with_plan(model, inputs: dict, kept: Sequence[torch.Tensor] | None, max_new_tokens: int,
                     eos_token_ids: Sequence[int] = (), suppressed_tokens: Sequence[int] = ()) -> list[int]:
    """Greedy tokens of ``model`` on processor ``inputs`` with each layer's cache cut to ``kept``
    after prefill (``kept=None``: full cache). Stops after an EOS token, like SGLang; never picks
    ``suppressed_tokens`` (a request whose ``min_new_tokens`` covers the answer)."""
    pre = prefill(model, inputs)
    cache = pre.cache
    if kept is not None:
        cache = crop_cache_positions(cache, kept, model.config.text_config)
    if suppressed_tokens:
        first = int(_masked(pre.logits, suppressed_tokens).argmax())
        return decode_steps(model, cache, first, pre.prompt_len, pre.rope_deltas, max_new_tokens,
                            eos_token_ids, suppressed_tokens=suppressed_tokens)[0]
    return decode_greedy(model, cache, pre.first_token, pre.prompt_len, pre.rope_deltas, max_new_tokens,
                         eos_token_ids)


@torch.no_grad()
def greedy_disagreements(model, inputs: dict, kept: Sequence[torch.Tensor] | None,
                         tokens: Sequence[int], suppressed_tokens: Sequence[int] = ()) -> list[tuple[int, int, float]]:
    """Where ``tokens`` (an engine's greedy answer to ``inputs`` under the plan ``kept``) are not
    the reference's greedy choice when the reference is fed those same tokens (teacher forcing):
    ``(step, reference token, margin)`` per such step, ``margin`` = reference logit of its own
    choice minus that of the engine's token (>= 0). Two correct engines differ only at numerical ties (margins of
    float noise); a wrong cache differs by real margins. ``suppressed_tokens``: as in
    :func:`greedy_with_plan`."""
    pre = prefill(model, inputs)
    cache = pre.cache
    if kept is not None:
        cache = crop_cache_positions(cache, kept, model.config.text_config)
    steps = [pre.logits]
    if len(tokens) > 1:
        steps += list(teacher_forced_logits(model, cache, tokens, pre.prompt_len, pre.rope_deltas))
    out = []
    for i, (logits, token) in enumerate(zip(steps, tokens)):
        best = int(_masked(logits, suppressed_tokens).argmax())
        if best != int(token):
            out.append((i, best, float(logits[best] - logits[int(token)])))
    return out
