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

from vlcache_sglang.backend import report
from vlcache_sglang.backend.cell_store import GlobalKV
from vlcache_sglang.backend.layer_lists import LayerListBuilder
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV
from vlcache_sglang.backend.metrics import CompressionMetrics
from vlcache_sglang.backend.request_info import RequestInfo
from vlcache_sglang.backend.request_state import CompressedRow, RequestState, RequestStates, ResolvedRow
from vlcache_sglang.backend.tensor_parallel import StatsGather
from vlcache_sglang.backend.virtual_kv import VirtualKV, install_free_filter
from vlcache_sglang.kernels.dispatch import StatsDispatch
from vlcache_sglang.kernels.launch_configs import StatsLaunch
from vlcache_sglang.policy import PolicyError, StatsAccumulator, attention_stats, build_plan, keep_everything

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadLists:
    """One layer's per-(request, KV head) key lists under head cells (what the executor read)."""

    k_head_rows: torch.Tensor  # the K storage read as head-rows ``[L * R * H, 1, D]``
    kv: RaggedKV  # entry ``b * H + h``: request ``b``'s head-rows of KV head ``h``
    positions: list[torch.Tensor | None]  # the same entries' prompt positions (None: plain rows)

    def positions_of(self, b: int) -> list[torch.Tensor] | None:
        """Request ``b``'s key positions per KV head; None when it reads plain rows (every head alike)."""
        entries = self.positions[b * self.kv.heads:(b + 1) * self.kv.heads] if self.positions else []
        return None if not entries or entries[0] is None else entries

    def keys_of(self, b: int) -> list[torch.Tensor]:
        return [self.k_head_rows[self.kv.head_slots(b, h)] for h in range(self.kv.heads)]


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
    #: retracted requests that resumed over their own compressed prompt (``compressed`` sharing)
    resumed_after_retraction: int = 0
    #: decode steps replayed from a captured CUDA graph, and those whose batch read per-layer
    #: (compressed) lists
    graph_decode_steps: int = 0
    graph_decode_steps_compressed: int = 0


