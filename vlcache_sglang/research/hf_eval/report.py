"""Tables (markdown) and the accuracy-vs-budget figure of a grid of :class:`EvalResult`."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from vlcache_sglang.research.hf_eval.evaluate import EvalResult

MARKERS = {"vlcache": "o", "snapkv": "s", "pyramidkv": "x", "h2o": "^", "streamingllm": "v", "random": "D"}
METHOD_LABELS = {"vlcache": "VL-Cache", "snapkv": "SnapKV", "pyramidkv": "PyramidKV", "h2o": "H2O",
                 "streamingllm": "StreamingLLM", "random": "random", "full": "full cache"}


def label(method: str) -> str:
    """Display name of ``method`` (a method without a label shows its registry name)."""
    return METHOD_LABELS.get(method, method)


def method_order(names: Iterable[str] | None = None) -> list[str]:
    """``names`` (default: every registered method) in display order: the labelled methods in
    :data:`METHOD_LABELS` order, then the others sorted, the full cache last."""
    from vlcache_sglang.policy import available_methods

    known = list(METHOD_LABELS)
    return sorted(available_methods() if names is None else names,
                  key=lambda m: (m == "full", known.index(m) if m in known else len(known), m))


def grid(results: Sequence[EvalResult]) -> tuple[list[str], list[float], dict[tuple[str, float], EvalResult]]:
    """Methods and alphas in first-seen / ascending order, and the results keyed by (method, alpha)."""
    methods = list(dict.fromkeys(r.method for r in results))
    alphas = sorted({r.alpha for r in results})
    return methods, alphas, {(r.method, r.alpha): r for r in results}


def _table(results: Sequence[EvalResult], value: Callable[[EvalResult], float], fmt: str) -> str:
    methods, alphas, cell = grid(results)
    lines = ["| method | " + " | ".join(f"{a:g}" for a in alphas) + " |",
             "|---|" + "---|" * len(alphas)]
    for m in methods:
        row = []
        for a in alphas:
            r = cell.get((m, a))
            row.append("" if r is None else format(value(r), fmt))
        lines.append(f"| {label(m)} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _qtype_table(results: Sequence[EvalResult], alpha: float) -> str:
    rows = [r for r in results if r.alpha == alpha]
    if not rows:
        return ""
    qtypes = list(rows[0].per_qtype)
    lines = ["| method | " + " | ".join(qtypes) + " | all |", "|---|" + "---|" * (len(qtypes) + 1)]
    for r in rows:
        lines.append(f"| {label(r.method)} | " + " | ".join(f"{100 * r.per_qtype[q]:.1f}" for q in qtypes)
                     + f" | {100 * r.accuracy:.1f} |")
    return "\n".join(lines)


def markdown_tables(results: Sequence[EvalResult], qtype_alpha: float = 0.1) -> str:
    """Accuracy, measured kept ratio, fidelity (token agreement, KL) per method x alpha, and
    per-question-type accuracy at ``qtype_alpha``."""
    n = results[0].n
    se = 100 * math.sqrt(0.25 / n)
    parts = [
        f"Exact-match accuracy (%), {n} items per cell (binomial standard error at most {se:.1f} points); "
        f"columns: budget alpha",
        _table(results, lambda r: 100 * r.accuracy, ".1f"),
        "Measured kept KV share (% of L x m; floors: SnapKV/PyramidKV force-keep their observation window)",
        _table(results, lambda r: 100 * r.kept_ratio, ".1f"),
        "Fidelity: greedy-token agreement with the full cache (%)",
        _table(results, lambda r: 100 * r.token_agreement, ".1f"),
        "Fidelity: output identical to the full cache's (% of items)",
        _table(results, lambda r: 100 * r.same_as_full, ".1f"),
        "Fidelity: KL(P_full || P_compressed) at the first decode step after compression (nats, mean)",
        _table(results, lambda r: r.kl_first_decode, ".4f"),
        "Fidelity: KL along the full cache's answer, mean over decode steps (nats, mean)",
        _table(results, lambda r: r.kl_mean, ".3f"),
    ]
    qt = _qtype_table(results, qtype_alpha)
    if qt:
        parts += [f"Accuracy (%) per question type at alpha {qtype_alpha:g}", qt]
    return "\n\n".join(parts) + "\n"


def plot_accuracy_vs_budget(results: Sequence[EvalResult], path: str | Path, title: str = "") -> Path:
    """Three panels against alpha (log x), one line per method: accuracy, token agreement, mean KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, alphas, cell = grid(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [("exact-match accuracy (%)", lambda r: 100 * r.accuracy),
              ("greedy-token agreement with full cache (%)", lambda r: 100 * r.token_agreement),
              ("mean next-token KL to full cache (nats)", lambda r: r.kl_mean)]
    for ax, (ylabel, value) in zip(axes, panels):
        for m in methods:
            xs = [a for a in alphas if (m, a) in cell]
            # distinct markers (and a dotted PyramidKV) keep coinciding curves visible
            style = ({"linestyle": "--", "color": "black"} if m == "full" else
                     {"marker": MARKERS.get(m, "o"), "linestyle": ":" if m == "pyramidkv" else "-"})
            ax.plot(xs, [value(cell[(m, a)]) for a in xs], label=label(m), linewidth=2 if m == "vlcache" else 1.3,
                    **style)
        ax.set_xscale("log")
        ax.set_xticks(alphas)
        ax.set_xticklabels([f"{a:g}" for a in alphas])
        ax.set_xlabel("budget alpha (kept share of the KV cache)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
