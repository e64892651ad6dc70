"""Load a model directory once and answer single questions under a policy (for tuning's ``--backend hf``)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlcache_sglang.research.hf_eval.evaluate import run_item
from vlcache_sglang.research.hf_eval.items import ChatPrompter
from vlcache_sglang.research.hf_eval.planning import layer_positions
from vlcache_sglang.policy import PolicyConfig


@dataclass
class HFHandle:
    """A loaded model and its prompter."""

    model: object
    prompter: ChatPrompter
    model_dir: Path


def load_model(model_dir: str | Path, device: str = "cpu"):
    """``Qwen2VLForConditionalGeneration`` in float32, eval mode, sdpa text attention."""
    from transformers import Qwen2VLForConditionalGeneration

    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    return Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).to(device).eval()


def load(model_path: str | Path, *, device: str = "cpu") -> HFHandle:
    """Model and prompter of ``model_path``."""
    return HFHandle(load_model(model_path, device), ChatPrompter.from_pretrained(model_path), Path(model_path))


def answer(handle: HFHandle, policy: PolicyConfig, image, question: str, *,
           max_new_tokens: int = 16, cells: str = "layer") -> tuple[str, float, int]:
    """``(text, kept_ratio, prompt_tokens)`` of one question under ``policy``, served as a server
    with ``--vlcache-cells cells`` would: with layer cells each layer holds the union over its heads
    (``sum_l |U_l| / (L m)``), with head cells every (layer, KV head) its own positions
    (``sum_{l,h} k_{l,h} / (L H m)``, :attr:`CompressionPlan.held_ratio`)."""
    run = run_item(handle.model, handle.prompter, image, question, [policy], max_new_tokens, cells=cells)
    plan = run.plans[0]
    if cells == "head":
        ratio = plan.held_ratio
    else:
        ratio = sum(int(k.numel()) for k in layer_positions(plan)) / (plan.num_layers * plan.prompt_len)
    return handle.prompter.decode(run.outputs[0].tokens), ratio, plan.prompt_len
