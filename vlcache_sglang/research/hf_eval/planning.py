"""The policy's plan computed in Hugging Face transformers, exactly as the SGLang backend does.

The server (``vlcache_sglang.backend.compressor``) builds, per request, ``locate_window(m,
image_spans, policy)`` and a :class:`~vlcache_sglang.policy.StatsAccumulator`, feeds it each
layer's needed query rows (post-RoPE) against all the prompt's keys, and calls
:func:`~vlcache_sglang.policy.build_plan`. Here the same three calls are fed from a captured HF
prefill (:mod:`vlcache_sglang.research.hf_eval.capture`), so the harness plan equals the server plan up
to float noise in q and k.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from vlcache_sglang.research.hf_eval.capture import QKCapture, prefill_with_capture
from vlcache_sglang.policy import CompressionPlan, PolicyConfig, StatsAccumulator, build_plan, locate_window


def image_spans(input_ids: torch.Tensor, token_ids: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` runs of visual tokens in a ``[1, m]`` or ``[m]`` id tensor (SGLang's
    ``MultimodalDataItem.offsets``: one run per image, placeholders only)."""
    ids = input_ids.reshape(-1)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for t in token_ids:
        if t is not None:
            mask |= ids == int(t)
    spans: list[tuple[int, int]] = []
    start = None
    for i, v in enumerate(mask.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            spans.append((start, i - 1))
            start = None
    if start is not None:
        spans.append((start, len(mask) - 1))
    return spans


def visual_token_ids(model) -> list[int]:
    """The image and video placeholder ids of a Qwen2-VL config."""
    return [t for t in (getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None))
            if t is not None]


def plan_from_capture(capture: QKCapture, input_ids: torch.Tensor, visual_ids: Sequence[int],
                      policy: PolicyConfig) -> CompressionPlan:
    """The plan of ``policy`` for one captured prefill (the server's observe_extend + _finish)."""
    if not isinstance(policy, PolicyConfig):
        raise TypeError(f"policy must be a PolicyConfig, got {type(policy).__name__}")
    m = int(input_ids.reshape(-1).shape[0])
    n_layers = capture.num_layers
    q0, k0 = capture.q[0], capture.k[0]
    if q0.shape[0] != m:
        raise ValueError(f"captured {q0.shape[0]} query rows for a prompt of {m} tokens")
    window = locate_window(m, image_spans(input_ids, visual_ids), policy)
    acc = StatsAccumulator(n_layers, q0.shape[1], k0.shape[1], m, window, policy)
    if acc.needs_attention:
        positions = torch.arange(m, device=q0.device)
        rows = acc.needed_rows(positions)
        for layer in range(n_layers):
            acc.add(layer, capture.q[layer][rows], positions[rows], capture.k[layer], capture.scale)
    return build_plan(acc)


def layer_positions(plan: CompressionPlan) -> list[torch.Tensor]:
    """Kept prompt positions per layer; head granularity keeps the union over heads (as the server)."""
    if plan.granularity == "head":
        return [torch.unique(k.flatten()) for k in plan.kept]
    return list(plan.kept)


def plan_in_hf(model, inputs: dict, policy: PolicyConfig) -> CompressionPlan:
    """Prefill ``inputs`` (processor output, batch of one) in HF and return ``policy``'s plan."""
    _, capture = prefill_with_capture(model, inputs)
    return plan_from_capture(capture, inputs["input_ids"], visual_token_ids(model), policy)
