"""Peer cross-check: our SnapKV, PyramidKV, StreamingLLM and H2O keep kvpress 0.5.5's tokens.

kvpress needs transformers<5.3, so it runs in its own venv (scripts/setup_kvpress_env.sh, built
here if missing or stale). A tiny random Llama (GQA) is saved from this venv; the helper
(kvpress_helper.py) loads it in the kvpress venv, captures post-RoPE q/k per layer, applies each
press and records the kept key positions per layer and KV head. We run our policy on the same
q/k - once over the whole prompt, once as three chunked-prefill calls in float32 - and require
identical kept sets. Differences of definition that the config cannot express are listed in
docs/policy.md.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from vlcache_sglang.policy import PolicyConfig, StatsAccumulator, build_plan, locate_window

ROOT = Path(__file__).resolve().parents[2]
PARAMS = {"seed": 0, "seq_len": 200, "compression_ratio": 0.75, "window_size": 16, "kernel_size": 5,
          "pyramid_beta": 2, "n_sink": 4}
# our settings that reproduce kvpress's definitions: head-wise selection, its budget rounding,
# no extra recent window, no redistribution, no 1% floor
COMMON = {"alpha": 1 - PARAMS["compression_ratio"], "granularity": "head", "redistribute": False,
          "recent_share": 0.0, "clip_min": 0.0, "text_only": "last_w", "window_size": PARAMS["window_size"]}
OURS = {
    "snapkv": {"method": "snapkv", "pool_kernel": PARAMS["kernel_size"]},
    "snapkv_kernel1": {"method": "vlcache", "window_mode": "last_w", "budget_fn": "uniform",
                       "protect_window": True, "pool_kernel": 1},
    "pyramidkv": {"method": "pyramidkv", "pyramid_beta": float(PARAMS["pyramid_beta"])},
    "streamingllm": {"method": "streamingllm", "n_sink": PARAMS["n_sink"]},
    "observed_attention": {"method": "h2o", "h2o_normalize": True},
}


@pytest.fixture(scope="module")
def kvpress_dump(tmp_path_factory) -> dict:
    setup = subprocess.run(["bash", str(ROOT / "scripts" / "setup_kvpress_env.sh")], check=True,
                           capture_output=True, text=True, timeout=1800)
    venv = Path(setup.stdout.strip().splitlines()[-1])
    tmp = tmp_path_factory.mktemp("kvpress")
    _save_tiny_llama(tmp / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1")
    out = tmp / "kvpress_kept.pt"
    run = subprocess.run([str(venv / "bin" / "python"), str(Path(__file__).with_name("kvpress_helper.py")),
                          str(tmp / "model"), str(out), json.dumps(PARAMS)],
                         capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(out, weights_only=True)


def _save_tiny_llama(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False)
    LlamaForCausalLM(config).float().save_pretrained(path)


def _our_plan(dump: dict, overrides: dict, chunked: bool):
    q, k, scale = dump["q"], dump["k"], dump["scale"]
    n_layers, (m, hq, _), hkv = len(q), q[0].shape, k[0].shape[1]
    extra = {"stats_dtype": "float32", "key_chunk": 24, "query_chunk": 5} if chunked else {"stats_dtype": "float64"}
    cfg = PolicyConfig().replace(**COMMON, **overrides, **extra)
    acc = StatsAccumulator(n_layers, hq, hkv, m, locate_window(m, [], cfg), cfg)
    bounds = [(0, 70), (70, 190), (190, m)] if chunked else [(0, m)]
    for a, b in bounds:  # chunked prefill: each chunk sees only the keys so far
        for layer in range(n_layers):
            acc.add(layer, q[layer][a:b], torch.arange(a, b), k[layer][:b], scale)
    return build_plan(acc)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked-f32"])
@pytest.mark.parametrize("press", sorted(OURS))
def test_same_kept_tokens_as_kvpress(kvpress_dump: dict, press: str, chunked: bool) -> None:
    assert kvpress_dump["versions"]["kvpress"] == "0.5.5"
    theirs = kvpress_dump["kept"][press]
    plan = _our_plan(kvpress_dump, OURS[press], chunked)
    assert not plan.is_identity
    for layer, ref in enumerate(theirs):
        assert plan.budgets[layer] == ref.shape[-1], (press, layer)
        for head in range(ref.shape[0]):
            ours, want = set(plan.head_kept[layer][head].tolist()), set(ref[head].tolist())
            assert ours == want, f"{press} layer {layer} head {head}: only ours {sorted(ours - want)}, " \
                                 f"only kvpress {sorted(want - ours)}"


def test_pyramid_budgets_are_a_real_pyramid(kvpress_dump: dict) -> None:
    sizes = [t.shape[-1] for t in kvpress_dump["kept"]["pyramidkv"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
