"""Every HTTP route of the installed SGLang is classified (vlcache_sglang/sglang_routes.tsv): served
with a test that exists, needing a launch flag that exists, changed upstream of the plugin (with
the test that pins it), without effect on the KV cache, or serving another model family."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlcache_sglang import sglang_flags
from vlcache_sglang.sglang_flags import coverage
from vlcache_sglang.sglang_routes import Support, load, render_markdown, sglang_routes

pytest.importorskip("sglang")

ROOT = Path(__file__).resolve().parents[2]
TABLE = load()


def test_every_route_is_classified_once():
    missing, stale = coverage(TABLE, sglang_routes())
    assert not missing, f"new SGLang routes to classify in sglang_routes.tsv: {missing}"
    assert not stale, f"routes SGLang no longer has: {stale}"


def test_rows_carry_the_evidence_their_kind_needs():
    flags = sglang_flags.load()
    for r in TABLE.values():
        if r.support in (Support.SERVED, Support.UPSTREAM):
            assert r.tests, f"{r.field}: {r.support.value} without a test"
        if r.support is Support.NEEDS_FLAG:
            assert r.flag, f"{r.field}: needs-flag without the flag"
        if r.flag:
            assert r.flag in flags, f"{r.field}: flag {r.flag!r} is not a ServerArgs field"
        if r.support is Support.SERVED and r.flag:  # a route served only behind a refused flag is not served
            assert flags[r.flag].support is not sglang_flags.Support.REFUSED, f"{r.field}: {r.flag} is refused"
        assert r.note, f"{r.field}: no note"


def test_named_tests_exist():
    gone = [f"{r.field}: {node}" for r in TABLE.values() for node in sglang_flags.missing_tests(r.tests, ROOT)]
    assert not gone, gone


def test_the_docs_page_is_current():
    page = ROOT / "docs" / "sglang-routes.md"
    assert page.read_text() == render_markdown(TABLE), \
        "regenerate: python -m vlcache_sglang.sglang_routes --write docs/sglang-routes.md"
