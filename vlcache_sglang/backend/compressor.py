"""Per-request compression inside the prefill forward: statistics, plan, compaction.

Lifecycle of a compressing request (one scheduler process):

1. every prefill chunk, every layer: the window rows' queries (or all rows for H2O) against all
   of the request's keys so far are added to its :class:`StatsAccumulator` (no second pass);
2. after the last layer of its last chunk: :func:`build_plan` picks each layer's kept positions
   and :func:`compact_request` moves them into cells, handing the rest of the request's prompt
   slots back to SGLang's allocator before its first decode step;
3. decode reads, per layer, the kept cells followed by the uncompressed generated tail;
4. release (finish, abort, retraction) goes through ``free_kv_row``, which frees the cell slots
   and the tail and skips the positions already returned (:meth:`Compressor.release_ranges`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from vlcache_sglang.backend.cell_store import CompressedRow, GlobalKV, compact_request
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV
from vlcache_sglang.backend.metrics import CompressionMetrics
from vlcache_sglang.backend.request_info import RequestInfo
from vlcache_sglang.policy import StatsAccumulator, build_plan, locate_window

logger = logging.getLogger(__name__)


@dataclass
class CompressionCounters:
    requests_compressed: int = 0
    prompt_tokens_compressed: int = 0
    kv_tokens_saved: int = 0


class Compressor:
    def __init__(self, kv: GlobalKV, req_to_token: torch.Tensor, allocator, num_q_heads: int, num_kv_heads: int):
        self.kv = kv
        self.req_to_token = req_to_token
        self.allocator = allocator
        self.num_layers = kv.num_layers
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        self.pending: dict[int, tuple[str, StatsAccumulator]] = {}  # req_pool_idx -> (rid, stats)
        self.rows: dict[int, CompressedRow] = {}  # req_pool_idx -> compacted request
        self.counters = CompressionCounters()
        self.metrics = CompressionMetrics()

    # -- prefill ---------------------------------------------------------------------------
    def _accumulator(self, info: RequestInfo) -> StatsAccumulator:
        entry = self.pending.get(info.req_pool_idx)
        if entry is None or entry[0] != info.rid:
            window = locate_window(info.prompt_len, info.image_spans, info.policy)
            acc = StatsAccumulator(self.num_layers, self.num_q_heads, self.num_kv_heads, info.prompt_len,
                                   window, info.policy)
            entry = self.pending[info.req_pool_idx] = (info.rid, acc)
        return entry[1]

    def observe_extend(self, layer_id: int, q: torch.Tensor, k_layer: torch.Tensor, meta: ForwardMetadata,
                       infos: list[RequestInfo], scaling: float) -> None:
        """Add this layer's statistics for every compressing request of an extend batch."""
        for b, info in enumerate(infos):
            if not info.compresses:
                continue
            acc = self._accumulator(info)
            if not acc.needs_attention:
                continue
            q0, q1 = meta.qo_indptr_cpu[b], meta.qo_indptr_cpu[b + 1]
            prefix = meta.prefix_lens_cpu[b]
            positions = torch.arange(prefix, prefix + (q1 - q0), device=q.device)
            rows = acc.needed_rows(positions)
            if not bool(rows.any()):
                continue
            keys = k_layer[meta.kv.slots(b)]
            acc.add(layer_id, q[q0:q1][rows], positions[rows], keys, scaling)
        if layer_id == self.num_layers - 1:
            for info in infos:
                if info.compresses and info.is_last_chunk:
                    self._finish(info)

    def _finish(self, info: RequestInfo) -> None:
        _, acc = self.pending.pop(info.req_pool_idx)
        # rows served from the radix prefix were never recomputed, so allow incomplete stats
        plan = build_plan(acc, allow_incomplete=True)
        if plan.is_identity:
            logger.debug("vlcache: %s left uncompressed (%s)", info.rid, "; ".join(plan.notes))
            _report(info, {"vlcache_kept_ratio": 1.0, "vlcache_kv_tokens_saved": 0,
                           "vlcache_notes": "; ".join(plan.notes)})
            return
        kept = plan.kept
        if plan.granularity == "head":  # per-head lists need per-head paging: keep the union for now
            kept = [torch.unique(k.flatten()) for k in kept]
        row = self.req_to_token[info.req_pool_idx]
        freed, layer_ids, cells = compact_request(self.kv, row, kept, info.protected_len, info.prompt_len)
        if freed.numel():
            self.allocator.free(freed.clone())
        record = CompressedRow(
            rid=info.rid, req_pool_idx=info.req_pool_idx, prompt_len=info.prompt_len,
            protected=info.protected_len, cell_slots=cells, layer_ids=layer_ids,
            kept_counts=[int(k.numel()) for k in kept],
        )
        self.rows[info.req_pool_idx] = record
        self.counters.requests_compressed += 1
        self.counters.prompt_tokens_compressed += info.prompt_len
        self.counters.kv_tokens_saved += record.tokens_saved
        self.metrics.record(info.prompt_len, record.tokens_saved)
        logger.debug("vlcache: %s kept %s of %d per layer (budgets %s), freed %d slots",
                     info.rid, record.kept_counts, info.prompt_len, plan.budgets, record.tokens_saved)
        report = {
            "vlcache_kept_ratio": sum(record.kept_counts) / (info.prompt_len * self.num_layers),
            "vlcache_kv_tokens_saved": record.tokens_saved,
            "vlcache_method": plan.method,
            "vlcache_layer_budgets": list(plan.budgets),
            "vlcache_notes": "; ".join(plan.notes),
        }
        if getattr(info.req, "sampling_params", None) is not None:
            custom = (info.req.sampling_params.custom_params or {}).get("vlcache") or {}
            if custom.get("return_plan"):
                report["vlcache_kept_positions"] = [k.tolist() for k in kept]
        _report(info, report)

    # -- decode ----------------------------------------------------------------------------
    def layer_kv_for_batch(self, meta: ForwardMetadata, req_pool_indices: list[int],
                           rids: list[str] | None) -> dict[int, RaggedKV]:
        """Per-layer slot lists (global row ids) when the batch holds a compressed request."""
        records = []
        for b, idx in enumerate(req_pool_indices):
            rec = self.rows.get(idx)
            if rec is not None and rids is not None and rec.rid != rids[b]:
                rec = None
            records.append(rec)
        if not any(records):
            return {}
        out: dict[int, RaggedKV] = {}
        for layer in range(self.num_layers):
            parts, indptr = [], [0]
            for b, rec in enumerate(records):
                slots = meta.kv.slots(b)
                if rec is None:
                    ids = self.kv.global_ids(layer, slots)
                else:
                    ids = torch.cat([rec.layer_ids[layer], self.kv.global_ids(layer, slots[rec.prompt_len :])])
                parts.append(ids)
                indptr.append(indptr[-1] + ids.numel())
            indices = torch.cat(parts)
            out[layer] = RaggedKV(torch.tensor(indptr, dtype=torch.int64, device=indices.device), indices, indptr)
        return out

    # -- release ---------------------------------------------------------------------------
    def release_ranges(self, req_pool_idx: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Row ranges SGLang may free for this request: its own ranges minus the positions whose
        slots compaction already returned. Forgets the request when its cells are released."""
        self.pending.pop(req_pool_idx, None)
        rec = self.rows.get(req_pool_idx)
        if rec is None:
            return ranges
        lo, hi = rec.dead_range
        out: list[tuple[int, int]] = []
        for start, end in ranges:
            if start <= rec.protected < end:  # the release covers the cells: forget the request
                self.rows.pop(req_pool_idx, None)
            for a, b in ((start, min(end, lo)), (max(start, hi), end)):
                if a < b:
                    out.append((a, b))
        return out


def _report(info: RequestInfo, values: dict) -> None:
    """Attach per-request figures to the response's ``meta_info`` (SGLang's customized info)."""
    req = info.req
    if req is None:
        return
    if req.customized_info is None:
        req.customized_info = {}
    for key, value in values.items():
        req.customized_info[key] = [value]
