"""Tables and the Pareto plot of a study."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .evaluator import TrialResult
from .objectives import TrialRecord, pareto_front

SHOWN_PARAMS = ("alpha", "window_mode", "window_size", "max_window", "sparsity_threshold", "recent_share",
                "recent_window", "clip_min", "clip_max", "granularity", "head_budget", "head_floor", "pool_kernel",
                "redistribute")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trials_table(records: Sequence[TrialRecord], chosen: TrialRecord | None, limit: int = 15) -> str:
    """Markdown table of the Pareto front (then the rest by accuracy), chosen trial marked."""
    front = pareto_front(records)
    numbers = {r.number for r in front}
    rest = sorted((r for r in records if r.number not in numbers), key=lambda r: (-r.accuracy, r.kept_ratio))
    rows = (front + rest)[:limit]
    params = [p for p in SHOWN_PARAMS if any(p in r.params for r in rows)]
    header = ["trial", "front", "accuracy", "kept KV", *params]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mark = "**chosen**" if chosen is not None and r.number == chosen.number else ("yes" if r.number in numbers else "")
        cells = [str(r.number), mark, f"{100 * r.accuracy:.1f}%", f"{100 * r.kept_ratio:.1f}%",
                 *(_fmt(r.params.get(p, "-")) for p in params)]
        lines.append("| " + " | ".join(cells) + " |")
    if len(records) > limit:
        lines.append(f"\n({len(records)} completed trials; {len(front)} on the Pareto front; first {limit} shown)")
    return "\n".join(lines)


def comparison_table(rows: Mapping[str, TrialResult], full_accuracy: float) -> str:
    """Markdown table: configuration, accuracy, relative to full cache, kept KV, per group."""
    groups = sorted({g for r in rows.values() for g in r.per_group})
    head = "| configuration | accuracy | vs full cache | kept KV | " + " | ".join(groups) + " |"
    lines = [head, "|---|---|---|---|" + "---|" * len(groups)]
    for name, r in rows.items():
        rel = f"{100 * r.accuracy / full_accuracy:.0f}%" if full_accuracy > 0 else "-"
        lines.append(f"| {name} | {100 * r.accuracy:.1f}% | {rel} | {100 * r.kept_ratio:.1f}% | "
                     + " | ".join(f"{100 * r.per_group.get(g, float('nan')):.1f}" for g in groups) + " |")
    return "\n".join(lines)


def plot_pareto(records: Sequence[TrialRecord], chosen: TrialRecord | None, refs: Mapping[str, TrialResult],
                path: str | Path, title: str) -> Path:
    """Scatter of every trial (kept KV share vs accuracy), the front, the chosen trial and references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    front = pareto_front(records)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.scatter([100 * r.kept_ratio for r in records], [100 * r.accuracy for r in records], s=18, c="#9aa5b1",
               label=f"trials ({len(records)})")
    ax.step([100 * r.kept_ratio for r in front], [100 * r.accuracy for r in front], where="post", c="#1f77b4",
            lw=1.5, label="Pareto front")
    ax.scatter([100 * r.kept_ratio for r in front], [100 * r.accuracy for r in front], s=28, c="#1f77b4")
    markers = iter(["s", "^", "D", "v"])
    for name, res in refs.items():
        if res.kept_ratio >= 0.999:
            ax.axhline(100 * res.accuracy, ls="--", c="k", lw=1, label=f"{name}: {100 * res.accuracy:.1f}%")
        else:
            ax.scatter([100 * res.kept_ratio], [100 * res.accuracy], marker=next(markers, "o"), s=60, c="#ff7f0e",
                       edgecolors="k", zorder=5, label=name)
    if chosen is not None:
        ax.scatter([100 * chosen.kept_ratio], [100 * chosen.accuracy], marker="*", s=220, c="#d62728",
                   edgecolors="k", zorder=6, label=f"chosen (trial {chosen.number})")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    for axis in (ax.xaxis,):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "235" else ""))
    ax.set_xlabel("KV kept (% of prompt KV, measured by the server; log scale)")
    ax.set_ylabel("accuracy (%), study split")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
