"""The ``vlcache`` attention backend: thin SGLang glue around a device executor.

SGLang calls ``init_forward_metadata`` once per forward and ``forward_extend`` /
``forward_decode`` once per layer. This class translates SGLang's batch into
:class:`ForwardMetadata` (ragged slot lists, FlashInfer's layout), writes new K/V into the pool,
feeds prefill statistics to the :class:`Compressor` and, in decode, points each layer at its own
kept list. The attention math lives in an executor; what to keep lives in the pure-PyTorch policy.
With budget 1.0 (or a request the policy leaves alone) nothing differs from ``torch_native``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool

from vlcache_sglang.backend.cell_store import FP8_DTYPES, rehome_pool_buffers
from vlcache_sglang.backend.compressor import Compressor, HeadLists
from vlcache_sglang.backend.cuda_graph import SEQ_LEN_FILL, graph_decode_metadata, graph_fits, graph_kv_capacity
from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor
from vlcache_sglang.backend.metadata import ForwardMetadata, build_ragged_kv, decode_metadata, host_ints, host_rows
from vlcache_sglang.backend.runtime import Runtime, attach
from vlcache_sglang.backend.tensor_parallel import StatsGather, attention_tp_group
from vlcache_sglang.kernels.launch_configs import KernelLaunches, launches_for
from vlcache_sglang.settings import ServerSettings, SettingsError, settings_of

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def check_pool_class(pool) -> None:
    """Compaction moves per-slot K/V rows of SGLang's plain MHA/GQA pool; any other pool (MLA,
    hybrid sliding-window or linear attention, the page-major layout, block-scaled fp4/mxfp8)
    would be read or moved wrongly, so the backend stops naming it instead."""
    if type(pool) is not MHATokenToKVPool:
        raise ValueError(
            f"--attention-backend vlcache serves models whose KV pool is SGLang's MHATokenToKVPool "
            f"(multi-head or grouped-query attention, one K and V row per token and layer); this "
            f"launch built {type(pool).__name__}. Serve this model with another --attention-backend, or "
            f"drop the flag that chose this pool (--enable-page-major-kv-layout, --kv-cache-dtype "
            f"mxfp8/nvfp4/fp4_mx_block16)")


class VLCacheAttnBackend(AttentionBackend):
    """Attention over per-layer ragged KV selections (CPU: torch SDPA executor)."""

    def __init__(self, model_runner: ModelRunner, executor: TorchAttentionExecutor | None = None,
                 settings: ServerSettings | None = None, launches: KernelLaunches | None = None):
        super().__init__()
        # the Triton kernels' launch options (per GPU model; :mod:`vlcache_sglang.kernels.launch_configs`)
        self.kernel_launches = launches or KernelLaunches()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.executor = executor or TorchAttentionExecutor()
        self.settings = settings or ServerSettings()
        self.forward_metadata: ForwardMetadata | None = None
        self.compressor: Compressor | None = None
        self.runtime: Runtime | None = None
        self._staged: tuple[tuple, list] | None = None  # (rids, RequestInfo list) of the next extend
        self.freed_reads = 0  # debug checks: forwards that would read a freed slot or virtual id
        self.debug_checks = self.settings.debug_checks
        allocator = self.allocator = getattr(model_runner, "token_to_kv_pool_allocator", None)
        self.graph_capacity: int | None = None  # keys per layer of the CUDA-graph buffers (init_cuda_graph_state)
        model_config = self.model_config = getattr(model_runner, "model_config", None)
        if allocator is not None and model_config is not None:
            check_pool_class(self.token_to_kv_pool)
            self.global_kv = rehome_pool_buffers(self.token_to_kv_pool)
            group = attention_tp_group()  # SGLang's attention TP group (None with one rank)
            tp = int(group.world_size) if group is not None else 1
            self.compressor = Compressor(
                self.global_kv, self.req_to_token_pool.req_to_token, allocator,
                num_q_heads=model_config.num_attention_heads // tp,
                num_kv_heads=max(1, model_config.get_num_kv_heads(tp)), debug_checks=self.debug_checks,
                gather=StatsGather(group), virtual_ids_per_slot=self.settings.virtual_ids_per_slot,
                metrics=self.settings.metrics, kernels=self.settings.kernels, cells=self.settings.cells,
                stats_launch=self.kernel_launches.stats,
            )
            check_head_cells(self.settings.cells, model_config, tp, self.compressor.num_kv_heads, self.executor)
            head_dim = self.global_kv.k.shape[-1]
            # what the executor's graph buffers are sized by (q heads, KV heads, head dim, dtypes, scale)
            self.graph_shapes = (self.compressor.num_q_heads, self.compressor.num_kv_heads, head_dim,
                                 getattr(model_runner, "dtype", self.global_kv.k.dtype), self.global_kv.k.dtype,
                                 head_dim ** -0.5)
            # the process's runtime, reachable from the allocator (scheduler, radix tree, batches)
            # and the model (vision-encoder hooks)
            self.runtime = attach(Runtime(self.settings, self), allocator, getattr(model_runner, "model", None))
            logger.info("vlcache backend: %s; kernel launches: %s", self.settings.describe(),
                        self.kernel_launches.describe())

    # -- metadata -------------------------------------------------------------------------
    def stage_request_info(self, rids, infos) -> None:
        """Per-request info for the next extend forward (from the ForwardBatch.init_new hook).

        Kept here, keyed by the batch's rids, because SGLang may run the forward on a
        ``dataclasses.replace`` copy of the ForwardBatch, which drops foreign attributes."""
        self._staged = (tuple(rids), infos) if rids is not None and infos is not None else None

    def _take_request_info(self, forward_batch) -> list | None:
        staged, self._staged = self._staged, None
        rids = getattr(forward_batch, "rids", None)
        if staged is None or rids is None or tuple(rids) != staged[0]:
            return None
        return staged[1]

    def init_forward_metadata(self, forward_batch: ForwardBatch):
        seq_lens_cpu = host_ints(forward_batch.seq_lens_cpu, forward_batch.seq_lens)
        req_to_token = self.req_to_token_pool.req_to_token
        if forward_batch.forward_mode.is_decode_or_idle():
            meta = decode_metadata(req_to_token, forward_batch.req_pool_indices, seq_lens_cpu)
            self._attach_layer_kv(meta, forward_batch)
            self.forward_metadata = meta
            return
        kv = build_ragged_kv(req_to_token, forward_batch.req_pool_indices, seq_lens_cpu)
        extend_lens = host_ints(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)
        prefix_lens = host_ints(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens)
        qo = [0]
        for n in extend_lens:
            qo.append(qo[-1] + n)
        meta = ForwardMetadata(is_decode=False, kv=kv, qo_indptr_cpu=qo, prefix_lens_cpu=prefix_lens,
                               requests=self._take_request_info(forward_batch))
        self._attach_layer_kv(meta, forward_batch)
        self.forward_metadata = meta

    def _attach_layer_kv(self, meta: ForwardMetadata, forward_batch) -> None:
        self.attach_layer_kv(meta, host_rows(forward_batch, self.debug_checks), getattr(forward_batch, "rids", None),
                             forward_batch.out_cache_loc)

    def attach_layer_kv(self, meta: ForwardMetadata, req_pool_indices: list[int], rids, out_cache_loc) -> None:
        """Per-layer key lists when a request is compacted or reads a compressed cached prefix."""
        if self.compressor is None:
            return
        meta.layer_kv, meta.layer_positions = self.compressor.layer_lists.build(meta, req_pool_indices, rids)
        if self.debug_checks:
            self._check_reads(meta, out_cache_loc, rids)

    def _check_reads(self, meta: ForwardMetadata, out_cache_loc, rids) -> None:
        """Debug (:attr:`ServerSettings.debug_checks`): count forwards whose key lists touch a slot the
        allocator holds as free or a virtual id that was released."""
        from vlcache_sglang.backend.virtual_kv import FREE

        vkv = self.compressor.vkv
        free = self.allocator.get_all_free_pages()
        new = out_cache_loc.to(torch.int64) if out_cache_loc is not None else None
        ids = meta.kv.kv_indices
        bad = False
        virtual = ids[ids > vkv.base]
        if virtual.numel() and bool((vkv.state[(virtual - vkv.base).cpu()] == FREE).any()):
            bad = True
        read = [ids[ids < vkv.base]]
        read += [vkv.slot_of(kv.kv_indices) for kv in meta.layer_kv.values()]
        read = torch.cat(read)
        if new is not None and new.numel():  # this forward's own new tokens are allocated
            read = read[~torch.isin(read, new)]
        if free is not None and read.numel() and bool(torch.isin(read, free.to(read.device)).any()):
            bad = True
        if bad:
            self.freed_reads += 1
            logger.error("vlcache debug: a forward reads freed KV (rids %s)", rids)

    # -- attention ------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=False)

    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=True)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool, decode: bool):
        if layer.is_cross_attention:
            raise NotImplementedError("vlcache: cross-attention layers are not supported")
        lid = layer.layer_id
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        out = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        k_scale, v_scale = fp8_kv_scales(self.token_to_kv_pool, layer)
        scales = {} if k_scale is None and v_scale is None else {"k_scale": k_scale, "v_scale": v_scale}
        if save_kv_cache and k is not None and v is not None:
            if scales:  # SGLang's set_kv_buffer divides by the scales in place
                k, v = k.clone(), v.clone()
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v,
                                                k_scale, v_scale)
        meta = self.forward_metadata
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        if meta.graph:  # every layer reads the global storage through the executor's fixed buffers
            self.executor.decode(q3, out.view(-1, layer.tp_q_head_num, layer.v_head_dim), self.global_kv.k,
                                 self.global_kv.v, meta.kv, meta, layer.scaling,
                                 layer.tp_q_head_num != layer.tp_k_head_num, layer_id=lid, **scales)
            return out
        layer_k = self.token_to_kv_pool.get_key_buffer(lid)
        if lid in meta.layer_kv:
            # global rows of [L * R, H, D] (head cells: per-head lists of head-rows into the same storage)
            k_cache, v_cache, kv = self.global_kv.k, self.global_kv.v, meta.layer_kv[lid]
        else:
            k_cache, v_cache, kv = layer_k, self.token_to_kv_pool.get_value_buffer(lid), meta.kv
        run = self.executor.decode if decode else self.executor.extend
        run(q3, out.view(-1, layer.tp_q_head_num, layer.v_head_dim), k_cache, v_cache, kv, meta,
            layer.scaling, layer.tp_q_head_num != layer.tp_k_head_num, **scales)
        infos = meta.requests
        if not decode and infos and self.compressor is not None:
            positions, head_lists = meta.layer_positions.get(lid), None
            if kv.heads > 1:  # head cells: statistics read plain rows, or per head a prefix compressed per head
                head_lists = HeadLists(k_cache.view(-1, 1, k_cache.shape[-1]), kv, positions or [])
                k_cache, kv, positions = layer_k, meta.kv, None
            # fp8 keys are read as stored; their k_scale folds into the softmax scale
            self.compressor.observe_extend(lid, q3, k_cache, kv, positions, meta, infos,
                                           layer.scaling * (k_scale or 1.0), head_lists=head_lists)
        return out

    def support_triton(self):
        return False

    # -- CUDA graphs (decode) -------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        """Fixed per-layer buffers for decode graphs (:mod:`vlcache_sglang.backend.cuda_graph`)."""
        enable = getattr(self.executor, "enable_cuda_graph", None)
        if enable is None or self.compressor is None:
            raise NotImplementedError(f"vlcache: {type(self.executor).__name__} has no CUDA-graph mode")
        if getattr(self.executor, "compressed_decode", "triton") != "triton":
            raise NotImplementedError(
                "vlcache: CUDA graphs need the plan-free Triton decode (VLCACHE_COMPRESSED_DECODE=triton); "
                f"per-layer FlashInfer plans would cost milliseconds per replay. Or launch with {CUDA_GRAPH_FLAGS}")
        context_len = int(getattr(self.model_config, "context_len", 0) or self.req_to_token_pool.req_to_token.shape[1])
        self.graph_capacity = graph_kv_capacity(max_bs, context_len, self.global_kv.rows_per_layer)
        self.graph_max_bs = max_bs
        # head cells: every graph step reads one list per (request, KV head) of head-rows
        heads = self.compressor.heads_per_unit
        enable(max_bs, self.graph_capacity, self.global_kv.num_layers, list_heads=heads)
        logger.info("vlcache: decode CUDA graphs up to batch %d, %d keys per layer%s", max_bs, self.graph_capacity,
                    f" and KV head ({heads} heads)" if heads > 1 else "")

    def get_cuda_graph_seq_len_fill_value(self):
        return SEQ_LEN_FILL

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False):
        """Capture and replay: load the step's per-layer lists into the executor's fixed buffers."""
        self.forward_metadata = graph_decode_metadata(self, forward_batch, in_capture)

    def graph_can_run(self, forward_batch) -> bool:
        """Whether the batch's lists fit the graph buffers (else SGLang runs it eagerly)."""
        return self.graph_capacity is not None and graph_fits(self.graph_capacity, forward_batch.seq_lens_sum,
                                                              self.graph_max_bs)


