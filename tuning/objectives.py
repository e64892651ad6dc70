"""What a study optimises and how the configuration to ship is chosen from its trials.

* ``pareto`` (default): maximise accuracy and minimise the measured kept KV share (two
  objectives; Optuna keeps the Pareto front). Chosen: the front's smallest kept share whose
  accuracy is at least ``min_relative_accuracy`` of full cache, else its most accurate point.
* ``memory-cap``: maximise accuracy subject to kept share <= ``max_kept``.
* ``min-budget``: minimise the kept share subject to accuracy >= ``min_relative_accuracy`` x
  full-cache accuracy (on the study split).

Constraints are given to Optuna's sampler (``constraints_func``: values <= 0 are feasible).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

KINDS = ("pareto", "memory-cap", "min-budget")


class ObjectiveError(ValueError):
    """Bad objective options, or no trial satisfies the objective's constraint."""


@dataclass(frozen=True)
class TrialRecord:
    """A finished trial as the chooser and the report see it."""

    number: int
    params: dict[str, Any]
    accuracy: float
    kept_ratio: float


@dataclass(frozen=True)
class ObjectiveSpec:
    """One of :data:`KINDS` with its threshold."""

    kind: str = "pareto"
    max_kept: float | None = None
    min_relative_accuracy: float = 0.95

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ObjectiveError(f"--objective must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.kind == "memory-cap" and (self.max_kept is None or not 0.0 < self.max_kept <= 1.0):
            raise ObjectiveError(f"--objective memory-cap needs --max-kept in (0, 1], got {self.max_kept!r}")
        if not 0.0 < self.min_relative_accuracy <= 1.5:
            raise ObjectiveError(f"--min-relative-accuracy must be in (0, 1.5], got {self.min_relative_accuracy}")

    @property
    def directions(self) -> list[str]:
        return {"pareto": ["maximize", "minimize"], "memory-cap": ["maximize"],
                "min-budget": ["minimize"]}[self.kind]

    def values(self, accuracy: float, kept_ratio: float) -> list[float]:
        """The objective values Optuna records for a trial."""
        return {"pareto": [accuracy, kept_ratio], "memory-cap": [accuracy],
                "min-budget": [kept_ratio]}[self.kind]

    def constraints(self, accuracy: float, kept_ratio: float, full_accuracy: float) -> list[float]:
        """Constraint values (<= 0 feasible); empty for ``pareto``."""
        if self.kind == "memory-cap":
            return [kept_ratio - float(self.max_kept)]
        if self.kind == "min-budget":
            return [self.min_relative_accuracy * full_accuracy - accuracy]
        return []

    def signature(self) -> dict[str, Any]:
        """What the study's values and constraints depend on (``pareto``'s threshold only picks)."""
        if self.kind == "memory-cap":
            return {"kind": self.kind, "max_kept": self.max_kept}
        if self.kind == "min-budget":
            return {"kind": self.kind, "min_relative_accuracy": self.min_relative_accuracy}
        return {"kind": self.kind}

    def choose(self, records: Sequence[TrialRecord], full_accuracy: float) -> TrialRecord:
        """The trial to ship; :class:`ObjectiveError` if a constrained objective has no feasible trial."""
        if not records:
            raise ObjectiveError("the study has no completed trial to choose from")
        target = self.min_relative_accuracy * full_accuracy
        if self.kind == "pareto":
            front = pareto_front(records)
            good = [r for r in front if r.accuracy >= target]
            if good:
                return min(good, key=lambda r: (r.kept_ratio, -r.accuracy, r.number))
            return max(front, key=lambda r: (r.accuracy, -r.kept_ratio, -r.number))
        if self.kind == "memory-cap":
            ok = [r for r in records if r.kept_ratio <= float(self.max_kept)]
            if not ok:
                best = min(r.kept_ratio for r in records)
                raise ObjectiveError(f"no trial kept at most {self.max_kept:.3f} of the KV (smallest: {best:.3f}); "
                                     "lower the alpha range or raise --max-kept")
            return max(ok, key=lambda r: (r.accuracy, -r.kept_ratio, -r.number))
        ok = [r for r in records if r.accuracy >= target]
        if not ok:
            best = max(r.accuracy for r in records)
            raise ObjectiveError(f"no trial reached {self.min_relative_accuracy:.0%} of full-cache accuracy "
                                 f"({target:.3f}; best {best:.3f}); run more trials or lower --min-relative-accuracy")
        return min(ok, key=lambda r: (r.kept_ratio, -r.accuracy, r.number))


def pareto_front(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    """Trials not dominated in (higher accuracy, lower kept share), sorted by kept share."""
    front = [r for r in records
             if not any((o.accuracy >= r.accuracy and o.kept_ratio <= r.kept_ratio)
                        and (o.accuracy > r.accuracy or o.kept_ratio < r.kept_ratio) for o in records)]
    return sorted(front, key=lambda r: (r.kept_ratio, -r.accuracy, r.number))
