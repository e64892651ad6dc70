"""The ``vlcache`` attention backend: thin SGLang glue around a device executor.

SGLang calls ``init_forward_metadata`` once per forward and ``forward_extend`` /
``forward_decode`` once per layer. This class only translates SGLang's batch into
:class:`ForwardMetadata` (ragged slot lists, FlashInfer's layout) and writes new K/V into the
pool; the attention math lives in an executor, and what to keep lives in the pure-PyTorch
policy. Nothing is compressed yet when the budget is 1.0: every layer reads every slot.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor
from vlcache_sglang.backend.metadata import ForwardMetadata, build_ragged_kv

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.model_executor.model_runner import ModelRunner

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

logger = logging.getLogger(__name__)


class VLCacheAttnBackend(AttentionBackend):
    """Attention over per-layer ragged KV selections (CPU: torch SDPA executor)."""

    def __init__(self, model_runner: ModelRunner, executor: TorchAttentionExecutor | None = None):
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        self.executor = executor or TorchAttentionExecutor()
        self.forward_metadata: ForwardMetadata | None = None

    # -- metadata -------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch: ForwardBatch):
        seq_lens_cpu = [int(x) for x in _host(forward_batch.seq_lens_cpu, forward_batch.seq_lens)]
        kv = build_ragged_kv(self.req_to_token_pool.req_to_token, forward_batch.req_pool_indices, seq_lens_cpu)
        mode = forward_batch.forward_mode
        if mode.is_decode_or_idle():
            bs = len(seq_lens_cpu)
            self.forward_metadata = ForwardMetadata(
                is_decode=True, kv=kv, qo_indptr_cpu=list(range(bs + 1)), prefix_lens_cpu=[n - 1 for n in seq_lens_cpu],
            )
            return
        extend_lens = [int(x) for x in _host(forward_batch.extend_seq_lens_cpu, forward_batch.extend_seq_lens)]
        prefix_lens = [int(x) for x in _host(forward_batch.extend_prefix_lens_cpu, forward_batch.extend_prefix_lens)]
        qo = [0]
        for n in extend_lens:
            qo.append(qo[-1] + n)
        self.forward_metadata = ForwardMetadata(is_decode=False, kv=kv, qo_indptr_cpu=qo, prefix_lens_cpu=prefix_lens)

    # -- attention ------------------------------------------------------------------------
    def forward_extend(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=False)

    def forward_decode(self, q, k, v, layer: RadixAttention, forward_batch: ForwardBatch, save_kv_cache=True):
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, decode=True)

    def _forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool, decode: bool):
        if layer.is_cross_attention:
            raise NotImplementedError("vlcache: cross-attention layers are not supported")
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        out = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)
        run = self.executor.decode if decode else self.executor.extend
        run(
            q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
            out.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            self.forward_metadata,
            layer.layer_id,
            layer.scaling,
            layer.tp_q_head_num != layer.tp_k_head_num,
        )
        return out

    def support_triton(self):
        return False


def _host(cpu_value, device_value) -> list:
    """Prefer SGLang's host copy of a per-request tensor; fall back to one device->host copy."""
    if cpu_value is not None:
        return cpu_value.tolist() if isinstance(cpu_value, torch.Tensor) else list(cpu_value)
    return device_value.tolist()


def create_vlcache_backend(model_runner: ModelRunner) -> AttentionBackend:
    """Factory registered as ``--attention-backend vlcache``.

    On CUDA the stock FlashInfer backend serves attention until the per-layer FlashInfer
    executor lands (compression off there for now); everywhere else the torch executor runs.
    """
    if str(model_runner.device).startswith("cuda"):
        from vlcache_sglang.backend.flashinfer_glue import create_flashinfer_backend

        return create_flashinfer_backend(model_runner)
    return VLCacheAttnBackend(model_runner)