def fp8_kv_scales(pool, layer) -> tuple[float | None, float | None]:
    """The layer's K/V scales when the pool stores fp8 and they are not 1 (else None): written
    divided by them and read multiplied, as SGLang's FlashInfer and Triton backends do."""
    if getattr(pool, "dtype", None) not in FP8_DTYPES:
        return None, None
    out = []
    for name in ("k_scale", "v_scale"):
        value = getattr(layer, f"{name}_float", None)
        if value is None and getattr(layer, name, None) is not None:
            value = float(getattr(layer, name))
        out.append(None if value is None or value == 1.0 else float(value))
    return out[0], out[1]


def check_head_cells(cells: str, model_config, tp: int, local_kv_heads: int, executor) -> None:
    """Head cells need an executor that reads per-(request, KV head) lists and each rank to hold
    its own KV heads (no replicated heads under TP)."""
    if cells != "head":
        return
    if not getattr(executor, "per_head_lists", False):
        raise SettingsError(f"--vlcache-cells head: the {type(executor).__name__} attention executor does not "
                            "read per-(layer, KV head) lists; use --vlcache-cells layer")
    total = int(model_config.get_total_num_kv_heads())
    if local_kv_heads * tp != total:
        raise SettingsError(f"--vlcache-cells head: {total} KV heads over --tp-size {tp} replicates heads across "
                            f"ranks; use --vlcache-cells layer or a --tp-size that divides {total}")


