"""CPU (and any-device fallback) attention executor in plain PyTorch SDPA.

Numerically it follows SGLang's ``TorchNativeAttnBackend`` op for op (per-request SDPA, the
extend computed over a full-length causal query and sliced), so that with nothing compressed
the ``vlcache`` backend's greedy tokens equal the stock ``torch_native`` backend's exactly.
The difference is where keys come from: each request (and, once compressed, each layer) reads
the slot list in :class:`ForwardMetadata`, FlashInfer's indptr/indices layout. With head cells
(``RaggedKV.per_head``) each (request, KV head) has its own list of head-rows ``row * H + h'``
(the place in ``[rows, H, D]`` where each cell lives) and that head's query group attends to it alone.
"""
from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV


class TorchAttentionExecutor:
    """Extend and decode attention for one layer over ragged slot lists."""

    per_head_lists = True  # reads per-(request, KV head) lists (head cells)

    def extend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv: RaggedKV, meta: ForwardMetadata, scaling: float, enable_gqa: bool,
               k_scale: float | None = None, v_scale: float | None = None) -> torch.Tensor:
        """q/out: [tokens, q_heads, dim]; caches: [rows, kv_heads, dim] indexed by ``kv``. Causal."""
        if kv.per_head:
            return self._per_head(q, out, k_cache, v_cache, kv, meta, scaling, k_scale, v_scale, causal=True)
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
        if kv.per_head:
            return self._per_head(q, out, k_cache, v_cache, kv, meta, scaling, k_scale, v_scale, causal=False)
        query = q.movedim(0, 1)
        for b in range(meta.batch_size):
            key, value = self._gather(k_cache, v_cache, kv.slots(b), query.dtype, k_scale, v_scale)
            o = scaled_dot_product_attention(
                query[:, b : b + 1].unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                enable_gqa=enable_gqa, scale=scaling, is_causal=False,
            ).squeeze(0).movedim(1, 0)
            out[b : b + 1] = o
        return out

    def _per_head(self, q, out, k_cache, v_cache, kv: RaggedKV, meta: ForwardMetadata, scaling: float,
                  k_scale, v_scale, *, causal: bool) -> torch.Tensor:
        """Per-(request, KV head) lists: KV head ``h``'s query group over that head's own list, which
        ends with the forward's new rows (its cached prefix may differ in length per head)."""
        heads = k_cache.shape[1]
        if kv.heads != heads:
            raise ValueError(f"per-head lists for {kv.heads} KV heads over a cache of {heads}")
        group = q.shape[1] // heads
        for b in range(meta.batch_size):
            q0, q1 = meta.qo_indptr_cpu[b], meta.qo_indptr_cpu[b + 1]
            for h in range(heads):
                rows = kv.head_slots(b, h)
                # a head-row is (row, place): a compacted cell may sit in another head's place
                flat_k, flat_v = k_cache.view(-1, 1, k_cache.shape[-1]), v_cache.view(-1, 1, v_cache.shape[-1])
                key, value = self._gather(flat_k, flat_v, rows, q.dtype, k_scale, v_scale)
                query = q[q0:q1, h * group:(h + 1) * group].movedim(0, 1)  # [group, new rows, dim]
                prefix = rows.numel() - (q1 - q0) if causal else 0
                if causal:  # as in extend: a full-length causal query whose cached rows are ignored
                    padded = query.new_zeros((group, rows.numel(), query.shape[2]))
                    padded[:, prefix:] = query
                    query = padded
                o = scaled_dot_product_attention(query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0),
                                                 scale=scaling, is_causal=causal, enable_gqa=group > 1)
                out[q0:q1, h * group:(h + 1) * group] = o.squeeze(0)[:, prefix:].movedim(1, 0)
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
