"""A method registered by third-party code is selectable like a built-in one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.policy.plan_helper import GRANULARITIES, check_matrix_cell, compressing_methods, method_matrix, run_plan
from vlcache_sglang.policy import (
    Method,
    PolicyConfig,
    PolicyConfigError,
    ScoreContext,
    available_methods,
    get_method,
    register_method,
)
from vlcache_sglang.policy import methods as registry

NAME = "sqrt_window"


def _score(ctx: ScoreContext, layer: int) -> torch.Tensor:
    """Square root of the window attention, ``[Hkv, m]`` (same order as VL-Cache's score)."""
    assert ctx.stats.col is not None
    return ctx.stats.col[layer].clamp_min(0).sqrt()


PLUGIN = Method(name=NAME, score=_score, default_budget="adaptive", rows="window",
                reference="test-only third-party method")


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[Method]:
    """``PLUGIN`` registered for one test; the registry is restored afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield register_method(PLUGIN)


def test_registered_method_is_selectable(plugin: Method) -> None:
    assert NAME in available_methods() and get_method(NAME) is plugin
    cfg = PolicyConfig(method=NAME, alpha=0.2)
    assert cfg.resolved_budget_fn() == "adaptive"
    assert PolicyConfig.from_dict(cfg.to_dict()) == cfg
    assert (NAME, "layer") in method_matrix() and NAME in compressing_methods()
    for granularity in GRANULARITIES:
        check_matrix_cell(NAME, granularity)
    plan = run_plan(cfg)
    assert plan.method == NAME and not plan.is_identity


def test_registered_method_is_selectable_from_the_launch_and_from_a_request(plugin: Method) -> None:
    """The server's validation asks the registry at validation time: the launch flag
    (``--vlcache-method``), the ``--help`` list and ``custom_params`` accept the new name."""
    import argparse

    from vlcache_sglang.launch_hooks import add_cli_args
    from vlcache_sglang.policy_resolution import check_request, resolve_policy
    from vlcache_sglang.settings import CompressionSettings, SettingsError, launch_settings

    settings, _ = launch_settings({"budget": 0.2, "method": NAME}, {}, None)
    assert settings.compression.method == NAME
    assert resolve_policy(settings.compression).method == NAME
    request = {"vlcache": {"method": NAME, "budget": 0.1}}
    check_request(CompressionSettings(), request)
    assert resolve_policy(CompressionSettings(), request) == PolicyConfig(method=NAME, alpha=0.1)
    parser = argparse.ArgumentParser()
    add_cli_args(None, parser)
    assert NAME in parser.format_help()
    with pytest.raises(SettingsError, match=f"vlcache method must be one of .*{NAME}"):
        launch_settings({"method": "nope"}, {}, None)


def test_unknown_method_error_lists_the_registered_ones(plugin: Method) -> None:
    with pytest.raises(PolicyConfigError, match=f"method: unknown method 'nope'; allowed: .*{NAME}") as err:
        PolicyConfig(method="nope")
    assert all(name in str(err.value) for name in available_methods())
    with pytest.raises(KeyError, match=f"available: .*{NAME}"):
        get_method("nope")


def test_registering_twice_needs_replace(plugin: Method) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method(PLUGIN)
    assert register_method(PLUGIN, replace=True) is PLUGIN


def test_reports_list_a_registered_method_under_its_own_name(plugin: Method) -> None:
    from vlcache_sglang.research.hf_eval.report import label, method_order  # imports transformers

    order = method_order()
    assert set(order) == set(available_methods()) and order[-1] == "full"
    assert order[:2] == ["vlcache", "snapkv"] and label(NAME) == NAME


def test_fixture_restored_the_registry() -> None:
    assert NAME not in available_methods()
    with pytest.raises(PolicyConfigError, match="unknown method"):
        PolicyConfig(method=NAME)
