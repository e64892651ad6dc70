"""Evaluate compression policies in Hugging Face transformers: accuracy and fidelity.

For every item: one full-attention prefill with q/k capture, then for every policy its plan
(the server's statistics and :func:`~vlcache_sglang.policy.build_plan`), each layer's cache
cropped to the plan's kept positions, and greedy decoding (first token from the prefill logits,
as SGLang). Identical plans (e.g. every identity plan of an item) are decoded once. The
full-cache greedy output of the same prefill is the fidelity reference: token agreement with it,
and the next-token KL ``KL(P_full || P_plan)`` at each decode step of that output (teacher
forced), reported at the first decode step after compression and as a mean over the steps.

Stable entry points: :func:`evaluate_policy` (one policy -> :class:`EvalResult`) and
:func:`evaluate_policies` (many policies sharing each item's prefill).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import torch
from tqdm.auto import tqdm

from vlcache_sglang.research.hf_eval.capture import prefill_with_capture
from vlcache_sglang.research.hf_eval.fidelity import next_token_kl, token_agreement
from vlcache_sglang.research.hf_eval.items import ChatPrompter, EvalItem, exact_match
from vlcache_sglang.research.hf_eval.planning import layer_positions, plan_from_capture, visual_token_ids
from vlcache_sglang.research.hf_reference import (crop_cache_positions, decode_steps, head_masks_for,
                                                  teacher_forced_logits)
from vlcache_sglang.policy import CompressionPlan, PolicyConfig


@dataclass
class ItemOutcome:
    """One item under one policy."""

    id: str
    qtype: str
    prediction: str
    tokens: list[int]
    correct: bool
    prompt_len: int
    kept_ratio: float  # kept positions over L * m (per-layer sets; head plans: union over heads)
    token_agreement: float  # with the full-cache greedy output
    same_as_full: bool
    # KL(P_full || P_plan) in nats at decode step 0 and its mean over the full output's decode
    # steps (teacher forced on the full output); None when the full output is a single token
    kl_first_decode: float | None
    kl_mean: float | None
    full_correct: bool
    budgets: list[int] = field(default_factory=list)
    kept: list[list[int]] | None = None  # per layer, only with return_plans=True
    # what the server holds: kept_ratio with layer cells; sum_{l,h} k_lh / (L * H * m) per head
    held_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        if d["kept"] is None:
            d.pop("kept")
        return d


@dataclass
class EvalResult:
    """Aggregates of one policy over the items (shares in [0, 1]; KL in nats)."""

    policy: PolicyConfig
    n: int
    accuracy: float  # exact match of the whole answer
    per_qtype: dict[str, float]
    kept_ratio: float  # mean measured kept share
    token_agreement: float  # mean over items
    same_as_full: float  # share of items whose greedy output equals the full cache's
    kl_first_decode: float  # mean over items where it is defined (nan if none)
    kl_mean: float  # mean over items of the per-item mean KL along the full-cache output
    full_accuracy: float  # the full cache on the same items
    seconds: float  # wall time of the whole call (shared by the policies evaluated together)
    items: list[ItemOutcome] = field(default_factory=list)
    held_ratio: float = float("nan")  # mean share of the prompt's KV the server holds (see ``cells``)
    cells: str = "layer"  # how the plans were served: layer cells (union over heads) or head cells

    @property
    def method(self) -> str:
        return self.policy.method

    @property
    def alpha(self) -> float:
        return self.policy.alpha

    def to_dict(self, include_items: bool = True) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("policy", "items")}
        d["policy"] = self.policy.to_dict()
        if include_items:
            d["items"] = [o.to_dict() for o in self.items]
        return d


def _check(items: Sequence[EvalItem], policies: Sequence[PolicyConfig], max_new_tokens: int) -> None:
    if not items:
        raise ValueError("no items to evaluate")
    if not policies:
        raise ValueError("no policies to evaluate")
    for p in policies:
        if not isinstance(p, PolicyConfig):
            raise TypeError(f"policies must be PolicyConfig objects (validated), got {type(p).__name__}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


@dataclass
class PlanOutput:
    """What one plan gives on one item: greedy tokens and next-token KL to the full cache along
    the full cache's own output (teacher forced; entry ``i`` is decode step ``i``)."""

    tokens: list[int]
    kl_steps: list[float]


