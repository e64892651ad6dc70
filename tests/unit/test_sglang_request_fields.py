"""Every request field of the installed SGLang is classified (vlcache_sglang/sglang_request_fields.tsv):
served with a test that exists, a 400 (checked here on SGLang's real request objects), needing a
launch flag that exists, acting upstream of the plugin, without effect on the KV cache, or read
only by another model family."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlcache_sglang import sglang_flags
from vlcache_sglang.sglang_flags import coverage
from vlcache_sglang.launch_hooks import check_generate_request, check_sampling_params
from vlcache_sglang.settings import CompressionSettings, ServerSettings
from vlcache_sglang.sglang_request_fields import SAMPLING, Support, load, render_markdown, sglang_fields

pytest.importorskip("sglang")

ROOT = Path(__file__).resolve().parents[2]
TABLE = load()


def test_every_request_field_is_classified_once():
    fields = sglang_fields()
    missing, stale = coverage(TABLE, fields)
    assert not missing, f"new SGLang request fields to classify in sglang_request_fields.tsv: {missing}"
    assert not stale, f"fields SGLang no longer has: {stale}"


REFUSING = [r for r in TABLE.values() if r.refused_with]


@pytest.mark.parametrize("row", REFUSING, ids=[r.field for r in REFUSING])
def test_each_refused_value_is_a_400_naming_its_field(row):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    name = row.field.split(".", 1)[1]
    with pytest.raises(ValueError, match=name):
        if row.field.startswith(SAMPLING):
            check_sampling_params(SamplingParams(**row.refused_with),
                                  ServerSettings.from_env({}, CompressionSettings(budget=0.1)), vocab_size=1000)
        else:
            obj = GenerateReqInput(text="hi", sampling_params={"max_new_tokens": 2}, **row.refused_with)
            obj.normalize_batch_and_arguments()
            check_generate_request(obj)


def test_rows_carry_the_evidence_their_kind_needs():
    flags = sglang_flags.load()
    for r in TABLE.values():
        if r.support in (Support.SERVED, Support.REFUSED, Support.UPSTREAM):
            assert r.tests, f"{r.field}: {r.support.value} without a test"
        if r.support is Support.REFUSED:
            assert r.refused_with, f"{r.field}: refused without the value that shows it"
        if r.support is Support.NEEDS_FLAG:
            assert r.flag in flags, f"{r.field}: flag {r.flag!r} is not a ServerArgs field"
        assert r.note, f"{r.field}: no note"


def test_named_tests_exist():
    gone = [f"{r.field}: {node}" for r in TABLE.values() for node in sglang_flags.missing_tests(r.tests, ROOT)]
    assert not gone, gone


def test_the_docs_page_is_current():
    page = ROOT / "docs" / "sglang-request-fields.md"
    assert page.read_text() == render_markdown(TABLE), \
        "regenerate: python -m vlcache_sglang.sglang_request_fields --write docs/sglang-request-fields.md"
