"""The fixed device buffers a captured decode step reads (the executor's CUDA-graph mode).

A captured graph replays the same kernels with the same pointers and scalars, so everything a
decode step varies lives in buffers allocated once and rewritten before every replay:

* per layer, one row of ``indices`` (up to ``max_kv_tokens`` keys, times ``list_heads`` with head
  cells) and one row of ``indptr`` (up to ``max_batch_size`` lists, times ``list_heads``): the
  layer's kept list, or the batch's slots shifted to the layer's rows of the global K/V storage;
* the plan-free split-KV decode's partial outputs, one flat pair sized once for the largest
  ``bs x splits`` and viewed per captured batch size (graphs never run at once), with a split
  count fixed per batch size from the capacity (never the step's lengths);
* the fused merge's per-(request, KV head) counters, which the kernel leaves at zero.

:meth:`GraphDecodeBuffers.load` rewrites the index rows with a fixed number of device ops
whatever the number of layers, and never reads the device (it runs on the replay's stream,
before every replay).
"""
from __future__ import annotations

import numpy as np
import torch

from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV, per_head_lists, to_device
from vlcache_sglang.kernels.launch_configs import DecodeLaunch

__all__ = ["GraphDecodeBuffers"]


class GraphDecodeBuffers:
    """Index rows, split workspace and merge counters for decode graphs of up to
    ``max_batch_size`` requests reading up to ``max_kv_tokens`` keys per layer (allocated on the
    first :meth:`allocate`, i.e. the first ``plan_decode``, outside any capture)."""

    def __init__(self, max_batch_size: int, max_kv_tokens: int, num_layers: int, list_heads: int,
                 decode_launch: DecodeLaunch) -> None:
        if min(max_batch_size, max_kv_tokens, num_layers, list_heads) < 1:
            raise ValueError("max_batch_size, max_kv_tokens, num_layers and list_heads must be positive")
        self.max_batch_size, self.max_kv_tokens, self.num_layers = max_batch_size, max_kv_tokens, num_layers
        self.list_heads = list_heads
        self.decode_launch = decode_launch
        self.indices: torch.Tensor | None = None  # int32 [layers, max_kv_tokens * list_heads]
        self.indptr: torch.Tensor | None = None  # int32 [layers, max_batch_size * list_heads + 1]
        self.counters: torch.Tensor | None = None  # int32 [max_batch_size * KV heads], fused merge only
        self.split_by_bs: list[int] | None = None  # per batch size (index), chosen once
        self._workspace_flat: tuple[torch.Tensor, torch.Tensor] | None = None

    def allocate(self, device: torch.device, num_kv_heads: int) -> None:
        """The index rows, and the fused merge's counters when the launch merges in one kernel."""
        if self.indices is None:
            L, heads = self.num_layers, self.list_heads
            self.indices = torch.zeros(L, self.max_kv_tokens * heads, dtype=torch.int32, device=device)
            self.indptr = torch.zeros(L, self.max_batch_size * heads + 1, dtype=torch.int32, device=device)
        rows = self.max_batch_size * num_kv_heads
        if self.decode_launch.fused_merge and (self.counters is None or self.counters.numel() < rows):
            self.counters = torch.zeros(rows, dtype=torch.int32, device=device)

    def layer_rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s ``(indices, indptr)`` rows (what its captured kernel reads)."""
        return self.indices[layer], self.indptr[layer]

    def split_workspace(self, bs: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                        device: torch.device) -> tuple[int, tuple[torch.Tensor, torch.Tensor]]:
        """The split count and split workspace of the graph captured for batch size ``bs``.

        SGLang captures one graph per batch size up to ``max_batch_size`` and replays the one of the
        padded batch's size, so the split count may depend on ``bs`` (never on the step's lengths): it
        is what the eager path would choose for ``bs`` requests at the capacity's length. One split
        count for all sizes, chosen for ``max_batch_size`` (256 on an 80-160 GB GPU), gave small batches a
        single split per (request, KV head) program. Every size's ``[bs, Hq, splits, D]`` view starts
        at the same two buffers, sized once for the largest ``bs x splits``."""
        if self.split_by_bs is None:
            from vlcache_sglang.kernels.ragged_decode import num_splits_for

            choice = self.decode_launch.split_choice()
            self.split_by_bs = [0] + [num_splits_for(self.max_kv_tokens, b, num_kv_heads, device, **choice)
                                      for b in range(1, self.max_batch_size + 1)]
            rows = max(b * s for b, s in enumerate(self.split_by_bs)) * num_q_heads
            self._workspace_flat = (torch.empty(rows * head_dim, dtype=torch.float32, device=device),
                                    torch.empty(rows, dtype=torch.float32, device=device))
        splits = self.split_by_bs[bs]
        o_flat, lse_flat = self._workspace_flat
        n = bs * num_q_heads * splits
        return splits, (o_flat[: n * head_dim].view(bs, num_q_heads, splits, head_dim),
                        lse_flat[:n].view(bs, num_q_heads, splits))

    def load(self, meta: ForwardMetadata, bs: int) -> list[tuple[list[int], int]]:
        """Load every layer's list into its rows; returns per layer (host indptr, length).

        A fixed number of device ops whatever the number of layers: the layers with their own list
        are concatenated once and scattered into their rows by one ``index_copy_`` (destinations
        expanded on the device from a per-layer table), their ``indptr`` rows written by one indexed
        assignment from one host copy; the layers without (an uncompressed batch's, with
        ``layer_row_stride``) read ``meta.kv``'s slots shifted per layer, in one broadcast. With
        per-head lists (``list_heads`` > 1) those layers read ``meta.kv`` expanded per KV head
        (:func:`per_head_lists`), as head-rows."""
        stride, heads = meta.layer_row_stride, self.list_heads
        capacity, entries = self.max_kv_tokens * heads, bs * heads + 1
        L = self.num_layers
        shared = [layer for layer in range(L) if layer not in meta.layer_kv]
        plain = per_head_lists(meta.kv, heads) if shared else meta.kv  # one expansion for every such layer
        lists = [meta.layer_kv.get(layer, plain) for layer in range(L)]
        out = []
        for layer, kv in enumerate(lists):
            n = kv.kv_indptr_cpu[-1]
            if n > capacity:
                raise ValueError(f"layer {layer} reads {n} keys, more than max_kv_tokens={self.max_kv_tokens}"
                                 + (f" x {heads} heads" if heads > 1 else ""))
            if len(kv.kv_indptr_cpu) != entries:
                raise ValueError(f"layer {layer}'s list has {len(kv.kv_indptr_cpu) - 1} entries, the batch {entries - 1}")
            out.append((kv.kv_indptr_cpu, n))
        direct = [layer for layer in range(L) if layer in meta.layer_kv or stride is None]
        if direct:
            self._scatter(direct, [lists[layer] for layer in direct], capacity, entries)
        if shared and stride is not None:
            # layers without their own list read meta.kv's slots in their own rows: one broadcast
            # (head-rows: row * heads + h, so a layer's shift is stride * heads)
            n = plain.kv_indptr_cpu[-1]
            rows = to_device(np.asarray(shared, dtype=np.int64), plain.kv_indices.device)  # no stream drain
            self.indices[rows, :n] = (plain.kv_indices.unsqueeze(0)
                                      + (rows * (stride * heads)).unsqueeze(1)).to(torch.int32)
            self.indptr[rows, :entries] = plain.kv_indptr.to(torch.int32).unsqueeze(0)
        return out

    def _scatter(self, layers: list[int], lists: list[RaggedKV], capacity: int, entries: int) -> None:
        """Write ``lists[i]`` into layer ``layers[i]``'s rows: one ``cat`` of their indices, one
        host-to-device copy (layer ids, per-layer destination shift and length, every layer's host
        ``indptr``), one ``repeat_interleave`` and one ``index_copy_``, one indexed ``indptr``
        write."""
        counts = np.asarray([kv.kv_indptr_cpu[-1] for kv in lists], dtype=np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ids = np.asarray(layers, dtype=np.int64)
        d = ids.size
        host = np.concatenate([ids, ids * capacity - first, counts,
                               np.asarray([kv.kv_indptr_cpu for kv in lists], dtype=np.int64).reshape(-1)])
        device = self.indices.device
        dev = to_device(host, device)
        rows = dev[:d]
        self.indptr[rows, :entries] = dev[3 * d:].view(d, entries).to(torch.int32)
        total = int(counts.sum())
        if total == 0:
            return
        source = torch.cat([kv.kv_indices for kv in lists]) if d > 1 else lists[0].kv_indices
        dest = torch.repeat_interleave(dev[d:2 * d], dev[2 * d:3 * d], output_size=total)
        dest += torch.arange(total, device=device)
        self.indices.view(-1).index_copy_(0, dest, source.to(torch.int32))
