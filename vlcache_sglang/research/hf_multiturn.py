"""Hugging Face reference for a conversation whose cache was compressed after every turn.

What a server that reuses a compressed turn from its radix tree must reproduce: turn 1's prompt
is prefilled with full attention and each layer cut to turn 1's kept positions; every later token
(turn 1's answer, turn 2's new text) attends to what the cache holds at that moment and is added
to every layer; after turn ``i``'s prompt each layer is cut to turn ``i``'s kept positions, which
must be positions the layer still holds. Tokens after the first prefill are fed one at a time, so
layers of different lengths need no attention mask.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from vlcache_sglang.research.hf_reference import (crop_cache_positions, decode_steps, head_masked_attention,
                                                   masked_logits)
from vlcache_sglang.research.tinyvlm.kvcache import decode_positions, rope_positions


class PositionedCache:
    """A DynamicCache plus, per layer, the prompt positions its rows hold (in order) and, once a
    per-head plan cut it, which of those rows each KV head still holds (``[Hkv, rows]``)."""

    def __init__(self, cache: DynamicCache, num_layers: int, length: int, config):
        self.cache, self.config = cache, config
        self.positions = [torch.arange(length) for _ in range(num_layers)]
        self.held: list[torch.Tensor] | None = None  # per layer [Hkv, rows]; None: every head holds every row

    def keep(self, kept: Sequence[torch.Tensor]) -> None:
        """Cut every head of layer ``l`` to ``kept[l]``."""
        self.keep_heads([[want] * self._heads() for want in kept])

    def keep_heads(self, head_kept: Sequence[Sequence[torch.Tensor]]) -> None:
        """Cut KV head ``h`` of layer ``l`` to ``head_kept[l][h]`` (positions it must still hold):
        the rows are cropped to each layer's union and the heads masked within it."""
        rows, held = [], []
        for layer, heads in enumerate(head_kept):
            have = self.positions[layer]
            wants = [torch.as_tensor(w, dtype=torch.long).sort().values for w in heads]
            for h, want in enumerate(wants):
                still = have if self.held is None else have[self.held[layer][h]]
                if not bool(torch.isin(want, still).all()):
                    raise ValueError(f"layer {layer} head {h} is asked to keep positions it no longer holds")
            union = torch.unique(torch.cat(wants))
            rows.append(torch.searchsorted(have, union))
            held.append(torch.stack([torch.isin(union, w) for w in wants]))
            self.positions[layer] = union
        self.cache = crop_cache_positions(self.cache, rows, self.config)
        self.held = None if all(bool(h.all()) for h in held) else held  # all-true: no mask needed

    def appended(self, position: int) -> None:
        for layer in range(len(self.positions)):
            self.positions[layer] = torch.cat([self.positions[layer], torch.tensor([position])])
            if self.held is not None:  # every head holds a token appended after the cut
                h = self.held[layer]
                self.held[layer] = torch.cat([h, torch.ones(h.shape[0], 1, dtype=torch.bool)], 1)

    def forward_kwargs(self) -> dict:
        """What a forward over this cache passes so that each head sees only what it holds."""
        return {} if self.held is None else {"vlcache_head_masks": list(self.held)}

    def _heads(self) -> int:
        return int(self.config.num_key_value_heads)


def prompt_embeddings(model, inputs: dict) -> torch.Tensor:
    """The language model's input embeddings of a processed image prompt (image features in place
    of the image pad tokens), as Qwen2-VL's forward builds them."""
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    image = torch.cat(features.pooler_output, dim=0).to(embeds.dtype)
    mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, image)


@torch.no_grad()
def greedy_after_turns(model, inputs: dict, turns: Sequence[tuple[int, Sequence]], max_new_tokens: int,
                       eos_token_ids: Sequence[int] = (), *, per_head: bool = False,
                       suppressed_tokens: Sequence[int] = ()) -> list[int]:
    """Greedy tokens after the last prompt of a conversation compressed turn by turn.

    Args:
        model: a Qwen2-VL model.
        inputs: processor output for the *last* turn's whole prompt (``input_ids`` ``[1, m]``).
        turns: ``[(m_1, kept_1), ..., (m_n, kept_n)]`` with ``m_1 < ... < m_n = m``: after the first
            ``m_i`` tokens each layer ``l`` keeps ``kept_i[l]`` (positions in ``[0, m_i)``; ``m_1``
            may fall inside the image, as a prefix match capped by ``logprob_start_len`` does); with
            ``per_head``, ``kept_i[l][h]`` per KV head (head cells: each head holds its own positions).
        max_new_tokens, eos_token_ids: as SGLang (stop after an EOS).
        suppressed_tokens: never chosen (what SGLang's ``min_new_tokens`` masks).
    """
    input_ids = inputs["input_ids"]
    m = input_ids.shape[1]
    if not turns or turns[-1][0] != m or any(a[0] >= b[0] for a, b in zip(turns, turns[1:])):
        raise ValueError("turn lengths must increase and end at the prompt length")
    config = model.config.text_config
    m1 = turns[0][0]
    cache = DynamicCache(config=config)
    image_id = model.config.image_token_id
    if bool((input_ids[0, m1:] == image_id).any()):  # the first turn ends inside the image (a capped
        # prefix match): every later token is fed as its embedding at its whole-prompt position
        pos, deltas = rope_positions(model, input_ids, inputs["image_grid_thw"], image_id)
        embeds = prompt_embeddings(model, inputs)

        def step(t: int) -> dict:
            return {"inputs_embeds": embeds[:, t:t + 1], "position_ids": pos[..., t:t + 1]}
        out = model(inputs_embeds=embeds[:, :m1], position_ids=pos[..., :m1], past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    else:
        pos, deltas = rope_positions(model, input_ids[:, :m1], inputs["image_grid_thw"], image_id)

        def step(t: int) -> dict:
            return {"input_ids": input_ids[:, t:t + 1], "position_ids": decode_positions(m1, deltas, t - m1, 1)}
        out = model(input_ids=input_ids[:, :m1], pixel_values=inputs.get("pixel_values"),
                    image_grid_thw=inputs["image_grid_thw"], position_ids=pos, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
    pc = PositionedCache(cache, config.num_hidden_layers, m1, config)
    cut = pc.keep_heads if per_head else pc.keep
    cut(turns[0][1])
    logits = out.logits[:, -1]
    boundaries = {length: kept for length, kept in turns[1:]}
    with head_masked_attention(model) if per_head else nullcontext():
        for t in range(m1, m):  # later tokens, one at a time, against what the cache holds
            o = model(**step(t), past_key_values=pc.cache, use_cache=True, **pc.forward_kwargs())
            pc.appended(t)
            logits = o.logits[:, -1]
            if t + 1 in boundaries:
                cut(boundaries[t + 1])
    masks = pc.held if per_head else None
    first = int(masked_logits(logits[0], suppressed_tokens).argmax(-1))
    return decode_steps(model, pc.cache, first, m, deltas, max_new_tokens, eos_token_ids,
                        suppressed_tokens=suppressed_tokens, head_masks=masks)[0]