@dataclass
class ItemRun:
    """One item under several policies (one prefill)."""

    prompt_len: int
    plans: list[CompressionPlan]
    outputs: list[PlanOutput]
    full_tokens: list[int]


def _outcome(item: EvalItem, prompter: ChatPrompter, plan: CompressionPlan, out: PlanOutput,
             full_tokens: list[int], return_plans: bool, cells: str = "layer") -> ItemOutcome:
    kept = layer_positions(plan)
    m, n_layers = plan.prompt_len, plan.num_layers
    union = sum(int(k.numel()) for k in kept) / (n_layers * m)
    pred = prompter.decode(out.tokens)
    return ItemOutcome(
        id=item.id, qtype=item.qtype, prediction=pred, tokens=out.tokens, correct=exact_match(pred, item.answer),
        prompt_len=m, kept_ratio=sum(int(k.numel()) for k in kept) / (n_layers * m),
        token_agreement=token_agreement(full_tokens, out.tokens), same_as_full=out.tokens == full_tokens,
        kl_first_decode=out.kl_steps[0] if out.kl_steps else None,
        kl_mean=fmean(out.kl_steps) if out.kl_steps else None,
        full_correct=exact_match(prompter.decode(full_tokens), item.answer),
        budgets=[int(k.numel()) for k in kept],
        kept=[k.tolist() for k in kept] if return_plans else None,
        held_ratio=plan.held_ratio if cells == "head" else union,
    )


@torch.no_grad()
def run_item(model, prompter: ChatPrompter, image, question: str, policies: Sequence[PolicyConfig],
             max_new_tokens: int, cells: str = "layer") -> ItemRun:
    """One prefill, then per policy its plan, greedy output and KL steps; plus the full-cache output.
    ``cells="head"``: per-head plans are applied per KV head (what ``--vlcache-cells head`` serves),
    otherwise as the union over each layer's heads (layer cells)."""
    if cells not in ("layer", "head"):
        raise ValueError(f"cells must be 'layer' or 'head', got {cells!r}")
    inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in prompter.inputs(image, question).items()}
    pre, capture = prefill_with_capture(model, inputs)
    visual = visual_token_ids(model)
    text_cfg = model.config.text_config

    def greedy(cache, masks=None) -> tuple[list[int], list[torch.Tensor]]:
        return decode_steps(model, cache, pre.first_token, pre.prompt_len, pre.rope_deltas, max_new_tokens,
                            prompter.eos_token_ids, head_masks=masks)

    full_tokens, full_logits = greedy(copy.deepcopy(pre.cache))  # the uncropped prefill cache
    n_steps = len(full_tokens) - 1  # decode step i reads full_tokens[i], predicts full_tokens[i + 1]
    plans, outs, memo = [], [], {}
    for policy in policies:
        plan = plan_from_capture(capture, inputs["input_ids"], visual, policy)
        kept = layer_positions(plan)
        per_head = cells == "head" and plan.head_kept is not None and not plan.is_identity
        masks = head_masks_for(plan.head_kept)[1] if per_head else None
        key = tuple(tuple(k.tolist()) for k in kept)
        if per_head:
            key += tuple(tuple(h.tolist()) for heads in plan.head_kept for h in heads)
        if key not in memo:
            tokens, logits = greedy(crop_cache_positions(pre.cache, kept, text_cfg), masks)
            if tokens[:n_steps] != full_tokens[:n_steps]:  # diverged: its own steps read other tokens
                logits = list(teacher_forced_logits(model, crop_cache_positions(pre.cache, kept, text_cfg),
                                                    full_tokens, pre.prompt_len, pre.rope_deltas, masks))
            kl = [next_token_kl(f, g) for f, g in zip(full_logits[:n_steps], logits[:n_steps])]
            memo[key] = PlanOutput(tokens, kl)
        plans.append(plan)
        outs.append(memo[key])
    return ItemRun(pre.prompt_len, plans, outs, full_tokens)


