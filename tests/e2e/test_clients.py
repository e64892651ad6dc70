"""One real `--attention-backend vlcache` server, driven the ways users drive SGLang:
the OpenAI Python client, raw `/generate`, and an SGLang frontend program; plus bad input."""
from __future__ import annotations

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from vlcache_sglang.tooling.serving import running_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache") as handle:
        yield handle


QUESTION = "What is in this image?"
# a 112 x 112 px image is 8 x 8 patches of 14 px, merged 2 x 2: 16 <|image_pad|> tokens, between the
# <|vision_start|> and <|vision_end|> markers the chat template adds with it
IMAGE_PROMPT_TOKENS = 16 + 2


def chat_messages(image, question=QUESTION):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64(image)}"}})
    return [{"role": "user", "content": content}]


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")


def chat(server, image, max_tokens=8, **extra_body):
    return openai_client(server).chat.completions.create(
        model="default", messages=chat_messages(image), max_tokens=max_tokens, temperature=0,
        extra_body=extra_body or None)


@pytest.fixture(scope="module")
def text_only_prompt_tokens(server) -> int:
    """The chat prompt's token count without the image (the same question, the same template)."""
    return chat(server, None, max_tokens=1).usage.prompt_tokens


def test_openai_chat_completion_with_base64_png(server, text_only_prompt_tokens):
    resp = chat(server, make_test_image(1))
    assert resp.choices[0].message.content  # a non-empty answer
    assert resp.usage.completion_tokens > 0
    # the image reached the model: exactly its tokens on top of the text-only prompt
    assert resp.usage.prompt_tokens == text_only_prompt_tokens + IMAGE_PROMPT_TOKENS, text_only_prompt_tokens


def test_openai_per_request_override_and_invalid_override(server):
    import openai

    # the server's default budget is 1.0; the override must compress this request: a 336 x 280 px
    # image (120 visual tokens) and a 16-token observation window, so SnapKV at 0.5 has room to drop
    ok = chat(server, make_test_image(2, (336, 280)), max_tokens=4, return_meta_info=True,
              custom_params={"vlcache": {"budget": 0.5, "method": "snapkv", "window_size": 16}})
    assert ok.usage.completion_tokens > 0
    meta = ok.choices[0].model_extra["meta_info"]
    assert meta["vlcache_kept_ratio"][0] < 1 and meta["vlcache_kv_tokens_saved"][0] > 0, meta
    assert meta["vlcache_kept_ratio"][0] == pytest.approx(0.5, abs=0.05), meta
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="budget"):
        client.chat.completions.create(
            model="default", messages=chat_messages(make_test_image(2)), max_tokens=4,
            extra_body={"custom_params": {"vlcache": {"budget": 0}}},
        )
    # the OpenAI routes build the same GenerateReqInput: the reserved radix namespace is a 400 there too
    with pytest.raises(openai.BadRequestError, match="extra_key may not contain"):
        client.chat.completions.create(
            model="default", messages=chat_messages(make_test_image(2)), max_tokens=4,
            extra_body={"extra_key": "vlcache:0123456789abcdef"},
        )


def test_generate_with_image(server):
    image = make_test_image(3)
    markers = "<|vision_start|><|image_pad|><|vision_end|>"
    prompt = f"<|im_start|>user\n{markers}Describe the picture.<|im_end|>\n<|im_start|>assistant\n"
    r = requests.post(f"{server.url}/generate", json={
        "text": prompt, "image_data": png_base64(image),
        "sampling_params": {"max_new_tokens": 8, "temperature": 0},
    }, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["output_ids"]) > 0
    text_only = requests.post(f"{server.url}/generate", json={
        "text": prompt.replace(markers, ""), "sampling_params": {"max_new_tokens": 1, "temperature": 0},
    }, timeout=120).json()
    # the one <|image_pad|> became the image's 16 tokens, inside the two markers
    assert body["meta_info"]["prompt_tokens"] == text_only["meta_info"]["prompt_tokens"] + IMAGE_PROMPT_TOKENS


def test_frontend_program_with_sgl_image(server, tmp_path):
    import sglang as sgl

    path = tmp_path / "img.png"
    image = make_test_image(4)
    image.save(path)

    @sgl.function
    def describe(s, image_path):
        s += sgl.user(sgl.image(image_path) + QUESTION)
        s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))

    backend = sgl.RuntimeEndpoint(server.url, chat_template_name="qwen2-vl")
    state = describe.run(image_path=str(path), backend=backend)
    requests.post(f"{server.url}/flush_cache", timeout=60)
    via_chat = chat(server, image)
    assert state["answer"]  # a non-empty answer
    # the same prompt as the OpenAI chat path, image included, hence the same greedy answer
    assert state.get_meta_info("answer")["prompt_tokens"] == via_chat.usage.prompt_tokens
    assert state["answer"] == via_chat.choices[0].message.content


@pytest.mark.parametrize("payload,expected", [
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"vlcache": {"budget": 7}}}}, "budget"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"vlcache": {"method": "zip"}}}},
     "method"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"vlcache": "fast"}}}, "vlcache"),
    ({"text": "<|vision_start|><|image_pad|><|vision_end|>hi", "image_data": "bm90IGFuIGltYWdl",
      "sampling_params": {"max_new_tokens": 2}}, "Could not decode image"),
    # beam search: beam rows alias the leader's compacted row; before the check this killed the server
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "beam_width": 2, "n": 2}}, "beam search is not supported"),
    # an id past the vocabulary with min_new_tokens: SGLang's penalizer killed the scheduler (stock too)
    ({"text": "hi", "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 2, "stop_token_ids": [10 ** 6]}},
     "stop_token_ids must be in"),
    # the radix namespace of compressed prefixes: a stock request naming it read compressed KV
    ({"text": "hi", "extra_key": "t|vlcache:0123456789abcdef", "sampling_params": {"max_new_tokens": 2}},
     "extra_key may not contain"),
    # with the prompt cached the pooled indices pointed past the computed rows: the scheduler died
    ({"text": "hi", "return_logprob": True, "token_ids_logprob": [5], "token_indices_to_pool": [1],
      "sampling_params": {"max_new_tokens": 0}}, "token_indices_to_pool needs logprob_start_len 0"),
])
def test_malformed_requests_get_4xx_and_server_keeps_serving(server, payload, expected):
    r = requests.post(f"{server.url}/generate", json=payload, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert expected in r.text
    again = requests.post(f"{server.url}/generate", json={"text": "Hello", "sampling_params": {
        "max_new_tokens": 2, "temperature": 0}}, timeout=60)
    assert again.status_code == 200


def test_non_json_body_is_rejected(server):
    r = requests.post(f"{server.url}/generate", data=b"{not json", headers={"content-type": "application/json"},
                      timeout=30)
    assert 400 <= r.status_code < 500
    assert requests.get(f"{server.url}/health_generate", timeout=60).status_code == 200
