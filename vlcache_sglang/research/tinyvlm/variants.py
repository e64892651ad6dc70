"""Variants of the bundled model with the same trained weights, regrouped into other head shapes.

FlashInfer has no kernels for head dim 32 (the bundled model's: 128 hidden / 4 heads): on the H200
SGLang's stock FlashInfer backend failed its decode CUDA-graph capture with ``Unsupported head_dim:
32`` (``VariableLengthMergeStates``, cascade.cuh). Regrouping the same projections into 2 query
heads and 1 KV head of 64 keeps every weight tensor's shape (``q_proj`` 128x128, ``k_proj`` /
``v_proj`` 64x128, ``o_proj`` 128x128), so the checkpoint loads unchanged; the multimodal rotary
sections double with the head dim. It is another model (its attention splits the same features
differently), not an equivalent one: use it where a comparison needs a head dim FlashInfer serves,
between engines running the same variant, never against the bundled model's figures.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def head_dim_variant(src: str | Path, dst: str | Path, head_dim: int = 64) -> Path:
    """Write into ``dst`` the model of ``src`` with its text attention regrouped to ``head_dim``."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    old_dim = text["hidden_size"] // text["num_attention_heads"]
    if head_dim % old_dim or text["hidden_size"] % head_dim:
        raise ValueError(f"head dim {head_dim} must be a multiple of {old_dim} dividing {text['hidden_size']}")
    factor = head_dim // old_dim
    if text["num_key_value_heads"] % factor:
        raise ValueError(f"{text['num_key_value_heads']} KV heads cannot be regrouped by {factor}")
    text["num_attention_heads"] //= factor
    text["num_key_value_heads"] //= factor
    rope = text["rope_parameters"]
    rope["mrope_section"] = [s * factor for s in rope["mrope_section"]]
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
