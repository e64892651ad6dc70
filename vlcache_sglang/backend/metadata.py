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

import numpy as np
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
    """Gather each request's slot ids for positions ``[0, seq_len)`` from ``req_to_token``.

    Every forward runs this, so it never waits for the device: the lengths are host ints, they
    reach the device in one non-blocking copy (with ``indptr``), and the rows are gathered at
    offsets expanded by a ``repeat_interleave`` of host-known size (a boolean mask would be a
    ``nonzero``: a device read)."""
    lens = np.asarray([int(n) for n in seq_lens_cpu], dtype=np.int64)
    indptr_np = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    indptr_cpu = indptr_np.tolist()
    device = req_to_token.device
    batch, total = lens.size, int(indptr_np[-1])
    width = int(lens.max()) if batch else 0
    # one copy: indptr, then per request (its flat row offset minus its output offset, its length)
    host = np.concatenate([indptr_np, np.arange(batch, dtype=np.int64) * width - indptr_np[:-1], lens])
    dev = to_device(host, device)
    indptr = dev[: batch + 1]
    if total == 0:
        indices = torch.empty(0, dtype=torch.int64, device=device)
    else:
        rows = req_to_token[req_pool_indices.to(device=device, dtype=torch.int64), :width].reshape(-1)
        shift = torch.repeat_interleave(dev[batch + 1: 2 * batch + 1], dev[2 * batch + 1:], output_size=total)
        indices = rows[shift + torch.arange(total, device=device)].to(torch.int64)
    return RaggedKV(kv_indptr=indptr, kv_indices=indices, kv_indptr_cpu=indptr_cpu)


def per_head_lists(kv: RaggedKV, heads: int) -> RaggedKV:
    """``kv``'s per-request lists as one list per (request, KV head): list ``b * heads + h`` holds
    request ``b``'s rows as head-rows ``row * heads + h`` (head cells' layout, every head reading
    all of the request's slots). A fixed number of device ops and no device read: the segment
    table (per list, its source offset minus its output offset, its head) reaches the device in
    one copy with the lengths and is expanded by one ``repeat_interleave`` of host-known size."""
    if heads == 1 or kv.heads != 1:
        if kv.heads != heads and heads != 1:
            raise ValueError(f"lists per {kv.heads} heads cannot be read per {heads} heads")
        return kv
    cut = np.asarray(kv.kv_indptr_cpu, dtype=np.int64)
    lens = np.repeat(np.diff(cut), heads)  # list b * heads + h: request b's length
    out_start = np.concatenate([[0], np.cumsum(lens)])
    indptr_cpu = out_start.tolist()
    total = int(out_start[-1])
    device = kv.kv_indices.device
    n = lens.size
    host = np.concatenate([out_start, np.repeat(cut[:-1], heads) - out_start[:-1],
                           np.tile(np.arange(heads, dtype=np.int64), n // heads), lens])
    dev = to_device(host, device)
    indptr = dev[: n + 1]
    if total == 0:
        return RaggedKV(indptr, torch.empty(0, dtype=torch.int64, device=device), indptr_cpu, heads=heads)
    table = dev[n + 1: 3 * n + 1].view(2, n)
    expanded = torch.repeat_interleave(table, dev[3 * n + 1:], dim=1, output_size=total)
    rows = kv.kv_indices.to(torch.int64)[expanded[0] + torch.arange(total, device=device)]
    return RaggedKV(indptr, rows * heads + expanded[1], indptr_cpu, heads=heads)


def to_device(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A host array on ``device`` without waiting for the device: on CUDA through pinned memory and
    a non-blocking copy (a pageable copy would drain the stream: SGLang's overlap scheduler
    prepares the next batch while the GPU runs this one)."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def host_ints(cpu_value, device_value) -> list[int]:
    """Prefer SGLang's host copy of a per-request tensor; fall back to one device->host copy."""
    if cpu_value is not None:
        values = cpu_value.tolist() if isinstance(cpu_value, torch.Tensor) else list(cpu_value)
    else:
        values = device_value.tolist()
    return [int(x) for x in values]


def host_rows(forward_batch, check: bool = False, count: int | None = None) -> list[int]:
    """The batch's request rows as host ints: SGLang's host copy when the batch has one (extend;
    decode through the ``ForwardBatch.init_new`` hook), else one device read. ``check`` (debug
    checks) compares the copy with the device tensor."""
    cpu = getattr(forward_batch, "req_pool_indices_cpu", None)
    device = forward_batch.req_pool_indices[:count]
    if cpu is None or len(cpu) < device.numel():
        return device.tolist()
    rows = [int(x) for x in cpu[:device.numel()].tolist()]
    if check and rows != device.tolist():
        raise AssertionError(f"vlcache debug: req_pool_indices_cpu {rows} differs from the device rows "
                             f"{device.tolist()}")
    return rows


def decode_metadata(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                    seq_lens_cpu: list[int]) -> ForwardMetadata:
    """A decode step: one query row per request, over its positions ``[0, seq_len)``."""
    kv = build_ragged_kv(req_to_token, req_pool_indices, seq_lens_cpu)
    return ForwardMetadata(is_decode=True, kv=kv, qo_indptr_cpu=list(range(len(seq_lens_cpu) + 1)),
                           prefix_lens_cpu=[n - 1 for n in seq_lens_cpu])
