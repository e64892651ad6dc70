"""CUDA attention executor: FlashInfer paged wrappers (page size 1) over per-layer index lists.

Same interface as :class:`~vlcache_sglang.backend.executors.torch_executor.TorchAttentionExecutor`
(``extend`` / ``decode`` with ``(q, out, k_cache, v_cache, kv, meta, scaling, enable_gqa)``), so the
backend can swap one for the other. A page is one token: ``k_cache`` ``[rows, Hkv, D]`` is handed
to FlashInfer as ``[rows, 1, Hkv, D]`` (NHD) and ``kv.kv_indices`` are the page ids.

Planning. A FlashInfer plan depends on the batch's lengths (``kv_indptr``), not on which pages
the requests read. So layers whose lists have equal lengths share one plan: per forward, the
executor groups the :class:`RaggedKV` lists it is called with by ``kv_indptr`` and plans each group
once, on the group's first layer; for a later layer of the same group it only copies that layer's
indices into the group's index buffer (a device copy of ``n`` int32) before running. With nothing
compressed every layer reads ``meta.kv`` and the whole forward costs one plan; with VL-Cache's
per-layer budgets the lengths differ per layer and it costs up to one plan per layer.
``plan_count`` / ``plan_seconds`` count the host time spent in ``plan`` (the GPU suite reports it
per decode step).

CUDA graphs. ``FlashInferAttentionExecutor(cuda_graph=True, max_batch_size=..., max_kv_tokens=...,
num_layers=...)`` (or :meth:`enable_cuda_graph` later) keeps fixed per-layer buffers; call
:meth:`plan_decode` outside the graph (before capture and before every replay), then ``decode``
with that same ``meta`` inside it does no planning, no allocation and no host synchronisation
(a ``decode`` with any other ``meta`` runs eagerly, so one executor serves both). In that mode layer
``l`` reads ``meta.layer_kv[l]`` (or ``meta.kv`` shifted by ``l * meta.layer_row_stride``) through
its own rows of the executor's
:class:`~vlcache_sglang.backend.executors.graph_buffers.GraphDecodeBuffers`, so pass ``layer_id=``
to ``decode`` (otherwise the i-th call after :meth:`plan_decode` is taken as layer i), and give
every layer the same ``k_cache`` tensor in capture and replay (the global K/V storage with global
row ids). Which kernel the graph holds is
fixed at construction, never per step (a captured graph replays what it captured): the plan-free
Triton kernel with ``compressed_decode="triton"``, FlashInfer wrappers planned per layer and per
replay otherwise.

Compressed decode without plans. ``compressed_decode="triton"`` (the default; launching
with ``VLCACHE_COMPRESSED_DECODE=flashinfer``, :attr:`ServerSettings.compressed_decode`, restores
per-layer plans) runs decode steps that carry
per-layer lists (``meta.layer_kv``, i.e. some request in the batch is compressed) through
:func:`vlcache_sglang.kernels.ragged_decode.ragged_decode`, a split-KV Triton kernel that reads each
request's range from the device ``kv_indptr`` and so needs no plan at all. Measured on an H200
(``benchmarks/gpu_suite.py``): one FlashInfer plan costs 80-160 us of host time, i.e. 2.2-4.5 ms
per 28-layer step when every layer has its own lengths, more than the step's attention; through
this kernel a compressed step's attention took 1.9-2.0 ms against 4.2-4.9 ms (eager, batch 1-32).
Uncompressed steps keep FlashInfer (one plan per step).

fp8 KV: ``k_cache``/``v_cache`` are fp8 views of SGLang's ``uint8`` storage (never the bytes), so
plans carry the fp8 ``kv_data_type``; the layer's ``k_scale``/``v_scale`` go to FlashInfer's ``run``
as SGLang's FlashInfer backend passes them, and to the Triton kernel.

``flashinfer`` is imported on first use only: importing this module needs neither flashinfer nor
SGLang (nor CUDA).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from vlcache_sglang.backend.executors.graph_buffers import GraphDecodeBuffers
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV
from vlcache_sglang.kernels.launch_configs import DecodeLaunch

__all__ = ["FlashInferAttentionExecutor", "flashinfer_available"]

_WORKSPACE_BYTES = 256 * 1024 * 1024
# FlashInfer's FA2 kernels for both wrappers, as SGLang's own FlashInfer backend does
# (`prefill_backend = decode_backend = "fa2"`): "auto" would pick FA3 on Hopper for prefill, a
# second (and much slower to compile) kernel family for the same page-size-1 layout.
_BACKEND = "fa2"


def _import_flashinfer():
    try:
        import flashinfer  # noqa: F401
        from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper
        from flashinfer.prefill import BatchPrefillWithPagedKVCacheWrapper
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "FlashInferAttentionExecutor needs the `flashinfer-python` package (and CUDA); "
            "see docs/gpu-suite.md for an offline install"
        ) from exc
    return BatchDecodeWithPagedKVCacheWrapper, BatchPrefillWithPagedKVCacheWrapper


def flashinfer_available() -> bool:
    """CUDA present and ``flashinfer`` importable."""
    if not torch.cuda.is_available():
        return False
    try:
        _import_flashinfer()
    except RuntimeError:
        return False
    return True


def _scales(k_scale, v_scale) -> dict:
    """FlashInfer ``run`` keywords for the layer's KV scales (none when there are none)."""
    out = {}
    if k_scale is not None:
        out["k_scale"] = k_scale
    if v_scale is not None:
        out["v_scale"] = v_scale
    return out


