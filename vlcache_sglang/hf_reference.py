"""Hugging Face reference for a compression plan: prefill with full attention, keep per layer the
plan's positions, decode greedily. What the server must reproduce token for token.

The first output token comes from the prefill logits (full cache), as in SGLang; each later
token attends, in layer ``l``, to ``plan.kept[l]`` plus the generated tail. Keys are stored
after RoPE, so cropping moves no position.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from vlcache_sglang.tinyvlm.kvcache import decode_positions, rope_positions


def crop_cache_positions(cache: DynamicCache, kept: Sequence[torch.Tensor], config) -> DynamicCache:
    """A new cache holding, in layer ``l``, only the prompt positions ``kept[l]`` (batch of one)."""
    new = DynamicCache(config=config)
    for layer, positions in enumerate(kept):
        k, v = cache.layers[layer].keys, cache.layers[layer].values
        idx = torch.as_tensor(positions, dtype=torch.long, device=k.device).sort().values
        new.update(k.index_select(2, idx), v.index_select(2, idx), layer)
    return new


@torch.no_grad()
def greedy_with_plan(model, inputs: dict, kept: Sequence[torch.Tensor] | None, max_new_tokens: int,
                     eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens of ``model`` on processor ``inputs`` with each layer's cache cut to ``kept``
    after prefill (``kept=None``: full cache). Stops after an EOS token, like SGLang."""
    input_ids = inputs["input_ids"]
    image_grid_thw = inputs.get("image_grid_thw")
    image_pad_id = model.config.image_token_id
    if image_grid_thw is not None:
        pos, deltas = rope_positions(model, input_ids, image_grid_thw, image_pad_id)
    else:
        pos = torch.arange(input_ids.shape[1]).view(1, 1, -1).expand(3, 1, -1)
        deltas = torch.zeros(1, 1, dtype=torch.long)
    cache = DynamicCache(config=model.config.text_config)
    out = model(input_ids=input_ids, pixel_values=inputs.get("pixel_values"), image_grid_thw=image_grid_thw,
                position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].argmax(-1)
    if kept is not None:
        cache = crop_cache_positions(cache, kept, model.config.text_config)
    tokens: list[int] = []
    current = first
    for step in range(max_new_tokens):
        tokens.append(int(current))
        if int(current) in eos_token_ids or step == max_new_tokens - 1:
            break
        # generated token `step` sits at prompt position m + step (plus the image's M-RoPE delta)
        position = decode_positions(input_ids.shape[1], deltas, step, 1)
        o = model(input_ids=current[:, None], position_ids=position, past_key_values=cache, use_cache=True)
        current = o.logits[:, -1].argmax(-1)
    return tokens
