"""Each forward's per-layer key lists: a batch's rows turned into ``indptr``/``indices`` per layer.

With head cells (``--vlcache-cells head``) a layer's list has one entry per (request, KV head)
(``RaggedKV.heads``), of head-rows into the storage read as ``[L * R * H, 1, D]``.

A batch in which no row holds a virtual id and no request was compacted reads SGLang's own
per-layer buffers through one list for all layers (the stock path: nothing is built here).
Otherwise every layer ``l`` gets its own :class:`RaggedKV` of *global* row ids into the contiguous
K/V storage (:mod:`vlcache_sglang.backend.cell_store`): per request, the kept tree-owned prefix
positions it selected (read through its row, so that ids the tree swapped in are followed) plus
whatever the rest of its row resolves to in that layer (cells through virtual ids, the generated
tail as plain slots). A row's resolution is kept on its :class:`RequestState` and extended by the
new tokens while it stays valid.
"""
from __future__ import annotations

import numpy as np
import torch

from vlcache_sglang.backend.cell_store import GlobalKV
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV, to_device
from vlcache_sglang.backend.request_state import CompressedRow, RequestStates, ResolvedRow
from vlcache_sglang.backend.virtual_kv import VirtualKV

LayerLists = tuple[dict[int, RaggedKV], dict[int, list[torch.Tensor | None]]]


