"""Tuning pieces without a server: aliases, data errors, search space, objectives, study storage."""
from __future__ import annotations

import json

import optuna
import pytest

from tuning.aliases import AliasError, resolve_model
from tuning.data import DatasetError, load_items, load_split
from tuning.evaluator import Answer, is_correct, policy_request, score
from tuning.objectives import ObjectiveError, ObjectiveSpec, TrialRecord, pareto_front
from tuning.space import SearchSpace, SpaceError, parse_fixed
from tuning.study import StudyError, open_storage, open_study, storage_url
from tuning.tune import main
from vlcache_sglang.bundled import bundled_model_dir
from vlcache_sglang.policy import PolicyConfig
from vlcache_sglang.policy_resolution import resolve_policy
from vlcache_sglang.settings import CompressionSettings

DATA = str(bundled_model_dir().parents[1] / "data" / "tinyvlm-docvqa")


# -- aliases ---------------------------------------------------------------------------------
def test_unknown_alias_is_a_clear_error():
    with pytest.raises(AliasError, match="unknown model alias 'qwen9-vl'.*qwen2-vl"):
        resolve_model("qwen9-vl", online=False)


def test_unknown_alias_from_the_command_line(capsys):
    assert main(["--model", "qwen9-vl", "--offline"]) == 2
    assert "unknown model alias 'qwen9-vl'" in capsys.readouterr().err


def test_qwen2_vl_offline_is_the_bundled_model_and_user_aliases_map(tmp_path):
    spec = resolve_model("qwen2-vl", online=False)
    assert spec.model_path == str(bundled_model_dir().resolve()) and spec.dataset == DATA
    assert resolve_model("qwen2-vl", online=True).model_path == "Qwen/Qwen2-VL-2B-Instruct"
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"mine": {"model": str(bundled_model_dir()), "dataset": "/data/x",
                                            "study_split": "a", "heldout_split": "b"}}))
    mine = resolve_model("mine", alias_file=aliases)
    assert (mine.dataset, mine.study_split, mine.heldout_split) == ("/data/x", "a", "b")
    aliases.write_text(json.dumps({"bad": {"model": "x", "window": 3}}))
    with pytest.raises(AliasError, match="unknown key"):
        resolve_model("bad", alias_file=aliases)


def test_hub_model_offline_and_not_cached_is_refused():
    with pytest.raises(AliasError, match="not in the local Hugging Face cache"):
        resolve_model("nobody-here/no-such-vlm", online=False)


