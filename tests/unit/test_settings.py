"""Launch-time and per-request compression settings: validation and precedence."""
import math

import pytest

from vlcache_sglang.settings import (
    ENV_BUDGET,
    ENV_CONFIG,
    ENV_METHOD,
    CompressionSettings,
    SettingsError,
    parse_request_overrides,
)


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, math.nan, math.inf, "0.1", True, None])
def test_bad_budget_is_rejected_with_its_name(budget):
    with pytest.raises(SettingsError, match="budget"):
        CompressionSettings(budget=budget).validate()


def test_bad_method_lists_the_allowed_ones():
    with pytest.raises(SettingsError, match="snapkv"):
        CompressionSettings(method="nope").validate()


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingsError, match="not found"):
        CompressionSettings(config_path=str(tmp_path / "missing.json")).validate()


def test_env_round_trip(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    s = CompressionSettings(budget=0.25, method="snapkv", config_path=str(cfg)).validate()
    assert CompressionSettings.from_env(s.to_env()) == s
    assert CompressionSettings.from_env({}) == CompressionSettings()
    with pytest.raises(SettingsError, match=ENV_BUDGET):
        CompressionSettings.from_env({ENV_BUDGET: "ten"})
    with pytest.raises(SettingsError):
        CompressionSettings.from_env({ENV_METHOD: "bogus"})
    with pytest.raises(SettingsError):
        CompressionSettings.from_env({ENV_CONFIG: str(tmp_path / "nope.json")})


def test_request_overrides_take_precedence_and_are_validated():
    server = CompressionSettings(budget=0.5, method="vlcache")
    assert server.with_request(None) is server
    assert server.with_request({"other": 1}) is server
    req = server.with_request({"vlcache": {"budget": 0.1, "method": "h2o", "window": 8}})
    assert (req.budget, req.method, dict(req.policy_overrides)) == (0.1, "h2o", {"window": 8})
    assert req.compresses and not CompressionSettings(budget=1.0).compresses
    assert not CompressionSettings(budget=0.1, method="full").compresses
    for bad in ({"vlcache": 0.1}, {"vlcache": {"budget": 2}}, {"vlcache": {"method": "x"}},
                {"vlcache": {"budget": [0.1]}}):
        with pytest.raises(SettingsError):
            parse_request_overrides(bad)


def test_sharing_mode_from_env_request_and_bad_values():
    base = CompressionSettings.from_env({"VLCACHE_SHARING": "prefix"})
    assert base.sharing == "prefix" and CompressionSettings().sharing == "off"
    assert base.with_request({"vlcache": {"sharing": "compressed"}}).sharing == "compressed"
    assert "sharing" not in base.with_request({"vlcache": {"sharing": "compressed"}}).policy_overrides
    with pytest.raises(SettingsError, match="sharing must be one of off, prefix, compressed"):
        parse_request_overrides({"vlcache": {"sharing": "always"}})
    with pytest.raises(SettingsError, match="sharing"):
        CompressionSettings.from_env({"VLCACHE_SHARING": "yes"})
