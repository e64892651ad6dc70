"""The table of every place the plugin touches SGLang (vlcache_sglang.hooks) against the installed
SGLang: each target resolves, with the parameters its hook relies on; a target that does not
resolve is reported by name and turns a vlcache launch into a refusal naming it."""
from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from vlcache_sglang import hooks
from vlcache_sglang.hooks import HOOKS, Hook, HookTargetMissing

pytest.importorskip("sglang")


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: f"{h.kind}:{h.target.rsplit('.', 2)[-2]}.{h.target.rsplit('.', 1)[-1]}")
def test_every_target_resolves_with_the_expected_parameters(hook: Hook):
    assert hooks.check(hook) is None
    obj = hooks.resolve(hook.target)
    if hook.kind in hooks.WRAPS:
        assert callable(hook.fn) and callable(obj)
        # the hook's own parameters line up with the target's (AFTER: result first; AROUND: original)
        lead = {"after": 1, "around": 1, "before": 0}[hook.kind]
        ours = tuple(inspect.signature(hook.fn).parameters)[lead:lead + len(hook.expects)]
        assert len(ours) == len(hook.expects)
    elif hook.kind == "subclass":
        module, name = hook.where.rsplit(".", 1)
        assert issubclass(getattr(__import__(module, fromlist=[name]), name), obj)
    else:
        assert hook.why and hook.where or hook.kind == "registration"


def test_the_table_is_the_only_route():
    """Every HookRegistry target the plugin wraps appears in the table once per hook function."""
    wraps = [(h.target, h.fn) for h in HOOKS if h.kind in hooks.WRAPS]
    assert len(wraps) == len(set(wraps))
    assert {h.kind for h in HOOKS} == {"before", "after", "around", "registration", "subclass", "instance"}


def test_a_missing_target_is_named_and_refuses_the_launch():
    gone = Hook("sglang.srt.managers.scheduler.Scheduler.no_such_method", "after", "test", lambda r, s: r, ("self",))
    renamed = Hook("sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.free_kv_row", "around", "test",
                   lambda o, s, kv, r: None, ("self", "row", "ranges"))
    found = hooks.problems((gone, renamed))
    assert len(found) == 2
    assert "Scheduler.no_such_method does not resolve" in found[0]
    assert "free_kv_row takes ('self', 'kv', 'ranges'), the hook expects ('self', 'row', 'ranges')" in found[1]
    refuse = hooks.refusal_hook(found)
    with pytest.raises(HookTargetMissing, match="Scheduler.no_such_method"):
        refuse(None, SimpleNamespace(attention_backend="vlcache"))
    assert refuse("ok", SimpleNamespace(attention_backend="flashinfer")) == "ok"  # other backends launch
