"""CPU (and any-device fallback) attention executor in plain PyTorch SDPA.

Numerically it follows SGLang's ``TorchNativeAttnBackend`` op for op (per-request SDPA, the
extend computed over a full-length causal query and sliced), so that with nothing compressed
the ``vlcache`` backend's greedy tokens equal the stock ``torch_native`` backend's exactly.
The difference is where keys come from: each request (and, once compressed, each layer) reads
the slot list in :class:`ForwardMetadata`, FlashInfer's indptr/indices layout.
"""
from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV


class TorchAttentionExecutor:
    """Extend and decode attention for one layer over ragged slot lists."""

    def extend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv: RaggedKV, meta: ForwardMetadata, scaling: float, enable_gqa: bool,
               k_scale: float | None = None, v_scale: float | None = None) -> torch.Tensor:
        """q/out: [tokens, q_heads, dim]; caches: [rows, kv_heads, dim] indexed by ``kv``. Causal."""
        query = q.movedim(0, 1)  # [heads, tokens, dim]
        for b in range(meta.batch_size):
            q0, q1 = meta.qo_indptr_cpu[b], meta.qo_indptr_cpu[b + 1]
            slots = kv.slots(b)
            kv_len = slots.numel()
            # the new rows are the list's last keys; a layer that holds a compressed prefix has
            # fewer cached keys before them than the request has cached positions
            prefix = kv_len - (q1 - q0)
            # Same shapes as torch_native: a full-length causal query whose cached rows are
            # ignored, so SDPA takes the same kernel path and gives identical numbers.
            padded = query.new_empty((query.shape[0], kv_len, query.shape[2]))
            padded[:, prefix:, :] = query[:, q0:q1, :]
            key, value = self._gather(k_cache, v_cache, slots, query.dtype, k_scale, v_scale)
            o = scaled_dot_product_attention(
                padded.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                enable_gqa=enable_gqa, scale=scaling, is_causal=True,
            ).squeeze(0).movedim(1, 0)
            out[q0:q1] = o[prefix:]
        return out

    def decode(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv: RaggedKV, meta: ForwardMetadata, scaling: float, enable_gqa: bool,
               k_scale: float | None = None, v_scale: float | None = None) -> torch.Tensor:
        """One query row per request over that layer's list (kept prompt + generated tail)."""
        query = q.movedim(0, 1)
        for b in range(meta.batch_size):
            key, value = self._gather(k_cache, v_cache, kv.slots(b), query.dtype, k_scale, v_scale)
            o = scaled_dot_product_attention(
                query[:, b : b + 1].unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                enable_gqa=enable_gqa, scale=scaling, is_causal=False,
            ).squeeze(0).movedim(1, 0)
            out[b : b + 1] = o
        return out

    @staticmethod
    def _gather(k_cache, v_cache, slots, dtype, k_scale=None, v_scale=None):
        key = k_cache[slots].movedim(0, 1)
        value = v_cache[slots].movedim(0, 1)
        if key.dtype != dtype:
            key, value = key.to(dtype), value.to(dtype)
        if k_scale is not None and k_scale != 1.0:
            key = key * k_scale
        if v_scale is not None and v_scale != 1.0:
            value = value * v_scale
        return key, value
