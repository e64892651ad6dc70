"""A policy written where tune.py writes it is loaded by a server launched without --vlcache-config,
and changes the measured kept share; a broken one stops the launch with a clear message."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from tuning.data import load_items
from tuning.evaluator import ServerEvaluator
from vlcache_sglang import tuned_configs as tc
from vlcache_sglang.bundled import REPO_ROOT, bundled_model_dir
from vlcache_sglang.policy import PolicyConfig
from vlcache_sglang.tooling.serving import running_server, server_command, server_env

pytestmark = pytest.mark.server
TUNED = PolicyConfig(alpha=0.25, granularity="head", recent_share=0.2)
CLEAN_ENV = {"VLCACHE_BUDGET": "", "VLCACHE_METHOD": "", "VLCACHE_CONFIG": ""}


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    """The bundled model copied (4.9 MB) with a tuned policy written to its per-model location."""
    root = tmp_path_factory.mktemp("tuned")
    model = shutil.copytree(bundled_model_dir(), root / "tinyvlm-copy",
                            ignore=shutil.ignore_patterns(tc.POLICY_FILENAME, "*.tuning.json"))
    path = tc.write_policy(TUNED, tc.default_write_path(model), {"trial": 0})
    assert path == model / tc.POLICY_FILENAME
    return model, root / "user-policies"


@pytest.fixture(scope="module")
def server(model_copy):
    model, user_dir = model_copy
    env = {**CLEAN_ENV, tc.ENV_CONFIG_DIR: str(user_dir)}
    with running_server(model, attention_backend="vlcache", max_running_requests=8, extra_env=env) as handle:
        yield handle


def ask(server, policy_fields: dict | None, item):
    """One chat request with only the given per-request fields (None: none at all)."""
    import requests

    body = {"model": "default", "temperature": 0, "max_tokens": 8, "return_meta_info": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": item.image_data_url}},
                {"type": "text", "text": item.question}]}]}
    if policy_fields is not None:
        body["custom_params"] = {"vlcache": policy_fields}
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["meta_info"]


def test_server_loads_the_per_model_policy_by_default(server):
    item = load_items(REPO_ROOT / "data" / "tinyvlm-docvqa", "heldout", groups=["single"], per_group=1)[0]
    assert "vlcache policy file" in server.log_tail(400) and tc.POLICY_FILENAME in server.log_tail(400)
    plain = ask(server, None, item)  # no flags, no request fields: the file's alpha, method and fields
    assert "vlcache_kept_ratio" in plain  # without the file the launch default is 1.0: nothing compressed
    kept_default_file = plain["vlcache_kept_ratio"][0] if isinstance(plain["vlcache_kept_ratio"], list) \
        else plain["vlcache_kept_ratio"]
    # granularity "head" is served as the union over KV heads, so it keeps more than alpha ...
    assert kept_default_file > TUNED.alpha + 0.02
    # ... and the same request with the paper's layer granularity keeps alpha: the file's fields are in force
    layer = ServerEvaluator(server.url).evaluate(TUNED.replace(granularity="layer"), [item])
    assert layer.kept_ratio == pytest.approx(TUNED.alpha, abs=0.01)
    full = ServerEvaluator(server.url).evaluate(PolicyConfig(method="full", alpha=1.0), [item])
    assert full.kept_ratio == 1.0


def test_broken_per_model_policy_stops_the_launch(model_copy, tmp_path):
    model, user_dir = model_copy
    broken = shutil.copytree(model, tmp_path / "broken", ignore=shutil.ignore_patterns("model.safetensors"))
    (broken / tc.POLICY_FILENAME).write_text('{"alpha": 0.1, "granularity": "token"}')
    cmd = server_command(broken, attention_backend="vlcache", port=1)
    proc = subprocess.run(cmd, env=server_env({**CLEAN_ENV, tc.ENV_CONFIG_DIR: str(user_dir)}),
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "vlcache_policy.json" in out and "granularity" in out and "--vlcache-config none" in out
