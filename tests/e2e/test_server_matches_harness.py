"""The SGLang server and the Hugging Face reference harness agree on the bundled model.

One ``--attention-backend vlcache`` server; 8 held-out items (2 per question type) x
{VL-Cache, SnapKV, H2O} x alpha {0.05, 0.1, 0.2}, each a per-request override with
``return_plan``, plus the full cache. The harness (``vlcache_sglang.research.hf_eval``) computes its
plans from its own HF prefill. Checked:

- the same prompt token ids reach both (same chat-template text, same image);
- each request carries its *whole* policy (so a policy file the server loads by default, e.g. a
  tuned ``vlcache_policy.json`` next to the weights, cannot leak in) and runs on an empty radix
  cache (``/flush_cache`` before each request: the plan of a cold prefill is compared; warm-cache
  plans are the radix tests' business);
- the server's kept positions equal the harness plan in every one of the 80 plans (72 compressed,
  8 full cache) (float noise in q/k could in principle flip a near-tie between two positions' scores; measured:
  80/80 identical, so none is tolerated; a differing plan's positions are reported);
- every request's greedy tokens equal the harness's, the full cache's included;
- so the server's accuracy per cell equals the harness's.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch

from tests.conftest import png_base64
from vlcache_sglang.policy import PolicyConfig
from vlcache_sglang.tooling.serving import flush_cache, running_server

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tinyvlm-docvqa"
HELDOUT = ROOT / "data" / "tinyvlm-docvqa" / "heldout"
METHODS = ("vlcache", "snapkv", "h2o")
ALPHAS = (0.05, 0.1, 0.2)
PER_QTYPE = 2
MAX_NEW = 16

if not (MODEL / "config.json").exists():
    pytest.skip("models/tinyvlm-docvqa not present", allow_module_level=True)


@pytest.fixture(scope="module")
def harness():
    """Items, prompter and the harness results (with plans) for every policy of the test."""
    from vlcache_sglang.research.hf_eval import ChatPrompter, evaluate_policies, items_from_dataset, load_model
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    torch.set_num_threads(1)
    items = items_from_dataset(load_eval_dataset(HELDOUT), PER_QTYPE)
    prompter = ChatPrompter.from_pretrained(MODEL)
    policies = [PolicyConfig(method=m, alpha=a) for m in METHODS for a in ALPHAS]
    policies.append(PolicyConfig(method="full", alpha=1.0))
    results = evaluate_policies(load_model(MODEL), prompter, items, policies, MAX_NEW, return_plans=True,
                                progress=False)
    return items, prompter, {(r.method, r.alpha): r for r in results}


@pytest.fixture(scope="module")
def served(harness):
    """The server's answers, meta_info included, for the same cells (compressing requests first)."""
    items, prompter, _ = harness
    cells = [(m, a) for m in METHODS for a in ALPHAS] + [("full", 1.0)]
    out: dict[tuple[str, float], list[dict]] = {}
    with running_server(MODEL, attention_backend="vlcache") as server:
        for method, alpha in cells:
            out[(method, alpha)] = [_generate(server.url, prompter.text(it.question), it.image,
                                              PolicyConfig(method=method, alpha=alpha)) for it in items]
    return out


def _request_policy(policy: PolicyConfig) -> dict:
    """The whole policy as ``custom_params["vlcache"]`` (``alpha`` travels as ``budget``)."""
    fields = policy.to_dict()
    return {"budget": fields.pop("alpha"), **fields, "return_plan": True}


def _generate(url: str, text: str, image, policy: PolicyConfig) -> dict:
    flush_cache(url)
    payload = {"text": text, "image_data": png_base64(image), "sampling_params": {
        "max_new_tokens": MAX_NEW, "temperature": 0, "custom_params": {"vlcache": _request_policy(policy)}}}
    r = requests.post(f"{url}/generate", json=payload, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def _server_plan(meta: dict, prompt_len: int, n_layers: int) -> list[list[int]]:
    if "vlcache_kept_positions" in meta:
        return [list(k) for k in meta["vlcache_kept_positions"][0]]
    return [list(range(prompt_len))] * n_layers  # served as stock: everything kept


def test_server_matches_harness(harness, served):
    items, prompter, hf = harness
    n_plans = n_identical = 0
    differing, token_mismatch = [], []
    for cell, bodies in served.items():
        for item, body, ho in zip(items, bodies, hf[cell].items):
            meta = body["meta_info"]
            # the same prompt ids reach both: same length here, same plan/tokens below
            assert meta["prompt_tokens"] == ho.prompt_len, (cell, item.id)
            plan = _server_plan(meta, ho.prompt_len, len(ho.kept))
            n_plans += 1
            if plan == ho.kept:
                n_identical += 1
            else:
                differing.append((cell, item.id, [sorted(set(s) ^ set(h)) for s, h in zip(plan, ho.kept)]))
            if body["output_ids"] != ho.tokens:
                token_mismatch.append((cell, item.id))
    print(f"identical plans: {n_identical}/{n_plans}, token mismatches: {len(token_mismatch)}")
    assert n_plans == len(served) * len(items) == 80
    assert not differing, f"{len(differing)}/{n_plans} plans differ (cell, item, positions per layer): {differing}"
    assert not token_mismatch, f"greedy tokens differ for {token_mismatch}"
    for cell, res in hf.items():  # hence the same accuracy per cell
        server_acc = sum(b["text"].strip() == it.answer.strip() for b, it in zip(served[cell], items)) / len(items)
        print(f"{cell[0]}@{cell[1]}: accuracy server {server_acc:.3f} harness {res.accuracy:.3f}")
        assert server_acc == res.accuracy, (cell, server_acc, res.accuracy)
    # the compressed cells really compressed, at the requested share (the test can fail)
    for (method, alpha), res in hf.items():
        if method != "full":
            assert abs(res.kept_ratio - alpha) < 0.01 or method == "snapkv", (method, alpha, res.kept_ratio)
            assert res.kept_ratio < 0.5
