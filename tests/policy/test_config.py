"""PolicyConfig: defaults, JSON round trips, overrides and error messages."""

from __future__ import annotations

import json

import pytest

from vlcache_sglang.policy import PolicyConfig, PolicyConfigError, available_methods


def test_defaults_are_valid_and_paper_like() -> None:
    cfg = PolicyConfig()
    assert cfg.method == "vlcache" and cfg.alpha == 0.1 and cfg.sparsity_threshold == 0.01
    assert (cfg.clip_min, cfg.clip_max, cfg.recent_share) == (0.01, 1.0, 0.1)
    assert cfg.resolved_budget_fn() == "adaptive" and cfg.resolved_pool_kernel() == 1
    assert not cfg.resolved_protect_window()


def test_method_defaults_resolve() -> None:
    snap = PolicyConfig(method="snapkv")
    assert snap.resolved_pool_kernel() == 5 and snap.resolved_protect_window()
    assert snap.resolved_budget_fn() == "uniform"
    assert PolicyConfig(method="pyramidkv").resolved_budget_fn() == "pyramid"
    assert PolicyConfig(method="snapkv", pool_kernel=1, protect_window=False).resolved_pool_kernel() == 1


def test_json_round_trip(tmp_path) -> None:
    cfg = PolicyConfig(method="snapkv", alpha=0.25, granularity="head", pool_kernel=7, max_window=64)
    assert PolicyConfig.from_json(cfg.to_json()) == cfg
    path = tmp_path / "policy.json"
    cfg.save(path)
    assert PolicyConfig.load(path) == cfg
    assert json.loads(path.read_text())["pool_kernel"] == 7


def test_legacy_budget_key_loads_as_budget_fn(tmp_path) -> None:
    """Files saved before the rename name the budget function ``budget``."""
    legacy = {**PolicyConfig().to_dict(), "budget": "uniform"}
    del legacy["budget_fn"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(legacy))
    assert PolicyConfig.load(path) == PolicyConfig(budget_fn="uniform")
    assert PolicyConfig.from_dict({"budget": None}).budget_fn is None
    with pytest.raises(PolicyConfigError, match="'budget_fn' and as its old name 'budget'"):
        PolicyConfig.from_dict({"budget": "uniform", "budget_fn": "uniform"})
    with pytest.raises(PolicyConfigError, match="budget_fn: 'cosine'"):
        PolicyConfig.from_dict({"budget": "cosine"})
    with pytest.raises(PolicyConfigError, match="budget: unknown field"):  # replace() takes field names only
        PolicyConfig().replace(budget="uniform")


def test_replace_accepts_json_scalars() -> None:
    cfg = PolicyConfig().replace(**json.loads('{"alpha": 1, "window_size": 32.0, "budget_fn": null, '
                                              '"granularity": "head", "redistribute": false}'))
    assert cfg.alpha == 1.0 and isinstance(cfg.alpha, float)
    assert cfg.window_size == 32 and isinstance(cfg.window_size, int)
    assert cfg.granularity == "head" and cfg.redistribute is False
    assert PolicyConfig.from_dict({"method": "h2o"}).method == "h2o"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"alpha": 0.0}, "alpha: 0.0 is outside (0.0, 1.0]"),
        ({"alpha": 1.5}, "alpha: 1.5 is outside"),
        ({"alpha": "0.1"}, "alpha: expected a finite number"),
        ({"alpha": True}, "alpha: expected a finite number"),
        ({"alpha": float("nan")}, "alpha: expected a finite number"),
        ({"alpha": 0.005}, "alpha: 0.005 must lie within [clip_min, clip_max]"),
        ({"sparsity_threshold": 1.0}, "sparsity_threshold: 1.0 is outside [0.0, 1.0)"),
        ({"window_mode": "tail"}, "window_mode: 'tail' is not one of"),
        ({"text_only": "drop"}, "text_only"),
        ({"granularity": "kv"}, "granularity: 'kv' is not one of 'layer', 'head'"),
        ({"budget_fn": "cosine"}, "budget_fn: 'cosine'"),
        ({"pool_kernel": 4}, "pool_kernel: 4 must be odd"),
        ({"pool_kernel": 0}, "pool_kernel: 0 must be an integer >= 1"),
        ({"pool_kernel": 2.5}, "pool_kernel: expected an integer or null"),
        ({"window_size": 0}, "window_size: 0 must be an integer >= 1"),
        ({"max_window": 0}, "max_window"),
        ({"recent_share": 1.5}, "recent_share: 1.5 is outside [0.0, 1.0]"),
        ({"clip_min": 0.5, "clip_max": 0.4, "alpha": 0.45}, "clip_min: 0.5 must not exceed clip_max"),
        ({"clip_max": 0.0}, "clip_max"),
        ({"redistribute": "yes"}, "redistribute: expected true or false"),
        ({"pyramid_beta": 0.5}, "pyramid_beta: 0.5 must be a finite number >= 1"),
        ({"key_chunk": 0}, "key_chunk"),
        ({"stats_dtype": "float16"}, "stats_dtype"),
        ({"method": "zipcache"}, "method: unknown method 'zipcache'"),
        ({"method": "streamingllm", "budget_fn": "adaptive"}, "budget_fn: 'adaptive' needs attention statistics"),
        ({"alhpa": 0.2}, "alhpa: unknown field"),
    ],
)
def test_bad_values_name_the_field(overrides, fragment) -> None:
    with pytest.raises(PolicyConfigError) as err:
        PolicyConfig().replace(**overrides)
    assert fragment in str(err.value)
    assert isinstance(err.value, ValueError)


def test_constructor_validates() -> None:
    with pytest.raises(PolicyConfigError, match="alpha"):
        PolicyConfig(alpha=2.0)


def test_bad_json() -> None:
    with pytest.raises(PolicyConfigError, match="not valid JSON"):
        PolicyConfig.from_json("{alpha: 0.1")
    with pytest.raises(PolicyConfigError, match="expected a JSON object"):
        PolicyConfig.from_json("[1, 2]")


def test_every_method_has_a_valid_default_config() -> None:
    assert set(available_methods()) == {"vlcache", "snapkv", "pyramidkv", "h2o", "streamingllm", "random", "full"}
    for name in available_methods():
        PolicyConfig(method=name).validate()


def test_alpha_one_is_always_valid_and_the_identity():
    """A tuned file may cap clip_max below 1; budget 1.0 must still mean 'keep everything'."""
    from vlcache_sglang.policy import PolicyConfig, PolicyConfigError

    cfg = PolicyConfig(alpha=1.0, clip_max=0.6).validate()
    assert cfg.alpha == 1.0
    with pytest.raises(PolicyConfigError, match="must lie within"):
        PolicyConfig(alpha=0.7, clip_max=0.6).validate()
