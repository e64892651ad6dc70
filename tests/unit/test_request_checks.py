"""Requests a vlcache server answers with a 400 or serves as stock, checked on SGLang's real request
objects: ``GenerateReqInput`` after SGLang's own normalization, and a scheduler ``Req`` whose
multimodal inputs hold real ``MultimodalDataItem``s."""
from __future__ import annotations

import pytest

from vlcache_sglang.backend.request_info import request_spec
from vlcache_sglang.launch_hooks import check_generate_request
from vlcache_sglang.settings import CompressionSettings

pytest.importorskip("sglang")


def normalized(**fields):
    from sglang.srt.managers.io_struct import GenerateReqInput

    obj = GenerateReqInput(**{"text": "hi", "sampling_params": {"max_new_tokens": 2}, **fields})
    obj.normalize_batch_and_arguments()
    return obj


@pytest.mark.parametrize("fields,named", [
    ({"extra_key": "vlcache:0123456789abcdef"}, "extra_key"),
    ({"extra_key": "user|vlcache:0123456789abcdef"}, "extra_key"),
    ({"lora_id": "vlcache:0123456789abcdef"}, "lora_id"),  # SGLang appends lora_id to extra_key
    ({"text": ["a", "b"], "extra_key": ["ok", "x|vlcache:ab"]}, "extra_key"),
    ({"token_indices_to_pool": [1], "return_logprob": True, "token_ids_logprob": [5]}, "token_indices_to_pool"),
    ({"text": ["a", "b"], "token_indices_to_pool": [None, [1]], "return_logprob": True,
      "logprob_start_len": [0, -1]}, "token_indices_to_pool"),
])
def test_refused_request_fields_name_the_field(fields, named):
    with pytest.raises(ValueError, match=named):
        check_generate_request(normalized(**fields))


@pytest.mark.parametrize("fields", [
    {},
    {"extra_key": "tenant-7"},
    {"extra_key": "vlcache"},  # only the namespace (with its colon) is reserved
    {"cache_salt": "vlcache:abc"},  # a separate radix key component, never rewritten by the plugin
    {"token_indices_to_pool": [1], "return_logprob": True, "token_ids_logprob": [5], "logprob_start_len": 0},
    {"text": ["a", "b"], "token_indices_to_pool": [None, [1]], "return_logprob": True, "logprob_start_len": [-1, 0]},
])
def test_accepted_request_fields(fields):
    check_generate_request(normalized(**fields))


def scheduler_req(items):
    from sglang.srt.managers.schedule_batch import MultimodalInputs, Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req("r", "", list(range(120)), SamplingParams(max_new_tokens=4, custom_params={"vlcache": {"budget": 0.1}}))
    req.multimodal_inputs = MultimodalInputs(mm_items=items)
    return req


def item(modality: str, *offsets):
    from sglang.srt.managers.schedule_batch import MultimodalDataItem
    from sglang.srt.multimodal.modality import Modality

    return MultimodalDataItem(modality=Modality[modality], offsets=list(offsets))


def test_an_image_prompt_compresses_over_its_image_span():
    spec = request_spec(scheduler_req([item("IMAGE", (5, 84))]), CompressionSettings(), 120)
    assert spec.policy is not None and spec.not_compressed is None
    assert spec.image_spans == ((5, 84),)


@pytest.mark.parametrize("items,spans", [
    ([item("AUDIO", (5, 84))], ()),
    ([item("IMAGE", (5, 50)), item("AUDIO", (52, 84))], ((5, 50),)),
])
def test_audio_items_are_served_as_stock_saying_why(items, spans):
    """An omni model's audio clip is not visual: before, its tokens were taken as an image span
    and compressed by scores and budgets the paper defines for images."""
    spec = request_spec(scheduler_req(items), CompressionSettings(), 120)
    assert spec.policy is None and spec.not_compressed == "audio_input"
    assert spec.image_spans == spans


@pytest.mark.parametrize("stops,refused", [([5, 999], False), ([1000], True), ([-1], True), (None, False)])
def test_stop_token_ids_must_be_in_the_vocabulary(stops, refused):
    from sglang.srt.sampling.sampling_params import SamplingParams

    from vlcache_sglang.launch_hooks import check_sampling_params
    from vlcache_sglang.settings import ServerSettings

    params = SamplingParams(max_new_tokens=4, min_new_tokens=2, stop_token_ids=stops)
    server = ServerSettings.from_env({}, CompressionSettings())
    if refused:
        with pytest.raises(ValueError, match="stop_token_ids must be in"):
            check_sampling_params(params, server, vocab_size=1000)
    else:
        check_sampling_params(params, server, vocab_size=1000)
    check_sampling_params(params, None, vocab_size=1000)  # not a vlcache server: SGLang's own checks only
