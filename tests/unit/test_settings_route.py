"""The one route of the launch's settings to SGLang's other processes: attached to the real
``ServerArgs``, they survive the pickling that hands the server args to every spawned scheduler,
TP rank and the detokenizer (``ServerArgs.__reduce__`` keeps its ``__dict__``)."""
from __future__ import annotations

import argparse
import pickle

import pytest

from vlcache_sglang.settings import CompressionSettings, ServerSettings, attach, settings_of

pytest.importorskip("sglang")


def test_settings_travel_with_pickled_server_args(tiny_model_dir):
    from sglang.srt.server_args import ServerArgs, add_attention_backend_choices

    add_attention_backend_choices(["vlcache"])
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    server_args = ServerArgs.from_cli_args(parser.parse_args(
        ["--model-path", str(tiny_model_dir), "--attention-backend", "vlcache", "--device", "cpu"]))
    settings = ServerSettings(CompressionSettings(budget=0.2, method="snapkv"), debug_checks=True, kernels="torch")
    assert settings_of(server_args) is None
    attach(server_args, settings)
    copy = pickle.loads(pickle.dumps(server_args))
    assert settings_of(copy) == settings and settings_of(copy) is not settings