CUDA_GRAPH_FLAGS = "--cuda-graph-backend-decode=disabled --cuda-graph-backend-prefill=disabled"
PREFILL_GRAPH_FLAG = "--cuda-graph-backend-prefill=disabled"


def require_prefill_graphs_disabled(prefill_disabled: bool) -> None:
    """Decode CUDA graphs are supported (:mod:`vlcache_sglang.backend.cuda_graph`); prefill graphs
    (SGLang's default breakable graphs on CUDA) are not: the prefill forward gathers statistics
    and compacts requests on the host. Refuse at launch with the flag to use, rather than fail
    inside SGLang's graph capture."""
    if not prefill_disabled:
        raise RuntimeError("VLCACHE_CUDA_EXECUTOR=flashinfer: the vlcache backend runs prefill eagerly; "
                           f"launch with {PREFILL_GRAPH_FLAG} (decode CUDA graphs stay on)")


TORCH_EXECUTOR_GRAPH_FLAGS = CUDA_GRAPH_FLAGS


def require_graphs_disabled(prefill_disabled: bool, decode_disabled: bool) -> None:
    """``VLCACHE_CUDA_EXECUTOR=torch`` runs the SDPA executor eagerly (per-request loops with host
    lengths): refuse CUDA graphs of either phase at launch, naming the flags."""
    if not (prefill_disabled and decode_disabled):
        raise RuntimeError("VLCACHE_CUDA_EXECUTOR=torch: the torch executor has no CUDA-graph mode; launch with "
                           f"{TORCH_EXECUTOR_GRAPH_FLAGS} (or VLCACHE_CUDA_EXECUTOR=flashinfer for decode graphs)")


