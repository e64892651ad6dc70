"""Optuna search of the VL-Cache policy for one model; writes the per-model default policy.

    python tuning/tune.py --model qwen2-vl [--n-trials 40] [--objective pareto]
    vlcache-tune --model qwen2-vl --study-name my-study      # same; rerun to resume

Every trial runs through one real SGLang server (``--attention-backend vlcache``, started here
or given with ``--url``) with the policy sent per request, on the study split of the dataset; the
chosen configuration is then measured on the held-out split against full cache and the paper's
default settings, a Pareto plot and tables are written, and the policy goes to the file the
server loads by default for that model (see ``vlcache_sglang/tuned_configs.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # `python tuning/tune.py` from a checkout
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(_HERE.parent))
    __package__ = "tuning"  # noqa: A001 - PEP 366: run as part of the package
    import tuning  # noqa: F401,E402

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from typing import Any, Iterator  # noqa: E402

from .aliases import AliasError, ModelSpec, resolve_model  # noqa: E402
from .data import DatasetError, EvalItem, load_items  # noqa: E402
from .evaluator import FULL_CACHE, Evaluator, HFEvaluator, ServerEvaluator, TrialResult  # noqa: E402
from .objectives import KINDS, ObjectiveError, ObjectiveSpec, TrialRecord  # noqa: E402
from .report import comparison_table, plot_pareto, trials_table  # noqa: E402
from .space import SearchSpace, SpaceError, parse_fixed  # noqa: E402
from .study import StudyError, completed, make_sampler, open_storage, open_study, storage_url  # noqa: E402

USER_ERRORS = (AliasError, DatasetError, ObjectiveError, SpaceError, StudyError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlcache-tune", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="alias (qwen2-vl, tinyvlm-docvqa, or --aliases), "
                   "local model directory or Hugging Face id")
    g.add_argument("--aliases", default=None, help="JSON file of user aliases (also $VLCACHE_MODEL_ALIASES)")
    net = g.add_mutually_exclusive_group()
    net.add_argument("--offline", dest="online", action="store_false", default=None,
                     help="resolve aliases as offline (bundled model)")
    net.add_argument("--online", dest="online", action="store_true", help="resolve aliases as online")
    g.add_argument("--dataset", default=None, help="dataset directory (one folder per split) or HF id[:config]; "
                   "default: the alias's")
    g.add_argument("--study-split", default=None, help="split the study optimises on (default: the alias's)")
    g.add_argument("--heldout-split", default=None, help="split the chosen policy is reported on")
    g.add_argument("--qtypes", nargs="+", default=None, help="only these question types (dataset column qtype)")
    g.add_argument("--per-group", type=int, default=None, help="at most this many items per question type")
    s = p.add_argument_group("study")
    s.add_argument("--n-trials", type=int, default=40, help="completed trials the study should have in total")
    s.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    s.add_argument("--storage", default=None, help="Optuna storage: SQLite file or database URL "
                   "(default runs/tuning/optuna.db)")
    s.add_argument("--study-name", default=None, help="study to create or resume (default <alias>-<objective>)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sampler", choices=("tpe", "nsga2", "random"), default="tpe")
    s.add_argument("--objective", choices=KINDS, default="pareto")
    s.add_argument("--max-kept", type=float, default=None, help="memory-cap: largest kept KV share")
    s.add_argument("--min-relative-accuracy", type=float, default=0.95,
                   help="min-budget constraint and pareto choice: accuracy >= this x full cache")
    s.add_argument("--method", default="vlcache", help="compression method whose settings are searched")
    s.add_argument("--fix", action="append", default=[], metavar="NAME=VALUE",
                   help="pin a policy field (repeatable), e.g. --fix granularity=layer")
    s.add_argument("--alpha-range", nargs=2, type=float, default=(0.02, 0.5), metavar=("LOW", "HIGH"))
    e = p.add_argument_group("evaluation")
    e.add_argument("--backend", choices=("server", "hf"), default="server",
                   help="server: real SGLang server; hf: Hugging Face harness (quick runs)")
    e.add_argument("--url", default=None, help="use this running vlcache server instead of starting one")
    e.add_argument("--cells", choices=("layer", "head"), default="layer",
                   help="KV cells the policy will be served with (--vlcache-cells): layer holds per-head "
                        "plans as the union over heads, head holds each head's own positions")
    e.add_argument("--max-tokens", type=int, default=16)
    e.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    o = p.add_argument_group("output")
    o.add_argument("--output", default=None, help="policy file to write (default: the per-model location)")
    o.add_argument("--no-write", action="store_true", help="do not write the policy file")
    o.add_argument("--report-dir", default=None, help="tables, report.json, plot (default runs/tuning/<study>)")
    o.add_argument("--plot", default=None, help="Pareto plot PNG path (default <report-dir>/pareto.png)")
    return p


@contextlib.contextmanager
def open_evaluator(args: argparse.Namespace, spec: ModelSpec,
                   given: ServerEvaluator | None = None) -> Iterator[Evaluator]:
    """The evaluator of ``--backend``: a server (``given``, checked by :func:`url_evaluator`, or
    started here) or the HF harness."""
    if args.backend == "hf":
        yield HFEvaluator(spec.model_path, max_tokens=args.max_tokens, cells=args.cells)
        return
    if given is not None:
        yield given
        return
    from vlcache_sglang.tooling.serving import running_server

    print(f"starting an SGLang server for {spec.model_path} ...", flush=True)
    # the policy travels whole in every request; 'none' keeps any per-model default out of it
    with running_server(spec.model_path, attention_backend="vlcache",
                        extra_args=["--vlcache-config", "none", "--vlcache-cells", args.cells]) as server:
        print(f"server ready at {server.url} (log {server.log_path})", flush=True)
        yield ServerEvaluator(server.url, max_tokens=args.max_tokens, concurrency=args.concurrency)


def url_evaluator(args: argparse.Namespace, spec: ModelSpec) -> ServerEvaluator:
    """The ``--url`` server, once it is known to serve this model with ``--cells`` (checked before
    the study is opened, so a refused launch stores nothing)."""
    ev = ServerEvaluator(args.url, max_tokens=args.max_tokens, concurrency=args.concurrency)
    served = ev.model_path()
    if not _same_model(served, spec.model_path):
        raise StudyError(f"the server at {args.url} serves {served!r}, not {spec.model_path!r}")
    cells = ev.cells()
    if cells != args.cells:  # the kept share it reports would be another memory than the one tuned for
        raise StudyError(f"the server at {args.url} serves --vlcache-cells {cells}, not {args.cells}: pass "
                         f"--cells {cells}, or relaunch it with --vlcache-cells {args.cells}")
    return ev


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _setup(args: argparse.Namespace, spec: ModelSpec, space: SearchSpace, objective: ObjectiveSpec,
           dataset: str, study_split: str) -> dict[str, Any]:
    setup = {"space": space.signature(), "objective": objective.signature(), "model": spec.model_path,
             "dataset": dataset, "study_split": study_split, "qtypes": sorted(args.qtypes or []),
             "per_group": args.per_group, "max_tokens": args.max_tokens}
    if args.cells != "layer":  # only then: studies stored before --cells existed still resume
        setup["cells"] = args.cells
    return setup


def _reference(study, key: str, evaluate) -> TrialResult:
    """A study-split reference result, measured once per study and kept in its attributes."""
    cached = study.user_attrs.get(key)
    if cached is None:
        cached = evaluate().to_dict()
        study.set_user_attr(key, cached)
    return TrialResult(**cached)


def run_trials(study, space: SearchSpace, objective: ObjectiveSpec, evaluator: Evaluator,
               items: list[EvalItem], full_accuracy: float, n_trials: int, timeout: float | None) -> int:
    """Run trials until the study has ``n_trials`` completed ones (or ``timeout``); returns how many ran."""
    from tqdm import tqdm

    done = len(completed(study))
    todo = max(0, n_trials - done)
    if todo == 0:
        return 0

    def trial_fn(trial) -> list[float]:
        params = space.sample(trial)
        res = evaluator.evaluate(space.to_policy(params), items)
        for key, value in res.to_dict().items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("constraints", objective.constraints(res.accuracy, res.kept_ratio, full_accuracy))
        return objective.values(res.accuracy, res.kept_ratio)

    bar = tqdm(total=n_trials, initial=done, desc="trials", unit="trial", dynamic_ncols=True)

    def on_done(study_, trial) -> None:
        if trial.state.name == "COMPLETE":
            bar.update(1)
            bar.set_postfix(acc=f"{trial.user_attrs['accuracy']:.3f}", kept=f"{trial.user_attrs['kept_ratio']:.3f}")
        if len(completed(study_)) >= n_trials:
            study_.stop()

    try:
        study.optimize(trial_fn, n_trials=todo + 4, timeout=timeout, callbacks=[on_done], gc_after_trial=False)
    finally:
        bar.close()
    return len(completed(study)) - done


#: the paper's settings (PolicyConfig defaults) at these budgets are the study's first trials
BASELINE_ALPHAS = (0.1, 0.05, 0.2)


def seed_baselines(study, space: SearchSpace) -> int:
    """Enqueue the paper's default policy at :data:`BASELINE_ALPHAS` (those inside the space)."""
    from vlcache_sglang.policy import PolicyConfig

    n = 0
    for alpha in BASELINE_ALPHAS:
        params = space.params_for(PolicyConfig(alpha=alpha))
        if params is not None:
            study.enqueue_trial(params, user_attrs={"baseline": f"paper defaults, alpha {alpha}"})
            n += 1
    return n


