"""The opt-in CUDA paths refuse CUDA graphs they cannot serve at launch, naming the flags (prefill
gathers statistics and compacts on the host); decode graphs are accepted. The decision itself is
pure and runs here."""
from __future__ import annotations

import pytest

from vlcache_sglang.backend.attention_backend import (
    PREFILL_GRAPH_FLAG,
    TORCH_EXECUTOR_GRAPH_FLAGS,
    require_graphs_disabled,
    require_prefill_graphs_disabled,
)


def test_prefill_graphs_on_is_refused_with_the_flag():
    with pytest.raises(RuntimeError, match="runs prefill eagerly") as err:
        require_prefill_graphs_disabled(False)
    assert PREFILL_GRAPH_FLAG in str(err.value)


def test_prefill_graphs_off_is_accepted():
    require_prefill_graphs_disabled(True)


@pytest.mark.parametrize("prefill_off,decode_off", [(False, True), (True, False), (False, False)])
def test_torch_executor_refuses_any_cuda_graph_with_the_flags(prefill_off, decode_off):
    with pytest.raises(RuntimeError, match="VLCACHE_CUDA_EXECUTOR=torch") as err:
        require_graphs_disabled(prefill_off, decode_off)
    assert TORCH_EXECUTOR_GRAPH_FLAGS in str(err.value)


def test_torch_executor_without_graphs_is_accepted():
    require_graphs_disabled(True, True)
