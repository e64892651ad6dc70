"""Reference evaluation of compression policies in Hugging Face transformers.

The server's plan, computed in HF from the prefill's post-RoPE q/k (:mod:`.capture`,
:mod:`.planning`), applied by cropping each layer's cache after prefill, then greedy decoding
(:mod:`vlcache_sglang.research.hf_reference`); accuracy plus label-free fidelity (:mod:`.fidelity`).

    from vlcache_sglang.research.hf_eval import ChatPrompter, evaluate_policy, items_from_dataset, load_model
    model = load_model("models/tinyvlm-docvqa")
    prompter = ChatPrompter.from_pretrained("models/tinyvlm-docvqa")
    result = evaluate_policy(model, prompter, items, PolicyConfig(method="vlcache", alpha=0.1))

The command: ``python benchmarks/eval_hf_accuracy.py`` (docs/accuracy-vs-budget.md).
"""
from vlcache_sglang.research.hf_eval.capture import QKCapture, capturing, prefill_with_capture
from vlcache_sglang.research.hf_eval.evaluate import (
    EvalResult,
    ItemOutcome,
    ItemRun,
    PlanOutput,
    evaluate_policies,
    evaluate_policy,
    run_item,
)
from vlcache_sglang.research.hf_eval.fidelity import next_token_kl, token_agreement
from vlcache_sglang.research.hf_eval.items import ChatPrompter, EvalItem, exact_match, items_from_dataset
from vlcache_sglang.research.hf_eval.planning import (
    image_spans,
    layer_positions,
    plan_from_capture,
    plan_in_hf,
    visual_token_ids,
)
from vlcache_sglang.research.hf_eval.session import HFHandle, answer, load, load_model

__all__ = [
    "ChatPrompter", "EvalItem", "EvalResult", "HFHandle", "ItemOutcome", "ItemRun", "PlanOutput", "QKCapture",
    "answer", "capturing",
    "evaluate_policies", "evaluate_policy", "exact_match", "image_spans", "items_from_dataset", "layer_positions",
    "load", "load_model", "next_token_kl", "plan_from_capture", "plan_in_hf", "prefill_with_capture", "run_item",
    "token_agreement", "visual_token_ids",
]
