"""The Hugging Face reference evaluation (``vlcache_sglang.research.hf_eval``) on the bundled model, no server.

- the q/k capture leaves the prefill unchanged, and the captured post-RoPE q/k reproduce the
  model's own attention probabilities (eager ``output_attentions``) and outputs;
- the harness plan equals the plan built from those eager attention probabilities (a dense oracle
  independent of the chunked statistics);
- identity plans (method ``full``, alpha 1.0) give the full-cache tokens, fidelity 1 and KL 0;
  compressed plans give the tokens of an independent re-prefill with the same plan;
- bad input fails with a clear error.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vlcache_sglang.policy import PolicyConfig, PolicyConfigError

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tinyvlm-docvqa"
HELDOUT = ROOT / "data" / "tinyvlm-docvqa" / "heldout"
MAX_NEW = 16

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="models/tinyvlm-docvqa not present")


@pytest.fixture(scope="module")
def setup():
    from vlcache_sglang.research.hf_eval import ChatPrompter, items_from_dataset, load_model
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    torch.set_num_threads(1)
    items = items_from_dataset(load_eval_dataset(HELDOUT), 2)  # 2 per question type, 8 in all
    return load_model(MODEL), ChatPrompter.from_pretrained(MODEL), items


@pytest.fixture(scope="module")
def eager_model():
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(MODEL, dtype=torch.float32,
                                                           attn_implementation="eager").eval()


def _inputs(prompter, item):
    return prompter.inputs(item.image, item.question)


def test_capture_leaves_the_prefill_unchanged(setup):
    from vlcache_sglang.research.hf_eval import prefill_with_capture
    from vlcache_sglang.research.hf_reference import prefill

    model, prompter, items = setup
    inputs = _inputs(prompter, items[0])
    plain = prefill(model, inputs)
    captured, cap = prefill_with_capture(model, inputs)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored after the capture
    assert torch.equal(plain.logits, captured.logits)
    n_layers = model.config.text_config.num_hidden_layers
    assert cap.num_layers == n_layers
    for layer in range(n_layers):
        assert torch.equal(plain.cache.layers[layer].keys, captured.cache.layers[layer].keys)
        # the captured keys are the (post-RoPE) keys the cache stores
        assert torch.equal(cap.k[layer], captured.cache.layers[layer].keys[0].transpose(0, 1))
    m = inputs["input_ids"].shape[1]
    assert cap.q[0].shape == (m, 4, 32) and cap.k[0].shape == (m, 2, 32)
    assert cap.scale == pytest.approx(32 ** -0.5)


def test_captured_qk_reproduce_the_models_attention(setup, eager_model):
    from vlcache_sglang.research.hf_eval import prefill_with_capture
    from vlcache_sglang.research.tinyvlm.kvcache import rope_positions

    model, prompter, items = setup
    inputs = _inputs(prompter, items[1])
    _, cap = prefill_with_capture(model, inputs)
    ids = inputs["input_ids"]
    pos, _ = rope_positions(eager_model, ids, inputs["image_grid_thw"], eager_model.config.image_token_id)
    with torch.no_grad():
        att = eager_model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                          position_ids=pos, output_attentions=True).attentions
    m = ids.shape[1]
    causal = torch.ones(m, m, dtype=torch.bool).tril()
    for layer, a_model in enumerate(att):
        q = cap.q[layer].transpose(0, 1).double()  # [Hq, m, D]
        k = cap.k[layer].transpose(0, 1).double().repeat_interleave(2, 0)  # GQA: query head h -> KV head h // 2
        v = cap.v[layer].transpose(0, 1).double().repeat_interleave(2, 0)
        a = torch.softmax((q @ k.transpose(1, 2) * cap.scale).masked_fill(~causal, -math.inf), -1)
        torch.testing.assert_close(a.float(), a_model[0], atol=2e-6, rtol=1e-4)
        torch.testing.assert_close((a @ v).transpose(0, 1).float(), cap.out[layer], atol=2e-5, rtol=1e-4)


def _oracle_plan(att, input_ids, cfg: PolicyConfig, visual_ids):
    """The plan built from the model's own (eager) attention probabilities."""
    from vlcache_sglang.research.hf_eval import image_spans
    from vlcache_sglang.policy import PolicyStats, build_plan, get_method, locate_window

    m = input_ids.shape[1]
    window = locate_window(m, image_spans(input_ids, visual_ids), cfg)
    rows = get_method(cfg.method).rows
    sel = torch.arange(m) if rows == "all" else torch.arange(window.start, window.end)
    causal = torch.ones(m, m, dtype=torch.bool).tril()[sel]
    col, below, count = [], [], []
    for a in att:  # [1, Hq, m, m]
        a = a[0][:, sel].double()
        col.append(a.sum(1).view(2, 2, m).sum(1))  # query heads -> their KV head
        thresh = cfg.sparsity_threshold * a.amax(-1, keepdim=True)
        below.append(((a < thresh) & causal).sum((1, 2)))
        count.append(causal.sum().expand(a.shape[0]).clone())
    stats = PolicyStats(m, len(att), 4, 2, window, rows, torch.stack(col), torch.stack(below), torch.stack(count),
                        rows_seen=[len(sel)] * len(att))
    return build_plan(stats, cfg)


