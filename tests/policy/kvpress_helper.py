"""Runs inside the kvpress venv (scripts/setup_kvpress_env.sh), never imported by pytest.

    python kvpress_helper.py MODEL_DIR OUT.pt PARAMS_JSON

Loads the tiny HF model saved by the test, captures each layer's post-RoPE queries and keys on
one uncompressed prefill, then prefills again under each kvpress press and records which key
positions each press kept per layer and KV head (recovered by matching the compressed keys
against the input keys inside ``press.compress``). Everything goes to OUT.pt.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.models.llama.modeling_llama import rotate_half

from kvpress import ObservedAttentionPress, PyramidKVPress, SnapKVPress, StreamingLLMPress
from kvpress.utils import get_prerope_query_states


def capture_qk(model, input_ids):
    """Post-RoPE q ``[m, Hq, D]`` and k ``[m, Hkv, D]`` per layer, and the softmax scale."""
    layers = model.model.layers
    qs: dict[int, torch.Tensor] = {}
    scale = {}

    def hook(module, args, kwargs, output):
        q = get_prerope_query_states(module, kwargs["hidden_states"])  # [1, Hq, m, D]
        cos, sin = kwargs["position_embeddings"]
        q = q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1)
        qs[module.layer_idx] = q[0].transpose(0, 1).contiguous()
        scale[module.layer_idx] = float(module.scaling)
        return output

    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    cache = DynamicCache()
    try:
        with torch.no_grad():
            model(input_ids, past_key_values=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    ks = [cache.layers[i].keys[0].transpose(0, 1).contiguous() for i in range(len(layers))]
    return [qs[i] for i in range(len(layers))], ks, scale[0]


def kept_indices(press, model, input_ids):
    """Per layer ``[Hkv, n_kept]`` sorted positions kept by ``press``."""
    kept: dict[int, torch.Tensor] = {}
    original = press.compress

    def compress(module, hidden_states, keys, values, attentions, kwargs):
        new_k, new_v = original(module, hidden_states, keys, values, attentions, kwargs)
        eq = (new_k[0][:, :, None, :] == keys[0][:, None, :, :]).all(-1)  # [Hkv, n, m]
        assert bool((eq.sum(-1) == 1).all()), "kept keys do not map to unique input positions"
        kept[module.layer_idx] = eq.float().argmax(-1).sort(-1).values
        return new_k, new_v

    press.compress = compress
    with torch.no_grad(), press(model):
        model(input_ids, past_key_values=DynamicCache(), use_cache=True)
    return [kept[i] for i in range(len(model.model.layers))]


def main() -> None:
    model_dir, out_path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.manual_seed(params["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    input_ids = torch.randint(0, model.config.vocab_size, (1, params["seq_len"]))
    qs, ks, scale = capture_qk(model, input_ids)
    cr, w = params["compression_ratio"], params["window_size"]
    presses = {
        "snapkv": SnapKVPress(compression_ratio=cr, window_size=w, kernel_size=params["kernel_size"]),
        "pyramidkv": PyramidKVPress(compression_ratio=cr, window_size=w, kernel_size=params["kernel_size"],
                                    beta=params["pyramid_beta"]),
        "snapkv_kernel1": SnapKVPress(compression_ratio=cr, window_size=w, kernel_size=1),
        "streamingllm": StreamingLLMPress(compression_ratio=cr, n_sink=params["n_sink"]),
        "observed_attention": ObservedAttentionPress(compression_ratio=cr),
    }
    kept = {name: kept_indices(press, model, input_ids) for name, press in presses.items()}
    torch.save({"q": qs, "k": ks, "scale": scale, "kept": kept, "params": params,
                "versions": {"kvpress": version("kvpress"), "transformers": transformers.__version__,
                             "torch": str(torch.__version__)}},
               out_path)
    print(json.dumps({name: [int(t.shape[-1]) for t in v] for name, v in kept.items()}))


if __name__ == "__main__":
    main()
