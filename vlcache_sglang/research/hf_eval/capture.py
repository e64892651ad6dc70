"""Capture every text layer's post-RoPE queries and keys during a Hugging Face prefill.

The policy's statistics (VL-Cache Sec. 1 and 3: ``A = softmax(q k^T / sqrt(d))`` of the window
rows) need the queries and keys *after* rotary embedding, which only exist inside the attention
module. transformers routes every attention call through ``ALL_ATTENTION_FUNCTIONS`` keyed by
``config._attn_implementation``; :func:`capturing` registers a wrapper under its own name
(``vlcache_capture_sdpa`` / ``vlcache_capture_eager``) that records ``query``/``key`` and then
calls the model's original implementation unchanged, so the prefill's numbers (cache, logits)
are exactly those of an ordinary prefill. The SGLang backend sees the same tensors: its
attention receives q and k after RoPE too (``vlcache_sglang.backend.compressor.observe_extend``).
"""
from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from vlcache_sglang.research.hf_reference import Prefill, prefill

_PREFIX = "vlcache_capture_"
_SUPPORTED = ("sdpa", "eager")
_ACTIVE: contextvars.ContextVar["QKCapture | None"] = contextvars.ContextVar("vlcache_qk_capture", default=None)


@dataclass
class QKCapture:
    """Per text layer: ``q[l]`` ``[m, Hq, D]`` and ``k[l]`` ``[m, Hkv, D]`` (post-RoPE), ``scale``."""

    q: dict[int, torch.Tensor] = field(default_factory=dict)
    k: dict[int, torch.Tensor] = field(default_factory=dict)
    v: dict[int, torch.Tensor] = field(default_factory=dict)
    out: dict[int, torch.Tensor] = field(default_factory=dict)  # attention output [m, Hq, D], for checks
    scale: float | None = None

    @property
    def num_layers(self) -> int:
        return len(self.q)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               output: torch.Tensor, scale: float) -> None:
        if query.shape[0] != 1:
            raise ValueError(f"q/k capture takes a batch of one prompt, got batch {query.shape[0]}")
        if layer in self.q:
            raise RuntimeError(f"layer {layer} was captured twice: capture one prefill forward at a time")
        if query.shape[2] != key.shape[2]:
            raise RuntimeError(f"layer {layer}: {query.shape[2]} query rows against {key.shape[2]} keys; "
                               "the capture expects a prefill from an empty cache")
        # [1, H, n, D] -> [n, H, D] (the policy's layout)
        self.q[layer] = query[0].transpose(0, 1).detach()
        self.k[layer] = key[0].transpose(0, 1).detach()
        self.v[layer] = value[0].transpose(0, 1).detach()
        self.out[layer] = output[0].detach()  # attention functions return [1, n, H, D]
        self.scale = float(scale)


def _wrapper(original: str):
    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.models.qwen2_vl.modeling_qwen2_vl import eager_attention_forward

        fn = AttentionInterface._global_mapping.get(original, eager_attention_forward)
        output, weights = fn(module, query, key, value, attention_mask, **kwargs)
        rec = _ACTIVE.get()
        if rec is not None:
            scale = kwargs.get("scaling")
            rec.record(module.layer_idx, query, key, value, output,
                       module.scaling if scale is None else scale)
        return output, weights

    capture_attention.__name__ = f"{_PREFIX}{original}"
    return capture_attention


def _register(original: str) -> str:
    if original not in _SUPPORTED:
        raise ValueError(f"q/k capture supports text attention {_SUPPORTED}, not {original!r}; "
                         "load the model with attn_implementation='sdpa' or 'eager'")
    name = f"{_PREFIX}{original}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrapper(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


@contextmanager
def capturing(model) -> Iterator[QKCapture]:
    """Within the block, every text-attention call of ``model`` is recorded into the yielded capture.

    Switches ``model.config.text_config._attn_implementation`` for the block (restored on exit), so
    one model must not run other forwards in other threads meanwhile."""
    cfg = model.config.text_config
    original = cfg._attn_implementation or "eager"
    name = original if original.startswith(_PREFIX) else _register(original)
    capture = QKCapture()
    token = _ACTIVE.set(capture)
    cfg._attn_implementation = name
    try:
        yield capture
    finally:
        cfg._attn_implementation = original
        _ACTIVE.reset(token)


def prefill_with_capture(model, inputs: dict) -> tuple[Prefill, QKCapture]:
    """:func:`vlcache_sglang.research.hf_reference.prefill` that also returns every layer's post-RoPE q/k."""
    with capturing(model) as capture:
        pre = prefill(model, inputs)
    n_layers = model.config.text_config.num_hidden_layers
    if sorted(capture.q) != list(range(n_layers)):
        raise RuntimeError(f"captured layers {sorted(capture.q)}, expected 0..{n_layers - 1}")
    return pre, capture
