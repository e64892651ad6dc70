"""Every ``ServerArgs`` field of the installed SGLang is classified (vlcache_sglang/sglang_flags.tsv):
served with a test that exists, refused at launch (checked here on SGLang's real ``ServerArgs``),
without effect on the KV cache, for other model families, or a sub-option of a classified field."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlcache_sglang import compatibility
from vlcache_sglang.settings import CompressionSettings, ServerSettings
from vlcache_sglang.sglang_flags import Support, cli_spellings, coverage, load, missing_tests, render_markdown

pytest.importorskip("sglang")

ROOT = Path(__file__).resolve().parents[2]
TABLE = load()


def test_every_server_arg_field_is_classified_once():
    from sglang.srt.server_args import ServerArgs

    fields = list(ServerArgs.__struct_fields__)
    missing, stale = coverage(TABLE, fields)
    assert not missing, f"new SGLang fields to classify in sglang_flags.tsv: {missing}"
    assert not stale, f"fields SGLang no longer has: {stale}"


REFUSING = [r for r in TABLE.values() if r.refused_with]


@pytest.mark.parametrize("row", REFUSING, ids=[r.field for r in REFUSING])
def test_each_refused_launch_is_refused_naming_a_flag(parse_server_args, row):
    found = compatibility.refusals(parse_server_args(*row.refused_with), ServerSettings.from_env({}, CompressionSettings(budget=0.1)))
    assert found, f"{' '.join(row.refused_with)} is marked refused but the launch passes"
    named = {a for a in row.refused_with if a.startswith("--")}
    assert any(any(flag in r.flag for flag in named) for r in found), [r.message() for r in found]


def test_rows_carry_the_evidence_their_kind_needs():
    for r in TABLE.values():
        if r.support is Support.SERVED:
            assert r.tests, f"{r.field}: served without a test"
        if r.support is Support.REFUSED:
            assert r.refused_with, f"{r.field}: refused without the launch that shows it"
        if r.support is Support.SUB_OPTION:
            assert r.parent in TABLE, f"{r.field}: parent {r.parent!r} is not a field"
        assert r.note, f"{r.field}: no note"


def test_named_tests_exist():
    gone = [f"{r.field}: {node}" for r in TABLE.values() for node in missing_tests(r.tests, ROOT)]
    assert not gone, gone


def test_the_docs_page_is_current():
    page = ROOT / "docs" / "sglang-flags.md"
    assert page.read_text() == render_markdown(TABLE, cli_spellings()), \
        "regenerate: python -m vlcache_sglang.sglang_flags --write docs/sglang-flags.md"


def test_every_switch_the_launch_refuses_is_marked_refused():
    wrong = [f for f, *_ in compatibility.UNSERVED_SWITCHES if TABLE[f].support is not Support.REFUSED]
    assert not wrong, wrong
