"""The compression plan: which prompt positions each layer (or KV head) keeps.

Built once per request after the last layer of the last prefill chunk:
budget (``budgets.py``) -> scores (``methods/``) -> top-k with a protected suffix
(``selection.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vlcache_sglang.policy.budgets import BUDGET_FUNCTIONS, BudgetContext, finalize_budgets
from vlcache_sglang.policy.methods import ScoreContext, get_method
from vlcache_sglang.policy.selection import select_kept
from vlcache_sglang.policy.stats import PolicyStats, StatsAccumulator
from vlcache_sglang.policy.window import WindowSpec

if TYPE_CHECKING:
    from vlcache_sglang.policy.config import PolicyConfig

__all__ = ["CompressionPlan", "PolicyError", "build_plan", "protected_suffix"]


class PolicyError(RuntimeError):
    """The statistics cannot support a plan (e.g. layers missing rows)."""


@dataclass
class CompressionPlan:
    """Kept prompt positions per layer (and per KV head).

    Attributes:
        method: method name.
        granularity: ``"layer"``: ``kept[l]`` is int64 ``[k_l]``; ``"head"``: int64
            ``[Hkv, k_l]`` - the same count ``k_l`` for every KV head of a layer, so a paged
            cache keeps one length per layer. Rows are sorted ascending, positions in ``0..m-1``.
        prompt_len, num_layers, num_kv_heads: shapes.
        kept: per layer, see ``granularity``.
        budgets: ``k_l`` per layer.
        protected: length of the always-kept suffix (recent window, plus the statistics window
            when it is force-kept); every layer keeps ``[m - protected, m)``.
        window: the statistics window.
        notes: fallbacks and adjustments, human readable.
        is_identity: nothing is dropped (``kept[l]`` is ``arange(m)``).
    """

    method: str
    granularity: str
    prompt_len: int
    num_layers: int
    num_kv_heads: int
    kept: list[torch.Tensor]
    budgets: list[int]
    protected: int
    window: WindowSpec
    notes: list[str] = field(default_factory=list)
    is_identity: bool = False

    @property
    def kept_ratio(self) -> float:
        """Kept tokens over ``L * m`` (1.0 for the identity)."""
        if self.prompt_len == 0:
            return 1.0
        return sum(self.budgets) / (self.num_layers * self.prompt_len)

    def kept_mask(self, layer: int) -> torch.Tensor:
        """Boolean ``[m]`` (layer) or ``[Hkv, m]`` (head) mask of kept positions."""
        idx = self.kept[layer]
        mask = torch.zeros(*idx.shape[:-1], self.prompt_len, dtype=torch.bool, device=idx.device)
        return mask.scatter_(-1, idx, True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors)."""
        return {
            "method": self.method,
            "granularity": self.granularity,
            "prompt_len": self.prompt_len,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "budgets": list(self.budgets),
            "kept_ratio": self.kept_ratio,
            "protected": self.protected,
            "window": self.window.to_dict(),
            "notes": list(self.notes),
            "is_identity": self.is_identity,
        }


def protected_suffix(prompt_len: int, window: WindowSpec, cfg: "PolicyConfig") -> int:
    """Suffix every layer keeps: ``max(ceil(recent_share * alpha * m), window if force-kept)``
    with the shared recent window; only the force-kept window with ``recent_window="per_layer"``
    (each layer's own recent window is :func:`layer_recent`)."""
    r = math.ceil(cfg.recent_share * cfg.alpha * prompt_len - 1e-9) if cfg.recent_window == "shared" else 0
    if cfg.resolved_protect_window() and window.compress:
        r = max(r, window.length)
    return min(max(r, 0), prompt_len)


def layer_recent(budget: int, protected: int, cfg: "PolicyConfig") -> int:
    """Recent tokens layer ``l`` keeps: the shared suffix, or with ``recent_window="per_layer"``
    ``max(1, floor(recent_share * k_l))`` of its own budget (VL-Cache's rule; 0 when
    ``recent_share`` is 0), never less than ``protected`` nor more than ``k_l``."""
    if cfg.recent_window == "shared" or cfg.recent_share == 0.0:
        return protected
    return min(budget, max(protected, 1, math.floor(cfg.recent_share * budget + 1e-9)))


