"""The vlcache backend and radix cache active in this process (one per scheduler/TP worker),
for scheduler hooks."""
from __future__ import annotations

_active = None
_tree = None


def set_active(backend) -> None:
    global _active
    _active = backend


def active():
    return _active


def active_compressor():
    return getattr(_active, "compressor", None)


def set_sharing_tree(tree) -> None:
    """Called by the ``vlcache`` radix cache: compressed requests may now enter the tree."""
    global _tree
    _tree = tree


def sharing_tree():
    return _tree
