"""The Hugging Face reference of per-KV-head plans (``head_kept[l][h]``), what a server with
``--vlcache-cells head`` must reproduce: the cache cropped to each layer's union, and each KV
head's query group masked off the union positions that head dropped.

- the masked attention equals a float64 per-head attention on random tensors (GQA);
- on the bundled model, a per-head plan whose heads all keep the same set gives the layer
  plan's tokens and logits; heads that disagree change the logits against the union.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlcache_sglang.research.hf_reference import _head_masked_sdpa, head_masks_for

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tinyvlm-docvqa"
HELDOUT = ROOT / "data" / "tinyvlm-docvqa" / "heldout"


def test_head_masks_are_the_heads_sets_within_the_union():
    unions, masks = head_masks_for([[torch.tensor([1, 4, 6]), torch.tensor([0, 4])]])
    assert unions[0].tolist() == [0, 1, 4, 6]
    assert masks[0].tolist() == [[False, True, True, True], [True, False, True, False]]


def test_masked_attention_equals_float64_per_head_attention():
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, union, tail = 4, 2, 8, 6, 3
    q = torch.randn(1, hq, 1, d, generator=g)
    k = torch.randn(1, hkv, union + tail, d, generator=g)
    v = torch.randn(1, hkv, union + tail, d, generator=g)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=hq // hkv, is_causal=True, training=False)
    out, _ = _head_masked_sdpa(module, q, k, v, None, vlcache_head_masks=[keep], scaling=0.5)
    for i in range(hq):
        h = i // (hq // hkv)
        sees = torch.cat([keep[h], torch.ones(tail, dtype=torch.bool)])
        s = (q[0, i, 0].double() @ k[0, h, sees].double().T) * 0.5
        want = torch.softmax(s, -1) @ v[0, h, sees].double()
        torch.testing.assert_close(out[0, 0, i].double(), want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
    if not (MODEL / "config.json").exists():
        pytest.skip("models/tinyvlm-docvqa not present")
    from vlcache_sglang.research.hf_eval import ChatPrompter, items_from_dataset, load_model
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    torch.set_num_threads(1)
    item = items_from_dataset(load_eval_dataset(HELDOUT), 1)[0]
    model, prompter = load_model(MODEL), ChatPrompter.from_pretrained(MODEL)
    return model, prompter, prompter.inputs(item.image, item.question)


def _plan(model, inputs, **policy):
    from vlcache_sglang.policy import PolicyConfig
    from vlcache_sglang.research.hf_eval.planning import plan_in_hf

    return plan_in_hf(model, inputs, PolicyConfig(alpha=0.1, **policy))


def test_heads_keeping_the_same_set_give_the_layer_plan(setup):
    from vlcache_sglang.research.hf_reference import greedy_disagreements, greedy_with_plan

    model, prompter, inputs = setup
    plan = _plan(model, inputs)
    heads = model.config.text_config.num_key_value_heads
    head_kept = [[k] * heads for k in plan.kept]
    layer = greedy_with_plan(model, inputs, plan.kept, 12, prompter.eos_token_ids)
    assert greedy_with_plan(model, inputs, None, 12, prompter.eos_token_ids, head_kept=head_kept) == layer
    flips = greedy_disagreements(model, inputs, None, layer, head_kept=head_kept)
    assert all(margin < 1e-4 for _, _, margin in flips)


def test_heads_that_disagree_change_the_logits(setup):
    from vlcache_sglang.research.hf_reference import _planned_cache, decode_steps, prefill

    model, prompter, inputs = setup
    plan = _plan(model, inputs, granularity="head", head_budget="adaptive")
    assert any(not torch.equal(a, b) for heads in plan.head_kept for a, b in zip(heads, heads[1:]))
    pre = prefill(model, inputs)
    per_head_cache, masks = _planned_cache(model, pre, None, plan.head_kept)
    _, per_head = decode_steps(model, per_head_cache, pre.first_token, pre.prompt_len, pre.rope_deltas, 3,
                               head_masks=masks)
    union_cache, _ = _planned_cache(model, prefill(model, inputs), head_masks_for(plan.head_kept)[0], None)
    _, union = decode_steps(model, union_cache, pre.first_token, pre.prompt_len, pre.rope_deltas, 3)
    assert not torch.allclose(per_head[0], union[0], atol=1e-4)  # the masks act
    with pytest.raises(ValueError, match="union"):
        _planned_cache(model, pre, [k[:-1] for k in plan.kept], plan.head_kept)


def test_harness_serves_per_head_plans_with_head_cells(setup):
    """``evaluate_policies(cells="head")`` decodes what ``--vlcache-cells head`` serves and reports
    the memory it holds; ``cells="layer"`` the union."""
    from vlcache_sglang.policy import PolicyConfig
    from vlcache_sglang.research.hf_eval import items_from_dataset, run_item
    from vlcache_sglang.research.hf_eval.evaluate import _outcome
    from vlcache_sglang.research.hf_reference import greedy_with_plan
    from vlcache_sglang.research.tasks.datasets_io import load_eval_dataset

    model, prompter, inputs = setup
    item = items_from_dataset(load_eval_dataset(HELDOUT), 1)[0]
    policy = PolicyConfig(alpha=0.1, granularity="head", head_budget="adaptive")
    head = run_item(model, prompter, item.image, item.question, [policy], 12, cells="head")
    layer = run_item(model, prompter, item.image, item.question, [policy], 12, cells="layer")
    plan = head.plans[0]
    assert head.outputs[0].tokens == greedy_with_plan(model, inputs, None, 12, prompter.eos_token_ids,
                                                      head_kept=plan.head_kept)
    assert layer.outputs[0].tokens == greedy_with_plan(model, inputs, plan.kept, 12, prompter.eos_token_ids)
    held = _outcome(item, prompter, plan, head.outputs[0], head.full_tokens, False, "head").held_ratio
    union = _outcome(item, prompter, plan, layer.outputs[0], layer.full_tokens, False, "layer").held_ratio
    assert held == plan.held_ratio < union
    with pytest.raises(ValueError, match="cells"):
        run_item(model, prompter, item.image, item.question, [policy], 12, cells="token")


def test_conversation_reference_cut_per_head(setup):
    """``greedy_after_turns(per_head=True)``, what compressed sharing with head cells reproduces:
    one turn equals :func:`greedy_with_plan` with the same per-head plan; a head asked to keep at
    turn 2 a position it dropped at turn 1 is an error; heads keeping alike equal the layer form."""
    from vlcache_sglang.research.hf_multiturn import greedy_after_turns
    from vlcache_sglang.research.hf_reference import greedy_with_plan

    model, prompter, inputs = setup
    plan = _plan(model, inputs, granularity="head", head_budget="adaptive")
    m = int(inputs["input_ids"].shape[1])
    eos = prompter.eos_token_ids
    one = greedy_after_turns(model, inputs, [(m, plan.head_kept)], 12, eos, per_head=True)
    assert one == greedy_with_plan(model, inputs, None, 12, eos, head_kept=plan.head_kept)
    # two turns: the first m1 tokens cut per head, then at m each head keeps a subset of what it held
    m1 = m - 8
    first = [[h[h < m1] for h in heads] for heads in plan.head_kept]
    second = [[torch.cat([h[::2], torch.arange(m1, m)]) for h in heads] for heads in first]
    tokens = greedy_after_turns(model, inputs, [(m1, first), (m, second)], 12, eos, per_head=True)
    assert len(tokens) > 0
    layer_first = [heads[0] for heads in first]
    layer_second = [torch.cat([k[::2], torch.arange(m1, m)]) for k in layer_first]
    same = greedy_after_turns(model, inputs, [(m1, [[k, k] for k in layer_first]), (m, [[k, k] for k in layer_second])],
                              12, eos, per_head=True)
    assert same == greedy_after_turns(model, inputs, [(m1, layer_first), (m, layer_second)], 12, eos)
    dropped = [[h for h in heads] for heads in second]
    layer = next(i for i, heads in enumerate(first) if not torch.equal(heads[0], heads[1]))
    only_in_0 = first[layer][0][~torch.isin(first[layer][0], first[layer][1])]
    dropped[layer][1] = torch.cat([dropped[layer][1], only_in_0[:1]]).sort().values
    with pytest.raises(ValueError, match=f"layer {layer} head 1"):
        greedy_after_turns(model, inputs, [(m1, first), (m, dropped)], 12, eos, per_head=True)
