"""The test servers' HTTP port is chosen where the kernel never hands out ports by itself."""
from __future__ import annotations

import socket

from vlcache_sglang.tooling.serving import _ephemeral_port_floor, free_port


def test_free_port_lies_below_the_ephemeral_range_and_is_bindable() -> None:
    floor = _ephemeral_port_floor()
    for _ in range(20):
        port = free_port()
        # SGLang puts its rendezvous at port + 100..1000: that must stay below the range too.
        assert port + 1000 < floor
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_already_bound(monkeypatch) -> None:
    import random

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    taken = held.getsockname()[1]
    first = {"done": False}

    class FirstTaken(random.Random):
        def randrange(self, *args):  # the first draw is the held port, then ordinary draws
            if not first["done"]:
                first["done"] = True
                return taken
            return super().randrange(*args)

    monkeypatch.setattr(random, "Random", FirstTaken)
    try:
        assert free_port() != taken
        assert first["done"]
    finally:
        held.close()
