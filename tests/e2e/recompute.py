"""The check shared by the tests that make SGLang take a running compressed request off the batch
(decode retraction, priority preemption): SGLang later re-prefills its prompt plus the ``k``
tokens it had generated, the plugin plans over all of them, and the rest of its answer must be
the Hugging Face reference decode that prefills the same tokens and applies that plan."""
from __future__ import annotations

import pytest


def assert_recomputed_like_reference(hf, out: dict, prompt: str, image, max_new: int,
                                     suppressed_tokens=(), where: str = "") -> None:
    """``out``: a ``/generate`` answer of a request sent with ``return_plan`` (its last plan's kept
    positions). ``suppressed_tokens``: tokens the server never picked (``min_new_tokens``)."""
    import torch

    from vlcache_sglang.research.hf_reference import greedy_disagreements, greedy_with_plan

    model, processor = hf
    meta = out["meta_info"]
    m, planned = meta["prompt_tokens"], meta["vlcache_planned_tokens"][0]
    k = planned - m
    assert 0 < k < max_new, (planned, m)
    kept = [torch.tensor(x) for x in meta["vlcache_kept_positions"][0]]
    assert all(int(x.max()) < planned for x in kept)
    inputs = dict(processor(text=[prompt], images=[image], return_tensors="pt"))
    assert inputs["input_ids"].shape[1] == m
    inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([out["output_ids"][:k]])], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    expected = greedy_with_plan(model, inputs, kept, max_new - k, (), suppressed_tokens=suppressed_tokens)
    if out["output_ids"][k:] != expected:  # say where and by how much the reference disagrees
        flips = greedy_disagreements(model, inputs, kept, out["output_ids"][k:], suppressed_tokens=suppressed_tokens)
        pytest.fail(f"recomputed request {meta['id']} ({meta['num_retractions']} retractions{where}; k={k}, "
                    f"planned {planned}) differs from the reference of its plan; teacher-forced (step, reference "
                    f"token, logit margin) where the reference picks another token: {flips}")
