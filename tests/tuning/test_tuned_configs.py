"""Per-model default policy files and how the launch (`settings.launch_settings`) picks them."""
from __future__ import annotations

import os
import shutil

import pytest

from vlcache_sglang import tuned_configs as tc
from vlcache_sglang.bundled import bundled_model_dir
from vlcache_sglang.policy import PolicyConfig
from vlcache_sglang.settings import ENV_BUDGET, ENV_CONFIG, ENV_METHOD, SettingsError, launch_settings


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    """A copy of the bundled model's config (no weights needed here) and an empty user config dir."""
    d = tmp_path / "my-vlm"
    d.mkdir()
    shutil.copy(bundled_model_dir() / "config.json", d / "config.json")
    monkeypatch.setenv(tc.ENV_CONFIG_DIR, str(tmp_path / "user-policies"))
    for name in (ENV_BUDGET, ENV_METHOD, ENV_CONFIG):
        monkeypatch.delenv(name, raising=False)
    return d


def launch(model, env=None, **flags):
    """Parse a launch as a fresh launcher process would (only ``env`` of ours set) after SGLang
    parsed the flags; returns the settings in their environment spelling (``to_env``)."""
    for name in (ENV_BUDGET, ENV_METHOD, ENV_CONFIG):
        os.environ.pop(name, None)
    os.environ.update(env or {})
    ours = flags.get("backend", "vlcache") == "vlcache"  # other backends: no per-model default
    cli = {"budget": flags.get("budget"), "method": flags.get("method"), "config": flags.get("config")}
    settings, _ = launch_settings(cli, os.environ, str(model) if ours else None)
    exported = settings.compression.to_env()
    return {k: exported.get(k) for k in (ENV_BUDGET, ENV_METHOD, ENV_CONFIG)}


def test_keys_and_locations(model_dir, tmp_path):
    assert tc.model_key("Qwen/Qwen2-VL-2B-Instruct") == "Qwen--Qwen2-VL-2B-Instruct"
    assert tc.model_key(model_dir).startswith("my-vlm-") and len(tc.model_key(model_dir)) == len("my-vlm-") + 8
    assert tc.candidate_paths(model_dir) == [tmp_path / "user-policies" / f"{tc.model_key(model_dir)}.json",
                                             model_dir.resolve() / tc.POLICY_FILENAME]
    assert tc.default_write_path(model_dir) == model_dir.resolve() / tc.POLICY_FILENAME
    assert tc.default_write_path("Qwen/Qwen2-VL-2B-Instruct") == tmp_path / "user-policies" / "Qwen--Qwen2-VL-2B-Instruct.json"
    assert tc.find_default_config(model_dir) is None
    with pytest.raises(tc.TunedConfigError, match="neither an existing directory"):
        tc.model_key("not a model!")


def test_write_then_found_user_dir_first(model_dir):
    beside = tc.write_policy(PolicyConfig(alpha=0.2), tc.default_write_path(model_dir), {"trial": 3})
    assert tc.find_default_config(model_dir) == beside
    assert tc.load_policy_file(beside) == PolicyConfig(alpha=0.2)
    assert '"trial": 3' in tc.provenance_path(beside).read_text()
    user = tc.write_policy(PolicyConfig(alpha=0.3), tc.candidate_paths(model_dir)[0])
    assert tc.find_default_config(model_dir) == user


def test_launch_without_flags_uses_the_per_model_default(model_dir):
    path = tc.write_policy(PolicyConfig(alpha=0.2, method="snapkv", granularity="head"), model_dir / tc.POLICY_FILENAME)
    env = launch(model_dir)
    assert env == {ENV_BUDGET: "0.2", ENV_METHOD: "snapkv", ENV_CONFIG: str(path)}


def test_flags_and_explicit_config_win(model_dir, tmp_path):
    tc.write_policy(PolicyConfig(alpha=0.2, method="snapkv"), model_dir / tc.POLICY_FILENAME)
    assert launch(model_dir, budget=0.5)[ENV_BUDGET] == "0.5"
    explicit = tc.write_policy(PolicyConfig(alpha=0.05), tmp_path / "explicit.json")
    env = launch(model_dir, config=str(explicit))
    assert env == {ENV_BUDGET: "0.05", ENV_METHOD: "vlcache", ENV_CONFIG: str(explicit)}


def test_none_disables_and_other_backends_ignore_it(model_dir, monkeypatch):
    tc.write_policy(PolicyConfig(alpha=0.2), model_dir / tc.POLICY_FILENAME)
    assert launch(model_dir, config="none") == {ENV_BUDGET: "1.0", ENV_METHOD: "vlcache", ENV_CONFIG: None}
    assert launch(model_dir, env={ENV_CONFIG: "none"})[ENV_CONFIG] is None
    assert launch(model_dir, env={ENV_BUDGET: "0.4"})[ENV_BUDGET] == "0.4"
    assert launch(model_dir, backend="torch_native")[ENV_CONFIG] is None


def test_bad_per_model_file_stops_the_launch_with_its_path(model_dir):
    (model_dir / tc.POLICY_FILENAME).write_text('{"alpha": 3}')
    with pytest.raises(SettingsError, match=r"vlcache_policy.json.*alpha.*--vlcache-config none"):
        launch(model_dir)