@pytest.mark.parametrize("method,alpha", [("vlcache", 0.1), ("vlcache", 0.02), ("snapkv", 0.2), ("h2o", 0.1),
                                          ("pyramidkv", 0.2)])
def test_harness_plan_equals_dense_oracle_from_model_attention(setup, eager_model, method, alpha):
    from vlcache_sglang.research.hf_eval import plan_in_hf, visual_token_ids
    from vlcache_sglang.research.tinyvlm.kvcache import rope_positions

    model, prompter, items = setup
    cfg = PolicyConfig(method=method, alpha=alpha)
    for item in items[::2]:
        inputs = _inputs(prompter, item)
        plan = plan_in_hf(model, inputs, cfg)
        ids = inputs["input_ids"]
        pos, _ = rope_positions(eager_model, ids, inputs["image_grid_thw"], eager_model.config.image_token_id)
        with torch.no_grad():
            att = eager_model(input_ids=ids, pixel_values=inputs["pixel_values"],
                              image_grid_thw=inputs["image_grid_thw"], position_ids=pos,
                              output_attentions=True).attentions
        oracle = _oracle_plan(att, ids, cfg, visual_token_ids(model))
        assert not plan.is_identity
        assert plan.budgets == oracle.budgets
        for got, want in zip(plan.kept, oracle.kept):
            assert torch.equal(got, want)


def test_identity_plans_give_the_full_cache(setup):
    from vlcache_sglang.research.hf_eval import evaluate_policies, plan_in_hf
    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, prompter, items = setup
    inputs = _inputs(prompter, items[0])
    m = inputs["input_ids"].shape[1]
    for cfg in (PolicyConfig(method="full", alpha=0.1), PolicyConfig(method="vlcache", alpha=1.0)):
        plan = plan_in_hf(model, inputs, cfg)
        assert plan.is_identity and plan.budgets == [m] * plan.num_layers
        full = greedy_with_plan(model, inputs, None, MAX_NEW, prompter.eos_token_ids)
        assert greedy_with_plan(model, inputs, plan.kept, MAX_NEW, prompter.eos_token_ids) == full
    results = evaluate_policies(model, prompter, items, [PolicyConfig(method="full", alpha=1.0),
                                                         PolicyConfig(method="h2o", alpha=1.0)],
                                MAX_NEW, progress=False)
    for r in results:
        assert r.kept_ratio == 1.0 and r.token_agreement == 1.0 and r.same_as_full == 1.0
        assert r.kl_first_decode == 0.0 and r.kl_mean == 0.0
        assert r.accuracy == r.full_accuracy
    # the bundled model answers most of these with the full cache (docs/tinyvlm.md)
    assert results[0].full_accuracy >= 0.5


def test_compressed_results_equal_an_independent_reprefill(setup):
    from vlcache_sglang.research.hf_eval import evaluate_policy, exact_match
    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, prompter, items = setup
    res = evaluate_policy(model, prompter, items, PolicyConfig(method="vlcache", alpha=0.05), MAX_NEW,
                          return_plans=True, progress=False)
    assert res.n == len(items) and set(res.per_qtype) == {"single", "multi", "number", "max"}
    for item, out in zip(items, res.items):
        inputs = _inputs(prompter, item)
        kept = [torch.tensor(k) for k in out.kept]
        assert out.tokens == greedy_with_plan(model, inputs, kept, MAX_NEW, prompter.eos_token_ids)
        assert out.correct == exact_match(prompter.decode(out.tokens), item.answer)
        assert out.kept_ratio == pytest.approx(sum(len(k) for k in kept) / (4 * out.prompt_len))
    assert res.accuracy == pytest.approx(sum(o.correct for o in res.items) / len(items))
    assert abs(res.kept_ratio - 0.05) < 0.005
    # compression at 2% of a random choice is visible in every fidelity measure (the metrics can fail)
    rand = evaluate_policy(model, prompter, items, PolicyConfig(method="random", alpha=0.02), MAX_NEW,
                           progress=False)
    assert rand.token_agreement < 0.9 and rand.same_as_full < 1.0 and rand.kl_mean > 0.1


