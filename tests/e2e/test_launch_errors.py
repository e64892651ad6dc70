"""Invalid launch settings stop the stock launcher with a readable message (before any model load).

Each case costs a full SGLang import (~20 s), so only four paths are covered here (a flag, the
environment, an unsupported SGLang flag, a feature SGLang's resolution turns on); the validation
matrices themselves are in tests/unit/test_settings.py and tests/unit/test_compatibility.py.
"""
from __future__ import annotations

import subprocess

import pytest

from vlcache_sglang.tooling.serving import server_command, server_env


@pytest.mark.parametrize("extra_args,extra_env,expected", [
    (["--vlcache-budget", "1.5"], {}, "vlcache budget must be a number in (0, 1]"),
    ([], {"VLCACHE_BUDGET": "ten"}, "VLCACHE_BUDGET must be a number"),
    # an SGLang flag the backend cannot serve: refused by name, with what to do instead
    (["--page-size", "4"], {}, "--page-size 4: compaction moves single KV slots"),
    # a feature SGLang's resolution turns on (DP attention from --attn-dp-size; dp_size stays 1)
    (["--attn-dp-size", "2", "--tp-size", "2"], {}, "--dp-size / --attn-dp-size / --enable-dp-attention: data-parallel"),
])
def test_invalid_launch_setting_fails_fast_with_message(tiny_model_dir, extra_args, extra_env, expected):
    cmd = server_command(tiny_model_dir, attention_backend="vlcache", port=1, extra_args=extra_args)
    proc = subprocess.run(cmd, env=server_env(extra_env), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
