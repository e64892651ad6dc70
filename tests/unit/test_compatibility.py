"""Launch refusals (vlcache_sglang.compatibility) on SGLang's real ``ServerArgs``: every flag the
backend cannot serve is named, with what to do instead; supported flags pass. One end-to-end
launch through the stock launcher is in tests/e2e/test_launch_errors.py."""
from __future__ import annotations

import pytest

from vlcache_sglang import compatibility
from vlcache_sglang.compatibility import CUDA_OPT_IN, TORCH_OPT_IN, not_compressing_message
from vlcache_sglang.settings import CompressionSettings, ServerSettings


def refusals(server_args, compression: CompressionSettings, environ: dict[str, str]):
    """:func:`compatibility.refusals` of a launch with these defaults and launcher environment."""
    return compatibility.refusals(server_args, ServerSettings.from_env(environ, compression))


def compresses_on(server_args, environ: dict[str, str]) -> bool:
    return compatibility.compresses_on(server_args, ServerSettings.from_env(environ, CompressionSettings()))

pytest.importorskip("sglang")


@pytest.fixture(scope="module")
def parse(parse_server_args):
    return parse_server_args


COMPRESS = CompressionSettings(budget=0.1)

REFUSED = [
    (["--speculative-algorithm", "NGRAM"], "--speculative-algorithm NGRAM", "drop the flag"),
    (["--pp-size", "2"], "--pp-size 2", "use --pp-size 1"),
    (["--page-size", "16"], "--page-size 16", "use --page-size 1"),
    (["--enable-lora"], "--enable-lora", "merge it into the weights"),
    (["--dp-size", "2"], "--dp-size", "sglang_router"),
    (["--disaggregation-mode", "prefill"], "--disaggregation-mode prefill", "without disaggregation"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache", "drop the flag"),
    (["--enable-torch-compile"], "--enable-torch-compile", "drop the flag"),
    (["--prefill-attention-backend", "torch_native"], "--prefill-attention-backend torch_native",
     "drop --prefill-attention-backend"),
    (["--decode-attention-backend", "triton"], "--decode-attention-backend triton", "drop --decode-attention-backend"),
    (["--enable-streaming-session"], "--enable-streaming-session", "open sessions without `streaming`"),
    (["--enable-session-radix-cache"], "--enable-session-radix-cache", "drop the flag"),
    (["--radix-eviction-policy", "tlru"], "--radix-eviction-policy tlru", "use --radix-eviction-policy lru"),
    (["--attn-dp-size", "2"], "--dp-size / --attn-dp-size", "sglang_router"),
    (["--dcp-size", "2"], "--dcp-size 2", "use --dcp-size 1"),
    (["--attn-cp-size", "2"], "--attn-cp-size 2", "use --attn-cp-size 1"),
    (["--enable-prefill-cp"], "--enable-prefill-cp", "drop the flag"),
    (["--radix-cache-backend", "flexkv"], "--radix-cache-backend flexkv", "--disable-radix-cache"),
    (["--kv-cache-dtype", "mxfp8"], "--kv-cache-dtype mxfp8", "fp8_e4m3"),
    (["--kv-canary", "log"], "--kv-canary log", "VLCACHE_DEBUG_CHECKS=1"),
    (["--moe-a2a-backend", "deepep"], "--moe-a2a-backend deepep", "use --moe-a2a-backend none"),
    (["--moe-dense-tp-size", "1"], "--moe-dense-tp-size", "drop the flag"),
    (["--cuda-graph-backend-decode", "breakable"], "--cuda-graph-backend-decode breakable", "full (the default)"),
    (["--model-impl", "transformers"], "--model-impl transformers", "use --model-impl auto"),
    (["--hicache-storage-backend", "file"], "--hicache-storage-backend", "drop the flag"),
    *[([flag], flag, "") for flag in ("--enable-lmcache", "--enable-flexkv", "--enable-unified-cache-external-linker",
                                      "--enable-pdmux", "--enable-two-batch-overlap", "--enable-mis",
                                      "--enable-deterministic-inference", "--enable-nvidia-megakernel",
                                      "--enable-amd-monokernel", "--language-only", "--enable-memory-saver",
                                      "--is-embedding")],
    (["--rl-on-policy-target", "fsdp"], "--rl-on-policy-target", "--attention-backend flashinfer"),
]


@pytest.mark.parametrize("flags,named,instead", REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_flag_is_refused_by_name(parse, flags, named, instead):
    found = refusals(parse(*flags), COMPRESS, environ={})
    assert len(found) == 1, [r.message() for r in found]
    assert found[0].message().startswith(named) and instead in found[0].message()


SUPPORTED = [[], ["--disable-radix-cache"], ["--allow-auto-truncate"], ["--strip-thinking-cache"], ["--disable-overlap-schedule"], ["--chunked-prefill-size", "64"],
             ["--enable-metrics"], ["--enable-mixed-chunk"], ["--page-size", "1"], ["--tp-size", "2"],
             ["--prefill-attention-backend", "vlcache"]]


@pytest.mark.parametrize("flags", SUPPORTED, ids=[" ".join(f) or "defaults" for f in SUPPORTED])
def test_supported_flags_pass(parse, flags):
    assert refusals(parse(*flags), COMPRESS, environ={}) == []


def test_features_sglang_resolution_turns_on_are_refused(parse):
    """Refusals read what SGLang's resolution settled on, not only the flags as typed:
    ``--attn-dp-size`` is DP attention although ``dp_size`` and ``enable_dp_attention`` stay at
    their defaults, and the deprecated pair is folded into it (raw fields reset)."""
    for flags in (["--attn-dp-size", "2", "--tp-size", "2"], ["--dp-size", "2", "--enable-dp-attention", "--tp-size", "2"]):
        sa = parse(*flags)
        sa.resolve_once()
        found = refusals(sa, COMPRESS, environ={})
        assert [r.flag for r in found] == ["--dp-size / --attn-dp-size / --enable-dp-attention"], flags
    sa = parse("--tp-size", "2")
    sa.resolve_once()
    assert refusals(sa, COMPRESS, environ={}) == []


def test_every_problem_is_listed_at_once(parse):
    found = refusals(parse("--page-size", "4", "--pp-size", "2", "--enable-lora"), COMPRESS, environ={})
    assert [r.flag.split()[0] for r in found] == ["--pp-size", "--page-size", "--enable-lora"]


def test_cuda_compression_needs_the_opt_in(parse):
    sa = parse()
    sa.device = "cuda"  # what resolution gives on a GPU machine (SGLang refuses --device cuda here)
    found = refusals(sa, COMPRESS, environ={})
    assert len(found) == 1 and CUDA_OPT_IN in found[0].message() and "--vlcache-budget 1.0" in found[0].message()
    assert TORCH_OPT_IN in found[0].message()
    assert refusals(sa, COMPRESS, environ={"VLCACHE_CUDA_EXECUTOR": "flashinfer"}) == []
    assert refusals(sa, COMPRESS, environ={"VLCACHE_CUDA_EXECUTOR": "torch"}) == []
    assert compresses_on(sa, environ={"VLCACHE_CUDA_EXECUTOR": "torch"})
    # budget 1.0 on CUDA is served by SGLang's FlashInfer backend, and says it does not compress
    assert refusals(sa, CompressionSettings(budget=1.0), environ={}) == []
    assert not compresses_on(sa, environ={}) and compresses_on(sa, environ={"VLCACHE_CUDA_EXECUTOR": "flashinfer"})
    assert compresses_on(parse(), environ={})
    assert CUDA_OPT_IN in not_compressing_message()


def test_compressing_request_to_a_non_compressing_server_is_a_400(monkeypatch):
    """On CUDA without the opt-in the server serves uncompressed: a request asking for a budget
    below 1.0 is rejected in the HTTP process (SGLang turns the ValueError into a 400)."""
    from sglang.srt.sampling.sampling_params import SamplingParams

    from vlcache_sglang import launch_hooks
    from vlcache_sglang.launch_hooks import verify_request as _verify_request

    # what the launch attached to the server args that the HTTP process publishes
    monkeypatch.setattr(launch_hooks, "serving_settings", lambda: ServerSettings(compresses=False))
    with pytest.raises(ValueError, match="does not compress"):
        _verify_request(None, SamplingParams(custom_params={"vlcache": {"budget": 0.1}}))
    _verify_request(None, SamplingParams(custom_params={"vlcache": {"budget": 1.0}}))
    _verify_request(None, SamplingParams())
    monkeypatch.setattr(launch_hooks, "serving_settings", lambda: ServerSettings(compresses=True))
    _verify_request(None, SamplingParams(custom_params={"vlcache": {"budget": 0.1}}))


def test_a_pool_other_than_mha_stops_the_backend_naming_it():
    """An MLA model (or any pool class not validated here) never reaches compaction: the backend
    stops at construction naming the pool, instead of failing on a missing ``k_buffer`` mid-start."""
    import torch
    from types import SimpleNamespace

    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool, ReqToTokenPool

    from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend

    pool = MLATokenToKVPool(size=64, page_size=1, dtype=torch.float32, kv_lora_rank=16, qk_rope_head_dim=8,
                            layer_num=2, device="cpu", enable_memory_saver=False)
    runner = SimpleNamespace(
        device="cpu", token_to_kv_pool=pool, dtype=torch.float32, tp_size=1,
        req_to_token_pool=ReqToTokenPool(size=2, max_context_len=16, device="cpu", enable_memory_saver=False),
        token_to_kv_pool_allocator=TokenToKVPoolAllocator(64, torch.float32, "cpu", pool, need_sort=False),
        model_config=SimpleNamespace(num_attention_heads=4, get_num_kv_heads=lambda tp: 1, context_len=16))
    with pytest.raises(ValueError, match="MHATokenToKVPool.*this launch built MLATokenToKVPool.*another --attention-backend"):
        VLCacheAttnBackend(runner)
