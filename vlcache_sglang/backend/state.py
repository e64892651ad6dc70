"""The vlcache backend active in this process (one per scheduler/TP worker), for scheduler hooks."""
from __future__ import annotations

_active = None


def set_active(backend) -> None:
    global _active
    _active = backend


def active():
    return _active


def active_compressor():
    return getattr(_active, "compressor", None)
