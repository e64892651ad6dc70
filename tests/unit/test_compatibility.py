"""Launch refusals (vlcache_sglang.compatibility) on SGLang's real ``ServerArgs``: every flag the
backend cannot serve is named, with what to do instead; supported flags pass. One end-to-end
launch through the stock launcher is in tests/e2e/test_launch_errors.py."""
from __future__ import annotations

import argparse

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
def parse(tiny_model_dir):
    from sglang.srt.server_args import ServerArgs, add_attention_backend_choices

    add_attention_backend_choices(["vlcache"])  # what the plugin's register() adds (no hooks here)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)

    def make(*flags: str) -> "ServerArgs":
        args = parser.parse_args(["--model-path", str(tiny_model_dir), "--attention-backend", "vlcache",
                                  "--device", "cpu", *flags])
        return ServerArgs.from_cli_args(args)

    return make


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
]


@pytest.mark.parametrize("flags,named,instead", REFUSED, ids=[r[1] for r in REFUSED])
def test_unsupported_flag_is_refused_by_name(parse, flags, named, instead):
    found = refusals(parse(*flags), COMPRESS, environ={})
    assert len(found) == 1, [r.message() for r in found]
    assert found[0].message().startswith(named) and instead in found[0].message()


SUPPORTED = [[], ["--disable-radix-cache"], ["--disable-overlap-schedule"], ["--chunked-prefill-size", "64"],
             ["--enable-metrics"], ["--enable-mixed-chunk"], ["--page-size", "1"], ["--tp-size", "2"],
             ["--prefill-attention-backend", "vlcache"]]


@pytest.mark.parametrize("flags", SUPPORTED, ids=[" ".join(f) or "defaults" for f in SUPPORTED])
def test_supported_flags_pass(parse, flags):
    assert refusals(parse(*flags), COMPRESS, environ={}) == []


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