def test_tuning_adapter_answer(setup):
    from vlcache_sglang.research.hf_eval import HFHandle, answer, evaluate_policy

    model, prompter, items = setup
    cfg = PolicyConfig(method="snapkv", alpha=0.2)
    text, ratio, m = answer(HFHandle(model, prompter, MODEL), cfg, items[2].image, items[2].question,
                            max_new_tokens=MAX_NEW)
    out = evaluate_policy(model, prompter, items[2:3], cfg, MAX_NEW, progress=False).items[0]
    assert (text, ratio, m) == (out.prediction, out.kept_ratio, out.prompt_len)


def test_tuning_adapter_answer_counts_what_the_cells_hold(setup):
    """Per-head plans: layer cells hold each layer's union over heads, head cells each head's own
    positions, so the tuner's kept share (its memory objective) depends on ``cells``."""
    from vlcache_sglang.research.hf_eval import HFHandle, answer, evaluate_policies

    model, prompter, items = setup
    handle, item = HFHandle(model, prompter, MODEL), items[2]
    cfg = PolicyConfig(alpha=0.1, granularity="head", head_budget="adaptive")
    _, union, _ = answer(handle, cfg, item.image, item.question, max_new_tokens=MAX_NEW, cells="layer")
    text, held, m = answer(handle, cfg, item.image, item.question, max_new_tokens=MAX_NEW, cells="head")
    out = evaluate_policies(model, prompter, items[2:3], [cfg], MAX_NEW, progress=False, cells="head")[0].items[0]
    assert held < union and (text, held, m) == (out.prediction, out.held_ratio, out.prompt_len)
    layer_cfg = PolicyConfig(alpha=0.1)  # one set per layer: both cells hold the same
    ratios = [answer(handle, layer_cfg, item.image, item.question, max_new_tokens=MAX_NEW, cells=c)[1]
              for c in ("layer", "head")]
    assert ratios[0] == pytest.approx(ratios[1])


def test_fidelity_measures():
    from vlcache_sglang.research.hf_eval import next_token_kl, token_agreement

    assert token_agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 5, 3]) == 0.5
    assert token_agreement([], []) == 1.0
    p = torch.tensor([2.0, 0.0, -1.0])
    assert next_token_kl(p, p) == 0.0
    q = torch.tensor([0.0, 2.0, -1.0])
    lp, lq = torch.log_softmax(p.double(), -1), torch.log_softmax(q.double(), -1)
    assert next_token_kl(p, q) == pytest.approx(float((lp.exp() * (lp - lq)).sum()))
    with pytest.raises(ValueError, match="shapes differ"):
        next_token_kl(p, torch.zeros(4))


def test_bad_input_fails_clearly(setup):
    from vlcache_sglang.research.hf_eval import evaluate_policy, items_from_dataset
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    model, prompter, items = setup
    with pytest.raises(PolicyConfigError, match="clip_min"):
        PolicyConfig(method="vlcache", alpha=0.005)
    with pytest.raises(PolicyConfigError, match="method"):
        PolicyConfig(method="nope", alpha=0.1)
    with pytest.raises(TypeError, match="PolicyConfig"):
        evaluate_policy(model, prompter, items, {"method": "vlcache", "alpha": 0.1}, progress=False)
    with pytest.raises(ValueError, match="no items"):
        evaluate_policy(model, prompter, [], PolicyConfig(), progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        evaluate_policy(model, prompter, items, PolicyConfig(), 0, progress=False)
    with pytest.raises(ValueError, match="unknown question types"):
        items_from_dataset(load_eval_dataset(HELDOUT), 1, ["nope"])


def test_command_rejects_bad_settings(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_hf_accuracy", ROOT / "benchmarks" / "eval_hf_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv, msg in ((["--alphas", "0.005"], "clip_min"), (["--methods", "nope"], "method"),
                      (["--split", "nope"], "no split directory"), (["--n", "0"], ">= 1")):
        with pytest.raises(SystemExit):
            mod.parse_args(argv)
        assert msg in capsys.readouterr().err
