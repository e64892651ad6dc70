"""Per-forward attention metadata in FlashInfer's ragged layout (page size 1).

For request ``b`` of a batch, its KV slots are ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``
(slot ids into the layer's K/V buffer, in position order) and, for an extend, its query rows are
``q[qo_indptr[b]:qo_indptr[b+1]]``. When the batch holds a compressed request, each layer reads
its own list: ``layer_kv[l]`` holds *global* row ids into the contiguous K/V storage
(``l * rows_per_layer + slot`` for ordinary tokens, cell ids for kept compressed ones). This is
exactly what a FlashInfer paged wrapper (page size 1) is planned with.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RaggedKV:
    """One ragged KV selection: slot ids of every request, concatenated."""

    kv_indptr: torch.Tensor  # int64 [batch + 1]
    kv_indices: torch.Tensor  # int64 [sum of lengths]
    kv_indptr_cpu: list[int]  # host copy, so executors never sync the device to slice
    heads: int = 1  # > 1: one entry per (request, KV head), of head-rows (row * heads + h)

    def slots(self, b: int) -> torch.Tensor:
        return self.kv_indices[self.kv_indptr_cpu[b] : self.kv_indptr_cpu[b + 1]]

    def length(self, b: int) -> int:
        return self.kv_indptr_cpu[b + 1] - self.kv_indptr_cpu[b]

    @property
    def per_head(self) -> bool:
        """One list per (request, KV head) (head cells) rather than one per request."""
        return self.heads > 1

    def head_slots(self, b: int, h: int) -> torch.Tensor:
        """Request ``b``'s head-rows of KV head ``h`` (``row * heads + h``); entry ``b * heads + h``."""
        return self.slots(b * self.heads + h)


@dataclass
class ForwardMetadata:
    """What the executors need for one forward of one batch."""

    is_decode: bool
    kv: RaggedKV  # every request's slots for positions [0, seq_len)
    qo_indptr_cpu: list[int]  # query rows per request ([b] .. [b+1])
    prefix_lens_cpu: list[int]  # extend: positions already cached before this forward
    layer_kv: dict[int, RaggedKV] = field(default_factory=dict)
    # per layer, per request: prompt positions of that layer's keys (None: positions 0..n-1)
    layer_positions: dict[int, list] = field(default_factory=dict)
    requests: list | None = None  # extend: per-request RequestInfo (compression settings, spans)
    # a layer without its own list reads meta.kv's slots at row l * layer_row_stride of the global
    # K/V storage (CUDA-graph mode, where every layer reads that storage); None: not given
    layer_row_stride: int | None = None
    graph: bool = False  # decode through the executor's CUDA-graph buffers (planned for this meta)

    @property
    def batch_size(self) -> int:
        return len(self.qo_indptr_cpu) - 1


def build_ragged_kv(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens_cpu: list[int]) -> RaggedKV:
    """Gather each request's slot ids for positions ``[0, seq_len)`` from ``req_to_token``."""
    indptr_cpu = [0]
    for n in seq_lens_cpu:
        indptr_cpu.append(indptr_cpu[-1] + int(n))
    device = req_to_token.device
    if indptr_cpu[-1] == 0:
        indices = torch.empty(0, dtype=torch.int64, device=device)
    else:
        rows = req_to_token[req_pool_indices.to(device=device, dtype=torch.int64)]
        pos = torch.arange(max(seq_lens_cpu), device=device)
        lens = torch.tensor(seq_lens_cpu, device=device)
        indices = rows[:, : pos.numel()][pos.unsqueeze(0) < lens.unsqueeze(1)].to(torch.int64)
    indptr = torch.tensor(indptr_cpu, dtype=torch.int64, device=device)
    return RaggedKV(kv_indptr=indptr, kv_indices=indices, kv_indptr_cpu=indptr_cpu)


def host_ints(cpu_value, device_value) -> list[int]:
    """Prefer SGLang's host copy of a per-request tensor; fall back to one device->host copy."""
    if cpu_value is not None:
        values = cpu_value.tolist() if isinstance(cpu_value, torch.Tensor) else list(cpu_value)
    else:
        values = device_value.tolist()
    return [int(x) for x in values]


def decode_metadata(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                    seq_lens_cpu: list[int]) -> ForwardMetadata:
    """A decode step: one query row per request, over its positions ``[0, seq_len)``."""
    kv = build_ragged_kv(req_to_token, req_pool_indices, seq_lens_cpu)
    return ForwardMetadata(is_decode=True, kv=kv, qo_indptr_cpu=list(range(len(seq_lens_cpu) + 1)),
                           prefix_lens_cpu=[n - 1 for n in seq_lens_cpu])
