"""Attention statistics without the m-by-m matrix (VL-Cache Sec. 1 and 3).

For a set of query rows Q (the window P, or every row for H2O) of one layer this computes,
per query head h and key j,

* ``col[h, j] = sum_{q in Q} A[h, q, j]`` - accumulated attention (VL-Cache's post-vision
  score ``s[l, j]`` before the head reduction; H2O's heavy-hitter score when Q is all rows);
* ``below[h] = #{(q, j): j <= q, A[h, q, j] < p * max_j' A[h, q, j']}`` and
  ``causal[h] = #{(q, j): j <= q}``, so ``gamma[l, h] = below / causal`` (threshold sparsity).

Keys are visited in chunks with a two-pass softmax: pass 1 keeps a running row max and
normaliser (online softmax), pass 2 recomputes the logits and emits log-probabilities
``log A = s - max - log(sum)``; since ``max_j A = 1 / sum``, the threshold test is
``log A < log p - log(sum)``. A query row's softmax lies entirely inside one call (all its causal keys
are passed), so the outputs of calls over disjoint row sets add up exactly - which is how
:class:`StatsAccumulator` follows chunked prefill. This module is the reference a fused
kernel must match; :func:`dense_attention_stats` is the test oracle that materialises A.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple, Sequence

import torch

from vlcache_sglang.policy.window import WindowSpec

if TYPE_CHECKING:
    from vlcache_sglang.policy.config import PolicyConfig

__all__ = [
    "AttentionStats",
    "PolicyStats",
    "StatsAccumulator",
    "StatsFn",
    "attention_stats",
    "dense_attention_stats",
]


class AttentionStats(NamedTuple):
    """Statistics of one layer over a set of query rows (per query head)."""

    col: torch.Tensor  # [Hq, n_k] accumulated attention per key
    below: torch.Tensor  # [Hq] int64, causal entries under p * row max
    causal: torch.Tensor  # [Hq] int64, causal entries


def _check_qk(q: torch.Tensor, pos: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [n_q, Hq, D] and k [n_k, Hkv, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    n_q, hq, d = q.shape
    n_k, hkv, dk = k.shape
    if d != dk or hq % hkv:
        raise ValueError(f"head dims differ or Hq={hq} is not a multiple of Hkv={hkv}")
    if pos.shape != (n_q,):
        raise ValueError(f"q_positions must be [{n_q}], got {tuple(pos.shape)}")
    pos = pos.detach().cpu()
    if n_q and (int(pos.min()) < 0 or int(pos.max()) >= n_k):
        raise ValueError(f"query positions must lie in [0, n_k={n_k}) (causal keys must be present)")
    return hq, hkv, n_k


def attention_stats(q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, scale: float,
                    threshold: float = 0.01, *, key_chunk: int = 1024, query_chunk: int = 128,
                    dtype: torch.dtype = torch.float32) -> AttentionStats:
    """Chunked two-pass statistics of ``softmax(scale * q k^T)`` under a causal mask.

    Args:
        q: ``[n_q, Hq, D]`` query rows (post-RoPE), any subset of the prompt's rows.
        q_positions: ``[n_q]`` absolute positions; row ``t`` sees keys ``0..t``.
        k: ``[n_k, Hkv, D]`` keys (post-RoPE); query head ``h`` uses KV head ``h // (Hq/Hkv)``.
        scale: softmax scale (usually ``head_dim ** -0.5``).
        threshold: ``p`` of the row-relative filter.
        key_chunk, query_chunk: block sizes; peak memory ~ ``Hq * query_chunk * key_chunk``.
        dtype: accumulation dtype (promoted with the inputs' dtype, at least float32).

    Returns:
        :class:`AttentionStats` with ``col`` in the promoted dtype.
    """
    hq, hkv, n_k = _check_qk(q, q_positions, k)
    g = hq // hkv
    cdt = torch.promote_types(torch.promote_types(q.dtype, dtype), torch.float32)
    dev = q.device
    col = torch.zeros(hkv, g, n_k, dtype=cdt, device=dev)
    below = torch.zeros(hkv, g, dtype=torch.int64, device=dev)
    causal = torch.zeros(hq, dtype=torch.int64, device=dev)
    n_q = q.shape[0]
    if n_q == 0 or n_k == 0:
        return AttentionStats(col.reshape(hq, n_k), below.reshape(hq), causal)
    log_p = math.log(threshold) if threshold > 0 else -math.inf
    kt = k.to(cdt).permute(1, 2, 0)  # [Hkv, D, n_k]
    pos_all = q_positions.to(device=dev, dtype=torch.int64)
    pos_host = q_positions.to(device="cpu", dtype=torch.int64)  # block bounds without device syncs
    key_idx = torch.arange(n_k, device=dev)
    for q0 in range(0, n_q, query_chunk):
        qc = q[q0:q0 + query_chunk].to(cdt)  # [nq, Hq, D]
        pos = pos_all[q0:q0 + query_chunk]
        ph = pos_host[q0:q0 + query_chunk]
        nq = qc.shape[0]
        qh = (qc * scale).permute(1, 0, 2).reshape(hkv, g * nq, -1)  # [Hkv, G*nq, D], scaled
        k_end = int(ph.max()) + 1  # keys past the last row's position are masked for all rows
        causal += int((ph + 1).sum())
        # pass 1: running max and normaliser (online softmax)
        row_max = torch.full((hkv, g, nq), -math.inf, dtype=cdt, device=dev)
        row_sum = torch.zeros(hkv, g, nq, dtype=cdt, device=dev)
        for k0 in range(0, k_end, key_chunk):
            s, _ = _logits(qh, kt, k0, min(k0 + key_chunk, k_end), pos, ph, key_idx, g, nq)
            new_max = torch.maximum(row_max, s.amax(-1))
            row_sum.mul_(torch.exp(row_max - new_max)).add_(s.sub_(new_max[..., None]).exp_().sum(-1))
            row_max = new_max
        # pass 2: log A = s - (max + log sum); the threshold A < p * max A is
        # log A < log p - log sum. Emits column sums and threshold counts.
        log_norm = (row_max + row_sum.log())[..., None]
        cut = (log_p - row_sum.log())[..., None]
        for k0 in range(0, k_end, key_chunk):
            k1 = min(k0 + key_chunk, k_end)
            s, n_masked = _logits(qh, kt, k0, k1, pos, ph, key_idx, g, nq)
            s.sub_(log_norm)  # log-probabilities; -inf where masked
            if log_p > -math.inf:  # masked entries (-inf) pass the test: take them back out
                below += (s < cut).sum((2, 3)) - n_masked
            col[:, :, k0:k1] += s.exp_().sum(2)
    return AttentionStats(col.reshape(hq, n_k), below.reshape(hq), causal)


StatsFn = Callable[..., AttentionStats]
"""A statistics function with the signature of :func:`attention_stats` (``q, q_positions, k, scale,
threshold, *, key_chunk, query_chunk, dtype``) and its outputs: the reference, or a fused kernel in its place."""


def _logits(qh: torch.Tensor, kt: torch.Tensor, k0: int, k1: int, pos: torch.Tensor,
            pos_host: torch.Tensor, key_idx: torch.Tensor, g: int, nq: int) -> tuple[torch.Tensor, int]:
    """Causally masked logits ``[Hkv, G, nq, k1-k0]`` of the pre-scaled queries and the number
    of masked (row, key) pairs per head (a block wholly below the diagonal skips the mask)."""
    s = torch.matmul(qh, kt[:, :, k0:k1]).view(qh.shape[0], g, nq, k1 - k0)
    if k1 - 1 <= int(pos_host.min()):
        return s, 0
    s.masked_fill_(key_idx[k0:k1][None, :] > pos[:, None], -math.inf)
    return s, int((k1 - torch.clamp(pos_host + 1, k0, k1)).sum())


def dense_attention_stats(q: torch.Tensor, q_positions: torch.Tensor, k: torch.Tensor, scale: float,
                          threshold: float = 0.01) -> AttentionStats:
    """Oracle: the same statistics from the materialised float64 attention (tests only)."""
    hq, hkv, n_k = _check_qk(q, q_positions, k)
    g = hq // hkv
    q64, k64 = q.double(), k.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q64, k64) * scale
    mask = torch.arange(n_k, device=q.device)[None, :] <= q_positions.to(q.device)[:, None]
    a = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)
    below = ((a < threshold * a.amax(-1, keepdim=True)) & mask).sum((1, 2))
    causal = mask.sum().expand(hq).clone()
    return AttentionStats(a.sum(1), below, causal)


@dataclass
class PolicyStats:
    """Per-request statistics of all layers, the input of :func:`build_plan`.

    ``col`` is reduced to KV heads (sum over each GQA group); sparsity stays per query head.
    Tensors are ``None`` for methods that gather nothing (StreamingLLM, random, full).
    """

    prompt_len: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    window: WindowSpec
    rows: str  # "window" | "all" | "none": which query rows were measured
    col: torch.Tensor | None = None  # [L, Hkv, m]
    below: torch.Tensor | None = None  # [L, Hq] int64
    causal: torch.Tensor | None = None  # [L, Hq] int64
    rows_seen: list[int] = field(default_factory=list)  # per layer
    #: first row this request computes: rows before it were served from a cache (a later turn
    #: over a compressed prefix) and cannot be measured, so "all" rows means rows from here on
    first_row: int = 0

    @property
    def rows_expected(self) -> int:
        """Rows each layer must see for complete statistics."""
        if self.rows == "window":
            return self.window.length if self.window.compress else 0
        if self.rows == "all":
            return self.prompt_len - self.first_row if self.window.compress else 0
        return 0

    @property
    def complete(self) -> bool:
        """Every layer has seen exactly its expected rows."""
        return all(n == self.rows_expected for n in self.rows_seen)

    def head_sparsity(self) -> torch.Tensor:
        """``gamma[l, h]`` = zeroed / causal entries of the measured rows, ``[L, Hq]`` float64."""
        if self.below is None or self.causal is None:
            raise ValueError("no attention statistics were gathered for this method")
        return self.below.double() / self.causal.clamp_min(1).double()

    def layer_sparsity(self) -> torch.Tensor:
        """``gamma[l]`` = mean over query heads of ``gamma[l, h]`` (VL-Cache), ``[L]``."""
        return self.head_sparsity().mean(1)


class StatsAccumulator:
    """Per-request accumulator fed layer by layer, prefill chunk by prefill chunk.

    ``add`` keeps only the query rows the method needs (window rows for VL-Cache, SnapKV and
    PyramidKV; all rows for H2O; none for StreamingLLM, random and full) and adds their
    statistics into ``[L, Hkv, m]`` / ``[L, Hq]`` buffers allocated on the first call's device.

    ``stats_fn`` computes one call's statistics (a :data:`StatsFn`); the default is the torch
    reference :func:`attention_stats`. The policy never picks a kernel itself: an engine with a
    fused kernel hands it in (the SGLang backend passes a ``kernels.dispatch.StatsDispatch``,
    Triton on CUDA).
    """

    def __init__(self, num_layers: int, num_q_heads: int, num_kv_heads: int, prompt_len: int,
                 window: WindowSpec, cfg: "PolicyConfig", first_row: int = 0, *,
                 stats_fn: StatsFn = attention_stats) -> None:
        from vlcache_sglang.policy.methods import get_method

        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        if window.prompt_len != prompt_len:
            raise ValueError(f"window is for a prompt of {window.prompt_len} tokens, not {prompt_len}")
        self.cfg = cfg
        self.method = get_method(cfg.method)
        rows = self.method.rows if window.compress else "none"
        if not 0 <= first_row < max(1, prompt_len):
            raise ValueError(f"first_row={first_row} must be in [0, prompt_len={prompt_len})")
        self.stats = PolicyStats(prompt_len, num_layers, num_q_heads, num_kv_heads, window, rows,
                                 rows_seen=[0] * num_layers, first_row=first_row)
        self._dtype = torch.float64 if cfg.stats_dtype == "float64" else torch.float32
        self._stats_fn = stats_fn

    @property
    def needs_attention(self) -> bool:
        """False when ``add`` would do nothing (the backend may skip calling it)."""
        return self.stats.rows != "none"

    def needed_rows(self, q_positions: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the rows of ``q_positions`` that ``add`` would use."""
        st = self.stats
        if st.rows == "all":
            return torch.ones_like(q_positions, dtype=torch.bool)
        if st.rows == "window":
            return (q_positions >= st.window.start) & (q_positions < st.window.end)
        return torch.zeros_like(q_positions, dtype=torch.bool)

    def needed_span(self, first_position: int, n_rows: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of ``n_rows`` rows at the consecutive positions ``first_position..``
        that ``add`` would use, from host integers (no device synchronisation)."""
        st = self.stats
        if st.rows == "all":
            return 0, n_rows
        if st.rows == "window":
            lo = min(max(st.window.start - first_position, 0), n_rows)
            return lo, max(lo, min(st.window.end - first_position, n_rows))
        return 0, 0

    def add(self, layer_id: int, q_rows: torch.Tensor, q_positions: torch.Tensor | int,
            k_all: torch.Tensor, scale: float, key_positions: torch.Tensor | None = None) -> None:
        """Add one layer's statistics for one prefill chunk.

        Args:
            layer_id: ``0 <= layer_id < num_layers``.
            q_rows: ``[n_q, Hq, D]`` the chunk's queries (post-RoPE).
            q_positions: ``[n_q]`` their absolute prompt positions, or an ``int``: the first of
                consecutive positions (a prefill chunk). Then the needed rows are chosen on the
                host (:meth:`needed_span`); a tensor needs a device-to-host read to choose them,
                which on a GPU waits for the work queued before it.
            k_all: ``[n_k, Hkv, D]`` all keys so far (positions ``0..n_k-1``), ``n_k <= m``.
            scale: softmax scale.
            key_positions: ``[n_k]`` increasing prompt positions of ``k_all`` when the layer holds
                only some keys (a prefix that was compressed earlier); absent keys get no attention,
                so their column stays zero. None: ``k_all`` holds positions ``0..n_k-1``.
        """
        st = self.stats
        if st.rows == "none":
            return
        self._check_layer(layer_id, k_all.shape[0])
        if q_rows.shape[1] != st.num_q_heads or k_all.shape[1] != st.num_kv_heads:
            raise ValueError(f"expected {st.num_q_heads} query heads and {st.num_kv_heads} KV heads, "
                             f"got q {tuple(q_rows.shape)} and k {tuple(k_all.shape)}")
        q_rows, q_positions = self._needed(q_rows, q_positions)
        if q_positions.numel() == 0:
            return
        self._accumulate(layer_id, slice(None), q_rows, q_positions, k_all, key_positions, scale)
        st.rows_seen[layer_id] += int(q_positions.shape[0])

    def add_per_head(self, layer_id: int, q_rows: torch.Tensor, q_positions: torch.Tensor | int,
                     keys: Sequence[torch.Tensor], key_positions: Sequence[torch.Tensor | None], scale: float) -> None:
        """:meth:`add` when each KV head holds its own keys (a prefix compressed per KV head
        earlier, served with head cells): KV head ``h``'s query group attends over ``keys[h]``
        (``[n_h, D]``, at the increasing prompt positions ``key_positions[h]``; None: ``0..n_h-1``)
        and only those columns of head ``h`` get attention, as in the forward's own attention.
        ``q_positions``: as in :meth:`add`."""
        st = self.stats
        if st.rows == "none":
            return
        if len(keys) != st.num_kv_heads or len(key_positions) != st.num_kv_heads:
            raise ValueError(f"expected keys of {st.num_kv_heads} KV heads, got {len(keys)} / {len(key_positions)}")
        if q_rows.shape[1] != st.num_q_heads:
            raise ValueError(f"expected {st.num_q_heads} query heads, got q {tuple(q_rows.shape)}")
        for k in keys:
            self._check_layer(layer_id, k.shape[0])
        q_rows, q_positions = self._needed(q_rows, q_positions)
        if q_positions.numel() == 0:
            return
        g = st.num_q_heads // st.num_kv_heads
        for h, (k, pos) in enumerate(zip(keys, key_positions)):
            k = k.reshape(k.shape[0], 1, -1)
            self._accumulate(layer_id, slice(h, h + 1), q_rows[:, h * g:(h + 1) * g], q_positions, k, pos, scale)
        st.rows_seen[layer_id] += int(q_positions.shape[0])

    def _check_layer(self, layer_id: int, n_keys: int) -> None:
        st = self.stats
        if not 0 <= layer_id < st.num_layers:
            raise ValueError(f"layer_id {layer_id} outside [0, {st.num_layers})")
        if n_keys > st.prompt_len:
            raise ValueError(f"k_all has {n_keys} keys, more than prompt_len={st.prompt_len}")

    def _needed(self, q_rows: torch.Tensor, q_positions: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(q_positions, torch.Tensor):
            q_positions = int(q_positions)
            lo, hi = self.needed_span(q_positions, q_rows.shape[0])
            return q_rows[lo:hi], torch.arange(q_positions + lo, q_positions + hi, device=q_rows.device)
        q_positions = q_positions.to(q_rows.device)
        sel = self.needed_rows(q_positions)
        if not bool(sel.all()):
            q_rows, q_positions = q_rows[sel], q_positions[sel]
        return q_rows, q_positions

    def _accumulate(self, layer_id: int, kv_heads: slice, q_rows: torch.Tensor, q_positions: torch.Tensor,
                    k_all: torch.Tensor, key_positions: torch.Tensor | None, scale: float) -> None:
        """Statistics of ``q_rows`` (the query heads of ``kv_heads``) over ``k_all`` into the buffers."""
        st = self.stats
        if st.col is None:
            dev = k_all.device
            st.col = torch.zeros(st.num_layers, st.num_kv_heads, st.prompt_len, dtype=self._dtype, device=dev)
            st.below = torch.zeros(st.num_layers, st.num_q_heads, dtype=torch.int64, device=dev)
            st.causal = torch.zeros(st.num_layers, st.num_q_heads, dtype=torch.int64, device=dev)
        if key_positions is not None:
            # causality is preserved by the increasing map position -> index in k_all
            key_positions = key_positions.to(device=q_rows.device, dtype=torch.int64)
            q_index = torch.searchsorted(key_positions, q_positions, right=True) - 1
        else:
            q_index = q_positions
        out = self._stats_fn(q_rows, q_index, k_all, scale, self.cfg.sparsity_threshold,
                             key_chunk=self.cfg.key_chunk, query_chunk=self.cfg.query_chunk, dtype=self._dtype)
        n_k, hkv = k_all.shape[0], k_all.shape[1]
        col = out.col.view(hkv, q_rows.shape[1] // hkv, n_k).sum(1).to(st.col.dtype)
        g = st.num_q_heads // st.num_kv_heads
        q_heads = slice(None) if kv_heads == slice(None) else slice(kv_heads.start * g, kv_heads.stop * g)
        if key_positions is None:
            st.col[layer_id, kv_heads, :n_k] += col
        else:
            st.col[layer_id, kv_heads].index_add_(1, key_positions.to(st.col.device), col)
        st.below[layer_id, q_heads] += out.below
        st.causal[layer_id, q_heads] += out.causal
