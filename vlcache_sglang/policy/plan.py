"""The compression plan: which prompt positions each layer (or KV head) keeps.

Built once per request after the last layer of the last prefill chunk:
budget (``budgets.py``) -> scores (``methods/``) -> top-k with a protected suffix
(``selection.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from vlcache_sglang.policy.budgets import BUDGET_FUNCTIONS, BudgetContext, finalize_budgets
from vlcache_sglang.policy.methods import ScoreContext, get_method
from vlcache_sglang.policy.selection import select_kept, select_kept_adaptive
from vlcache_sglang.policy.stats import PolicyStats, StatsAccumulator
from vlcache_sglang.policy.window import WindowSpec

if TYPE_CHECKING:
    from vlcache_sglang.policy.config import PolicyConfig

__all__ = ["CompressionPlan", "PolicyError", "build_plan", "keep_everything", "protected_suffix"]


class PolicyError(RuntimeError):
    """The statistics cannot support a plan (e.g. layers missing rows)."""


@dataclass
class CompressionPlan:
    """Kept prompt positions per layer (and per KV head).

    Attributes:
        method: method name.
        granularity: ``"layer"`` (every KV head of a layer keeps ``kept[l]``) or ``"head"``
            (KV head ``h`` of layer ``l`` keeps ``head_kept[l][h]``).
        prompt_len, num_layers, num_kv_heads: shapes.
        kept: per layer, int64 ``[k]`` sorted ascending, positions in ``0..m-1``: what the layer
            keeps, with head granularity the union over its heads (what layer cells hold).
        budgets: ``k_l`` per layer (the mean per head with head granularity).
        protected: length of the always-kept suffix (recent window, plus the statistics window
            when it is force-kept); every layer keeps ``[m - protected, m)``.
        window: the statistics window.
        notes: fallbacks and adjustments, human readable.
        is_identity: nothing is dropped (``kept[l]`` is ``arange(m)``).
        head_kept: head granularity: ``[l][h]`` sorted int64 positions of KV head ``h`` (lengths
            differ per head under ``head_budget="adaptive"``); None for layer granularity.
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
    head_kept: list[list[torch.Tensor]] | None = None

    @property
    def kept_ratio(self) -> float:
        """Kept tokens over ``L * m`` (1.0 for the identity)."""
        if self.prompt_len == 0:
            return 1.0
        return sum(self.budgets) / (self.num_layers * self.prompt_len)

    @property
    def head_budgets(self) -> list[list[int]] | None:
        """``k_{l,h}`` per layer and KV head (head granularity), else None."""
        if self.head_kept is None:
            return None
        return [[int(k.numel()) for k in heads] for heads in self.head_kept]

    @property
    def held_ratio(self) -> float:
        """What the plan holds when every (layer, KV head) keeps its own positions:
        ``sum_{l,h} k_{l,h} / (L * Hkv * m)`` (head granularity), else :attr:`kept_ratio`."""
        if self.head_kept is None or self.prompt_len == 0:
            return self.kept_ratio
        cells = sum(sum(heads) for heads in self.head_budgets)
        return cells / (self.num_layers * self.num_kv_heads * self.prompt_len)

    def kept_mask(self, layer: int) -> torch.Tensor:
        """Boolean ``[m]`` mask of the layer's kept positions (the union over heads)."""
        idx = self.kept[layer]
        return torch.zeros(self.prompt_len, dtype=torch.bool, device=idx.device).scatter_(0, idx, True)

    def head_mask(self, layer: int) -> torch.Tensor:
        """Boolean ``[Hkv, m]``: what each KV head of ``layer`` keeps (every head: ``kept[l]``
        with layer granularity)."""
        if self.head_kept is None:
            return self.kept_mask(layer).expand(self.num_kv_heads, -1).clone()
        mask = torch.zeros(self.num_kv_heads, self.prompt_len, dtype=torch.bool, device=self.kept[layer].device)
        for h, idx in enumerate(self.head_kept[layer]):
            mask[h, idx] = True
        return mask

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
            "held_ratio": self.held_ratio,
            "head_budgets": self.head_budgets,
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
    head_kept = [[ar.clone() for _ in range(h)] for _ in range(st.num_layers)] if cfg.granularity == "head" else None
    return CompressionPlan(cfg.method, cfg.granularity, m, st.num_layers, h, [ar.clone() for _ in range(st.num_layers)],
                           [m] * st.num_layers, m, st.window, notes, is_identity=True, head_kept=head_kept)


def keep_everything(plan: CompressionPlan, note: str) -> CompressionPlan:
    """``plan`` changed to keep every position in every layer (and KV head), yet not an identity:
    for a request whose prefix came already compressed and that is not to be compressed again
    (what it keeps there is what it holds; an identity plan would serve its row as stock)."""
    m = plan.prompt_len
    ar = torch.arange(m, dtype=torch.int64, device=plan.kept[0].device if plan.kept else None)
    head_kept = None if plan.head_kept is None else [[ar.clone() for _ in heads] for heads in plan.head_kept]
    return replace(plan, kept=[ar.clone() for _ in plan.kept], budgets=[m] * plan.num_layers, protected=m,
                   notes=[*plan.notes, note], is_identity=False, head_kept=head_kept)


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
    head_kept: list[list[torch.Tensor]] | None = [] if cfg.granularity == "head" else None
    for layer in range(n_layers):
        scores = method.score(ctx, layer).to(device)
        recent = layer_recent(budgets[layer], protected, cfg)
        if head_kept is None:
            kept.append(select_kept(scores.sum(0), budgets[layer], recent, pool))
            continue
        heads = head_selection(scores, budgets[layer], recent, pool, cfg)
        head_kept.append(heads)
        kept.append(torch.unique(torch.cat(heads)))
    return CompressionPlan(cfg.method, cfg.granularity, m, n_layers, st.num_kv_heads, kept, budgets,
                           protected, st.window, notes, head_kept=head_kept)


def head_selection(scores: torch.Tensor, budget: int, recent: int, pool: int, cfg: "PolicyConfig") -> list[torch.Tensor]:
    """One layer's kept positions per KV head (``scores`` ``[Hkv, m]``): ``k_l`` each
    (``head_budget="uniform"``) or AdaKV's adaptive split of ``Hkv * k_l``."""
    if cfg.head_budget == "adaptive":
        return select_kept_adaptive(scores, budget, recent, cfg.head_floor, pool)
    return list(select_kept(scores, budget, recent, pool).unbind(0))