class Compressor:
    """Statistics, plan and compaction of this process's compressing requests (their states live
    in :attr:`states`; each forward's per-layer lists come from :attr:`layer_lists`)."""

    def __init__(self, kv: GlobalKV, req_to_token: torch.Tensor, allocator, num_q_heads: int, num_kv_heads: int,
                 debug_checks: bool = False, gather: StatsGather | None = None, *,
                 virtual_ids_per_slot: float = 4.0, metrics: bool = False, kernels: str = "auto",
                 cells: str = "layer", stats_launch: StatsLaunch | None = None):
        self.kv = kv
        self.gather = gather or StatsGather()  # one plan on every tensor-parallel rank
        self.debug_checks = debug_checks  # plans from incomplete statistics raise instead of noting
        self.req_to_token = req_to_token
        self.allocator = allocator
        self.num_layers = kv.num_layers
        self.num_q_heads, self.num_kv_heads = num_q_heads, num_kv_heads
        # the statistics function handed to the policy: the fused Triton kernel on CUDA (per
        # ``kernels``: VLCACHE_KERNELS), the policy's torch reference elsewhere
        self.stats_fn = StatsDispatch(kernels, launch=stats_launch) if kv.k.is_cuda else attention_stats
        # cells: a slot's L layer rows, or with head cells its L * Hkv (layer, KV head) rows
        self.head_cells = cells == "head"  # one KV head per rank under TP still holds per head
        self.heads_per_unit = num_kv_heads if self.head_cells else 1
        # this rank's first KV head in the model's head order (plans cover all heads)
        self.head_offset = self.gather.rank * num_kv_heads
        # the same figure the pool budget charged for (memory_budget.table_bytes_per_slot)
        self.vkv = VirtualKV(kv.rows_per_layer, kv.num_layers,
                             max(2, int(virtual_ids_per_slot * kv.rows_per_layer)), device=kv.k.device,
                             kernels=kernels, heads_per_unit=self.heads_per_unit)
        self.cell_k, self.cell_v = kv.cells(self.heads_per_unit)
        install_free_filter(allocator, self.vkv)
        self.states = RequestStates()
        self.layer_lists = LayerListBuilder(kv, self.vkv, self.states, debug_checks=debug_checks)
        self.counters = CompressionCounters()
        self.metrics = CompressionMetrics(enabled=metrics)

    @property
    def rows(self) -> dict[int, CompressedRow]:
        """Compacted rows by ``req_pool_idx`` (a snapshot)."""
        return self.states.rows

    @property
    def resolved(self) -> dict[int, ResolvedRow]:
        """Rows' cached resolutions by ``req_pool_idx`` (a snapshot)."""
        return self.states.resolutions

    # -- prefill ---------------------------------------------------------------------------
    def _state(self, info: RequestInfo) -> RequestState:
        """The request's state, its compression started at its first prefill chunk."""
        state = self.states.get(info.req_pool_idx, info.rid)
        if state is None or state.stats is None:
            window = info.window
            floor = min(info.window_floor, info.prompt_len - 1)
            if window.compress and floor > window.start:
                window = replace(window, start=floor, reason=(window.reason + "; " if window.reason else "")
                                 + f"window starts after the {floor} cached tokens")
            stats = StatsAccumulator(self.num_layers, self.num_q_heads, self.num_kv_heads, info.prompt_len,
                                     window, info.policy, first_row=info.window_floor, stats_fn=self.stats_fn)
            state = state if state is not None else self.states.start(info.req_pool_idx, RequestState(info.rid))
            state.window, state.stats, state.planned = window, stats, False
            state.sharing, state.tree_cap = info.sharing, info.compaction_protected
        return state

    def observe_extend(self, layer_id: int, q: torch.Tensor, k_cache: torch.Tensor, kv: RaggedKV,
                       key_positions: list[torch.Tensor | None] | None, meta: ForwardMetadata,
                       infos: list[RequestInfo], scaling: float, head_lists: HeadLists | None = None) -> None:
        """Add this layer's statistics for every compressing request of an extend batch.

        ``kv`` is the layer's key list (rows of ``k_cache``); ``key_positions[b]`` the prompt
        positions of request ``b``'s keys when some are absent in this layer (None: all present).
        With head cells ``kv`` is the batch's plain rows and ``head_lists`` the layer's per-(request,
        KV head) lists: a request whose prefix came from the tree compressed per head reads those."""
        for b, info in enumerate(infos):
            if not info.compresses:
                continue
            acc = self._state(info).stats
            if not acc.needs_attention:
                continue
            q0, q1 = meta.qo_indptr_cpu[b], meta.qo_indptr_cpu[b + 1]
            prefix = meta.prefix_lens_cpu[b]  # the chunk's rows sit at positions prefix, prefix + 1, ...
            lo, hi = acc.needed_span(prefix, q1 - q0)  # host integers: no device sync per layer
            if hi <= lo:
                continue
            rows = q[q0 + lo:q0 + hi]
            if head_lists is not None and head_lists.positions_of(b) is not None:
                acc.add_per_head(layer_id, rows, prefix + lo, head_lists.keys_of(b), head_lists.positions_of(b),
                                 scaling)
                continue
            keys = k_cache[kv.slots(b)]
            pos = key_positions[b] if key_positions is not None else None
            acc.add(layer_id, rows, prefix + lo, keys, scaling, key_positions=pos)
        if layer_id == self.num_layers - 1:
            for info in infos:
                if info.compresses and info.is_last_chunk:
                    self._finish(info)
                elif info.not_compressed is not None and info.is_last_chunk:
                    self._not_compressed(info, info.not_compressed)

    def is_decoding(self, req_pool_idx: int, rid: str) -> bool:
        """Whether this request's prefill is over (planned: compacted or left alone); a forward
        that carries it again is a decode step mixed into an extend batch, never a new prefill."""
        state = self.states.get(req_pool_idx, rid)
        return state is not None and state.compressing and state.planned

    def _not_compressed(self, info: RequestInfo, reason: str) -> None:
        """A request that asked for compression is served as stock: say why (once per request)."""
        if report.already_reported_not_compressed(info.req):
            return
        self.counters.not_compressed[reason] = self.counters.not_compressed.get(reason, 0) + 1
        self.metrics.not_compressed(reason)
        report.not_compressed(info.req, reason)

    def _finish(self, info: RequestInfo) -> None:
        state = self.states.get(info.req_pool_idx, info.rid)
        acc, state.stats, state.planned = state.stats, None, True
        incomplete = acc.needs_attention and not acc.stats.complete
        if incomplete:  # a chunk's rows were never measured: a plan from part of the question
            self.counters.plans_from_incomplete_statistics += 1
            if self.debug_checks:
                raise PolicyError(f"vlcache debug: {info.rid} planned from incomplete statistics "
                                  f"(rows per layer {acc.stats.rows_seen}, expected {acc.stats.rows_expected})")
        # every TP rank holds its own heads: gather all heads' statistics so all plan alike
        plan = build_plan(self.gather.gather(acc.stats), acc.cfg, allow_incomplete=True)
        if info.resumed:  # retracted, back over its own compressed prompt: continue as if never retracted
            self.counters.resumed_after_retraction += 1
            plan = keep_everything(plan, "resumed after retraction from its compressed prompt in the tree")
        try:
            self._apply_plan(info, plan, incomplete)
        finally:
            if self.debug_checks:  # every rank must now hold the same plan and the same pool
                self.gather.agree("plan", [plan.is_identity, list(plan.budgets), plan.head_budgets]
                                  + [k.tolist() for k in plan.kept])
                self.gather.agree("pool after compaction", [int(self.allocator.available_size()),
                                                            self.vkv.live_ids, self.vkv.live_cell_slots()])

    def _apply_plan(self, info: RequestInfo, plan, incomplete: bool) -> None:
        if plan.is_identity:
            logger.debug("vlcache: %s left uncompressed (%s)", info.rid, "; ".join(plan.notes))
            report.report(info.req, {"vlcache_notes": "; ".join(plan.notes)})
            self._not_compressed(info, "budget_covers_prompt")
            return
        protected = info.compaction_protected
        kept = self._present_only(self.req_to_token[info.req_pool_idx], self._unit_kept(plan), protected)
        min_slots, id_positions = self._rank_agreement(plan, protected, info.prompt_len)
        if min_slots < 0:
            report.report(info.req, {"vlcache_notes": "head cells: the ranks' kept cells are too uneven to free "
                                                      "the same slots; left uncompressed"})
            self._not_compressed(info, "uneven_heads_across_ranks")
            return
        record = self.compact_row(info.req_pool_idx, info.rid, kept, protected, info.prompt_len,
                                  min_cell_slots=min_slots, id_positions=id_positions)
        if record is None:
            report.report(info.req, {"vlcache_notes": "virtual ids exhausted: left uncompressed"})
            self._not_compressed(info, "virtual_ids_exhausted")
            return
        self.counters.requests_compressed += 1
        self.counters.prompt_tokens_compressed += info.prompt_len
        self.counters.kv_tokens_saved += record.tokens_saved
        self.metrics.record(info.prompt_len, record.tokens_saved)
        logger.debug("vlcache: %s kept %s of %d per layer (budgets %s), freed %d slots",
                     info.rid, record.kept_counts, info.prompt_len, plan.budgets, record.tokens_saved)
        layer_kept, head_kept = self._reported_sets(plan, kept)
        report.compressed(info.req, plan, layer_kept, record.kept_counts, record.tokens_saved, info.prompt_len,
                          self.vkv.num_units, reused_tokens=info.protected_len, incomplete=incomplete,
                          return_plan=info.return_plan,
                          head_kept=head_kept)

    def _reported_sets(self, plan, kept: list[torch.Tensor]) -> tuple[list[torch.Tensor], list | None]:
        """What the request holds, per layer and (head cells) per KV head: the plan's sets less the
        prefix positions a unit no longer held (a prefix compressed earlier, from the tree)."""
        if not self.head_cells:
            return kept, None
        if self.gather.world_size > 1:  # each rank holds other heads; no prefix here is compressed
            return list(plan.kept), plan.head_kept  # (compressed sharing is refused with head cells under TP)
        hp = self.heads_per_unit
        heads = [kept[layer * hp:(layer + 1) * hp] for layer in range(self.num_layers)]
        union = [torch.unique(torch.cat(h)) for h in heads]
        same = all(torch.equal(h, hs[0]) for hs in heads for h in hs)
        return union, (None if plan.head_kept is None and same else heads)

    def _head_sets(self, plan, layer: int) -> list[torch.Tensor]:
        """Every KV head's kept positions in ``layer`` (all heads of the model, in order)."""
        if plan.head_kept is not None:
            return list(plan.head_kept[layer])
        return [plan.kept[layer]] * (self.num_kv_heads * self.gather.world_size)

    def _unit_kept(self, plan) -> list[torch.Tensor]:
        """The plan as kept positions per cell unit of this rank: per layer (the union over its
        heads, with layer cells), or per (layer, local KV head) with head cells."""
        if not self.head_cells:
            return list(plan.kept)
        lo = self.head_offset
        return [h for layer in range(self.num_layers)
                for h in self._head_sets(plan, layer)[lo:lo + self.heads_per_unit]]

    def _rank_agreement(self, plan, protected: int, prompt_len: int) -> tuple[int, torch.Tensor | None]:
        """With head cells under tensor parallelism each rank holds other heads, so it would need
        another number of cell slots and virtual ids: every rank keeps the slots of the rank that
        needs most and gives a virtual id to every position some head of any rank keeps, so all
        ranks free the same slots and take the same ids (SGLang's allocators stay identical)."""
        if not self.head_cells or self.gather.world_size == 1:
            return 0, None
        hp, units = self.heads_per_unit, self.vkv.num_units
        per_rank = [0] * self.gather.world_size
        used = torch.zeros(prompt_len, dtype=torch.bool)
        for layer in range(self.num_layers):
            for h, pos in enumerate(self._head_sets(plan, layer)):
                own = pos.cpu()[pos.cpu() >= protected]
                per_rank[h // hp] += int(own.numel())
                used[own] = True
        need = max(-(-n // units) for n in per_rank)
        if min(per_rank) < need:  # a rank would hold a slot without a cell: leave it whole everywhere
            return -1, used
        return need, used

    def compact_row(self, req_pool_idx: int, rid: str, kept: list[torch.Tensor], protected: int,
                    prompt_len: int, *, min_cell_slots: int = 0,
                    id_positions: torch.Tensor | None = None) -> CompressedRow | None:
        """Compact a request's row to ``kept`` (per cell unit, positions it holds) and record it;
        None when virtual ids ran out (nothing changed)."""
        result = self.vkv.compact(self.cell_k, self.cell_v, self.req_to_token[req_pool_idx], kept, protected,
                                  prompt_len, min_cell_slots=min_cell_slots, id_positions=id_positions)
        if result is None:
            return None
        prefix_pos = [k.to(self.kv.k.device)[k < protected] for k in kept]
        record = CompressedRow(prompt_len=prompt_len, protected=protected, prefix_pos=prefix_pos,
                               kept_counts=result.kept_counts, tokens_saved=result.freed_slots)
        self.states.for_row(req_pool_idx, rid).row = record
        self.states.row_rewritten(req_pool_idx)  # its cached resolution and virtual-id flag are stale
        return record

    def _present_only(self, row: torch.Tensor, kept: list[torch.Tensor], protected: int) -> list[torch.Tensor]:
        """Drop kept prefix positions a unit does not hold (its prefix came compressed)."""
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
        state = self.states.get(req_pool_idx, rid)
        if state is None or not state.compressing:
            return up_to
        if state.sharing == "prefix":
            return min(up_to, state.tree_cap)
        if state.sharing == "compressed":
            return up_to if state.planned else 0
        return 0

    # -- release ---------------------------------------------------------------------------
    def forget(self, req_pool_idx: int) -> None:
        """The request's row is being released: drop its state."""
        self.states.drop(req_pool_idx)