def heldout_comparison(evaluator: Evaluator, chosen_policy, items: list[EvalItem], chosen: TrialRecord):
    """Chosen policy, full cache and the paper's defaults (alpha 0.1, and at the chosen policy's
    measured kept share), on the held-out items."""
    from vlcache_sglang.policy import PolicyConfig

    cells = {"full cache": FULL_CACHE, "paper defaults (VL-Cache, alpha 0.1)": PolicyConfig()}
    same = round(chosen.kept_ratio, 3)  # the same memory as the tuned policy (its measured share)
    if abs(same - 0.1) > 1e-3 and 0.01 <= same <= 1.0:
        cells[f"paper defaults at the tuned kept share (alpha {same:.3g})"] = PolicyConfig(alpha=same)
    cells[f"tuned (trial {chosen.number})"] = chosen_policy
    from tqdm import tqdm

    return {name: evaluator.evaluate(policy, items) for name, policy in tqdm(cells.items(), desc="held-out")}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: completed trials are stored; rerun the same command to resume", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace) -> int:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.n_trials < 1:
        raise StudyError(f"--n-trials must be >= 1, got {args.n_trials}")
    spec = resolve_model(args.model, alias_file=args.aliases, online=args.online)
    dataset = args.dataset or spec.dataset
    if dataset is None:
        raise DatasetError(f"model {args.model!r} has no default dataset; pass --dataset")
    study_split, heldout_split = args.study_split or spec.study_split, args.heldout_split or spec.heldout_split
    if study_split == heldout_split:
        raise DatasetError(f"the held-out split must differ from the study split (both {study_split!r})")
    objective = ObjectiveSpec(args.objective, args.max_kept, args.min_relative_accuracy)
    space = SearchSpace.build(args.method, parse_fixed(args.fix), tuple(args.alpha_range))
    study_items = load_items(dataset, study_split, groups=args.qtypes, per_group=args.per_group)
    heldout_items = load_items(dataset, heldout_split, groups=args.qtypes, per_group=args.per_group)
    if {it.id for it in study_items} & {it.id for it in heldout_items} and Path(str(dataset)).is_dir():
        raise DatasetError(f"splits {study_split!r} and {heldout_split!r} share item ids; they must be disjoint")
    given = url_evaluator(args, spec) if args.backend == "server" and args.url else None
    url = storage_url(args.storage)
    storage = open_storage(url)
    name = args.study_name or f"{spec.name.replace('/', '--')}-{objective.kind}"
    n_done = len(completed(optuna.load_study(study_name=name, storage=storage))) if name in {
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)} else 0
    sampler = make_sampler(args.sampler, None if args.seed is None else args.seed + n_done,
                           constrained=objective.kind != "pareto")
    study, resumed = open_study(storage, name, _setup(args, spec, space, objective, str(dataset), study_split),
                                objective.directions, sampler)
    if not resumed:
        seeded = seed_baselines(study, space)
    state = f"resumed with {n_done} completed trials" if resumed else f"new, {seeded} baseline trials enqueued"
    print(f"study {name!r} in {url}: {state}; target {args.n_trials} trials; "
          f"{len(study_items)} study items ({study_split}), "
          f"{len(heldout_items)} held-out items ({heldout_split})", flush=True)

    with open_evaluator(args, spec, given) as evaluator:
        from vlcache_sglang.policy import PolicyConfig

        full = _reference(study, "ref_full_cache", lambda: evaluator.evaluate(FULL_CACHE, study_items))
        paper = _reference(study, "ref_paper_defaults", lambda: evaluator.evaluate(PolicyConfig(), study_items))
        ran = run_trials(study, space, objective, evaluator, study_items, full.accuracy, args.n_trials, args.timeout)
        records = completed(study)
        print(f"{ran} trials run now, {len(records)} completed in the study", flush=True)
        chosen = objective.choose(records, full.accuracy)
        chosen_policy = space.to_policy(chosen.params)
        held = heldout_comparison(evaluator, chosen_policy, heldout_items, chosen)
    return _report(args, spec, name, url, records, chosen, chosen_policy, full, paper, held, objective,
                   study_split, heldout_split)