class LayerListBuilder:
    """Builds :attr:`ForwardMetadata.layer_kv` and ``layer_positions`` for one forward."""

    def __init__(self, kv: GlobalKV, vkv: VirtualKV, states: RequestStates, debug_checks: bool = False) -> None:
        self.kv, self.vkv, self.states = kv, vkv, states
        self.num_layers = kv.num_layers
        # True once the vlcache radix tree reports every rewrite of a row's ids (its checkpoint:
        # RequestStates.row_rewritten); then decode steps trust a row's cached resolution without
        # reading the device (see _build_decode). Without that tree every step compares the row.
        self.rows_reported = False
        self.debug_checks = debug_checks  # decode: still compare, count what a report missed
        self.stale_resolutions = 0  # debug checks: cached resolutions (or virtual-id flags) a missing report left stale

    def build(self, meta: ForwardMetadata, req_pool_indices: list[int], rids: list[str] | None) -> LayerLists:
        """Per-layer key lists (global row ids) and their positions, when the batch holds a
        compacted request or a row with virtual ids; ``({}, {})`` otherwise (stock path).

        Host work per forward does not grow with batch x layers: which rows hold virtual ids is
        one device read for the whole batch (in a reported decode step: none once every row of the
        batch was seen, :meth:`_decode_rows_with_virtual_ids`), plain requests' rows in a layer come from one
        elementwise op over the batch's slots (consecutive plain requests: one slice; with head
        cells a view per request and head), every layer's ``indptr`` goes to the device in one
        copy, and each layer's list is one ``cat`` (this runs before every decode step)."""
        records = [self.states.compressed_row(idx, rids[b] if rids is not None else None)
                   for b, idx in enumerate(req_pool_indices)]
        kv = meta.kv
        reported_decode = meta.is_decode and self.rows_reported
        if reported_decode:
            virtual = self._decode_rows_with_virtual_ids(kv, req_pool_indices, rids)
        else:
            virtual = self._rows_with_virtual_ids(kv, len(req_pool_indices))
        if not any(records) and not any(virtual):
            return {}, {}
        if reported_decode:
            return self._build_decode(kv, req_pool_indices, rids, records, virtual), {}
        per_request = []  # per request: per layer (rows, positions), None: plain slots
        for b, rec in enumerate(records):
            if rec is None and not virtual[b]:
                per_request.append(None)
                continue
            rid = rids[b] if rids is not None else None
            per_request.append(self._request_layers(req_pool_indices[b], rid, rec, kv.slots(b)))
        hp = self.vkv.units.heads_per_unit
        rows_per_layer = self.vkv.units.rows_per_layer
        slots = kv.kv_indices.to(torch.int64)
        cut = kv.kv_indptr_cpu
        indptrs: list[list[int]] = []
        parts_by_layer: list[list[torch.Tensor]] = []
        positions_out: dict[int, list[torch.Tensor | None]] = {}
        for layer in range(self.num_layers):
            # CellUnits.rows for the whole batch: (slot + layer * R) * hp + head
            plain = [(slots + layer * rows_per_layer) * hp + head for head in range(hp)] if None in per_request else []
            parts, pos_parts, indptr = [], [], [0]
            run = None  # layer cells: consecutive plain requests are one slice of `plain`
            for b, units in enumerate(per_request):
                if units is None and hp == 1:
                    run = (run[0] if run else cut[b], cut[b + 1])
                    pos_parts.append(None)
                    indptr.append(indptr[-1] + cut[b + 1] - cut[b])
                    continue
                if run:
                    parts.append(plain[0][run[0]:run[1]])
                    run = None
                for head in range(hp):  # head cells: one list per (request, KV head)
                    if units is None:
                        ids, pos = plain[head][cut[b]:cut[b + 1]], None  # a view
                    else:
                        ids, pos = units[layer * hp + head]
                    parts.append(ids)
                    pos_parts.append(pos)
                    indptr.append(indptr[-1] + ids.numel())
            if run:
                parts.append(plain[0][run[0]:run[1]])
            parts_by_layer.append(parts)
            indptrs.append(indptr)
            positions_out[layer] = pos_parts  # head cells: one entry per (request, KV head)
        indptr_dev = to_device(np.asarray(indptrs, dtype=np.int64), slots.device)  # one copy for all layers
        out = {layer: RaggedKV(indptr_dev[layer], torch.cat(parts), indptrs[layer], heads=hp)
               for layer, parts in enumerate(parts_by_layer)}
        return out, positions_out

    def _build_decode(self, kv: RaggedKV, req_pool_indices: list[int], rids: list[str] | None,
                      records: list[CompressedRow | None], virtual: list[bool]) -> dict[int, RaggedKV]:
        """A decode step's lists, with row rewrites reported: a constant number of device ops.

        A request reading per-layer lists reads, in unit ``u``, its cached resolution's rows (made
        at ``n0`` ids, :meth:`ResolvedRow.flattened`) and then its tail ``[n0, len)``: slots a decode
        step appended (plain, so their rows are ``slot * hp + offset_u``); a plain request reads
        its slots' rows in every unit. So every (layer, request, head) list is two segments of one
        source (the resolutions' rows, then the batch's slots) with an affine map, expanded on the
        device in one ``repeat_interleave`` from a segment table built on the host with numpy: no
        device op per request or layer (but a view per layer) and no device read (positions are
        not built: decode does not read them)."""
        hp = self.vkv.units.heads_per_unit
        units, layers = self.vkv.num_units, self.num_layers
        batch = len(req_pool_indices)
        cut = np.asarray(kv.kv_indptr_cpu, dtype=np.int64)
        tail_start, tail_len = cut[:-1].copy(), np.diff(cut)
        base_start = np.zeros(batch, dtype=np.int64)
        base_counts = np.zeros((batch, units), dtype=np.int64)
        sources, src_len = [], 0
        for b, rec in enumerate(records):
            if rec is None and not virtual[b]:
                continue
            rid = rids[b] if rids is not None else None
            resolved = self._decode_resolution(req_pool_indices[b], rid, rec, kv, b)
            flat, counts = resolved.flattened()
            n0 = resolved.ids.numel()
            base_start[b], base_counts[b] = src_len, counts
            tail_start[b] += n0
            tail_len[b] -= n0
            sources.append(flat)
            src_len += flat.numel()
        slots = kv.kv_indices.to(torch.int64)
        tail_rows = slots * hp if hp > 1 else slots  # a tail slot's row in unit u: slot * hp + offset_u
        source = torch.cat(sources + [tail_rows]) if sources else tail_rows
        unit_base = base_start[:, None] + np.cumsum(base_counts, axis=1) - base_counts  # [batch, units]
        offsets = (np.arange(units) // hp) * self.vkv.rows_per_layer * hp + np.arange(units) % hp
        # segments in output order: layer, request, head, (resolution rows, tail); unit u = layer * hp + head
        shape = (layers, batch, hp, 2)
        lengths = np.empty(shape, dtype=np.int64)
        start = np.empty(shape, dtype=np.int64)
        shift = np.zeros(shape, dtype=np.int64)
        per_unit = lambda a: a.reshape(batch, layers, hp).transpose(1, 0, 2)  # [batch, units] -> [L, B, hp]
        lengths[..., 0] = per_unit(base_counts)
        lengths[..., 1] = tail_len[None, :, None]
        start[..., 0] = per_unit(unit_base)
        start[..., 1] = (src_len + tail_start)[None, :, None]
        shift[..., 1] = offsets.reshape(layers, 1, hp)
        lengths = lengths.reshape(-1)
        ends = np.cumsum(lengths)
        # per segment: (its start in `source` minus its start in the output, the row shift), its length
        table = np.stack([start.reshape(-1) - (ends - lengths), shift.reshape(-1), lengths])
        total = int(ends[-1]) if ends.size else 0
        dev = to_device(table, slots.device)
        expanded = torch.repeat_interleave(dev[:2], dev[2], dim=1, output_size=total)
        rows = source[expanded[0] + torch.arange(total, device=slots.device)] + expanded[1]
        # per layer: indptr over its (request, head) lists, and where the layer starts in `rows`
        per_list = lengths.reshape(layers, batch * hp, 2).sum(axis=2)
        indptr = np.zeros((layers, batch * hp + 1), dtype=np.int64)
        indptr[:, 1:] = np.cumsum(per_list, axis=1)
        layer_start = np.concatenate([[0], np.cumsum(indptr[:, -1])])
        indptr_dev = to_device(indptr, slots.device)
        return {layer: RaggedKV(indptr_dev[layer], rows[layer_start[layer]:layer_start[layer + 1]],
                                indptr[layer].tolist(), heads=hp) for layer in range(layers)}

    def _decode_resolution(self, req_pool_idx: int, rid: str | None, rec: CompressedRow | None,
                           kv: RaggedKV, b: int) -> ResolvedRow:
        """Request ``b``'s cached resolution, trusted without a device op (rewrites are reported),
        else made afresh. Debug checks compare it as :meth:`_request_layers` does."""
        start = rec.protected if rec is not None else 0
        state = self.states.for_row(req_pool_idx, rid)
        c = state.resolved
        if c is not None and c.row is rec and start <= c.ids.numel() <= kv.length(b):
            if not self.debug_checks or self._still_valid(c, kv.slots(b)):
                return c
            self.stale_resolutions += 1
        slots = kv.slots(b)
        state.resolved = ResolvedRow(rec, slots.clone(), self._resolve_request(rec, slots, start), self.vkv.births)
        return state.resolved

    def _holds(self, c: ResolvedRow, slots: torch.Tensor) -> bool:
        """Whether the row still starts with ``c``'s ids and none of their table rows was rewritten
        since (device reads)."""
        return torch.equal(slots[:c.ids.numel()], c.ids) and (
            c.stamp == self.vkv.births or self.vkv.newest_birth(c.ids) <= c.stamp)

    def _still_valid(self, c: ResolvedRow, slots: torch.Tensor) -> bool:
        """:meth:`_holds`, and the rest of the row is plain slots (what the decode path assumes)."""
        return self._holds(c, slots) and not self.vkv.has_virtual(slots[c.ids.numel():])

    def _rows_with_virtual_ids(self, kv: RaggedKV, batch: int) -> list[bool]:
        """Per request, whether its slots hold a virtual id (one device read for the batch)."""
        if batch == 0 or kv.kv_indices.numel() == 0:
            return [False] * batch
        seen = torch.nn.functional.pad((kv.kv_indices >= self.vkv.base).to(torch.int64).cumsum(0), (1, 0))
        per = seen[kv.kv_indptr.to(device=seen.device, dtype=torch.int64)]  # virtual ids before each boundary
        return (per[1:] > per[:-1]).tolist()

    def _decode_rows_with_virtual_ids(self, kv: RaggedKV, req_pool_indices: list[int],
                                      rids: list[str] | None) -> list[bool]:
        """:meth:`_rows_with_virtual_ids` in a decode step with rewrites reported: read from the
        device only when a row of the batch was not seen since its last reported rewrite (its
        first decode step, or after a checkpoint). A decode step appends plain slots, so what was
        read holds for the request's later steps: in steady state a step reads nothing. Debug
        checks read every step and count a known answer the device contradicts in
        ``stale_resolutions``."""
        keys = [(idx, rids[b] if rids is not None else None) for b, idx in enumerate(req_pool_indices)]
        known = [self.states.holds_virtual(idx, rid) for idx, rid in keys]
        if None not in known and not self.debug_checks:
            return known
        read = self._rows_with_virtual_ids(kv, len(req_pool_indices))
        for (idx, rid), was, now in zip(keys, known, read):
            self.stale_resolutions += was is not None and was != now
            self.states.note_holds_virtual(idx, rid, now)
        return read

    def _request_layers(self, req_pool_idx: int, rid: str | None, rec: CompressedRow | None,
                        slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per cell unit (rows, positions) a request reads, resolved from its row.

        Resolving the whole row is an ``[n, L]`` gather and ``L`` nonzero per request per forward,
        O(length x layers): in decode only the new token is new. So the last resolution is kept
        on the row's state and reused while the row still starts with the same ids and none of
        their table entries was rewritten since (no compaction at all since, or
        :meth:`VirtualKV.newest_birth`); only the new ids are resolved and appended. Anything else
        (the tree swapped ids in, a new compaction, another request in the row) resolves afresh."""
        start = rec.protected if rec is not None else 0
        state = self.states.for_row(req_pool_idx, rid)
        c = state.resolved
        n = 0 if c is None else c.ids.numel()
        if c is not None and c.row is rec and start <= n <= slots.numel() and self._holds(c, slots):
            if n == slots.numel():
                return c.layers
            add = self.vkv.resolve(slots[n:])
            layers = [(torch.cat([rows, more]), torch.cat([pos, present + n]))
                      for (rows, pos), (present, more) in zip(c.layers, add)]
        else:
            layers = self._resolve_request(rec, slots, start)
        state.resolved = ResolvedRow(rec, slots.clone(), layers, self.vkv.births)
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
