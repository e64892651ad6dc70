"""Engine-independent KV-cache compression policy (pure PyTorch; no SGLang import).

Flow for one request::

    cfg = PolicyConfig(method="vlcache", alpha=0.1)
    window = locate_window(prompt_len, image_spans, cfg)
    acc = StatsAccumulator(num_layers, num_q_heads, num_kv_heads, prompt_len, window, cfg)
    for each prefill chunk, for each layer l:
        acc.add(l, q_rows, q_positions, k_all, scale)
    plan = build_plan(acc)          # plan.kept[l]: sorted int64 prompt positions

See docs/policy.md.
"""

from vlcache_sglang.policy.budgets import (
    BudgetContext,
    adaptive_budgets,
    finalize_budgets,
    fit_total,
    pyramid_budgets,
    uniform_budgets,
)
from vlcache_sglang.policy.config import PolicyConfig, PolicyConfigError
from vlcache_sglang.policy.methods import Method, ScoreContext, available_methods, get_method, register_method
from vlcache_sglang.policy.plan import CompressionPlan, PolicyError, build_plan, keep_everything, protected_suffix
from vlcache_sglang.policy.selection import pool_scores, select_kept
from vlcache_sglang.policy.stats import (
    AttentionStats,
    PolicyStats,
    StatsAccumulator,
    StatsFn,
    attention_stats,
    dense_attention_stats,
)
from vlcache_sglang.policy.window import WindowSpec, locate_window

__all__ = [
    "AttentionStats",
    "BudgetContext",
    "CompressionPlan",
    "Method",
    "PolicyConfig",
    "PolicyConfigError",
    "PolicyError",
    "PolicyStats",
    "ScoreContext",
    "StatsAccumulator",
    "StatsFn",
    "WindowSpec",
    "adaptive_budgets",
    "attention_stats",
    "available_methods",
    "build_plan",
    "dense_attention_stats",
    "finalize_budgets",
    "fit_total",
    "get_method",
    "keep_everything",
    "locate_window",
    "pool_scores",
    "protected_suffix",
    "pyramid_budgets",
    "register_method",
    "select_kept",
    "uniform_budgets",
]
