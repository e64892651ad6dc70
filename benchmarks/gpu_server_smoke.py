"""First contact of a whole SGLang server with the vlcache backend on a GPU (issue: whole server).

    PYTHONPATH=out/gpu-site:. python3 benchmarks/gpu_server_smoke.py --out "$OUT"

Runs, one after the other, on the bundled model (bf16 weights are not needed: float32):

1. ``--attention-backend flashinfer`` (stock; ``--stock-backend torch_native`` for the CPU
   rehearsal): greedy tokens of one image question;
2. ``--attention-backend vlcache`` with the opt-in CUDA executor: the same question at budget 1.0
   (must equal 1.) and at budget 0.1 (its tokens must equal the HF reference applying the
   server's own plan), decode CUDA graphs on (SGLang's default), prefill graphs off.

Servers use SGLang's pure-torch fused ops (``SGLANG_FORCE_FUSED_OP_BACKEND=torch``), the torch
sampler and SDPA vision attention, because sgl-kernel cannot reach the lent machine. Every
server log is copied to ``--out``; a server that does not come up leaves its traceback there,
which names the op or import that blocked it. Writes ``server_smoke.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlcache_sglang.tooling.gpu_kit import GPU_SERVER_ARGS as GPU_PROFILE_ARGS  # noqa: E402
from vlcache_sglang.tooling.gpu_kit import GPU_SERVER_ENV as GPU_PROFILE_ENV  # noqa: E402

QUESTION = "What is the value of U?"


def ask(url: str, image_b64: str, budget: float | None, max_new: int = 12) -> dict:
    import requests

    prompt = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION
              + "<|im_end|>\n<|im_start|>assistant\n")
    params = {"max_new_tokens": max_new, "temperature": 0}
    if budget is not None:
        params["custom_params"] = {"vlcache": {"budget": budget, "return_plan": True}}
    r = requests.post(f"{url}/generate", json={"text": prompt, "image_data": image_b64, "sampling_params": params},
                      timeout=600)
    r.raise_for_status()
    return r.json()


#: the vlcache server's own switches beside the GPU profile (the benchmark serves with the same)
VLCACHE_EXTRA_ARGS = ["--cuda-graph-backend-prefill=disabled"]


def stop_servers_on_sigterm() -> None:
    """``timeout`` (scripts/gpu_session.sh) sends SIGTERM: leave through ``running_server``'s
    ``finally`` so the server's process group is stopped, not left holding the GPU."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def serve(model: Path, backend: str, out: Path, name: str, extra_args: list[str], fn, **launch) -> dict:
    """``fn(url)`` against one server with the GPU profile; ``launch`` overrides
    ``running_server``'s keywords (``startup_timeout``, ``max_total_tokens``, ...)."""
    from vlcache_sglang.tooling.serving import running_server

    log = out / f"server_{name}.log"
    launch = {"startup_timeout": 600, "max_total_tokens": 20000, **launch}
    try:
        with running_server(model, attention_backend=backend, extra_args=GPU_PROFILE_ARGS + extra_args,
                            extra_env={**GPU_PROFILE_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                            log_path=log, **launch) as server:
            return {"ok": True, **fn(server.url)}
    except Exception as exc:  # keep going: the log says what blocked it
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:], "traceback": traceback.format_exc()[-4000:]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stock-backend", default="flashinfer",
                    help="the stock backend to compare with (CPU rehearsal: torch_native)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stop_servers_on_sigterm()
    from tests.conftest import make_test_image, png_base64
    from vlcache_sglang.bundled import bundled_model_dir

    model = bundled_model_dir()
    image = make_test_image(3, (224, 224))
    b64 = png_base64(image)
    report: dict = {"model": str(model)}
    report["stock"] = serve(model, args.stock_backend, args.out, "stock", [], lambda url: {"tokens": ask(url, b64, None)["output_ids"]})

    def vlcache(url):
        full, low = ask(url, b64, 1.0), ask(url, b64, 0.1)
        return {"tokens_budget_1": full["output_ids"], "tokens_budget_01": low["output_ids"],
                "kept_ratio": low["meta_info"].get("vlcache_kept_ratio"),
                "kept": low["meta_info"].get("vlcache_kept_positions"), "prompt_tokens": low["meta_info"]["prompt_tokens"]}

    report["vlcache"] = serve(model, "vlcache", args.out, "vlcache", VLCACHE_EXTRA_ARGS, vlcache)
    v, s = report["vlcache"], report["stock"]
    if v.get("ok") and s.get("ok"):
        report["budget_1_equals_stock"] = v["tokens_budget_1"] == s["tokens"]
    if v.get("ok") and v.get("kept"):
        try:
            import torch
            from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

            from vlcache_sglang.research.hf_reference import greedy_with_plan

            hf = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=torch.float32).eval()
            proc = AutoProcessor.from_pretrained(model)
            text = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + QUESTION
                    + "<|im_end|>\n<|im_start|>assistant\n")
            inputs = proc(text=[text], images=[image], return_tensors="pt")
            eos = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
            expected = greedy_with_plan(hf, dict(inputs), [torch.tensor(k) for k in v["kept"][0]], 12, eos)
            report["budget_01_equals_hf_plan"] = expected == v["tokens_budget_01"]
        except Exception:
            report["hf_reference_error"] = traceback.format_exc()[-3000:]
    (args.out / "server_smoke.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report.get(k) for k in ("budget_1_equals_stock", "budget_01_equals_hf_plan")}),
          "stock ok:", s.get("ok"), "vlcache ok:", v.get("ok"))
    for name in ("stock", "vlcache"):
        if not report[name].get("ok"):
            print(f"--- {name} server failed: {report[name]['error'][:2000]}")
    return 0 if report.get("budget_1_equals_stock") and report.get("budget_01_equals_hf_plan") else 1


if __name__ == "__main__":
    raise SystemExit(main())
