"""Prefill, crop the visual part of a ``DynamicCache`` after prefill, and decode from the cropped cache.

This mirrors what a KV-compression policy does at serving time: the prompt is prefilled with full
attention, the first output token is sampled from the prefill logits (full cache), then chosen visual
positions are removed from every layer's cache and decoding continues. Keys are stored after RoPE, so
cropping does not move anyone's position: the token decoded at step ``i`` keeps the position id it would
have had without the crop (``prompt_len + i`` plus the M-RoPE delta of the image).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def rope_positions(model, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_pad_id: int,
                   video_grid_thw: torch.Tensor | None = None, video_pad_id: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids (3, B, L) and rope deltas (B, 1), computed as the model does (image
    tokens are modality 1, video tokens modality 2, as the processor's ``mm_token_type_ids``)."""
    mm = (input_ids == image_pad_id).int()
    if video_grid_thw is not None:
        mm = mm + 2 * (input_ids == video_pad_id).int()
    return model.model.get_rope_index(input_ids, mm, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw)


def crop_cache(cache: DynamicCache, keep: list[torch.Tensor] | torch.Tensor, vis_start: int, n_visual: int,
               config) -> DynamicCache:
    """A new cache with, per layer, all text positions and only the visual positions in ``keep``.

    Args:
        cache: the prefill cache, (B, H, T, D) per layer.
        keep: (B, k) visual indices (0-based within the image) for every layer, or a list with one
            such tensor per layer (k may differ between layers). Order does not matter.
        vis_start: position of the first visual token in the prompt.
        n_visual: number of visual tokens.
    """
    new = DynamicCache(config=config)
    n_layers = len(cache.layers)
    per_layer = keep if isinstance(keep, (list, tuple)) else [keep] * n_layers
    for layer in range(n_layers):
        k, v = cache.layers[layer].keys, cache.layers[layer].values
        b, t = k.shape[0], k.shape[2]
        dev = k.device
        vis = per_layer[layer].to(dev).sort(1).values + vis_start
        idx = torch.cat([torch.arange(vis_start, device=dev).expand(b, -1), vis,
                         torch.arange(vis_start + n_visual, t, device=dev).expand(b, -1)], 1)
        g = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        new.update(k.gather(2, g), v.gather(2, g), layer)
    return new


def decode_positions(prompt_len: int, rope_deltas: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """(3, B, n) position ids of generated tokens ``start .. start+n-1`` (0 = first generated token)."""
    p = torch.arange(prompt_len + start, prompt_len + start + n, device=rope_deltas.device)
    p = p.view(1, 1, -1) + rope_deltas.view(1, -1, 1)
    return p.expand(3, -1, -1)


@torch.no_grad()
def greedy_from_cache(model, cache: DynamicCache, first_token: torch.Tensor, prompt_len: int,
                      rope_deltas: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding of ``steps`` tokens, the first given (sampled from the prefill logits)."""
    out = [first_token]
    for i in range(1, steps):
        pos = decode_positions(prompt_len, rope_deltas, i - 1, 1)
        o = model(input_ids=out[-1][:, None], position_ids=pos, past_key_values=cache, use_cache=True)
        out.append(o.logits[:, -1].argmax(-1))
    return torch.stack(out, 1)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
            image_pad_id: int, output_attentions: bool = False):
    """Full-attention prefill. Returns (cache, last-position logits, rope deltas, attentions or None)."""
    pos, deltas = rope_positions(model, input_ids, image_grid_thw, image_pad_id)
    cache = DynamicCache(config=model.config.text_config)
    o = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=image_grid_thw, position_ids=pos,
              past_key_values=cache, use_cache=True, output_attentions=output_attentions, logits_to_keep=1)
    return cache, o.logits[:, -1], deltas, (o.attentions if output_attentions else None)
