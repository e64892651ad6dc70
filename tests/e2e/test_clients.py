"""One real `--attention-backend vlcache` server, driven the ways users drive SGLang:
the OpenAI Python client, raw `/generate`, and an SGLang frontend program; plus bad input."""
from __future__ import annotations

import pytest
import requests

from tests.conftest import make_test_image, png_base64
from vlcache_sglang.serving import running_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with running_server(tiny_model_dir, attention_backend="vlcache") as handle:
        yield handle


def chat_messages(image, question="What is in this image?"):
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_base64(image)}"}},
        {"type": "text", "text": question},
    ]}]


def test_openai_chat_completion_with_base64_png(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    resp = client.chat.completions.create(
        model="default", messages=chat_messages(make_test_image(1)), max_tokens=8, temperature=0,
    )
    assert resp.choices[0].message.content is not None
    assert resp.usage.completion_tokens > 0
    assert resp.usage.prompt_tokens > 16  # 112 x 112 px -> 16 visual tokens plus the text


def test_openai_per_request_override_and_invalid_override(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    ok = client.chat.completions.create(
        model="default", messages=chat_messages(make_test_image(2)), max_tokens=4, temperature=0,
        extra_body={"custom_params": {"vlcache": {"budget": 0.5, "method": "snapkv"}}},
    )
    assert ok.usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError, match="budget"):
        client.chat.completions.create(
            model="default", messages=chat_messages(make_test_image(2)), max_tokens=4,
            extra_body={"custom_params": {"vlcache": {"budget": 0}}},
        )


def test_generate_with_image(server):
    image = make_test_image(3)
    prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the picture.<|im_end|>\n"
              "<|im_start|>assistant\n")
    r = requests.post(f"{server.url}/generate", json={
        "text": prompt, "image_data": png_base64(image),
        "sampling_params": {"max_new_tokens": 8, "temperature": 0},
    }, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["output_ids"]) > 0
    assert body["meta_info"]["prompt_tokens"] >= 16 + 10


def test_frontend_program_with_sgl_image(server, tmp_path):
    import sglang as sgl

    path = tmp_path / "img.png"
    make_test_image(4).save(path)

    @sgl.function
    def describe(s, image_path):
        s += sgl.user(sgl.image(image_path) + "What is in this image?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))

    backend = sgl.RuntimeEndpoint(server.url, chat_template_name="qwen2-vl")
    state = describe.run(image_path=str(path), backend=backend)
    assert isinstance(state["answer"], str)
    assert state.get_meta_info("answer")["prompt_tokens"] >= 16


@pytest.mark.parametrize("payload,expected", [
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"vlcache": {"budget": 7}}}}, "budget"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"vlcache": {"method": "zip"}}}},
     "method"),
    ({"text": "hi", "sampling_params": {"max_new_tokens": 2, "custom_params": {"vlcache": "fast"}}}, "vlcache"),
    ({"text": "<|vision_start|><|image_pad|><|vision_end|>hi", "image_data": "bm90IGFuIGltYWdl",
      "sampling_params": {"max_new_tokens": 2}}, ""),
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