PER_HEAD_GRAPHS = ("vlcache: per-(layer, KV head) lists (--vlcache-cells head) need decode CUDA graphs "
                   "enabled for them (enable_cuda_graph(..., list_heads=KV heads)): a captured step's kernel "
                   "reads one kind of list")


class _Slot:
    """One plan: a wrapper and the index buffers it reads."""

    def __init__(self, device: torch.device, capacity_bs: int, capacity_tokens: int) -> None:
        self.device = device
        self.wrappers: dict[Any, Any] = {}
        self.indices = torch.empty(max(capacity_tokens, 1), dtype=torch.int32, device=device)
        self.indptr = torch.zeros(capacity_bs + 1, dtype=torch.int32, device=device)
        self.last_page_len = torch.ones(max(capacity_bs, 1), dtype=torch.int32, device=device)
        self.qo_indptr = torch.zeros(capacity_bs + 1, dtype=torch.int32, device=device)
        self.key: tuple | None = None  # what the current plan was made for
        self.holder: RaggedKV | None = None  # whose indices are in self.indices now
        self.wrapper = None  # wrapper of the current plan

    def fit(self, bs: int, tokens: int) -> None:
        if tokens > self.indices.numel():
            self.indices = torch.empty(max(tokens, 2 * self.indices.numel()), dtype=torch.int32, device=self.device)
            self.key, self.holder = None, None
        if bs + 1 > self.indptr.numel():
            n = max(bs, 2 * (self.indptr.numel() - 1))
            self.indptr = torch.zeros(n + 1, dtype=torch.int32, device=self.device)
            self.qo_indptr = torch.zeros(n + 1, dtype=torch.int32, device=self.device)
            self.last_page_len = torch.ones(n, dtype=torch.int32, device=self.device)
            self.key, self.holder = None, None


