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

import torch
from transformers import DynamicCache

from vlcache_sglang.research.hf_reference import crop_cache_positions, decode_greedy
from vlcache_sglang.research.tinyvlm.kvcache import decode_positions, rope_positions


class PositionedCache:
    """A DynamicCache plus, per layer, the prompt positions its rows hold (in order)."""

    def __init__(self, cache: DynamicCache, num_layers: int, length: int, config):
        self.cache, self.config = cache, config
        self.positions = [torch.arange(length) for _ in range(num_layers)]

    def keep(self, kept: Sequence[torch.Tensor]) -> None:
        rows = []
        for layer, want in enumerate(kept):
            want = torch.as_tensor(want, dtype=torch.long).sort().values
            have = self.positions[layer]
            idx = torch.searchsorted(have, want)
            if bool((idx >= have.numel()).any()) or not torch.equal(have[idx.clamp(max=have.numel() - 1)], want):
                raise ValueError(f"layer {layer} is asked to keep positions it no longer holds")
            rows.append(idx)
            self.positions[layer] = want
        self.cache = crop_cache_positions(self.cache, rows, self.config)

    def appended(self, position: int) -> None:
        for layer in range(len(self.positions)):
            self.positions[layer] = torch.cat([self.positions[layer], torch.tensor([position])])


@torch.no_grad()
def greedy_after_turns(model, inputs: dict, turns: Sequence[tuple[int, Sequence[torch.Tensor]]],
                       max_new_tokens: int, eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Greedy tokens after the last prompt of a conversation compressed turn by turn.

    Args:
        model: a Qwen2-VL model.
        inputs: processor output for the *last* turn's whole prompt (``input_ids`` ``[1, m]``).
        turns: ``[(m_1, kept_1), ..., (m_n, kept_n)]`` with ``m_1 < ... < m_n = m``: after the first
            ``m_i`` tokens each layer ``l`` keeps ``kept_i[l]`` (positions in ``[0, m_i)``).
        max_new_tokens, eos_token_ids: as SGLang (stop after an EOS).
    """
    input_ids = inputs["input_ids"]
    m = input_ids.shape[1]
    if not turns or turns[-1][0] != m or any(a[0] >= b[0] for a, b in zip(turns, turns[1:])):
        raise ValueError("turn lengths must increase and end at the prompt length")
    config = model.config.text_config
    m1 = turns[0][0]
    pos, deltas = rope_positions(model, input_ids[:, :m1], inputs["image_grid_thw"], model.config.image_token_id)
    cache = DynamicCache(config=config)
    out = model(input_ids=input_ids[:, :m1], pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs["image_grid_thw"], position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    pc = PositionedCache(cache, config.num_hidden_layers, m1, config)
    pc.keep(turns[0][1])
    logits = out.logits[:, -1]
    boundaries = {length: kept for length, kept in turns[1:]}
    for t in range(m1, m):  # later tokens, one at a time, against what the cache holds
        o = model(input_ids=input_ids[:, t:t + 1], position_ids=decode_positions(m1, deltas, t - m1, 1),
                  past_key_values=pc.cache, use_cache=True)
        pc.appended(t)
        logits = o.logits[:, -1]
        if t + 1 in boundaries:
            pc.keep(boundaries[t + 1])
    return decode_greedy(model, pc.cache, int(logits.argmax(-1)), m, deltas, max_new_tokens, eos_token_ids)
