"""Real multimodal prompts end to end (issue 20): several images with text between them, a
Qwen2-VL video, and a prompt cut inside the image placeholder (why the true post-vision fallback
is unreachable through SGLang), on one
SGLang runtime with the trained bundled model (``models/tinyvlm-docvqa``, its pages as images and
as video frames).

The runtime is SGLang's offline ``Engine`` in a child process (``vlcache_sglang.tooling.engine_worker``),
not the HTTP server: SGLang 0.5.23's ``/generate`` takes a video only as an encoded file (path,
URL, base64), which needs torchcodec or decord, absent from the CPU install; the Engine takes the
frames as an array and serves them through the same tokenizer manager, scheduler, model and
attention backend. One runtime serves the whole module.

For every request the whole policy travels with it (a tuned ``vlcache_policy.json`` cannot
leak in) and:

- the server's kept positions equal the plan the Hugging Face harness computes from its own
  prefill with the spans of *every* visual run (``hf_eval.plan_in_hf``; float noise may flip a
  near-tie: at most a few positions per layer);
- its greedy tokens equal the HF reference applying the server's own plan;
- the window is where ``locate_window`` says (``protect_window=True`` force-keeps it, which makes it
  visible in the kept sets): after the *last* visual token (every layer keeps all of it; the
  images and the text between them are scored, not protected);
- the memory comes back: tokens saved > 0, nothing live afterwards, the pool full after a flush;
- the vision tower's encode counters see every image and the video.

The trained model rather than the random fixture: its attention is peaked on the cells that
matter, so plans differ between a right and a wrong window (a random model spreads attention
almost uniformly, where a wrong window can still pick similar positions).
"""
from __future__ import annotations

import time

import pytest
import torch

from vlcache_sglang.bundled import trained_model_dir
from vlcache_sglang.policy import PolicyConfig
from vlcache_sglang.tooling.engine_worker import running_engine

pytestmark = pytest.mark.server
MODEL = trained_model_dir()
MAX_NEW = 8
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GRID = 8  # 8 x 8 cells of 16 px: 64 visual tokens a page

if MODEL is None:
    pytest.skip("models/tinyvlm-docvqa not present", allow_module_level=True)


@pytest.fixture(scope="module")
def server():
    with running_engine(MODEL, max_total_tokens=6000, max_running_requests=4) as handle:
        yield handle


def mm_size() -> dict:
    """The processor size the runtime applies (``--mm-process-config``; SGLang passes it to the
    video processor as well), so that the HF reference sees the same pixels."""
    from vlcache_sglang.tooling.serving import mm_process_config

    return mm_process_config(MODEL)["image"]["size"]


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoProcessor

    from vlcache_sglang.research.hf_eval import load_model

    torch.set_num_threads(1)
    return load_model(MODEL), AutoProcessor.from_pretrained(MODEL)


def pages(n: int, seed: int):
    from PIL import Image

    from vlcache_sglang.research.tasks.docvqa import DocGenerator

    gen = DocGenerator(seed, digit_split="heldout")
    docs = [gen.sample(GRID, "single") for _ in range(n)]
    return [Image.fromarray(gen.render(d), "RGB") for d in docs], docs


def request_policy(policy: PolicyConfig) -> dict:
    """The whole policy as ``custom_params["vlcache"]`` (``alpha`` travels as ``budget``)."""
    fields = policy.to_dict()
    return {"budget": fields.pop("alpha"), **fields, "return_plan": True}


def flush(server) -> None:
    deadline = time.monotonic() + 30
    while not server.flush():  # refused while a just-answered request is still in its batch
        assert time.monotonic() < deadline, "flush_cache refused"
        time.sleep(0.1)


def generate(server, text: str, policy: PolicyConfig, images=None, video=None) -> dict:
    from tests.conftest import png_base64

    kwargs = {"prompt": text, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                  "custom_params": {"vlcache": request_policy(policy)}}}
    if images:
        kwargs["image_data"] = [png_base64(im) for im in images]
    if video is not None:
        kwargs["video_data"] = [video]
    return server.generate(**kwargs)


def check_against_hf(hf, body: dict, text: str, policy: PolicyConfig, images=None, video=None
                     ) -> tuple[list[list[int]], torch.Tensor]:
    """The server's plan is the harness plan and its tokens are the HF reference's with that plan;
    returns the server's kept positions and the prompt ids."""
    from vlcache_sglang.research.hf_eval.planning import layer_positions, plan_in_hf
    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, processor = hf
    meta = body["meta_info"]
    inputs = dict(processor(text=[text], images=images or None, videos=None if video is None else [video],
                            size=mm_size(), return_tensors="pt"))
    m = inputs["input_ids"].shape[1]
    assert meta["prompt_tokens"] == m
    kept = [list(k) for k in meta["vlcache_kept_positions"][0]]
    assert len(kept) == model.config.text_config.num_hidden_layers
    harness = [sorted(int(p) for p in k) for k in layer_positions(plan_in_hf(model, inputs, policy))]
    for layer, (s, h) in enumerate(zip(kept, harness)):
        assert len(set(s) ^ set(h)) <= 4, (layer, sorted(set(s) ^ set(h)))
    eos = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    expected = greedy_with_plan(model, inputs, [torch.tensor(k) for k in kept], MAX_NEW, eos)
    assert body["output_ids"] == expected
    return kept, inputs["input_ids"][0]