def _report(args, spec: ModelSpec, name: str, url: str, records: list[TrialRecord], chosen: TrialRecord,
            chosen_policy, full: TrialResult, paper: TrialResult, held: dict[str, TrialResult],
            objective: ObjectiveSpec, study_split: str, heldout_split: str) -> int:
    from vlcache_sglang.tuned_configs import default_write_path, find_default_config, write_policy

    report_dir = Path(args.report_dir) if args.report_dir else Path("runs") / "tuning" / name
    report_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_pareto(records, chosen, {"full cache": full, "paper defaults (alpha 0.1)": paper},
                       args.plot or report_dir / "pareto.png",
                       f"{spec.name}: {len(records)} trials, {objective.kind}, split {study_split}")
    held_full = held["full cache"].accuracy
    t_trials, t_held = trials_table(records, chosen), comparison_table(held, held_full)
    summary = (f"## Study {name} ({spec.model_path})\n\nStudy split `{study_split}` (full cache "
               f"{100 * full.accuracy:.1f}%, paper defaults {100 * paper.accuracy:.1f}% at "
               f"{100 * paper.kept_ratio:.1f}% KV):\n\n{t_trials}\n\n"
               f"Held-out split `{heldout_split}` ({held['full cache'].n} items):\n\n{t_held}\n")
    (report_dir / "summary.md").write_text(summary)
    print("\n" + summary)
    provenance = {
        "written_by": "vlcache-tune", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": spec.name, "model_path": spec.model_path, "study_name": name, "storage": url,
        "objective": objective.signature(), "cells": args.cells, "trial": chosen.number, "params": chosen.params,
        "study_split": {"name": study_split, "accuracy": chosen.accuracy, "kept_ratio": chosen.kept_ratio,
                        "full_cache_accuracy": full.accuracy},
        "heldout": {"name": heldout_split, **{k: v.to_dict() for k, v in held.items()}},
    }
    (report_dir / "report.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"plot: {plot}\nreport: {report_dir / 'summary.md'}, {report_dir / 'report.json'}")
    if not args.no_write:
        target = Path(args.output) if args.output else default_write_path(spec.model_path)
        written = write_policy(chosen_policy, target, provenance)
        loaded = find_default_config(spec.model_path)
        how = ("loaded by default by a vlcache server for this model" if loaded is not None
               and loaded.resolve() == written.resolve() else "not the per-model default location")
        print(f"policy written to {written} ({how}); explicit use: --vlcache-config {os.path.abspath(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
