"""Per-request compression inside the prefill forward: statistics, plan, compaction.

Lifecycle of a compressing request (one scheduler process):

1. every prefill chunk, every layer: the window rows' queries (or all rows for H2O) against all
   of the request's keys so far (those present in that layer, when its prefix came compressed
   from the radix tree) are added to its :class:`StatsAccumulator` (no second pass);
2. after the last layer of its last chunk: :func:`build_plan` picks each layer's kept positions
   and :meth:`VirtualKV.compact` moves the kept rows of the request's own positions into cells,
   writes virtual ids into its row and hands the other slots back to SGLang's allocator, all
   before its first decode step;
3. every later forward reads, per layer, the kept tree-owned prefix positions it selected plus
   whatever its row resolves to in that layer (cells through virtual ids, the generated tail);
4. the ``vlcache`` radix cache asks :meth:`Compressor.insert_limit` how much of the request may
   enter the tree (nothing while its statistics are pending under ``compressed`` sharing);
5. release (finish, abort, retraction) frees the row through SGLang's own path; virtual ids are
   filtered out of ``allocator.free`` (:func:`install_free_filter`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from vlcache_sglang.backend.cell_store import GlobalKV
from vlcache_sglang.backend.memory_budget import ids_per_slot
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV
from vlcache_sglang.backend.metrics import CompressionMetrics
from vlcache_sglang.backend.request_info import RequestInfo
from vlcache_sglang.backend.tensor_parallel import StatsGather
from vlcache_sglang.backend.virtual_kv import VirtualKV, install_free_filter
from vlcache_sglang.policy import PolicyError, StatsAccumulator, build_plan, locate_window

logger = logging.getLogger(__name__)


@dataclass
class CompressionCounters:
    requests_compressed: int = 0
    prompt_tokens_compressed: int = 0
    kv_tokens_saved: int = 0
    #: requests whose policy asked for compression but that were served as stock, by reason code
    #: (:data:`~vlcache_sglang.backend.request_info.NOT_COMPRESSED_REASONS`)
    not_compressed: dict[str, int] = field(default_factory=dict)
    #: plans made from incomplete statistics (a chunk's rows were never measured)
    plans_from_incomplete_statistics: int = 0
    #: decoding requests served inside an extend batch (``--enable-mixed-chunk``)
    mixed_decode_rows: int = 0


@dataclass
class CompressedRow:
    """A request after compaction: what it reads of the tree-owned prefix ``[0, protected)``."""

    rid: str
    prompt_len: int
    protected: int
    prefix_pos: list[torch.Tensor]  # per layer: its kept positions < protected (read through the row)
    kept_counts: list[int]
    tokens_saved: int


@dataclass
class ResolvedRow:
    """A row's last resolution into per-layer (rows, positions), reused while it stays valid."""

    rec: CompressedRow | None
    ids: torch.Tensor  # the row's ids it was resolved from
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    stamp: int  # VirtualKV.births when it was made


@dataclass
class SharingState:
    mode: str  # "compressed", "prefix" or "off"
    cap: int  # "prefix": positions that may enter the tree
    done: bool = False  # plan applied (or identity): the row is final


