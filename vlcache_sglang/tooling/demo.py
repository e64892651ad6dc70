"""The README's main job: serve the bundled model with ``--attention-backend vlcache`` on
127.0.0.1, ask a question about an image through the OpenAI API, print the answer, stop.

    python -m vlcache_sglang.tooling.demo [--budget 0.1] [--method vlcache] [--model PATH]

Without ``--budget``/``--method`` the server compresses with the model's tuned default policy
(``vlcache_policy.json`` next to the weights, written by ``tune.py``).
"""
from __future__ import annotations

import argparse
import base64
import io
import time

from vlcache_sglang.bundled import bundled_model_dir, trained_model_dir
from vlcache_sglang.tooling.serving import running_server, vlcache_state


def demo_image_and_question(model_dir):
    """A document image with its question and gold answer when the trained model is served,
    otherwise a plain synthetic picture (the random fixture cannot really answer)."""
    if trained_model_dir() is not None and model_dir == trained_model_dir():
        try:
            from vlcache_sglang.research.tasks import demo_example  # provided with the trained model

            return demo_example()
        except ImportError:
            pass
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(np.kron(blocks, np.ones((28, 28, 1), dtype=np.uint8)), "RGB")
    return image, "What is in this image?", None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--budget", type=float, default=None,
                        help="vlcache budget ratio alpha in (0, 1] (default: the model's tuned policy)")
    parser.add_argument("--method", default=None, help="compression method (default: the tuned policy's)")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    import openai

    model_dir = args.model or bundled_model_dir()
    image, question, gold = demo_image_and_question(model_dir)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    print(f"model: {model_dir}")
    extra = []
    if args.budget is not None:
        extra += ["--vlcache-budget", str(args.budget)]
    if args.method is not None:
        extra += ["--vlcache-method", args.method]
    from vlcache_sglang.tuned_configs import find_default_config

    tuned = find_default_config(str(model_dir))
    setting = " ".join(extra) or (f"tuned policy {tuned}" if tuned else "budget 1.0")
    print(f"starting SGLang with --attention-backend vlcache ({setting}) ...", flush=True)
    t0 = time.monotonic()
    with running_server(model_dir, attention_backend="vlcache", extra_args=extra) as server:
        print(f"server ready at {server.url} after {time.monotonic() - t0:.0f} s", flush=True)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        before = vlcache_state(server.url)  # the server's own warm-up may have compressed one
        t1 = time.monotonic()
        resp = client.chat.completions.create(
            model="default", temperature=0, max_tokens=args.max_tokens,
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}],
        )
        print(f"question: {question}")
        print(f"answer:   {resp.choices[0].message.content!r}")
        if gold is not None:
            print(f"expected: {gold!r}")
        print(f"({resp.usage.prompt_tokens} prompt tokens, {resp.usage.completion_tokens} generated, "
              f"{time.monotonic() - t1:.2f} s)")
        after = vlcache_state(server.url)
        print(kv_summary(before, after, resp.usage.prompt_tokens))


def kv_summary(before: dict, after: dict, prompt_tokens: int) -> str:
    """What compression did to one request's KV (the counters' change across it)."""
    if after.get("requests_compressed", 0) == before.get("requests_compressed", 0):
        return "KV cache: left whole (nothing compressed)"
    saved = int(after.get("kv_tokens_saved", 0)) - int(before.get("kv_tokens_saved", 0))
    return (f"KV cache: {saved} of {prompt_tokens} token slots returned to the pool after prefill "
            f"(about {100 * (1 - saved / max(1, prompt_tokens)):.0f}% of the prompt's KV kept)")


if __name__ == "__main__":
    main()