def _aggregate(policy: PolicyConfig, outcomes: list[ItemOutcome], seconds: float, cells: str = "layer") -> EvalResult:
    groups: dict[str, list[bool]] = {}
    for o in outcomes:
        groups.setdefault(o.qtype, []).append(o.correct)
    kl0 = [o.kl_first_decode for o in outcomes if o.kl_first_decode is not None]
    klm = [o.kl_mean for o in outcomes if o.kl_mean is not None]
    return EvalResult(
        policy=policy, n=len(outcomes), accuracy=fmean(o.correct for o in outcomes),
        per_qtype={q: fmean(v) for q, v in groups.items()}, kept_ratio=fmean(o.kept_ratio for o in outcomes),
        token_agreement=fmean(o.token_agreement for o in outcomes),
        same_as_full=fmean(o.same_as_full for o in outcomes),
        kl_first_decode=fmean(kl0) if kl0 else float("nan"), kl_mean=fmean(klm) if klm else float("nan"),
        full_accuracy=fmean(o.full_correct for o in outcomes), seconds=seconds, items=outcomes,
        held_ratio=fmean(o.held_ratio for o in outcomes), cells=cells,
    )


def evaluate_policies(model, prompter: ChatPrompter, items: Sequence[EvalItem], policies: Sequence[PolicyConfig],
                      max_new_tokens: int = 16, *, return_plans: bool = False, progress: bool = True,
                      desc: str = "items x policies", cells: str = "layer") -> list[EvalResult]:
    """Every policy on every item; each item is prefilled once for all policies.

    Args:
        model: a ``Qwen2VLForConditionalGeneration`` in eval mode (sdpa or eager text attention).
        prompter: :class:`ChatPrompter` of the model's processor (prompt text, inputs, EOS ids).
        items: :class:`EvalItem` list (see :func:`vlcache_sglang.research.hf_eval.items.items_from_dataset`).
        policies: validated :class:`PolicyConfig` objects (``alpha`` below ``clip_min`` or an unknown
            method is rejected when the config is built: :class:`PolicyConfigError`).
        max_new_tokens: greedy tokens at most (stops after EOS).
        return_plans: keep each item's kept positions per layer in :attr:`ItemOutcome.kept`.
        progress: show a tqdm bar over items x policies.
        cells: ``"layer"`` (head plans as the union over heads, the default server) or ``"head"``
            (per KV head, ``--vlcache-cells head``); sets :attr:`EvalResult.held_ratio`.

    Returns:
        One :class:`EvalResult` per policy, in order.
    """
    _check(items, policies, max_new_tokens)
    t0 = time.monotonic()
    per_policy: list[list[ItemOutcome]] = [[] for _ in policies]
    with tqdm(total=len(items) * len(policies), desc=desc, disable=not progress, unit="cell") as bar:
        for item in items:
            run = run_item(model, prompter, item.image, item.question, policies, max_new_tokens, cells)
            for i, (plan, out) in enumerate(zip(run.plans, run.outputs)):
                per_policy[i].append(_outcome(item, prompter, plan, out, run.full_tokens, return_plans, cells))
            bar.update(len(policies))
    seconds = time.monotonic() - t0
    return [_aggregate(p, o, seconds, cells) for p, o in zip(policies, per_policy)]


def evaluate_policy(model, prompter: ChatPrompter, items: Sequence[EvalItem], policy: PolicyConfig,
                    max_new_tokens: int = 16, *, return_plans: bool = False, progress: bool = True) -> EvalResult:
    """One policy on ``items``: exact-match accuracy (overall and per question type), measured kept
    ratio, and fidelity to the full cache (token agreement, identical outputs, next-token KL).
    See :func:`evaluate_policies` for the arguments."""
    _check(items, [policy], max_new_tokens)
    return evaluate_policies(model, prompter, items, [policy], max_new_tokens, return_plans=return_plans,
                             progress=progress, desc=f"{policy.method}@{policy.alpha:g}")[0]