def _identity(st: PolicyStats, cfg: "PolicyConfig", device: torch.device, notes: list[str]) -> CompressionPlan:
    m, h = st.prompt_len, st.num_kv_heads
    ar = torch.arange(m, dtype=torch.int64, device=device)
    kept = [ar.expand(h, m).clone() if cfg.granularity == "head" else ar.clone() for _ in range(st.num_layers)]
    return CompressionPlan(cfg.method, cfg.granularity, m, st.num_layers, h, kept, [m] * st.num_layers,
                           m, st.window, notes, is_identity=True)


def build_plan(source: StatsAccumulator | PolicyStats, cfg: "PolicyConfig | None" = None, *,
               allow_incomplete: bool = False, device: torch.device | str | None = None) -> CompressionPlan:
    """Decide what each layer keeps.

    Args:
        source: the request's :class:`StatsAccumulator` (or its :class:`PolicyStats`).
        cfg: defaults to the accumulator's config (required with bare stats).
        allow_incomplete: plan even if some layer saw fewer rows than expected (e.g. rows served
            from a prefix cache); otherwise raise :class:`PolicyError`.
        device: where the kept tensors live (default: the statistics' device, else CPU).

    Identity plans: method ``full``, ``window.compress`` false (text-only by default, short
    prompts), ``alpha == 1``, or budgets that reach ``m`` in every layer.
    """
    if isinstance(source, StatsAccumulator):
        cfg = cfg or source.cfg
        st = source.stats
    else:
        st = source
    if cfg is None:
        raise ValueError("build_plan needs a PolicyConfig with bare PolicyStats")
    method = get_method(cfg.method)
    if device is None:
        device = st.col.device if st.col is not None else torch.device("cpu")
    device = torch.device(device)
    m, n_layers = st.prompt_len, st.num_layers
    notes = [st.window.reason] if st.window.reason else []

    if method.identity:
        return _identity(st, cfg, device, notes + ["method 'full' keeps everything"])
    if not st.window.compress:
        return _identity(st, cfg, device, notes)
    if cfg.alpha >= 1.0:
        return _identity(st, cfg, device, notes + ["alpha = 1 keeps everything"])
    if method.rows != "none":
        if not st.complete:
            msg = f"incomplete statistics: rows seen per layer {st.rows_seen}, expected {st.rows_expected}"
            if not allow_incomplete:
                raise PolicyError(msg)
            notes.append(msg)
        if st.col is None:  # nothing was ever added (only possible with allow_incomplete)
            st.col = torch.zeros(n_layers, st.num_kv_heads, m, device=device)
            st.below = torch.zeros(n_layers, st.num_q_heads, dtype=torch.int64, device=device)
            st.causal = torch.zeros(n_layers, st.num_q_heads, dtype=torch.int64, device=device)

    protected = protected_suffix(m, st.window, cfg)
    budget_kind = cfg.resolved_budget_fn()
    sparsity = st.layer_sparsity() if st.below is not None else None
    raw = BUDGET_FUNCTIONS[budget_kind](BudgetContext(m, n_layers, cfg, sparsity))
    budgets, budget_notes = finalize_budgets(raw, m, cfg, protected)
    notes += budget_notes
    if all(b >= m for b in budgets):
        return _identity(st, cfg, device, notes + ["every layer's budget covers the prompt"])

    ctx = ScoreContext(cfg=cfg, stats=st, window=st.window, device=device)
    pool = cfg.resolved_pool_kernel()
    kept: list[torch.Tensor] = []
    for layer in range(n_layers):
        scores = method.score(ctx, layer).to(device)
        if cfg.granularity == "layer":
            scores = scores.sum(0)
        kept.append(select_kept(scores, budgets[layer], layer_recent(budgets[layer], protected, cfg), pool))
    return CompressionPlan(cfg.method, cfg.granularity, m, n_layers, st.num_kv_heads, kept, budgets,
                           protected, st.window, notes)
