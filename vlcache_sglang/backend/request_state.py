"""One state object per request row: what the plugin knows about a request while SGLang runs it.

A :class:`RequestState` lives from the start of a compressing request's prefill until SGLang frees
its row (``BasePrefixCache.free_kv_row`` hook → :meth:`RequestStates.drop`). It carries, in order
of its lifecycle: the statistics window (located once), the statistics accumulated over the
prefill chunks, whether the plan was applied (the row is final), the compacted row, and the last
resolution of the row into per-layer key lists (reused in decode). A row that only *reads* virtual
ids (a stock request over a compressed cached prefix) gets a state for its resolution only.

Every lookup checks the request id once, here: a row that SGLang has since handed to another
request never shows the old request's state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlcache_sglang.policy import StatsAccumulator, WindowSpec


@dataclass
class CompressedRow:
    """A request after compaction: what it reads of the tree-owned prefix ``[0, protected)``."""

    prompt_len: int
    protected: int
    prefix_pos: list[torch.Tensor]  # per layer: its kept positions < protected (read through the row)
    kept_counts: list[int]
    tokens_saved: int


@dataclass
class ResolvedRow:
    """A row's last resolution into per-layer (rows, positions), reused while it stays valid."""

    row: CompressedRow | None
    ids: torch.Tensor  # the row's ids it was resolved from
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    stamp: int  # VirtualKV.births when it was made
    flat: torch.Tensor | None = None  # decode: every unit's rows concatenated (made once, on first use)
    counts: list[int] | None = None  # decode: rows per unit in ``flat`` (host ints)

    def flattened(self) -> tuple[torch.Tensor, list[int]]:
        """Every unit's rows in one tensor and their counts (one ``cat``, once per resolution)."""
        if self.flat is None:
            self.counts = [int(rows.numel()) for rows, _ in self.layers]
            self.flat = torch.cat([rows.to(torch.int64) for rows, _ in self.layers])
        return self.flat, self.counts


@dataclass
class RequestState:
    """One request row (``req_pool_idx``) the plugin tracks."""

    rid: str | None  # None: a row seen only through a forward without request ids (graph replay)
    window: WindowSpec | None = None  # where the statistics come from (compressing requests)
    stats: StatsAccumulator | None = None  # until the plan is applied
    sharing: str = "off"  # "compressed", "prefix" or "off" (what the radix tree may take)
    tree_cap: int = 0  # "prefix": positions that may enter the tree
    planned: bool = False  # plan applied (or identity): the row is final
    row: CompressedRow | None = None  # after compaction
    resolved: ResolvedRow | None = None  # the row's last per-layer resolution

    @property
    def compressing(self) -> bool:
        return self.window is not None

    @property
    def pending(self) -> bool:
        """Statistics are being gathered (the prefill has not finished)."""
        return self.stats is not None and not self.planned


class RequestStates:
    """The states of this process's rows, keyed by ``req_pool_idx``."""

    def __init__(self) -> None:
        self._by_row: dict[int, RequestState] = {}
        # per row seen in a decode step: (rid, whether its ids include a virtual id). A decode step
        # appends plain slots, so the answer holds until a reported rewrite or SGLang frees the row.
        # Kept apart from the states: every decoding row has one, plain requests included.
        self._holds_virtual: dict[int, tuple[str | None, bool]] = {}

    def get(self, req_pool_idx: int, rid: str | None = None) -> RequestState | None:
        """The row's state, unless it belongs to another request (``rid`` None: any)."""
        state = self._by_row.get(req_pool_idx)
        if state is None or (rid is not None and state.rid is not None and state.rid != rid):
            return None
        return state

    def start(self, req_pool_idx: int, state: RequestState) -> RequestState:
        """A request starts in the row (what was kept about an earlier one is gone)."""
        self._by_row[req_pool_idx] = state
        known = self._holds_virtual.get(req_pool_idx)
        if known is not None and known[0] != state.rid:  # (a state made for the same request keeps it)
            del self._holds_virtual[req_pool_idx]
        return state

    def for_row(self, req_pool_idx: int, rid: str | None) -> RequestState:
        """The row's state, created (or restarted for ``rid``) when missing."""
        state = self.get(req_pool_idx, rid)
        return state if state is not None else self.start(req_pool_idx, RequestState(rid=rid))

    def row_rewritten(self, req_pool_idx: int) -> None:
        """Something other than a decode step rewrote the row's ids (the radix tree swapped in
        its own ids at a checkpoint): its cached resolution no longer holds."""
        state = self._by_row.get(req_pool_idx)
        if state is not None:
            state.resolved = None
        self._holds_virtual.pop(req_pool_idx, None)

    def holds_virtual(self, req_pool_idx: int, rid: str | None) -> bool | None:
        """Whether the row's ids include a virtual id, as last read in a decode step (None: not
        known since its last reported rewrite, or the row is another request's now)."""
        known = self._holds_virtual.get(req_pool_idx)
        if known is None or (rid is not None and known[0] is not None and known[0] != rid):
            return None
        return known[1]

    def note_holds_virtual(self, req_pool_idx: int, rid: str | None, holds: bool) -> None:
        """A decode step read whether the row holds a virtual id (kept for the later steps)."""
        self._holds_virtual[req_pool_idx] = (rid, holds)

    def drop(self, req_pool_idx: int) -> None:
        """SGLang releases the row: forget everything about it."""
        self._by_row.pop(req_pool_idx, None)
        self._holds_virtual.pop(req_pool_idx, None)

    def compressed_row(self, req_pool_idx: int, rid: str | None) -> CompressedRow | None:
        state = self.get(req_pool_idx, rid)
        return state.row if state is not None else None

    @property
    def rows(self) -> dict[int, CompressedRow]:
        """Compacted rows by ``req_pool_idx`` (a snapshot)."""
        return {idx: s.row for idx, s in self._by_row.items() if s.row is not None}

    @property
    def resolutions(self) -> dict[int, ResolvedRow]:
        """Cached row resolutions by ``req_pool_idx`` (a snapshot)."""
        return {idx: s.resolved for idx, s in self._by_row.items() if s.resolved is not None}

    def counts(self) -> dict[str, int]:
        """Live states for ``/server_info`` (all zero when the server is idle)."""
        states = self._by_row.values()
        return {"compressed_requests_live": sum(s.row is not None for s in states),
                "pending_statistics": sum(s.pending for s in states),
                "resolved_rows_live": sum(s.resolved is not None for s in states),
                "request_states_live": len(self._by_row),
                "row_flags_live": len(self._holds_virtual)}

    def __len__(self) -> int:
        return len(self._by_row)