def create_vlcache_backend(model_runner: ModelRunner) -> AttentionBackend:
    """Factory registered as ``--attention-backend vlcache``, with the settings the launch attached
    to ``server_args`` (:func:`vlcache_sglang.settings.settings_of`).

    Everywhere but CUDA the torch executor runs. On CUDA the per-layer executor (FlashInfer for
    uncompressed steps, the plan-free Triton kernel for steps with per-layer lists) is opt-in with
    ``VLCACHE_CUDA_EXECUTOR=flashinfer`` (with ``--cuda-graph-backend-prefill=disabled``; decode
    CUDA graphs are supported), or the SDPA executor with ``VLCACHE_CUDA_EXECUTOR=torch`` (eager,
    any dtype: float32 has no FlashInfer kernels). The SDPA executor passed a whole-server run on an
    H200 (float32); the per-layer executor passed its own tests there but not yet a whole server
    (docs/gpu-runs/2026-12-04-h200-server.md), so by default SGLang's stock FlashInfer backend
    serves attention on CUDA, uncompressed.
    """
    settings = settings_of(getattr(model_runner, "server_args", None))
    if settings is None:
        raise SettingsError("vlcache: these server args were not resolved with the vlcache plugin loaded "
                            "(no settings attached); launch with SGLANG_PLUGINS including vlcache")
    # resolved once per backend (a file is read here, not per kernel launch); off CUDA ``auto`` is
    # the defaults, which the CPU's interpreter and torch paths do not use, and /server_info reports
    launches = launches_for(model_runner.device, settings.kernel_launches)
    if str(model_runner.device).startswith("cuda"):
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend

        prefill_off = check_cuda_graph_backend(Phase.PREFILL, Backend.DISABLED)
        if settings.cuda_executor == "flashinfer":
            from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor

            require_prefill_graphs_disabled(prefill_off)
            executor = FlashInferAttentionExecutor(model_runner.device, compressed_decode=settings.compressed_decode,
                                                   decode_launch=launches.decode)
            return VLCacheAttnBackend(model_runner, executor=executor, settings=settings, launches=launches)
        if settings.cuda_executor == "torch":
            require_graphs_disabled(prefill_off, check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED))
            return VLCacheAttnBackend(model_runner, settings=settings, launches=launches)
        from vlcache_sglang.backend.flashinfer_glue import create_flashinfer_backend

        return create_flashinfer_backend(model_runner)
    return VLCacheAttnBackend(model_runner, settings=settings, launches=launches)
