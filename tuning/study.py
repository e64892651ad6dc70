"""Optuna storage and study handling: open or resume a study, refuse one with another setup.

A study's *setup* (search space, objective, model, data selection) is stored in its user
attributes when it is created; resuming under the same ``--study-name`` with a different setup
is an error rather than a silent mix of incomparable trials. The RDB storage runs a heartbeat,
so a trial left RUNNING by a killed process is marked failed and retried by a later run
(``RetryHeartbeatStaleTrialCallback``); completed trials are never lost.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .objectives import TrialRecord

SETUP_ATTR = "vlcache_setup"
DEFAULT_STORAGE = Path("runs") / "tuning" / "optuna.db"


class StudyError(ValueError):
    """The storage cannot be opened, or the stored study does not match this run."""


def storage_url(text: str | None) -> str:
    """A database URL: ``sqlite:///...`` and other SQLAlchemy URLs as given, a plain path as SQLite."""
    if not text:
        text = str(DEFAULT_STORAGE)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise StudyError(f"--storage {text!r} is a directory; give a file such as {path / 'optuna.db'}")
    return f"sqlite:///{path}"


def open_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int = 30) -> RDBStorage:
    """Open (and create) the RDB storage; :class:`StudyError` with the cause if it cannot be used."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"cannot open the study storage {url}: {exc}") from None
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2))
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy/Optuna raise many kinds; all mean "unusable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StudyError(f"cannot open the study storage {url}: {type(exc).__name__}: {first}") from None


def make_sampler(kind: str, seed: int | None, constrained: bool) -> optuna.samplers.BaseSampler:
    """Optuna's TPE (default), NSGA-II or random sampler, seeded, with constraints when needed."""
    constraints = _constraints if constrained else None
    if kind == "tpe":
        warnings.filterwarnings("ignore", message=".*``group``.*", category=optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constraints_func=constraints)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise StudyError(f"--sampler must be tpe, nsga2 or random; got {kind!r}")


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return list(trial.user_attrs.get("constraints", []))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{key}.{d}" for d in _differences(a, b)]
        else:
            out.append(f"{key}: stored {json.dumps(a, sort_keys=True)} != now {json.dumps(b, sort_keys=True)}")
    return out


def open_study(storage: RDBStorage, name: str, setup: Mapping[str, Any], directions: list[str],
               sampler: optuna.samplers.BaseSampler) -> tuple[optuna.Study, bool]:
    """Create the study, or load it if it exists with the same setup; returns (study, resumed)."""
    setup = json.loads(json.dumps(setup))  # what the storage will hand back
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if name in existing:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        stored = study.user_attrs.get(SETUP_ATTR)
        if stored is None:
            raise StudyError(f"study {name!r} exists in the storage but was not created by tune.py; "
                             "choose another --study-name")
        diff = _differences(stored, setup)
        if diff:
            raise StudyError(f"study {name!r} was created with a different setup, so its trials cannot be "
                             "continued with these options; use the original options or a new --study-name. "
                             "Differences: " + "; ".join(diff))
        return study, True
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=directions)
    study.set_user_attr(SETUP_ATTR, setup)
    return study, False


def completed(study: optuna.Study) -> list[TrialRecord]:
    """Finished trials with their measured accuracy and kept share."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if "accuracy" in t.user_attrs and "kept_ratio" in t.user_attrs:
            out.append(TrialRecord(number=t.number, params=dict(t.params), accuracy=float(t.user_attrs["accuracy"]),
                                   kept_ratio=float(t.user_attrs["kept_ratio"])))
    return out
