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

import torch

from vlcache_sglang.backend.cell_store import GlobalKV
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV
from vlcache_sglang.backend.request_state import CompressedRow, RequestStates, ResolvedRow
from vlcache_sglang.backend.virtual_kv import VirtualKV

LayerLists = tuple[dict[int, RaggedKV], dict[int, list[torch.Tensor | None]]]


class LayerListBuilder:
    """Builds :attr:`ForwardMetadata.layer_kv` and ``layer_positions`` for one forward."""

    def __init__(self, kv: GlobalKV, vkv: VirtualKV, states: RequestStates) -> None:
        self.kv, self.vkv, self.states = kv, vkv, states
        self.num_layers = kv.num_layers

    def build(self, meta: ForwardMetadata, req_pool_indices: list[int], rids: list[str] | None) -> LayerLists:
        """Per-layer key lists (global row ids) and their positions, when the batch holds a
        compacted request or a row with virtual ids; ``({}, {})`` otherwise (stock path)."""
        records = [self.states.compressed_row(idx, rids[b] if rids is not None else None)
                   for b, idx in enumerate(req_pool_indices)]
        if not any(records) and not self.vkv.has_virtual(meta.kv.kv_indices):
            return {}, {}
        per_request = []  # per request: per layer (rows, positions), None: plain slots
        for b, rec in enumerate(records):
            slots = meta.kv.slots(b)
            if rec is None and not self.vkv.has_virtual(slots):
                per_request.append(None)
                continue
            rid = rids[b] if rids is not None else None
            per_request.append(self._request_layers(req_pool_indices[b], rid, rec, slots))
        hp = self.vkv.units.heads_per_unit
        out: dict[int, RaggedKV] = {}
        positions_out: dict[int, list[torch.Tensor | None]] = {}
        for layer in range(self.num_layers):
            parts, pos_parts, indptr = [], [], [0]
            for b, units in enumerate(per_request):
                for head in range(hp):  # head cells: one list per (request, KV head)
                    unit = layer * hp + head
                    if units is None:
                        ids = self.vkv.units.rows(unit, meta.kv.slots(b))
                        pos_parts.append(None)
                    else:
                        ids, pos = units[unit]
                        pos_parts.append(pos)
                    parts.append(ids)
                    indptr.append(indptr[-1] + ids.numel())
            indices = torch.cat(parts)
            out[layer] = RaggedKV(torch.tensor(indptr, dtype=torch.int64, device=indices.device), indices, indptr,
                                  heads=hp)
            positions_out[layer] = pos_parts  # head cells: one entry per (request, KV head)
        return out, positions_out

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
        if (c is not None and c.row is rec and start <= n <= slots.numel() and torch.equal(slots[:n], c.ids)
                and (c.stamp == self.vkv.births or self.vkv.newest_birth(c.ids) <= c.stamp)):
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