class FlashInferAttentionExecutor:
    """Extend (causal, ragged prefix) and decode attention over ragged page-size-1 lists.

    Per-(request, KV head) lists (head cells): FlashInfer has no per-head page table, so decode
    runs the plan-free Triton kernel's ``per_head`` mode, and an extend over such lists (a decoding
    row mixed into an extend batch) the torch executor. Decode CUDA graphs read them when enabled
    with ``list_heads`` = the KV heads (every captured step then reads per-head lists, plain
    requests' slots expanded per head)."""

    per_head_lists = True

    def __init__(self, device: torch.device | str | None = None, *, workspace_bytes: int = _WORKSPACE_BYTES,
                 use_tensor_cores: bool | None = None, cuda_graph: bool = False,
                 max_batch_size: int | None = None, max_kv_tokens: int | None = None,
                 num_layers: int | None = None, compressed_decode: str | None = None,
                 decode_launch: DecodeLaunch | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        # the plan-free decode's block, splits, warps, stages (kernels/launch_configs.py)
        self.decode_launch = (decode_launch or DecodeLaunch()).check()
        self.compressed_decode = compressed_decode or "triton"
        if self.compressed_decode not in ("triton", "flashinfer"):
            raise ValueError(f"compressed_decode must be 'triton' or 'flashinfer', not {self.compressed_decode!r}")
        self._graph_triton = self.compressed_decode == "triton"  # fixed: what a captured graph holds
        self._graph_meta: ForwardMetadata | None = None  # the meta of the last plan_decode
        self._graph_splits = 1  # the split count and workspace of the last planned graph batch
        self._graph_ws: tuple[torch.Tensor, torch.Tensor] | None = None
        self.graph_buffers: GraphDecodeBuffers | None = None  # cuda_graph mode's fixed buffers
        # eager steps' fused-merge counters, zero between launches (the kernel leaves them so)
        self._eager_counters: torch.Tensor | None = None
        self.graph_list_heads = 1  # > 1: graph steps read per-(request, KV head) lists (head cells)
        self.workspace_bytes = workspace_bytes
        self.use_tensor_cores = use_tensor_cores
        self.cuda_graph = False
        self.max_batch_size = self.max_kv_tokens = self.num_layers = None
        if cuda_graph:
            if max_batch_size is None or max_kv_tokens is None or num_layers is None:
                raise ValueError("cuda_graph=True needs max_batch_size, max_kv_tokens and num_layers (fixed buffers)")
            self.enable_cuda_graph(max_batch_size, max_kv_tokens, num_layers)
        self._workspace: torch.Tensor | None = None
        self._classes = None
        # eager mode: slots reused across forwards; the current forward's grouping
        self._free: dict[str, list[_Slot]] = {"decode": [], "prefill": []}
        self._meta: ForwardMetadata | None = None
        self._groups: dict[tuple, _Slot] = {}
        self._by_kv: dict[int, _Slot] = {}
        # graph mode: one slot per layer
        self._graph_slots: list[_Slot] = []
        self._graph_bs = 0
        self._graph_calls = 0
        self.plan_count = 0
        self.plan_seconds = 0.0

    # -- public interface -----------------------------------------------------------------------
    def enable_cuda_graph(self, max_batch_size: int, max_kv_tokens: int, num_layers: int,
                          list_heads: int = 1) -> None:
        """Switch on CUDA-graph mode: fixed buffers for up to ``max_batch_size`` requests reading up
        to ``max_kv_tokens`` keys per layer (allocated on the first :meth:`plan_decode`).
        ``list_heads`` > 1 (head cells, the rank's KV heads): every step reads one list per
        (request, KV head) of head-rows, so each layer's buffers hold ``list_heads`` times as much."""
        buffers = GraphDecodeBuffers(max_batch_size, max_kv_tokens, num_layers, list_heads, self.decode_launch)
        if list_heads > 1 and not self._graph_triton:
            raise NotImplementedError("per-head lists in CUDA graphs need the plan-free Triton decode")
        self.cuda_graph = True
        self.max_batch_size, self.max_kv_tokens, self.num_layers = max_batch_size, max_kv_tokens, num_layers
        self.graph_list_heads, self.graph_buffers = list_heads, buffers
        self._graph_slots, self._graph_ws, self._graph_meta = [], None, None

    def extend(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv: RaggedKV, meta: ForwardMetadata, scaling: float, enable_gqa: bool,
               k_scale: float | None = None, v_scale: float | None = None) -> torch.Tensor:
        """q/out: ``[tokens, Hq, D]``; request ``b``'s rows are the last ``qo_len`` of its list (causal)."""
        if kv.per_head:
            from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor

            return TorchAttentionExecutor().extend(q, out, k_cache, v_cache, kv, meta, scaling, enable_gqa,
                                                   k_scale=k_scale, v_scale=v_scale)
        slot = self._eager_slot("prefill", q, k_cache, kv, meta, scaling)
        self._load_indices(slot, kv)
        slot.wrapper.run(q.contiguous(), self._paged(k_cache, v_cache), out=out, **_scales(k_scale, v_scale))
        return out

    def decode(self, q: torch.Tensor, out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               kv: RaggedKV, meta: ForwardMetadata, scaling: float, enable_gqa: bool,
               layer_id: int | None = None, k_scale: float | None = None,
               v_scale: float | None = None) -> torch.Tensor:
        """One query row per request over that request's list in ``kv``."""
        if self.cuda_graph and meta is self._graph_meta:
            layer = self._graph_calls if layer_id is None else layer_id
            self._graph_calls += 1
            slot = self._graph_slots[layer]
            if self._graph_triton:
                heads = self.graph_list_heads
                return self._ragged(q, out, k_cache, v_cache, slot.indptr[: self._graph_bs * heads + 1],
                                    slot.indices, scaling, splits=self._graph_splits, workspace=self._graph_ws,
                                    k_scale=k_scale, v_scale=v_scale, per_head=heads > 1, graph=True)
            wrapper = slot.wrappers[self._graph_bs]
        elif kv.per_head:
            lens = kv.kv_indptr_cpu
            return self._ragged(q, out, k_cache, v_cache, kv.kv_indptr, kv.kv_indices, scaling,
                                max_len=max(b - a for a, b in zip(lens, lens[1:])), k_scale=k_scale,
                                v_scale=v_scale, per_head=True)
        elif meta.layer_kv and self.compressed_decode == "triton":
            lens = kv.kv_indptr_cpu
            return self._ragged(q, out, k_cache, v_cache, kv.kv_indptr, kv.kv_indices, scaling,
                                max_len=max(b - a for a, b in zip(lens, lens[1:])), k_scale=k_scale, v_scale=v_scale)
        else:
            slot = self._eager_slot("decode", q, k_cache, kv, meta, scaling)
            self._load_indices(slot, kv)
            wrapper = slot.wrapper
        wrapper.run(q.contiguous(), self._paged(k_cache, v_cache), out=out, **_scales(k_scale, v_scale))
        return out

    def plan_decode(self, meta: ForwardMetadata, num_q_heads: int, num_kv_heads: int, head_dim: int,
                    q_dtype: torch.dtype, kv_dtype: torch.dtype, scaling: float) -> None:
        """CUDA-graph mode: load every layer's lists for this batch into the fixed buffers (and, for
        FlashInfer, plan each layer); call outside the graph. ``decode`` with this ``meta`` then
        reads them."""
        if not self.cuda_graph:
            raise RuntimeError("plan_decode is for cuda_graph=True; eager executors plan on first use")
        heads = self.graph_list_heads
        if any(kv.heads != heads for kv in meta.layer_kv.values()):
            raise NotImplementedError(PER_HEAD_GRAPHS if heads == 1 else
                                      f"a graph step of per-head lists needs every layer's list per {heads} KV heads")
        bs = meta.batch_size
        if bs > self.max_batch_size:
            raise ValueError(f"batch of {bs} exceeds max_batch_size={self.max_batch_size}")
        device = meta.kv.kv_indices.device
        self.device = self.device or device
        buffers = self.graph_buffers
        buffers.allocate(device, num_kv_heads)  # here, outside any capture; every size's graph shares them
        if not self._graph_slots:
            self._graph_slots = self._new_graph_slots(device)
        lists = buffers.load(meta, bs)
        self._graph_bs, self._graph_calls, self._graph_meta = bs, 0, meta
        if self._graph_triton:
            # no plan: per captured batch size a fixed split count (from the capacity) and a fixed
            # workspace view keep its captured launches valid for any lengths
            self._graph_splits, self._graph_ws = buffers.split_workspace(bs, num_q_heads, num_kv_heads, head_dim,
                                                                         device)
            return
        Decode, _ = self._wrapper_classes()
        tc = self._tensor_cores(num_q_heads, num_kv_heads)
        for layer, slot in enumerate(self._graph_slots):
            indptr_cpu, n = lists[layer]
            w = slot.wrappers.get(bs)
            if w is None:
                w = slot.wrappers[bs] = Decode(
                    self._workspace_for(device), "NHD", use_cuda_graph=True, use_tensor_cores=tc,
                    paged_kv_indptr_buffer=slot.indptr[: bs + 1], paged_kv_indices_buffer=slot.indices,
                    paged_kv_last_page_len_buffer=slot.last_page_len[:bs], backend=_BACKEND)
            t0 = time.perf_counter()
            w.plan(torch.tensor(indptr_cpu, dtype=torch.int32), slot.indices[:n],
                   torch.ones(bs, dtype=torch.int32), num_q_heads, num_kv_heads, head_dim, 1,
                   q_data_type=q_dtype, kv_data_type=kv_dtype, sm_scale=scaling)
            self.plan_seconds += time.perf_counter() - t0
            self.plan_count += 1

    def _new_graph_slots(self, device: torch.device) -> list[_Slot]:
        """One slot per layer, whose index/indptr buffers are the layer's rows of the graph buffers."""
        slots = []
        for layer in range(self.num_layers):
            slot = _Slot(device, self.max_batch_size, 0)
            slot.indices, slot.indptr = self.graph_buffers.layer_rows(layer)
            slots.append(slot)
        return slots

    def reset_counters(self) -> None:
        self.plan_count, self.plan_seconds = 0, 0.0

    # -- internals ------------------------------------------------------------------------------
    def _ragged(self, q, out, k_cache, v_cache, indptr, indices, scaling, *, splits=None, max_len=None,
                workspace=None, k_scale=None, v_scale=None, per_head=False, graph=False):
        from vlcache_sglang.kernels.ragged_decode import num_splits_for, ragged_decode

        launch = self.decode_launch
        if splits is None:
            splits = num_splits_for(max_len, q.shape[0], k_cache.shape[1], q.device, **launch.split_choice())
        counters = None
        if launch.fused_merge:  # graph: plan_decode's (largest captured batch), allocated before any capture
            counters = (self.graph_buffers.counters if graph
                        else self._fused_counters(q.shape[0] * k_cache.shape[1], q.device))
        return ragged_decode(q, k_cache, v_cache, indptr, indices, scaling, out=out, num_splits=splits,
                             workspace=workspace, k_scale=k_scale, v_scale=v_scale, per_head=per_head,
                             block_n=launch.block_n, num_warps=launch.num_warps, num_stages=launch.num_stages,
                             fused_merge=launch.fused_merge, counters=counters)

    def _fused_counters(self, rows: int, device: torch.device) -> torch.Tensor:
        """Eager steps' zeroed int32 counters, at least ``rows`` of them, kept (the kernel leaves them zero)."""
        have = self._eager_counters
        if have is None or have.numel() < rows or have.device != device:
            have = self._eager_counters = torch.zeros(max(rows, 64), dtype=torch.int32, device=device)
        return have

    @property
    def merge_counters(self) -> list[torch.Tensor]:
        """Every fused-merge counter buffer allocated so far (eager, graph): all zero between steps."""
        graph = self.graph_buffers.counters if self.graph_buffers is not None else None
        return [c for c in (self._eager_counters, graph) if c is not None]

    @staticmethod
    def _paged(k_cache: torch.Tensor, v_cache: torch.Tensor):
        return k_cache.unsqueeze(1), v_cache.unsqueeze(1)  # [pages, page_size=1, Hkv, D] (NHD)

    def _wrapper_classes(self):
        if self._classes is None:
            self._classes = _import_flashinfer()
        return self._classes

    def _workspace_for(self, device: torch.device) -> torch.Tensor:
        if self._workspace is None:
            # one float workspace shared by every wrapper: runs are sequential on one stream
            self._workspace = torch.zeros(self.workspace_bytes, dtype=torch.uint8, device=device)
        return self._workspace

    def _tensor_cores(self, hq: int, hkv: int) -> bool:
        if self.use_tensor_cores is not None:
            return self.use_tensor_cores
        return hq // hkv >= 4

    def _new_forward(self, meta: ForwardMetadata) -> None:
        for (kind, *_), slot in self._groups.items():
            self._free[kind].append(slot)
        self._groups, self._by_kv = {}, {}
        self._meta = meta

    def _eager_slot(self, kind: str, q: torch.Tensor, k_cache: torch.Tensor, kv: RaggedKV,
                    meta: ForwardMetadata, scaling: float) -> _Slot:
        if meta is not self._meta:
            self._new_forward(meta)
        slot = self._by_kv.get(id(kv))
        if slot is not None:
            return slot
        hq, hkv, d = q.shape[1], k_cache.shape[1], q.shape[2]
        sig = (hq, hkv, d, k_cache.shape[-1], q.dtype, k_cache.dtype, float(scaling))
        indptr = tuple(kv.kv_indptr_cpu)
        qo = tuple(meta.qo_indptr_cpu) if kind == "prefill" else None
        key = (kind, indptr, qo, sig)
        slot = self._groups.get(key)
        if slot is None:
            slot = self._plan_slot(kind, key, q, k_cache, kv, meta, scaling)
            self._groups[key] = slot
        self._by_kv[id(kv)] = slot
        return slot

    def _plan_slot(self, kind, key, q, k_cache, kv: RaggedKV, meta: ForwardMetadata, scaling) -> _Slot:
        device = q.device
        bs = len(kv.kv_indptr_cpu) - 1
        n = kv.kv_indptr_cpu[-1]
        free = self._free[kind]
        slot = free.pop() if free else _Slot(device, max(bs, 8), max(n, 1024))
        slot.fit(bs, n)
        Decode, Prefill = self._wrapper_classes()
        hq, hkv, d = q.shape[1], k_cache.shape[1], q.shape[2]
        tc = self._tensor_cores(hq, hkv)
        wkey = (kind, tc)
        w = slot.wrappers.get(wkey)
        if w is None:
            ws = self._workspace_for(device)
            w = (Decode(ws, "NHD", use_tensor_cores=tc, backend=_BACKEND) if kind == "decode"
                 else Prefill(ws, "NHD", backend=_BACKEND))
            slot.wrappers[wkey] = w
        slot.indices[:n].copy_(kv.kv_indices)
        slot.holder = kv
        indptr = torch.tensor(kv.kv_indptr_cpu, dtype=torch.int32)
        last = torch.ones(bs, dtype=torch.int32)
        t0 = time.perf_counter()
        if kind == "decode":
            w.plan(indptr, slot.indices[:n], last, hq, hkv, d, 1,
                   q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scaling)
        else:
            qo = torch.tensor(meta.qo_indptr_cpu, dtype=torch.int32)
            w.plan(qo, indptr, slot.indices[:n], last, hq, hkv, d, 1, causal=True,
                   q_data_type=q.dtype, kv_data_type=k_cache.dtype, sm_scale=scaling)
        self.plan_seconds += time.perf_counter() - t0
        self.plan_count += 1
        slot.key, slot.wrapper = key, w
        return slot

    @staticmethod
    def _load_indices(slot: _Slot, kv: RaggedKV) -> None:
        """Put this layer's indices where the group's plan reads them (skip if already there)."""
        if slot.holder is kv:
            return
        n = kv.kv_indptr_cpu[-1]
        slot.indices[:n].copy_(kv.kv_indices)
        slot.holder = kv
