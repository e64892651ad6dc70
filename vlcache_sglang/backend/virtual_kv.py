"""Virtual token ids: how a compressed position lives in SGLang's rows and radix tree.

After compaction (:mod:`vlcache_sglang.backend.cell_store`) a compressed prompt position ``j`` is
kept in some layers and dropped in others, and its kept K/V rows sit in *cells* (rows of slots
that may hold other positions' cells too). SGLang's ``req_to_token`` rows and radix-tree values
need one id per token, so position ``j`` gets a **virtual id** ``v >= base`` (``base`` = rows per
layer, above every real slot id):

* ``table[v - base, u]`` is the K/V row of ``j`` in cell unit ``u`` (``-1``: dropped there); a
  unit is a layer (layer cells, the default) or a (layer, KV head) pair ``u = l * H + h`` (head
  cells, ``--vlcache-cells head``: each KV head keeps its own positions), see :class:`CellUnits`;
* ``null_id`` (= ``base``) stands for every position dropped in all layers; it owns nothing;
* each cell slot counts its live cells (``slot_live``); when the last virtual id reading a slot is
  released the slot goes back to SGLang's allocator.

Every free in SGLang ends in ``allocator.free(ids)`` (finish, abort, retraction, radix dedup,
eviction), so :func:`install_free_filter` wraps that one method: real ids go to the allocator,
virtual ids to :meth:`VirtualKV.release`. Rows and tree values therefore stay ordinary id
tensors that SGLang copies, splits, locks and frees without knowing what they mean.

For the radix tree's accounting each virtual id has a state (request-owned, in the tree and
evictable, in the tree and locked) and each slot counts its cells per state, so the tree can
report evictable and protected memory in slots, exactly (see :mod:`vlcache_sglang.radix_cache`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

FREE, OWNED, CACHED, LOCKED = 0, 1, 2, 3  # virtual id states
ID_DTYPE = torch.int32  # virtual-id table and birth stamps (device tables)


@dataclass
class Compaction:
    """What :meth:`VirtualKV.compact` did to one request."""

    prefix_ids: list[torch.Tensor]  # per layer: global rows of the kept positions < protected
    kept_counts: list[int]  # per layer: kept prompt positions (prefix + own)
    cell_slots: int  # slots now holding the request's cells
    freed_slots: int  # slots handed back to the allocator
    new_vids: int  # virtual ids taken (positions kept in at least one layer)


@dataclass(frozen=True)
class CellUnits:
    """Where slot ``s``'s cell of unit ``u`` lives in the K/V storage.

    Layer cells (``heads_per_unit == 1``): units are layers, the storage is ``[L * R, H, D]`` and
    the row is ``u * R + s``. Head cells (``heads_per_unit == H``): units are (layer, KV head)
    pairs ``u = l * H + h``, the same storage is read as ``[L * R * H, 1, D]`` head-rows and the row
    is ``(l * R + s) * H + h``. A slot holds ``L * heads_per_unit`` cells either way."""

    rows_per_layer: int
    num_layers: int
    heads_per_unit: int = 1

    @property
    def num_units(self) -> int:
        return self.num_layers * self.heads_per_unit

    def offsets(self, device: torch.device | str) -> torch.Tensor:
        """``[units]``: row of slot 0 in each unit (row = ``slot * heads_per_unit + offset``)."""
        u = torch.arange(self.num_units, device=device, dtype=torch.int64)
        hp = self.heads_per_unit
        return (u // hp) * self.rows_per_layer * hp + u % hp

    def rows(self, unit: int, slots: torch.Tensor) -> torch.Tensor:
        """Rows of ``slots``' cells in ``unit``."""
        layer, head = divmod(unit, self.heads_per_unit)
        return (slots.to(torch.int64) + layer * self.rows_per_layer) * self.heads_per_unit + head

    def slot_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The slot owning each row."""
        return (rows // self.heads_per_unit) % self.rows_per_layer


class VirtualKV:
    """Virtual ids over the K/V storage's cells (plain PyTorch); see :class:`CellUnits`."""

    def __init__(self, rows_per_layer: int, num_layers: int, capacity: int, device: torch.device | str = "cpu",
                 kernels: str = "auto", heads_per_unit: int = 1):
        if capacity < 2:
            raise ValueError("need room for the null id and at least one virtual id")
        if rows_per_layer * num_layers * heads_per_unit >= torch.iinfo(ID_DTYPE).max:
            raise ValueError(f"{num_layers} layers x {rows_per_layer} rows x {heads_per_unit} heads do not fit "
                             "int32 row ids")
        self.base = self.null_id = rows_per_layer
        self.rows_per_layer, self.num_layers, self.capacity = rows_per_layer, num_layers, capacity
        self.units = CellUnits(rows_per_layer, num_layers, heads_per_unit)
        self.num_units = self.units.num_units
        self._unit_offsets = self.units.offsets(device)
        self.device = torch.device(device)
        self.kernels = kernels  # compaction moves: kernels.dispatch mode (VLCACHE_KERNELS)
        self.free_slots_fn = None  # the allocator's original free (set by install_free_filter)
        self.births = 0  # compactions so far (never reset: stamps of cached resolutions stay comparable)
        self.clear()

    def clear(self) -> None:
        """Forget every virtual id and cell (SGLang's flush_cache clears the allocator next)."""
        # Device tables, counted in SGLang's pool budget (backend/memory_budget.py): int32 ids, since
        # global rows L * R and compaction counts fit (checked in __init__).
        self.table = torch.full((self.capacity, self.num_units), -1, dtype=ID_DTYPE, device=self.device)
        self.born = torch.zeros(self.capacity, dtype=ID_DTYPE, device=self.device)  # compaction that wrote it
        self.state = torch.zeros(self.capacity, dtype=torch.int8)
        self.state[0] = CACHED  # the null id is never freed and owns nothing
        self._free = list(range(self.capacity - 1, 0, -1))  # stack of free table indices
        # per slot (host): live cells, and cells whose virtual id is request-owned / locked in the tree
        self.slot_live = torch.zeros(self.rows_per_layer, dtype=torch.int32)
        self.slot_owned = torch.zeros(self.rows_per_layer, dtype=torch.int32)
        self.slot_locked = torch.zeros(self.rows_per_layer, dtype=torch.int32)
        # running totals over slots, kept by _count (so the scheduler's size queries are O(1)):
        # slots with a live cell; of those with no request-owned cell, without / with a locked one
        self.n_live_slots = self.n_evictable_slots = self.n_protected_slots = 0
        self.slots_freed = 0  # cell slots returned to the allocator by release (a running count)

    def device_bytes(self) -> int:
        """Bytes of this object's tables on ``device`` (what memory_budget charges per slot)."""
        return self.table.nbytes + self.born.nbytes

    # -- queries ---------------------------------------------------------------------------
    @property
    def free_ids(self) -> int:
        return len(self._free)

    @property
    def live_ids(self) -> int:
        return self.capacity - 1 - len(self._free)

    def live_cell_slots(self) -> int:
        return self.n_live_slots

    def owned_cell_slots(self) -> int:
        """Cell slots at least one request-owned virtual id reads (held by running requests)."""
        return int((self.slot_owned > 0).sum())

    def cached_cell_slots(self) -> tuple[int, int]:
        """(evictable, protected) cell slots: slots all of whose cells belong to tree entries,
        with no locked cell, resp. with at least one locked cell. O(1): running totals kept where
        cells are created, freed, inserted and locked (the scheduler asks several times per step)."""
        return self.n_evictable_slots, self.n_protected_slots

    def recount(self) -> tuple[int, int, int]:
        """(live, evictable, protected) slots recounted from the per-slot counters, O(slots): the
        reference for the running totals (tests, debug checks)."""
        live = self.slot_live > 0
        in_tree = live & (self.slot_owned == 0)
        locked = self.slot_locked > 0
        return int(live.sum()), int((in_tree & ~locked).sum()), int((in_tree & locked).sum())

    def is_virtual(self, ids: torch.Tensor) -> torch.Tensor:
        return ids >= self.base

    def has_virtual(self, ids: torch.Tensor) -> bool:
        return bool(ids.numel()) and int(ids.max()) >= self.base

    def slot_of(self, rows: torch.Tensor) -> torch.Tensor:
        return self.units.slot_of(rows)

    def layer_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``[n, units]`` K/V row of each id in each cell unit (``-1`` where dropped); units are
        layers with layer cells, (layer, KV head) pairs with head cells."""
        ids = ids.to(device=self.device, dtype=torch.int64)
        rows = ids.unsqueeze(1) * self.units.heads_per_unit + self._unit_offsets
        virtual = ids >= self.base
        if bool(virtual.any()):
            rows[virtual] = self.table[ids[virtual] - self.base].to(rows.dtype)
        return rows

    def newest_birth(self, ids: torch.Tensor) -> int:
        """The latest compaction that wrote any of ``ids``' table rows (0: none are virtual). A
        resolution of ``ids`` made when :attr:`births` was ``b`` still holds while this is ``<= b``
        (a table row changes only when its id is released and handed out again)."""
        ids = ids.to(device=self.device, dtype=torch.int64)
        idx = ids[ids > self.base] - self.base
        return int(self.born[idx].max()) if idx.numel() else 0

    def resolve(self, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per unit ``(present, rows)``: the indices into ``ids`` present in that unit and their
        K/V rows, in order. Ids without a virtual one (a decode step's new tokens) cost one device
        read in all, not one ``nonzero`` per unit."""
        ids = ids.to(device=self.device, dtype=torch.int64)
        if not self.has_virtual(ids):  # plain slots (a decode step's new tokens): in every unit, no nonzero
            present = torch.arange(ids.numel(), device=ids.device)
            rows = ids.unsqueeze(1) * self.units.heads_per_unit + self._unit_offsets
            return [(present, rows[:, u]) for u in range(self.num_units)]
        rows = self.layer_rows(ids)
        out = []
        for layer in range(self.num_units):
            col = rows[:, layer]
            present = torch.nonzero(col >= 0).flatten()
            out.append((present, col[present]))
        return out

    # -- compaction ------------------------------------------------------------------------
    def compact(self, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor, kept: list[torch.Tensor],
                protected: int, prompt_len: int, *, min_cell_slots: int = 0,
                id_positions: torch.Tensor | None = None) -> Compaction | None:
        """Move one request's kept K/V into cells and rewrite its row with virtual ids.

        Args:
            k, v: the K/V storage as cell rows (:meth:`GlobalKV.cells`): ``[L * R, heads, dim]``
                with layer cells, ``[L * R * H, 1, dim]`` with head cells.
            row: the request's ``req_to_token`` row (written in place for ``[protected, prompt_len)``).
            kept: per unit, sorted kept positions in ``[0, prompt_len)``, all present in that unit.
            protected: positions ``< protected`` belong to the radix tree: read in place, never moved.
            prompt_len: ``m``.
            min_cell_slots: keep at least this many slots (tensor parallelism with head cells:
                every rank keeps as many slots as the rank that needs most, so all free alike).
            id_positions: boolean ``[m]``: positions that get a virtual id (default: kept in some
                unit here); with head cells under tensor parallelism, kept in a unit of any rank,
                so every rank takes the same number of virtual ids.

        Positions ``[protected, m)`` must hold the request's own real slots. Their kept rows (``k_u``
        per unit) are packed into ``c = ceil(sum_u k_u / U)`` of those slots; the rest go back to
        the allocator. Returns None (nothing changed) when there are not enough free virtual ids.
        """
        from vlcache_sglang.kernels.dispatch import move_kv_rows_auto
        from vlcache_sglang.kernels.kv_move import compaction_moves

        dev = self.device
        slots = row[:prompt_len].to(device=dev, dtype=torch.int64)
        if self.has_virtual(slots[protected:]):
            raise AssertionError("a request's own positions must hold real slots before compaction")
        prefix_rows = self.layer_rows(slots[:protected]) if protected else None
        owned = prompt_len - protected
        used = torch.zeros(owned, dtype=torch.bool, device=dev)
        prefix_ids, own_pos, counts = [], [], []
        for layer, pos in enumerate(kept):
            pos = pos.to(device=dev, dtype=torch.int64)
            in_prefix = pos < protected
            ids = prefix_rows[pos[in_prefix], layer] if prefix_rows is not None else pos[in_prefix]
            if bool((ids < 0).any()):
                raise AssertionError(f"layer {layer} keeps a prefix position it does not hold")
            prefix_ids.append(ids)
            own = pos[~in_prefix] - protected
            own_pos.append(own)
            used[own] = True
            counts.append(int(pos.numel()))
        if id_positions is not None:
            used |= id_positions.to(dev)[protected:prompt_len]
        n_vids = int(used.sum())
        if n_vids > len(self._free):
            logger.warning("vlcache: %d virtual ids needed, %d free; request left uncompressed", n_vids, len(self._free))
            return None
        moves = compaction_moves(self.num_units, self.rows_per_layer, slots, kept, protected, prompt_len, device=dev,
                                 heads_per_unit=self.units.heads_per_unit, min_cell_slots=min_cell_slots)
        if moves.src.numel():  # sources are read before any cell is written; bytes (fp8 pools store uint8)
            from vlcache_sglang.backend.cell_store import storage_view

            move_kv_rows_auto(storage_view(k), storage_view(v), moves.src, moves.dst, mode=self.kernels)
        # virtual ids for positions kept somewhere; the null id for the rest
        vid_index = torch.zeros(owned, dtype=torch.int64, device=dev)
        taken = [self._free.pop() for _ in range(n_vids)]
        vid_index[used] = torch.tensor(taken, dtype=torch.int64, device=dev)
        for layer, own in enumerate(own_pos):
            self.table[vid_index[own], layer] = moves.own_dst[layer].to(ID_DTYPE)
        if taken:
            self.state[torch.tensor(taken)] = OWNED
        self.births += 1
        if taken:
            self.born[torch.tensor(taken, device=dev)] = self.births
        self._count(self.slot_of(moves.dst).cpu(), live=1, owned=1)
        row[protected:prompt_len] = (vid_index + self.base).to(row.dtype)
        if moves.freed.numel():
            self._free_slots(moves.freed)
        return Compaction(prefix_ids=prefix_ids, kept_counts=counts, cell_slots=moves.cell_slots,
                          freed_slots=int(moves.freed.numel()), new_vids=n_vids)

    # -- state changes (radix tree) --------------------------------------------------------
    def set_state(self, ids: torch.Tensor, old: int, new: int) -> int:
        """Move the virtual ids among ``ids`` that are in state ``old`` to ``new``; returns how many."""
        idx = self._indices(ids)
        if idx.numel() == 0:
            return 0
        idx = idx[self.state[idx] == old]
        if idx.numel() == 0:
            return 0
        self._count_cells(idx, old, -1)
        self._count_cells(idx, new, +1)
        self.state[idx] = new
        return int(idx.numel())

    def release(self, ids: torch.Tensor) -> None:
        """Free virtual ids (the null id is ignored); slots whose last cell goes are freed."""
        idx = self._indices(ids)
        if idx.numel() == 0:
            return
        states = self.state[idx]
        if bool((states == FREE).any()):
            raise AssertionError(f"double free of virtual ids {(idx[states == FREE] + self.base).tolist()[:8]}")
        for s in (OWNED, LOCKED):
            self._count_cells(idx[states == s], s, -1)
        cells = self.table[idx.to(self.device)]
        cells = cells[cells >= 0]
        slot_ids = self.slot_of(cells).cpu().to(torch.int64)
        self._count(slot_ids, live=-1)
        emptied = torch.unique(slot_ids)
        emptied = emptied[self.slot_live[emptied] == 0]
        self.table[idx.to(self.device)] = -1
        self.state[idx] = FREE
        self._free.extend(idx.tolist())
        if emptied.numel():
            self.slots_freed += int(emptied.numel())
            self._free_slots(emptied.to(self.device))

    # -- internals -------------------------------------------------------------------------
    def _indices(self, ids: torch.Tensor) -> torch.Tensor:
        """Table indices (CPU int64) of the non-null virtual ids among ``ids``."""
        ids = ids.reshape(-1).to(device="cpu", dtype=torch.int64)
        idx = ids[ids > self.base] - self.base
        return idx

    def _count_cells(self, idx: torch.Tensor, state: int, sign: int) -> None:
        if state not in (OWNED, LOCKED) or idx.numel() == 0:
            return
        cells = self.table[idx.to(self.device)]
        slot_ids = self.slot_of(cells[cells >= 0]).cpu().to(torch.int64)
        self._count(slot_ids, owned=sign if state == OWNED else 0, locked=sign if state == LOCKED else 0)

    def _count(self, slot_ids: torch.Tensor, live: int = 0, owned: int = 0, locked: int = 0) -> None:
        """Add ``live``/``owned``/``locked`` per occurrence of a slot in ``slot_ids`` (host int64)
        and move the running totals by the classes of the touched slots: O(cells touched)."""
        if slot_ids.numel() == 0:
            return
        touched = torch.unique(slot_ids)
        before = self._classes(touched)
        for counter, delta in ((self.slot_live, live), (self.slot_owned, owned), (self.slot_locked, locked)):
            if delta:
                counter.index_add_(0, slot_ids, torch.full_like(slot_ids, delta, dtype=torch.int32))
        after = self._classes(touched)
        self.n_live_slots += after[0] - before[0]
        self.n_evictable_slots += after[1] - before[1]
        self.n_protected_slots += after[2] - before[2]

    def _classes(self, slots: torch.Tensor) -> tuple[int, int, int]:
        live = self.slot_live[slots] > 0
        in_tree = live & (self.slot_owned[slots] == 0)
        locked = self.slot_locked[slots] > 0
        return int(live.sum()), int((in_tree & ~locked).sum()), int((in_tree & locked).sum())

    def _free_slots(self, slots: torch.Tensor) -> None:
        if self.free_slots_fn is None:
            raise RuntimeError("VirtualKV has no allocator: call install_free_filter first")
        self.free_slots_fn(slots.to(torch.int64))


def install_free_filter(allocator, vkv: VirtualKV) -> None:
    """Route virtual ids in every ``allocator.free`` call to ``vkv.release`` (idempotent)."""
    if getattr(allocator, "_vlcache_free_filter", None) is vkv:
        return
    original = allocator.free
    vkv.free_slots_fn = original

    def free(free_index: torch.Tensor):
        if free_index.numel() == 0:
            return original(free_index)
        virtual = free_index >= vkv.base
        if not bool(virtual.any()):
            return original(free_index)
        vkv.release(free_index[virtual])
        real = free_index[~virtual]
        if real.numel():
            original(real)

    allocator.free = free
    allocator._vlcache_free_filter = vkv