class Compressor:
    def __init__(self, kv: GlobalKV, req_to_token: torch.Tensor, allocator, num_q_heads: int, num_kv_heads: int,
                 debug_checks: bool = False, gather: StatsGather | None = None):
        self.kv = kv
        self.gather = gather or StatsGather()  # one plan on every tensor-parallel rank
        self.debug_checks = debug_checks  # plans from incomplete statistics raise instead of noting
        self.req_to_token = req_to_token
        self.allocator = allocator
        self.num_layers = kv.num_layers
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        per_slot = ids_per_slot()  # the same figure the pool budget charged for (memory_budget)
        self.vkv = VirtualKV(kv.rows_per_layer, kv.num_layers, max(2, int(per_slot * kv.rows_per_layer)),
                             device=kv.k.device)
        install_free_filter(allocator, self.vkv)
        self.pending: dict[int, tuple[str, StatsAccumulator]] = {}  # req_pool_idx -> (rid, stats)
        self.rows: dict[int, CompressedRow] = {}  # req_pool_idx -> compacted request
        self.sharing: dict[int, tuple[str, SharingState]] = {}  # req_pool_idx -> (rid, what the tree may take)
        self.resolved: dict[int, ResolvedRow] = {}  # req_pool_idx -> its row's last resolution
        self.counters = CompressionCounters()
        self.metrics = CompressionMetrics()

    # -- per-layer key lists ---------------------------------------------------------------
    def batch_layer_kv(self, meta: ForwardMetadata, req_pool_indices: list[int], rids: list[str] | None
                       ) -> tuple[dict[int, RaggedKV], dict[int, list[torch.Tensor | None]]]:
        """Per-layer key lists (global row ids) and their positions, when the batch holds a
        compacted request or a row with virtual ids; ``({}, {})`` otherwise (stock path)."""
        records = []
        for b, idx in enumerate(req_pool_indices):
            rec = self.rows.get(idx)
            if rec is not None and (rids is None or rec.rid != rids[b]):
                rec = None
            records.append(rec)
        if not any(records) and not self.vkv.has_virtual(meta.kv.kv_indices):
            return {}, {}
        per_request = []  # per request: per layer (rows, positions or None)
        for b, rec in enumerate(records):
            slots = meta.kv.slots(b)
            start = rec.protected if rec is not None else 0
            if rec is None and not self.vkv.has_virtual(slots):
                per_request.append(None)
                continue
            per_request.append(self._request_layers(req_pool_indices[b], rec, slots, start))
        out: dict[int, RaggedKV] = {}
        positions_out: dict[int, list[torch.Tensor | None]] = {}
        for layer in range(self.num_layers):
            parts, pos_parts, indptr = [], [], [0]
            for b, layers in enumerate(per_request):
                if layers is None:
                    ids = self.kv.global_ids(layer, meta.kv.slots(b))
                    pos_parts.append(None)
                else:
                    ids, pos = layers[layer]
                    pos_parts.append(pos)
                parts.append(ids)
                indptr.append(indptr[-1] + ids.numel())
            indices = torch.cat(parts)
            out[layer] = RaggedKV(torch.tensor(indptr, dtype=torch.int64, device=indices.device), indices, indptr)
            positions_out[layer] = pos_parts
        return out, positions_out

    def _request_layers(self, req_pool_idx: int, rec: CompressedRow | None, slots: torch.Tensor,
                        start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (global rows, positions) a request reads, resolved from its row.

        Resolving the whole row is an ``[n, L]`` gather and ``L`` nonzero per request per forward,
        O(length x layers): in decode only the new token is new. So the last resolution is kept
        per row and reused while the row still starts with the same ids and none of their table
        entries was rewritten since (no compaction at all since, or :meth:`VirtualKV.newest_birth`);
        only the new ids are resolved and appended. Anything else (the tree swapped ids in, a new compaction, another
        request in the row) resolves afresh."""
        c = self.resolved.get(req_pool_idx)
        n = 0 if c is None else c.ids.numel()
        if (c is not None and c.rec is rec and start <= n <= slots.numel() and torch.equal(slots[:n], c.ids)
                and (c.stamp == self.vkv.births or self.vkv.newest_birth(c.ids) <= c.stamp)):
            if n == slots.numel():
                return c.layers
            add = self.vkv.resolve(slots[n:])
            layers = [(torch.cat([rows, more]), torch.cat([pos, present + n]))
                      for (rows, pos), (present, more) in zip(c.layers, add)]
        else:
            layers = self._resolve_request(rec, slots, start)
        self.resolved[req_pool_idx] = ResolvedRow(rec, slots.clone(), layers, self.vkv.births)
        return layers

    def _resolve_request(self, rec: CompressedRow | None, slots: torch.Tensor,
                         start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        resolved = self.vkv.resolve(slots[start:])
        # the selected tree-owned prefix, through the row (the tree may have swapped in its
        # own ids for identical content since compaction)
        prefix_rows = self.vkv.layer_rows(slots[:start]) if rec is not None and start else None
        layers = []
        for layer, (present, rows) in enumerate(resolved):
            positions = present + start
            if prefix_rows is not None:
                pos = rec.prefix_pos[layer]
                own = prefix_rows[pos, layer]
                ok = own >= 0
                rows = torch.cat([own[ok], rows])
                positions = torch.cat([pos[ok], positions])
            layers.append((rows, positions))
        return layers

    # -- prefill ---------------------------------------------------------------------------
    def _accumulator(self, info: RequestInfo) -> StatsAccumulator:
        entry = self.pending.get(info.req_pool_idx)
        if entry is None or entry[0] != info.rid:
            window = locate_window(info.prompt_len, info.image_spans, info.policy)
            floor = min(info.window_floor, info.prompt_len - 1)
            if window.compress and floor > window.start:
                window = replace(window, start=floor, reason=(window.reason + "; " if window.reason else "")
                                 + f"window starts after the {floor} cached tokens")
            acc = StatsAccumulator(self.num_layers, self.num_q_heads, self.num_kv_heads, info.prompt_len,
                                   window, info.policy, first_row=info.window_floor)
            entry = self.pending[info.req_pool_idx] = (info.rid, acc)
            self.sharing[info.req_pool_idx] = (info.rid, SharingState(info.sharing, info.compaction_protected))
        return entry[1]

    def observe_extend(self, layer_id: int, q: torch.Tensor, k_cache: torch.Tensor, kv: RaggedKV,
                       key_positions: list[torch.Tensor | None] | None, meta: ForwardMetadata,
                       infos: list[RequestInfo], scaling: float) -> None:
        """Add this layer's statistics for every compressing request of an extend batch.

        ``kv`` is the layer's key list (rows of ``k_cache``); ``key_positions[b]`` the prompt
        positions of request ``b``'s keys when some are absent in this layer (None: all present)."""
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
            keys = k_cache[kv.slots(b)]
            pos = key_positions[b] if key_positions is not None else None
            acc.add(layer_id, q[q0:q1][rows], positions[rows], keys, scaling, key_positions=pos)
        if layer_id == self.num_layers - 1:
            for info in infos:
                if info.compresses and info.is_last_chunk:
                    self._finish(info)
                elif info.not_compressed is not None and info.is_last_chunk:
                    self._not_compressed(info, info.not_compressed)

    def is_decoding(self, req_pool_idx: int, rid: str) -> bool:
        """Whether this request's prefill is over (planned: compacted or left alone); a forward
        that carries it again is a decode step mixed into an extend batch, never a new prefill."""
        entry = self.sharing.get(req_pool_idx)
        decoding = entry is not None and entry[0] == rid and entry[1].done
        if decoding:
            self.counters.mixed_decode_rows += 1
        return decoding

    def _not_compressed(self, info: RequestInfo, reason: str) -> None:
        """A request that asked for compression is served as stock: say why (once per request)."""
        req = info.req
        if req is not None and "vlcache_not_compressed" in (req.customized_info or {}):
            return
        self.counters.not_compressed[reason] = self.counters.not_compressed.get(reason, 0) + 1
        self.metrics.not_compressed(reason)
        _report(info, {"vlcache_not_compressed": reason, "vlcache_kept_ratio": 1.0, "vlcache_kv_tokens_saved": 0})

    def _finish(self, info: RequestInfo) -> None:
        _, acc = self.pending.pop(info.req_pool_idx)
        entry = self.sharing.get(info.req_pool_idx)
        if entry is not None and entry[0] == info.rid:
            entry[1].done = True
        incomplete = acc.needs_attention and not acc.stats.complete
        if incomplete:  # a chunk's rows were never measured: a plan from part of the question
            self.counters.plans_from_incomplete_statistics += 1
            if self.debug_checks:
                raise PolicyError(f"vlcache debug: {info.rid} planned from incomplete statistics "
                                  f"(rows per layer {acc.stats.rows_seen}, expected {acc.stats.rows_expected})")
        # every TP rank holds its own heads: gather all heads' statistics so all plan alike
        plan = build_plan(self.gather.gather(acc.stats), acc.cfg, allow_incomplete=True)
        try:
            self._apply_plan(info, plan, incomplete)
        finally:
            if self.debug_checks:  # every rank must now hold the same plan and the same pool
                self.gather.agree("plan", [plan.is_identity, list(plan.budgets)]
                                  + [k.flatten().tolist() for k in plan.kept])
                self.gather.agree("pool after compaction", [int(self.allocator.available_size()),
                                                            self.vkv.live_ids, self.vkv.live_cell_slots()])

    def _apply_plan(self, info: RequestInfo, plan, incomplete: bool) -> None:
        if plan.is_identity:
            logger.debug("vlcache: %s left uncompressed (%s)", info.rid, "; ".join(plan.notes))
            _report(info, {"vlcache_notes": "; ".join(plan.notes)})
            self._not_compressed(info, "budget_covers_prompt")
            return
        kept = plan.kept
        if plan.granularity == "head":  # per-head lists need per-head paging: keep the union for now
            kept = [torch.unique(k.flatten()) for k in kept]
        protected = info.compaction_protected
        kept = self._present_only(self.req_to_token[info.req_pool_idx], kept, protected)
        record = self.compact_row(info.req_pool_idx, info.rid, kept, protected, info.prompt_len)
        if record is None:
            _report(info, {"vlcache_notes": "virtual ids exhausted: left uncompressed"})
            self._not_compressed(info, "virtual_ids_exhausted")
            return
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
            # what the plan was built over: the prompt, plus, when SGLang retracted the request and
            # recomputes it, the tokens it had generated (they are re-prefilled and planned with it)
            "vlcache_planned_tokens": info.prompt_len,
            "vlcache_notes": "; ".join(plan.notes),
        }
        if incomplete:
            report["vlcache_incomplete_statistics"] = True
        if getattr(info.req, "sampling_params", None) is not None:
            custom = (info.req.sampling_params.custom_params or {}).get("vlcache") or {}
            if custom.get("return_plan"):
                report["vlcache_kept_positions"] = [k.tolist() for k in kept]
        _report(info, report)

    def compact_row(self, req_pool_idx: int, rid: str, kept: list[torch.Tensor], protected: int,
                    prompt_len: int) -> CompressedRow | None:
        """Compact a request's row to ``kept`` (per layer, positions it holds) and record it; None
        when virtual ids ran out (nothing changed)."""
        result = self.vkv.compact(self.kv.k, self.kv.v, self.req_to_token[req_pool_idx], kept, protected,
                                  prompt_len)
        if result is None:
            return None
        prefix_pos = [k.to(self.kv.k.device)[k < protected] for k in kept]
        record = CompressedRow(rid=rid, prompt_len=prompt_len, protected=protected, prefix_pos=prefix_pos,
                               kept_counts=result.kept_counts, tokens_saved=result.freed_slots)
        self.rows[req_pool_idx] = record
        self.resolved.pop(req_pool_idx, None)  # the row was rewritten
        return record

    def _present_only(self, row: torch.Tensor, kept: list[torch.Tensor], protected: int) -> list[torch.Tensor]:
        """Drop kept prefix positions a layer does not hold (its prefix came compressed)."""
        if protected == 0 or not self.vkv.has_virtual(row[:protected]):
            return kept
        rows = self.vkv.layer_rows(row[:protected])
        out = []
        for layer, pos in enumerate(kept):
            pos = pos.to(rows.device)
            in_prefix = pos < protected
            ok = torch.ones_like(pos, dtype=torch.bool)
            ok[in_prefix] = rows[pos[in_prefix], layer] >= 0
            out.append(pos[ok])
        return out

    # -- radix tree ------------------------------------------------------------------------
    def insert_limit(self, req_pool_idx: int, rid: str, up_to: int) -> int:
        """How much of a request (of the ``up_to`` positions SGLang wants to cache) may enter the
        radix tree: all of it unless the request compresses; under ``prefix`` sharing only the
        uncompressed prefix; under ``compressed`` sharing nothing until compaction."""
        entry = self.sharing.get(req_pool_idx)
        if entry is None or entry[0] != rid:
            return up_to
        st = entry[1]
        if st.mode == "prefix":
            return min(up_to, st.cap)
        if st.mode == "compressed":
            return up_to if st.done else 0
        return 0

    # -- release ---------------------------------------------------------------------------
    def forget(self, req_pool_idx: int) -> None:
        """The request's row is being released: drop what is kept about it."""
        self.pending.pop(req_pool_idx, None)
        self.rows.pop(req_pool_idx, None)
        self.sharing.pop(req_pool_idx, None)
        self.resolved.pop(req_pool_idx, None)


def _report(info: RequestInfo, values: dict) -> None:
    """Attach per-request figures to the response's ``meta_info`` (SGLang's customized info)."""
    req = info.req
    if req is None:
        return
    if req.customized_info is None:
        req.customized_info = {}
    for key, value in values.items():
        req.customized_info[key] = [value]
