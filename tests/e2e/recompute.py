"""The check shared by the tests that make SGLang take a running compressed request off the batch
(decode retraction, priority preemption, a ``retract`` pause): SGLang later re-prefills its prompt
plus the ``k`` tokens it had generated, the plugin plans over all of them, and the rest of its
answer must be the Hugging Face reference decode that prefills the same tokens and applies that
plan. Under ``compressed`` sharing the re-prefill may read the request's own compressed entry from
the tree instead; the reference then replays what that entry holds (see ``resumed_from``)."""
from __future__ import annotations

import pytest


def assert_recomputed_like_reference(hf, out: dict, prompt: str, image, max_new: int,
                                     suppressed_tokens=(), where: str = "", resumed_from=None) -> None:
    """``out``: a ``/generate`` answer of a request sent with ``return_plan`` (its last plan's kept
    positions). ``suppressed_tokens``: tokens the server never picked (``min_new_tokens``).
    ``resumed_from``: under ``compressed`` sharing, the kept positions per layer of the request's
    first plan (over the prompt). When the re-prefill read ``c = vlcache_reused_tokens`` tokens
    from the tree, those were the compacted prompt (what the first plan kept) and the tokens the
    request had decoded against it; the reference cuts the prompt to the first plan, feeds the
    decoded tokens one at a time against it, then the rest, and cuts to the last plan."""
    import torch

    from vlcache_sglang.research.hf_multiturn import greedy_after_turns
    from vlcache_sglang.research.hf_reference import greedy_disagreements, greedy_with_plan

    model, processor = hf
    meta = out["meta_info"]
    m, planned = meta["prompt_tokens"], meta["vlcache_planned_tokens"][0]
    reused = meta["vlcache_reused_tokens"][0]
    k = planned - m
    assert 0 < k < max_new, (planned, m)
    assert 0 <= reused < planned, (reused, planned)
    kept = [torch.tensor(x) for x in meta["vlcache_kept_positions"][0]]
    assert all(int(x.max()) < planned for x in kept)
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    assert inputs["input_ids"].shape[1] == m
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([out["output_ids"][:k]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if resumed_from is not None and reused > 0:
        first = [torch.tensor(x) for x in resumed_from]
        turns = [(min(reused, m), [x[x < reused] for x in first])]
        if reused > m:  # the decoded tokens were all kept
            turns.append((reused, [torch.cat([x, torch.arange(m, reused)]) for x in first]))
        expected = greedy_after_turns(model, inputs, [*turns, (planned, kept)], max_new - k,
                                      suppressed_tokens=suppressed_tokens)
        if out["output_ids"][k:] != expected:
            pytest.fail(f"resumed request {meta['id']} ({meta['num_retractions']} retractions{where}; k={k}, "
                        f"reused {reused}, planned {planned}) differs from the reference of its two plans: "
                        f"{out['output_ids'][k:]} != {expected}")
        return
    expected = greedy_with_plan(model, inputs, kept, max_new - k, (), suppressed_tokens=suppressed_tokens)
    if out["output_ids"][k:] != expected:  # say where and by how much the reference disagrees
        flips = greedy_disagreements(model, inputs, kept, out["output_ids"][k:], suppressed_tokens=suppressed_tokens)
        pytest.fail(f"recomputed request {meta['id']} ({meta['num_retractions']} retractions{where}; k={k}, "
                    f"planned {planned}) differs from the reference of its plan; teacher-forced (step, reference "
                    f"token, logit margin) where the reference picks another token: {flips}")
