"""The opt-in CUDA path refuses prefill CUDA graphs at launch with the flag to use (prefill
gathers statistics and compacts on the host); decode graphs are accepted. The decision itself is
pure and runs here."""
from __future__ import annotations

import pytest

from vlcache_sglang.backend.attention_backend import PREFILL_GRAPH_FLAG, require_prefill_graphs_disabled


def test_prefill_graphs_on_is_refused_with_the_flag():
    with pytest.raises(RuntimeError, match="runs prefill eagerly") as err:
        require_prefill_graphs_disabled(False)
    assert PREFILL_GRAPH_FLAG in str(err.value)


def test_prefill_graphs_off_is_accepted():
    require_prefill_graphs_disabled(True)
