"""The opt-in CUDA path refuses CUDA graphs at launch with the flags to use (the backend has no
graph hooks yet); the decision itself is pure and runs here."""
from __future__ import annotations

import pytest

from vlcache_sglang.backend.attention_backend import CUDA_GRAPH_FLAGS, require_cuda_graphs_disabled


def test_graphs_on_is_refused_with_the_flags():
    with pytest.raises(RuntimeError, match="does not support CUDA graphs") as err:
        require_cuda_graphs_disabled(False)
    assert CUDA_GRAPH_FLAGS in str(err.value)


def test_graphs_off_is_accepted():
    require_cuda_graphs_disabled(True)
