"""The SGLang server and the Hugging Face reference harness agree on the bundled model.

One ``--attention-backend vlcache`` server; 8 held-out items (2 per question type) x
{VL-Cache, SnapKV, H2O} x alpha {0.05, 0.1, 0.2}, each a per-request override with
``return_plan``, plus the full cache. The harness (``vlcache_sglang.hf_eval``) computes its
plans from its own HF prefill. Checked:

- the same prompt token ids reach both (same chat-template text, same image);
- each request carries its *whole* policy (so a policy file the server loads by default, e.g. a
  tuned ``vlcache_policy.json`` next to the weights, cannot leak in) and runs on an empty radix
  cache (``/flush_cache`` before each request: the plan of a cold prefill is compared; warm-cache
  plans are the radix tests' business);
- the server's kept positions equal the harness plan (float noise in q/k could flip a near-tie
  between two positions' scores; the share of identical plans is asserted >= 95%, and any
  difference must be a few positions per layer; the measured figure is printed);
- whenever the plans are equal the greedy tokens are equal, and the full cache's are equal;
- so the server's accuracy per cell equals the harness's up to the items whose plans differ.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
import torch

from tests.conftest import png_base64
from vlcache_sglang.policy import PolicyConfig
from vlcache_sglang.serving import running_server

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tinyvlm-docvqa"
HELDOUT = ROOT / "data" / "tinyvlm-docvqa" / "heldout"
METHODS = ("vlcache", "snapkv", "h2o")
ALPHAS = (0.05, 0.1, 0.2)
PER_QTYPE = 2
MAX_NEW = 16
MIN_IDENTICAL_SHARE = 0.95

if not (MODEL / "config.json").exists():
    pytest.skip("models/tinyvlm-docvqa not present", allow_module_level=True)


@pytest.fixture(scope="module")
def harness():
    """Items, prompter and the harness results (with plans) for every policy of the test."""
    from vlcache_sglang.hf_eval import ChatPrompter, evaluate_policies, items_from_dataset, load_model
    from vlcache_sglang.tasks.datasets_io import load_eval_dataset

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
    assert fields.pop("budget") is None  # the budget *function* cannot travel per request
    return {"budget": fields.pop("alpha"), **fields, "return_plan": True}


def _flush(url: str, timeout: float = 30.0) -> None:
    """Empty the radix cache. SGLang refuses (400) while a request is still in its running batch,
    which a just-answered request can be for a moment, so retry until it is accepted."""
    deadline = time.monotonic() + timeout
    while True:
        r = requests.post(f"{url}/flush_cache", timeout=60)
        if r.status_code == 200:
            return
        assert time.monotonic() < deadline, f"flush_cache refused for {timeout:.0f} s: {r.status_code} {r.text}"
        time.sleep(0.1)


def _generate(url: str, text: str, image, policy: PolicyConfig) -> dict:
    _flush(url)
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
    report = []
    for cell, bodies in served.items():
        res = hf[cell]
        differing = 0
        server_correct = 0
        for item, body, ho in zip(items, bodies, res.items):
            meta = body["meta_info"]
            # the same prompt ids reach both: same length here, same plan/tokens below
            assert meta["prompt_tokens"] == ho.prompt_len, (cell, item.id)
            server_correct += body["text"].strip() == item.answer.strip()
            plan = _server_plan(meta, ho.prompt_len, len(ho.kept))
            n_plans += 1
            if plan == ho.kept:
                n_identical += 1
                assert body["output_ids"] == ho.tokens, (cell, item.id)
            else:
                differing += 1
                # float noise flips near-ties: a few positions per layer, never a different plan shape
                for s, h in zip(plan, ho.kept):
                    assert len(set(s) ^ set(h)) <= 4, (cell, item.id, sorted(set(s) ^ set(h)))
        server_acc = server_correct / len(items)
        report.append(f"{cell[0]}@{cell[1]}: plans identical {len(items) - differing}/{len(items)}, "
                      f"accuracy server {server_acc:.3f} harness {res.accuracy:.3f}")
        # accuracy can only differ on the items whose plans differ
        assert abs(server_acc - res.accuracy) <= differing / len(items) + 1e-9, report[-1]
    print("\n".join(report))
    print(f"identical plans: {n_identical}/{n_plans}")
    assert n_identical / n_plans >= MIN_IDENTICAL_SHARE, f"only {n_identical}/{n_plans} plans identical"
    # the compressed cells really compressed, at the requested share (the test can fail)
    for (method, alpha), res in hf.items():
        if method != "full":
            assert abs(res.kept_ratio - alpha) < 0.01 or method == "snapkv", (method, alpha, res.kept_ratio)
            assert res.kept_ratio < 0.5
