"""First contact of a whole SGLang server with the vlcache backend on a GPU (issue: whole server).

    PYTHONPATH=out/gpu-site:.:vlcache_sglang/cpu_runtime/sgl_kernel_placeholder \\
        python3 benchmarks/gpu_server_smoke.py --out "$OUT" [--phases fp32-torch bf16-flashinfer]

Each phase serves the bundled model twice (on CUDA both servers start at once, so their imports
and FlashInfer JIT builds overlap; they are asked one after the other):

1. the stock backend the vlcache executor follows op for op: greedy tokens of one image question;
2. ``--attention-backend vlcache`` with that executor: the same question at budget 1.0 (must equal
   1.), at budget 0.1 (its tokens must equal the HF reference applying the server's own plan),
   then four requests alone and the same four at once (two images x budgets 1.0 / 0.1: one batch
   mixing compressed and uncompressed requests, tokens equal to alone), a repeat with ``prefix``
   sharing (a radix hit, the same plan and tokens) and two questions with ``compressed`` sharing,
   and finally the pool and every store of the plugin back at their values after a flush.

Every comparison is exact. Where one fails, ``divergences`` says where the greedy tokens first
differ and how far apart each server run's two most likely tokens were there (in nats, from the
request's own ``top_logprobs``): different attention kernels in bfloat16 may break a near-tie the
other way (a gap of a few hundredths in both runs), which a wrong plan or a wrong key list does not
look like (a wide gap, often at the first token). The verdict stays the exact one.

Phases (run in this order, each skipped when the ``--deadline`` would not leave it enough time):

* ``fp32-torch``: float32, stock ``torch_native`` against ``VLCACHE_CUDA_EXECUTOR=torch`` (the SDPA
  executor on the GPU, statistics and compaction by the Triton kernels), CUDA graphs off. FlashInfer
  has no float32 kernels, so this is the float32 anchor, and it needs no FlashInfer JIT build.
* ``bf16-flashinfer``: bfloat16, the bundled weights regrouped into heads of 64 (FlashInfer has no
  head dim 32: on the H200 the stock server failed its graph capture with ``Unsupported head_dim:
  32``), stock ``flashinfer`` against ``VLCACHE_CUDA_EXECUTOR=flashinfer`` with decode CUDA graphs on (SGLang's default; ``graph_decode_steps`` counts the replays, and
  ``graph_decode_steps_compressed`` those whose batch read per-layer lists), prefill graphs off.
  The HF reference runs in bfloat16 on the same device.

Servers use SGLang's pure-torch fused ops (``SGLANG_FORCE_FUSED_OP_BACKEND=torch``), the torch
sampler and SDPA vision attention, because sgl-kernel cannot reach the lent machine. Every server
log is copied to ``--out``; a server that does not come up leaves its traceback there, which names
the op or import that blocked it. Writes ``server_smoke.json`` after every phase. CPU rehearsal:
``--stock-backend torch_native`` (every phase's stock server is then ``torch_native``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlcache_sglang.tooling.gpu_kit import GPU_SERVER_ARGS as GPU_PROFILE_ARGS  # noqa: E402
from vlcache_sglang.tooling.gpu_kit import GPU_SERVER_ENV as GPU_PROFILE_ENV  # noqa: E402

QUESTION = "What is the value of U?"
OTHER_QUESTION = "What is the value of B?"
GRAPHS_OFF = ["--cuda-graph-backend-decode=disabled", "--cuda-graph-backend-prefill=disabled"]
#: the vlcache server's own switches beside the GPU profile (the benchmark serves with the same)
VLCACHE_EXTRA_ARGS = ["--cuda-graph-backend-prefill=disabled"]
#: FlashInfer has no head dim 32 (the bundled model's): its phases serve the bundled weights
#: regrouped into heads of 64 (:func:`vlcache_sglang.research.tinyvlm.variants.head_dim_variant`)
FLASHINFER_HEAD_DIM = 64
#: name -> dtype, stock backend, stock args, vlcache env, vlcache args, seconds it needs at least
PHASES = {
    "fp32-torch": dict(dtype="float32", stock="torch_native", stock_args=GRAPHS_OFF,
                       env={"VLCACHE_CUDA_EXECUTOR": "torch"}, args=GRAPHS_OFF, needs_s=90),
    "bf16-flashinfer": dict(dtype="bfloat16", stock="flashinfer", stock_args=[], head_dim=FLASHINFER_HEAD_DIM,
                            env={"VLCACHE_CUDA_EXECUTOR": "flashinfer"}, args=VLCACHE_EXTRA_ARGS, needs_s=150),
}
#: the plugin's stores that must come back to their values after a workload and a flush
STORES = ("available_kv_tokens", "evictable_kv_tokens", "virtual_ids_live", "cell_slots_live",
          "pending_statistics", "resolved_rows_live", "row_flags_live", "compressed_requests_live")


def prompt(question: str) -> str:
    return ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>" + question
            + "<|im_end|>\n<|im_start|>assistant\n")


def ask(url: str, image_b64: str, budget: float | None, max_new: int = 12, question: str = QUESTION,
        sharing: str | None = None) -> dict:
    import requests

    params = {"max_new_tokens": max_new, "temperature": 0}
    if budget is not None:
        params["custom_params"] = {"vlcache": {"budget": budget, "return_plan": True,
                                               **({"sharing": sharing} if sharing else {})}}
    # the two most likely tokens at every step, for the divergence diagnosis (greedy tokens unchanged)
    r = requests.post(f"{url}/generate", json={"text": prompt(question), "image_data": image_b64,
                                               "sampling_params": params, "return_logprob": True,
                                               "top_logprobs_num": 2}, timeout=600)
    r.raise_for_status()
    return r.json()


def top2(response: dict) -> list[list[tuple[float, int]]]:
    """Per generated token, the server's two most likely ``(logprob, token id)``."""
    return [[(float(lp), int(tok)) for lp, tok, *_ in pos[:2]]
            for pos in response["meta_info"].get("output_top_logprobs") or []]


