"""CUDA-graph decode for the ``vlcache`` backend: SGLang's capture/replay hooks over the executor's
fixed buffers.

SGLang's decode graph runner (0.5.23 contract) calls ``init_cuda_graph_state(max_bs, ...)`` once,
then per captured batch size ``init_forward_metadata_out_graph(fb, in_capture=True)`` before
capturing the model's forward, and before every replay ``init_forward_metadata_out_graph(view)``
with a padded view of the live batch (``num_padding`` trailing entries with request row 0, length
``get_cuda_graph_seq_len_fill_value()``, writing to slot 0; no ``rids``).

What a captured step may not do is change its kernels or their scalar arguments. So, in graph
mode, every layer of every step reads the *global* K/V storage (:mod:`cell_store`) through its
own fixed index buffers, through the plan-free Triton kernel with a split count fixed per captured
batch size (from the capacity, never the step's lengths); a replay only rewrites buffer contents:

* layers of an uncompressed batch read the batch's slots shifted by ``l * rows_per_layer``
  (one broadcast for all layers);
* a batch with a compressed request gets per-layer lists from the :class:`Compressor`, as in eager
  mode;
* padded entries read one key, the pool's reserved padding slot 0;
* head cells: every list is one per (request, KV head) of head-rows (the kernel's ``per_head``
  mode is what the graph holds), an uncompressed batch's slots expanded per head, padding one key
  per head.

The buffers hold ``capacity`` keys per layer: ``min(max_bs * context_len, pool rows)``. A layer's
list is never longer than the batch's ``seq_lens_sum`` (a compressed request reads its kept
tokens plus its tail, fewer than its length), so :func:`graph_fits` sends a batch whose
``seq_lens_sum`` (plus padding) exceeds it to the eager path (only heavy radix sharing, where
requests share slots, can do that). Prefill stays eager (``--cuda-graph-backend-prefill=disabled``).
"""
from __future__ import annotations

import numpy as np
import torch

from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV, decode_metadata, host_ints, host_rows, to_device

PADDING_SLOT = 0  # SGLang's allocator never hands out slot 0: padded tokens write (and here read) it
SEQ_LEN_FILL = 1


def graph_kv_capacity(max_bs: int, context_len: int, rows_per_layer: int) -> int:
    """Keys per layer the fixed buffers hold."""
    return max(1, min(max_bs * max(1, context_len), rows_per_layer))


def graph_fits(capacity: int, seq_lens_sum: int | None, max_bs: int) -> bool:
    """Whether a decode batch can replay a graph (its lists fit the buffers whatever the padding)."""
    return seq_lens_sum is not None and seq_lens_sum + max_bs * SEQ_LEN_FILL <= capacity


def pad_lists(lists: list[RaggedKV], rows: list[int], pad: int) -> list[RaggedKV]:
    """Each list plus ``pad`` entries of one key each, at global row ``rows[i]`` (a list of
    per-head lists, head cells: ``pad`` requests of one list per KV head, head ``h`` at head-row
    ``rows[i] * heads + h``), with one host-to-device copy for all of their ``indptr`` (not one
    per list)."""
    if pad == 0 or not lists:
        return lists
    device = lists[0].kv_indices.device
    indptr_cpu, fills = [], []
    for kv, row in zip(lists, rows):
        added = pad * kv.heads
        indptr_cpu.append(kv.kv_indptr_cpu + [kv.kv_indptr_cpu[-1] + i + 1 for i in range(added)])
        fills.append(np.tile(row * kv.heads + np.arange(kv.heads, dtype=np.int64), pad))
    widths = [len(p) for p in indptr_cpu]
    host = np.concatenate([np.asarray(p, dtype=np.int64) for p in indptr_cpu] + fills)
    dev = to_device(host, device)
    bounds = np.concatenate([[0], np.cumsum(widths + [f.size for f in fills])])
    parts = [dev[bounds[i]:bounds[i + 1]] for i in range(2 * len(lists))]
    # every padded list in one cat (a list's entries, then its padding): views of one tensor, so
    # the padding costs one device op for the step, not one per layer
    flat = torch.cat([t for i, kv in enumerate(lists) for t in (kv.kv_indices, parts[len(lists) + i])])
    starts = np.concatenate([[0], np.cumsum([kv.kv_indices.numel() + f.size for kv, f in zip(lists, fills)])])
    return [RaggedKV(parts[i], flat[starts[i]:starts[i + 1]], indptr_cpu[i], heads=kv.heads)
            for i, kv in enumerate(lists)]


def graph_decode_metadata(backend, forward_batch, in_capture: bool) -> ForwardMetadata:
    """The step's :class:`ForwardMetadata` in graph mode, loaded into the executor's buffers."""
    mode = forward_batch.forward_mode
    if not mode.is_decode_or_idle():
        raise NotImplementedError(f"vlcache: CUDA graphs are supported for decode only, not {mode}; "
                                  "launch with --cuda-graph-backend-prefill=disabled")
    bs = int(forward_batch.batch_size)
    pad = bs if in_capture else int(getattr(forward_batch, "num_padding", 0) or 0)
    real = bs - pad
    seq_lens = host_ints(forward_batch.seq_lens_cpu, forward_batch.seq_lens)[:real]
    rows = forward_batch.req_pool_indices[:real]
    meta = decode_metadata(backend.req_to_token_pool.req_to_token, rows, seq_lens)
    if real:
        backend.attach_layer_kv(meta, host_rows(forward_batch, backend.debug_checks, real), None,
                                getattr(forward_batch, "out_cache_loc", None))
    stride = backend.global_kv.rows_per_layer
    layers = list(meta.layer_kv)  # the batch's slots read the padding slot, each layer its own row of it
    pad_rows = [PADDING_SLOT] + [layer * stride + PADDING_SLOT for layer in layers]
    padded = pad_lists([meta.kv, *meta.layer_kv.values()], pad_rows, pad)
    meta.kv, meta.layer_kv = padded[0], dict(zip(layers, padded[1:]))
    meta.qo_indptr_cpu = list(range(bs + 1))
    meta.prefix_lens_cpu = meta.prefix_lens_cpu + [SEQ_LEN_FILL - 1] * pad
    meta.layer_row_stride, meta.graph = stride, True
    backend.executor.plan_decode(meta, *backend.graph_shapes)
    if not in_capture and backend.compressor is not None:
        counters = backend.compressor.counters
        counters.graph_decode_steps += 1
        counters.graph_decode_steps_compressed += bool(meta.layer_kv)
    return meta
