"""Plans from incomplete statistics are never silent (SGLang's real pools and allocator).

A compressing request whose window rows were not all measured (a chunk skipped, rows served from
a cache) is planned from part of its question: with ``VLCACHE_DEBUG_CHECKS`` that raises, without
it the plan is counted and noted in ``meta_info``. A later turn over a compressed prefix measures
H2O's rows from its first computed row on: that is complete, not incomplete."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from tests.unit.test_resolved_rows import D, L, setup
from vlcache_sglang.backend.compressor import Compressor
from vlcache_sglang.backend.metadata import ForwardMetadata, build_ragged_kv
from vlcache_sglang.backend.request_info import RequestInfo
from vlcache_sglang.policy import PolicyConfig, PolicyError

M, IMAGE_END = 40, 29  # image tokens 0..29, question 30..39 (the post-vision window)


def prefill(s, comp: Compressor, method: str, computed_from: int, sharing: str = "off", protected: int = 0):
    """One last prefill chunk of one request computing rows ``[computed_from, M)``."""
    g = torch.Generator().manual_seed(0)
    slots = s.allocator.alloc(M)
    s.req_pool.req_to_token[0, :M] = slots.to(torch.int32)
    s.kv.k.copy_(torch.randn(s.kv.k.shape, generator=g))
    req = SimpleNamespace(customized_info=None, sampling_params=None)
    info = RequestInfo(rid="r0", req_pool_idx=0, prompt_len=M, image_spans=((0, IMAGE_END),), is_last_chunk=True,
                       protected_len=protected, policy=PolicyConfig(alpha=0.3, method=method), sharing=sharing,
                       req=req)
    n = M - computed_from
    meta = ForwardMetadata(is_decode=False, kv=build_ragged_kv(s.req_pool.req_to_token, torch.tensor([0]), [M]),
                           qo_indptr_cpu=[0, n], prefix_lens_cpu=[computed_from], requests=[info])
    rows = s.kv.rows_per_layer
    for layer in range(L):
        q = torch.randn(n, 4, D, generator=g)
        comp.observe_extend(layer, q, s.kv.k[layer * rows:(layer + 1) * rows], meta.kv, None, meta, [info], D ** -0.5)
    return req.customized_info


def test_complete_statistics_plan_without_a_note():
    s = setup()
    report = prefill(s, s.comp, "vlcache", computed_from=0)
    assert s.comp.counters.plans_from_incomplete_statistics == 0
    assert "vlcache_incomplete_statistics" not in report and report["vlcache_kept_ratio"][0] < 1


def test_incomplete_statistics_are_counted_and_noted():
    s = setup()
    report = prefill(s, s.comp, "vlcache", computed_from=35)  # half of the window never measured
    assert s.comp.counters.plans_from_incomplete_statistics == 1
    assert report["vlcache_incomplete_statistics"] == [True]
    assert "incomplete statistics" in report["vlcache_notes"][0]


def test_incomplete_statistics_raise_under_debug_checks():
    s = setup()
    s.comp.debug_checks = True
    with pytest.raises(PolicyError, match="incomplete statistics"):
        prefill(s, s.comp, "vlcache", computed_from=35)


def test_h2o_over_a_compressed_prefix_counts_rows_from_its_first_computed_row():
    s = setup()
    s.comp.debug_checks = True  # would raise if the 20 cached rows were expected
    report = prefill(s, s.comp, "h2o", computed_from=20, sharing="compressed", protected=20)
    assert s.comp.counters.plans_from_incomplete_statistics == 0
    assert report["vlcache_kept_ratio"][0] < 1