def visual_runs(ids: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    from vlcache_sglang.research.hf_eval.planning import image_spans

    return image_spans(ids, [token_id])


@pytest.mark.parametrize("n_images", [2, 4])
def test_several_images_with_text_between(server, hf, n_images):
    model, _ = hf
    images, docs = pages(n_images, seed=2000 + n_images)
    between = [f"Page {i + 1} of {n_images}." for i in range(n_images)]
    text = SYSTEM + "".join(IMAGE + t for t in between) + f" {docs[0].question}<|im_end|>\n<|im_start|>assistant\n"
    policy = PolicyConfig(method="vlcache", alpha=0.1, protect_window=True)
    flush(server)
    start = server.state()
    body = generate(server, text, policy, images)
    meta = body["meta_info"]
    kept, ids = check_against_hf(hf, body, text, policy, images)
    m = len(ids)
    runs = visual_runs(ids, model.config.image_token_id)
    assert len(runs) == n_images and all(e - s + 1 == GRID * GRID for s, e in runs)
    v = runs[-1][1] + 1  # first token after the last visual token: the post-vision window [v, m)
    first_gap = runs[0][1] + 1
    for layer in kept:
        assert set(range(v, m)) <= set(layer), "the post-vision window is always kept"
        # the images after the first and the text between them are scored, not protected: a window
        # starting after the first image would keep all of it
        assert not set(range(first_gap, m)) <= set(layer)
    assert "fell back" not in meta["vlcache_notes"][0]
    assert meta["vlcache_kv_tokens_saved"][0] > 0
    assert meta["vlcache_kept_ratio"][0] == pytest.approx(sum(map(len, kept)) / (m * len(kept)))
    assert meta["vlcache_kept_ratio"][0] < 0.2
    # the memory comes back: nothing live, the saved tokens counted, the pool full again
    end = server.state()
    assert end["kv_tokens_saved"] - start["kv_tokens_saved"] == meta["vlcache_kv_tokens_saved"][0]
    assert end["compressed_requests_live"] == 0 and end["pending_statistics"] == 0
    assert end["images_encoded"] - start["images_encoded"] == n_images
    flush(server)
    assert server.state()["available_kv_tokens"] == start["max_total_num_tokens"]


def test_a_prompt_cannot_end_inside_the_image(server):
    """The true fallback of ``locate_window`` (the last visual token is the last prompt token) is
    not reachable through SGLang with Qwen2-VL: its processor only recognises a whole
    ``<|vision_start|><|image_pad|>+<|vision_end|>`` placeholder (``qwen_vl.py``,
    ``image_token_regex``), so a placeholder cut before ``<|vision_end|>`` is never expanded and the
    image never reaches the model; every served image is followed by at least ``<|vision_end|>``
    (the one-token window of tests/e2e/test_compression.py). The fallback itself is unit-tested in
    tests/policy/test_window.py. If SGLang ever expands such a prompt, this test fails and the
    fallback becomes reachable end to end (then compare with the HF reference here)."""
    images, _ = pages(1, seed=2030)
    text = SYSTEM + "Look at the page: <|vision_start|><|image_pad|>"
    policy = PolicyConfig(method="vlcache", alpha=0.2, window_size=16, protect_window=True)
    start = server.state()
    body = generate(server, text, policy, images)
    meta = body["meta_info"]
    assert meta["prompt_tokens"] < GRID * GRID, meta  # the page's 64 visual tokens are not there
    assert meta.get("vlcache_not_compressed") == ["text_only"], meta
    assert server.state()["images_encoded"] == start["images_encoded"]


def test_video_frames(server, hf):
    """A Qwen2-VL video item (4 frames, 2 temporal patches): one visual run of video tokens, the
    window after it, the plan the harness's, no leak; the encode counter sees the video."""
    import numpy as np

    model, _ = hf
    frames, docs = pages(4, seed=2040)
    video = np.stack([np.asarray(f) for f in frames])  # (T, H, W, 3) uint8
    text = SYSTEM + VIDEO + f"{docs[0].question}<|im_end|>\n<|im_start|>assistant\n"
    policy = PolicyConfig(method="vlcache", alpha=0.1, protect_window=True)
    flush(server)
    start = server.state()
    body = generate(server, text, policy, video=video)
    meta = body["meta_info"]
    kept, ids = check_against_hf(hf, body, text, policy, video=video)
    m = len(ids)
    runs = visual_runs(ids, model.config.video_token_id)
    assert runs == [(runs[0][0], runs[0][0] + 2 * GRID * GRID - 1)], runs  # 2 temporal patches of 64
    assert not visual_runs(ids, model.config.image_token_id)
    v = runs[-1][1] + 1
    for layer in kept:
        assert set(range(v, m)) <= set(layer)
        assert not set(range(runs[0][0], m)) <= set(layer)
    assert "fell back" not in meta["vlcache_notes"][0]
    assert meta["vlcache_kv_tokens_saved"][0] > 0 and meta["vlcache_kept_ratio"][0] < 0.2
    end = server.state()
    assert end["videos_encoded"] - start["videos_encoded"] == 1
    assert end["images_encoded"] == start["images_encoded"]
    assert end["compressed_requests_live"] == 0 and end["pending_statistics"] == 0
    flush(server)
    assert server.state()["available_kv_tokens"] == start["max_total_num_tokens"]