# -- data --------------------------------------------------------------------------------------
def test_dataset_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="does not exist"):
        load_split(str(tmp_path / "missing"), "calibration")
    with pytest.raises(DatasetError, match="no split 'nope'.*calibration, heldout"):
        load_split(DATA, "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="needs network access"):
        load_split("nobody-here/no-such-dataset", "validation")
    with pytest.raises(DatasetError, match="not in the dataset"):
        load_items(DATA, "calibration", groups=["single", "poems"], per_group=1)


def test_items_and_scoring():
    items = load_items(DATA, "calibration", groups=["single", "multi"], per_group=2)
    assert [it.group for it in items] == ["single", "single", "multi", "multi"]
    assert is_correct(" Value:  7.", ["value: 7"]) and not is_correct("value: 1", ["value: 7"])
    answers = [Answer(it.answers[0] if i % 2 == 0 else "x", kept, tokens)
               for i, (it, kept, tokens) in enumerate(zip(items, [0.1, 0.2, 0.3, 0.4], [100, 100, 200, 100]))]
    res = score(items, answers)
    assert res.accuracy == 0.5 and res.per_group == {"multi": 0.5, "single": 0.5}
    assert res.kept_ratio == pytest.approx((10 + 20 + 60 + 40) / 500)


def test_policy_request_carries_the_whole_policy():
    req = policy_request(PolicyConfig(alpha=0.2, granularity="head"))
    assert req["budget"] == 0.2 and req["method"] == "vlcache" and req["granularity"] == "head"
    assert "alpha" not in req and set(req) - {"budget", "method"} == set(PolicyConfig().to_dict()) - {
        "alpha", "method"}
    assert req["budget_fn"] is None
    # the budget function travels per request under its own name; the server resolves it back
    policy = PolicyConfig(alpha=0.2, budget_fn="uniform", granularity="head")
    req = policy_request(policy)
    assert req["budget"] == 0.2 and req["budget_fn"] == "uniform"
    assert resolve_policy(CompressionSettings(), {"vlcache": req}) == policy


# -- search space ------------------------------------------------------------------------------
def test_every_sampled_point_is_a_valid_policy_and_conditionals_follow_the_mode():
    space = SearchSpace.build()
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    modes, splits = set(), set()
    for _ in range(60):
        trial = study.ask()
        params = space.sample(trial)
        policy = space.to_policy(params)
        modes.add(policy.window_mode)
        splits.add((policy.granularity, policy.head_budget))
        assert ("window_size" in params) == (policy.window_mode == "last_w")
        assert ("max_window" in params) == (policy.window_mode == "post_vision")
        assert ("head_budget" in params) == (policy.granularity == "head")  # AdaKV's split: heads only
        assert ("head_floor" in params) == (policy.head_budget == "adaptive")
        if "head_floor" not in params:
            assert policy.head_floor == PolicyConfig().head_floor
        assert space.params_for(policy) == params  # every point maps back to itself
        assert policy.clip_min <= policy.alpha <= policy.clip_max and policy.method == "vlcache"
        study.tell(trial, [0.0, 0.0])
    assert modes == {"post_vision", "last_w"}
    assert splits == {("layer", "uniform"), ("head", "uniform"), ("head", "adaptive")}


def test_a_fixed_parent_decides_its_conditionals():
    layer = SearchSpace.build(fixed={"granularity": "layer"})
    assert "head_budget" not in layer.distributions and "head_floor" not in layer.distributions
    uniform = SearchSpace.build(fixed={"granularity": "head", "head_budget": "uniform"})
    assert "head_floor" not in uniform.distributions
    adaptive = SearchSpace.build(fixed={"head_budget": "adaptive"})  # granularity still searched
    assert {"granularity", "head_floor"} <= set(adaptive.distributions)
    assert adaptive.to_policy({"granularity": "layer", "head_floor": 0.4}).head_floor == PolicyConfig().head_floor
    assert adaptive.to_policy({"granularity": "head", "head_floor": 0.4}).head_floor == 0.4


def test_fixing_a_parameter_removes_it_and_bad_values_are_refused():
    space = SearchSpace.build(fixed=parse_fixed(["granularity=layer", "window_mode=last_w"]))
    assert "granularity" not in space.distributions and "max_window" not in space.distributions
    assert space.signature() != SearchSpace.build().signature()
    pinned = SearchSpace.build(fixed=parse_fixed(["budget_fn=uniform"]))  # travels per request
    assert pinned.to_policy(pinned.params_for(PolicyConfig(alpha=0.1, budget_fn="uniform"))).budget_fn == "uniform"
    with pytest.raises(SpaceError, match="not a policy field"):
        parse_fixed(["windoww=3"])
    with pytest.raises(SpaceError, match="name=value"):
        parse_fixed(["granularity"])
    with pytest.raises(SpaceError, match="granularity"):
        SearchSpace.build(fixed={"granularity": "token"})
    with pytest.raises(SpaceError, match="alpha range"):
        SearchSpace.build(alpha_range=(0.5, 0.1))


def test_the_paper_defaults_are_a_point_of_the_space():
    space = SearchSpace.build()
    params = space.params_for(PolicyConfig(alpha=0.1))
    assert params is not None and params["pool_kernel"] == 1 and params["max_window"] == 0
    assert space.to_policy(params) == PolicyConfig(alpha=0.1, pool_kernel=1)
    assert space.params_for(PolicyConfig(alpha=0.9)) is None  # outside the alpha range
    assert SearchSpace.build(fixed={"granularity": "head"}).params_for(PolicyConfig()) is None


# -- objectives --------------------------------------------------------------------------------
def _records():
    pts = [(0, 0.9, 0.5), (1, 0.8, 0.1), (2, 0.85, 0.3), (3, 0.7, 0.05), (4, 0.6, 0.2), (5, 0.95, 0.9)]
    return [TrialRecord(n, {}, a, k) for n, a, k in pts]


def test_pareto_front_and_choices():
    recs = _records()
    assert [r.number for r in pareto_front(recs)] == [3, 1, 2, 0, 5]
    assert ObjectiveSpec("pareto", min_relative_accuracy=0.85).choose(recs, 1.0).number == 2
    assert ObjectiveSpec("pareto", min_relative_accuracy=1.0).choose(recs, 1.0).number == 5
    assert ObjectiveSpec("memory-cap", max_kept=0.35).choose(recs, 1.0).number == 2
    assert ObjectiveSpec("min-budget", min_relative_accuracy=0.8).choose(recs, 1.0).number == 1
    with pytest.raises(ObjectiveError, match="no trial kept at most"):
        ObjectiveSpec("memory-cap", max_kept=0.01).choose(recs, 1.0)
    with pytest.raises(ObjectiveError, match="no trial reached"):
        ObjectiveSpec("min-budget", min_relative_accuracy=1.0).choose(recs, 1.0)
    spec = ObjectiveSpec("min-budget", min_relative_accuracy=0.9)
    assert spec.directions == ["minimize"] and spec.constraints(0.8, 0.1, 1.0) == pytest.approx([0.1])
    with pytest.raises(ObjectiveError, match="max-kept"):
        ObjectiveSpec("memory-cap")


def test_the_trials_table_shows_every_searched_parameter():
    from tuning.report import trials_table

    searched = SearchSpace.build("vlcache").distributions
    header = trials_table([TrialRecord(0, dict.fromkeys(searched, 1), 0.5, 0.1)], None).splitlines()[0]
    assert [n for n in searched if f" {n} |" not in header] == []
    table = trials_table([TrialRecord(0, {}, 0.5, 0.1)], None).splitlines()  # no parameters: still a table
    assert len({line.count("|") for line in table}) == 1


# -- storage and study ---------------------------------------------------------------------------
def test_storage_that_cannot_be_opened(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_text("not a database")
    with pytest.raises(StudyError, match="cannot open the study storage"):
        open_storage(storage_url(str(bad)))
    with pytest.raises(StudyError, match="is a directory"):
        storage_url(str(tmp_path))


def test_study_with_another_search_space_is_refused(tmp_path):
    storage = open_storage(storage_url(str(tmp_path / "s.db")))
    sampler = optuna.samplers.RandomSampler(seed=0)
    setup = {"space": SearchSpace.build().signature(), "objective": ObjectiveSpec().signature()}
    study, resumed = open_study(storage, "s", setup, ["maximize", "minimize"], sampler)
    assert not resumed
    study.optimize(lambda t: [0.5, SearchSpace.build().to_policy(SearchSpace.build().sample(t)).alpha], n_trials=2)
    again, resumed = open_study(storage, "s", setup, ["maximize", "minimize"], sampler)
    assert resumed and len(again.trials) == 2
    other = dict(setup, space=SearchSpace.build(fixed={"granularity": "layer"}).signature())
    with pytest.raises(StudyError, match=r"different setup.*granularity"):
        open_study(storage, "s", other, ["maximize", "minimize"], sampler)


def test_recent_window_rule_is_searched_or_fixed():
    """Issue 22: the tuner chooses between one shared recent window and the paper's per-layer one."""

    space = SearchSpace.build()
    assert space.distributions["recent_window"].choices == ("shared", "per_layer")
    assert {space.to_policy({"recent_window": v}).recent_window for v in ("shared", "per_layer")} == {
        "shared", "per_layer"}
    fixed = SearchSpace.build(fixed=parse_fixed(["recent_window=per_layer"]))
    assert "recent_window" not in fixed.distributions and fixed.to_policy({}).recent_window == "per_layer"
