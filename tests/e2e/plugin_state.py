"""The at-start check every server test module ends a workload with: once nothing is live and
the radix tree is flushed, the KV pool is whole and every store of the plugin is empty
(``tooling.serving.settled_state`` and ``differences_from_start``)."""
from __future__ import annotations

from vlcache_sglang.tooling.serving import differences_from_start, settled_state


def settle(server, flush: bool = True) -> dict:
    """The plugin's state once no compressed request is live and no statistics are pending,
    after a flush of the tree unless ``flush`` is false."""
    return settled_state(server.url, flush=flush)


def assert_at_start(state: dict) -> None:
    """``state`` (a settled, flushed one) is the server's state at start: nothing leaked."""
    assert differences_from_start(state) == {}, state