def stock_tokens(url: str, image_b64: str) -> dict:
    """The stock server's greedy tokens of the question and their :func:`top2`."""
    r = ask(url, image_b64, None)
    return {"tokens": r["output_ids"], "top": top2(r)}


def divergence(a: list[int], b: list[int], a_top: list | None = None, b_top: list | None = None) -> dict | None:
    """None when ``a == b``; else the first index where they differ and, per run with its
    :func:`top2`, the gap in nats between its two most likely tokens there (a near-tie when small)."""
    if a == b:
        return None
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    out: dict = {"index": i, "a": a[i] if i < len(a) else None, "b": b[i] if i < len(b) else None}
    for side, top in (("a", a_top), ("b", b_top)):
        if top is not None and i < len(top) and len(top[i]) == 2:
            out[f"gap_nats_{side}"] = round(top[i][0][0] - top[i][1][0], 5)
    return out


def stop_servers_on_sigterm() -> None:
    """``timeout`` (scripts/gpu_session.sh) sends SIGTERM: leave through ``running_server``'s
    ``finally`` so the server's process group is stopped, not left holding the GPU."""
    import signal

    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def launch_spec(model: Path, backend: str, out: Path, name: str, extra_args: list[str], env: dict | None = None,
                **launch) -> dict:
    """:func:`~vlcache_sglang.tooling.serving.start_server`'s keywords for one server with the GPU
    profile; ``launch`` overrides the defaults (``startup_timeout``, ``max_total_tokens``, ...)."""
    return {"model_path": model, "attention_backend": backend, "log_path": out / f"server_{name}.log",
            "extra_args": GPU_PROFILE_ARGS + extra_args,
            "extra_env": {**GPU_PROFILE_ENV, **(env or {}), "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            **{"startup_timeout": 600, "max_total_tokens": 20000, **launch}}


def serve_all(jobs: list[tuple[dict, object]], together: bool) -> list[dict]:
    """``fn(url)`` against each ``(launch_spec, fn)`` server, in order, one at a time. ``together``:
    all servers start at once (imports, weight loading and FlashInfer JIT builds overlap; the GPU
    holds them all), else each starts after the previous one stopped. A server that fails to start
    or whose ``fn`` raises gives ``{"ok": False, ...}`` (its log says what blocked it)."""
    from vlcache_sglang.tooling.serving import running_servers

    def failed(exc: BaseException) -> dict:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[-4000:],
                "traceback": "".join(traceback.format_exception(exc))[-4000:]}

    results: list[dict] = []
    groups = [list(range(len(jobs)))] if together else [[i] for i in range(len(jobs))]
    for group in groups:
        started = time.monotonic()
        with running_servers({str(i): jobs[i][0] for i in group}) as handles:
            up = round(time.monotonic() - started, 1)
            for i in group:
                handle = handles[str(i)]
                if isinstance(handle, Exception):
                    results.append(failed(handle))
                    continue
                try:
                    results.append({"ok": True, "startup_s": up, **jobs[i][1](handle.url)})
                except Exception as exc:  # keep going: the log says what blocked it
                    results.append(failed(exc))
    return results


def serve(model: Path, backend: str, out: Path, name: str, extra_args: list[str], fn, env: dict | None = None,
          **launch) -> dict:
    """``fn(url)`` against one server with the GPU profile (see :func:`launch_spec`)."""
    return serve_all([(launch_spec(model, backend, out, name, extra_args, env, **launch), fn)], together=False)[0]


def vlcache_checks(url: str, images: list[str]) -> dict:
    """Every whole-server check on one vlcache server (see the module docstring)."""
    from vlcache_sglang.tooling.serving import flush_cache, settled_state

    flush_cache(url)
    start = settled_state(url)
    full, low = ask(url, images[0], 1.0), ask(url, images[0], 0.1)
    res = {"tokens_budget_1": full["output_ids"], "tokens_budget_01": low["output_ids"],
           "top_budget_1": top2(full), "top_budget_01": top2(low),
           "kept_ratio": low["meta_info"].get("vlcache_kept_ratio"),
           "kept": low["meta_info"].get("vlcache_kept_positions"), "prompt_tokens": low["meta_info"]["prompt_tokens"]}
    # one batch that mixes compressed and uncompressed requests (decode graphs replay it when on)
    cases = [(img, b) for img in images for b in (1.0, 0.1)]
    flush_cache(url)
    alone = [ask(url, img, b, max_new=16) for img, b in cases]
    flush_cache(url)
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        together = [f.result() for f in [pool.submit(ask, url, img, b, 16) for img, b in cases]]
    res["mixed_batch_equals_alone"] = [r["output_ids"] for r in together] == [r["output_ids"] for r in alone]
    diverged = {f"mixed_batch_{i}": divergence(x["output_ids"], y["output_ids"], top2(x), top2(y))
                for i, (x, y) in enumerate(zip(alone, together))}
    # prefix sharing: the same request again hits the radix tree, same plan, same tokens
    again = ask(url, images[0], 0.1, sharing="prefix")
    res["prefix_hit_cached_tokens"] = again["meta_info"].get("cached_tokens")
    res["prefix_sharing_equal"] = (again["output_ids"] == low["output_ids"]
                                   and again["meta_info"].get("vlcache_kept_positions") == res["kept"])
    diverged["prefix_sharing"] = divergence(low["output_ids"], again["output_ids"], top2(low), top2(again))
    # compressed sharing: the first question is unshared (equal to budget 0.1 above), the second
    # reads its compressed image
    flush_cache(url)
    first = ask(url, images[0], 0.1, sharing="compressed")
    second = ask(url, images[0], 0.1, sharing="compressed", question=OTHER_QUESTION)
    res["compressed_sharing_first_equal"] = first["output_ids"] == low["output_ids"]
    diverged["compressed_sharing_first"] = divergence(low["output_ids"], first["output_ids"], top2(low), top2(first))
    res["divergences"] = {k: d for k, d in diverged.items() if d is not None}
    res["compressed_sharing_second_cached_tokens"] = second["meta_info"].get("cached_tokens")
    flush_cache(url)
    end = settled_state(url)
    res["stores_back_at_start"] = {k: (start.get(k), end.get(k)) for k in STORES if start.get(k) != end.get(k)} or True
    res["counters"] = {k: end.get(k) for k in ("requests_compressed", "kv_tokens_saved", "graph_decode_steps",
                                               "graph_decode_steps_compressed", "freed_reads",
                                               "plans_from_incomplete_statistics")}
    return res


def hf_reference(model: Path, image, kept, dtype: str) -> list[int]:
    """The HF model's greedy tokens with each layer's cache cut to the server's plan, in ``dtype``
    (bfloat16 on the GPU when there is one)."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from vlcache_sglang.research.hf_reference import greedy_with_plan

    torch_dtype = getattr(torch, dtype)
    device = "cuda" if dtype != "float32" and torch.cuda.is_available() else "cpu"
    hf = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=torch_dtype).to(device).eval()
    proc = AutoProcessor.from_pretrained(model)
    inputs = {k: v.to(device) for k, v in proc(text=[prompt(QUESTION)], images=[image], return_tensors="pt").items()}
    eos = [proc.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return greedy_with_plan(hf, inputs, [torch.tensor(k) for k in kept[0]], 12, eos)


def model_for(bundled: Path, head_dim: int | None) -> Path:
    """The bundled model, or its variant regrouped into heads of ``head_dim`` (written to /tmp)."""
    if not head_dim:
        return bundled
    import tempfile

    from vlcache_sglang.research.tinyvlm.variants import head_dim_variant

    return head_dim_variant(bundled, Path(tempfile.gettempdir()) / f"vlcache-{bundled.name}-hd{head_dim}", head_dim)


def run_phase(name: str, spec: dict, model: Path, out: Path, stock_backend: str | None, image, images: list[str],
              together: bool = False) -> dict:
    model = model_for(model, spec.get("head_dim"))
    dtype_args = ["--dtype", spec["dtype"]]
    stock = stock_backend or spec["stock"]
    stock_args = spec["stock_args"] if stock == spec["stock"] else GRAPHS_OFF
    phase: dict = {"dtype": spec["dtype"], "model": str(model), "stock_backend": stock, "vlcache_env": spec["env"]}
    phase["together"] = together
    phase["stock"], phase["vlcache"] = serve_all([
        (launch_spec(model, stock, out, f"stock_{name}", dtype_args + stock_args),
         lambda url: stock_tokens(url, images[0])),
        (launch_spec(model, "vlcache", out, f"vlcache_{name}", dtype_args + spec["args"], env=spec["env"]),
         lambda url: vlcache_checks(url, images)),
    ], together)
    v, s = phase["vlcache"], phase["stock"]
    divergences = dict(v.get("divergences") or {})
    if v.get("ok") and s.get("ok"):
        phase["budget_1_equals_stock"] = v["tokens_budget_1"] == s["tokens"]
        divergences["budget_1_vs_stock"] = divergence(s["tokens"], v["tokens_budget_1"], s.get("top"),
                                                      v.get("top_budget_1"))
    if v.get("ok") and v.get("kept"):
        try:
            expected = hf_reference(model, image, v["kept"], spec["dtype"])
            phase["hf_plan_tokens"] = expected
            phase["budget_01_equals_hf_plan"] = expected == v["tokens_budget_01"]
            divergences["budget_01_vs_hf_plan"] = divergence(expected, v["tokens_budget_01"], None,
                                                             v.get("top_budget_01"))
        except Exception:
            phase["hf_reference_error"] = traceback.format_exc()[-3000:]
    phase["divergences"] = {k: d for k, d in divergences.items() if d is not None}
    checks = ("budget_1_equals_stock", "budget_01_equals_hf_plan")
    phase["passed"] = bool(all(phase.get(k) for k in checks) and v.get("mixed_batch_equals_alone")
                           and v.get("prefix_sharing_equal") and v.get("compressed_sharing_first_equal")
                           and v.get("stores_back_at_start") is True)
    return phase


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    ap.add_argument("--stock-backend", default=None,
                    help="serve every phase's stock server with this backend (CPU rehearsal: torch_native)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from now after which no phase starts that needs more than what is left")
    ap.add_argument("--together", action=argparse.BooleanOptionalAction, default=None,
                    help="start a phase's two servers at once (default: on CUDA; on a 2-core CPU an idle "
                         "server keeps a core busy)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stop_servers_on_sigterm()
    t0 = time.monotonic()
    from tests.conftest import make_test_image, png_base64
    from vlcache_sglang.bundled import bundled_model_dir
    from vlcache_sglang.tooling.serving import has_cuda

    together = has_cuda() if args.together is None else args.together
    model = bundled_model_dir()
    image = make_test_image(3, (224, 224))
    images = [png_base64(image), png_base64(make_test_image(5, (224, 224)))]
    report: dict = {"model": str(model), "phases": {}}
    path = args.out / "server_smoke.json"
    for name in args.phases:
        left = None if args.deadline is None else args.deadline - (time.monotonic() - t0)
        if left is not None and left < PHASES[name]["needs_s"]:
            report["phases"][name] = {"skipped": f"{left:.0f} s left of the deadline"}
            continue
        started = time.monotonic()
        report["phases"][name] = run_phase(name, PHASES[name], model, args.out, args.stock_backend, image, images,
                                           together)
        report["phases"][name]["wall_s"] = round(time.monotonic() - started, 1)
        path.write_text(json.dumps(report, indent=1))
        ph = report["phases"][name]
        print(f"[{name}]", json.dumps({k: ph.get(k) for k in ("budget_1_equals_stock", "budget_01_equals_hf_plan",
                                                             "passed", "wall_s", "divergences")}),
              "stock ok:", ph["stock"].get("ok"), "vlcache ok:", ph["vlcache"].get("ok"), flush=True)
        v = ph["vlcache"]
        if v.get("ok"):
            print(f"[{name}] vlcache:", json.dumps({k: v.get(k) for k in (
                "startup_s", "kept_ratio", "mixed_batch_equals_alone", "prefix_sharing_equal",
                "prefix_hit_cached_tokens", "compressed_sharing_first_equal",
                "compressed_sharing_second_cached_tokens", "stores_back_at_start", "counters")}), flush=True)
        for side in ("stock", "vlcache"):
            if not ph[side].get("ok"):
                print(f"--- [{name}] {side} server failed: {ph[side]['error'][:2000]}", flush=True)
    path.write_text(json.dumps(report, indent=1))
    ran = [p for p in report["phases"].values() if "skipped" not in p]
    return 0 if ran and all(p["passed"] for p in ran) else 1


if __name__ == "__main__":
    raise SystemExit(main())
