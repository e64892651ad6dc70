"""Which SGLang features the ``vlcache`` backend serves, and launch refusals for the rest.

Checked after ``ServerArgs.resolve_once`` (launcher and ``sglang.Engine``), before any model is loaded, so an
unsupported combination stops with a message that names the flag and what to do instead, rather
than crashing inside a forward or serving uncompressed in silence. The README's compatibility
matrix lists every row with its test. Pure: reads attributes of ``ServerArgs`` only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlcache_sglang.settings import COMPRESSING_CUDA_EXECUTORS, ENV_CUDA_EXECUTOR, ServerSettings

#: Opt-in for the per-layer executor on CUDA (not yet passed in a whole SGLang server on a GPU).
CUDA_OPT_IN = f"{ENV_CUDA_EXECUTOR}=flashinfer --cuda-graph-backend-prefill=disabled"
#: Opt-in for the SDPA executor on CUDA (passed a whole-server run on an H200 in float32).
TORCH_OPT_IN = (f"{ENV_CUDA_EXECUTOR}=torch --cuda-graph-backend-decode=disabled "
                "--cuda-graph-backend-prefill=disabled")


@dataclass(frozen=True)
class Refusal:
    """One unsupported setting: the flag as the user typed it, why, and what to do instead."""

    flag: str
    why: str
    instead: str

    def message(self) -> str:
        return f"{self.flag}: {self.why}; {self.instead}"


def _get(server_args: Any, name: str, default: Any = None) -> Any:
    return getattr(server_args, name, default)


def refusals(server_args: Any, settings: ServerSettings) -> list[Refusal]:
    """Every reason this launch of ``--attention-backend vlcache`` cannot be served correctly."""
    out: list[Refusal] = []
    if _get(server_args, "speculative_algorithm"):
        out.append(Refusal(
            f"--speculative-algorithm {server_args.speculative_algorithm}",
            "speculative decoding is not supported by the vlcache backend (target-verify forwards "
            "would be compacted again; the draft worker would wrap the KV allocator twice)",
            "drop the flag, or serve speculative decoding with --attention-backend flashinfer/triton"))
    if int(_get(server_args, "pp_size", 1) or 1) > 1:
        out.append(Refusal(f"--pp-size {server_args.pp_size}",
                           "pipeline parallelism is not supported (per-layer plans need every layer in one process)",
                           "use --pp-size 1"))
    if int(_get(server_args, "page_size", 1) or 1) > 1:
        out.append(Refusal(f"--page-size {server_args.page_size}",
                           "compaction moves single KV slots; the paged allocator frees whole pages and "
                           "would bypass the plugin's virtual-id filter",
                           "use --page-size 1 (the default)"))
    if _get(server_args, "enable_lora") or _get(server_args, "lora_paths"):
        out.append(Refusal("--enable-lora / --lora-paths", "LoRA adapters are not supported with compression yet",
                           "serve the adapter with another --attention-backend, or merge it into the weights"))
    if int(_get(server_args, "dp_size", 1) or 1) > 1 or _get(server_args, "enable_dp_attention"):
        out.append(Refusal("--dp-size / --enable-dp-attention",
                           "data-parallel attention is not supported with compression",
                           "run one server per GPU behind SGLang's router (sglang_router) instead"))
    if str(_get(server_args, "disaggregation_mode", "null") or "null") != "null":
        out.append(Refusal(f"--disaggregation-mode {server_args.disaggregation_mode}",
                           "prefill/decode disaggregation would transfer the uncompacted pool layout",
                           "serve without disaggregation"))
    if _get(server_args, "enable_hierarchical_cache"):
        out.append(Refusal("--enable-hierarchical-cache", "HiCache's host copies do not know about compacted cells",
                           "drop the flag (the vlcache radix cache shares compressed prefixes on the device)"))
    # SGLang's registry refuses these too, but only in the scheduler after the model has loaded,
    # pointing at its own issue tracker; the vlcache tree extends RadixCache, not UnifiedRadixCache
    if _get(server_args, "enable_streaming_session"):
        out.append(Refusal("--enable-streaming-session",
                           "streaming sessions keep each turn's KV in SGLang's UnifiedRadixCache, which the "
                           "vlcache radix cache (compressed prefixes, virtual ids) does not extend",
                           "drop the flag and open sessions without `streaming` (served: each turn is "
                           "prefilled and planned over the whole conversation)"))
    if _get(server_args, "enable_session_radix_cache"):
        out.append(Refusal("--enable-session-radix-cache",
                           "session radix caching lives in SGLang's UnifiedRadixCache, which the vlcache radix "
                           "cache does not extend",
                           "drop the flag (sessions without it are served)"))
    if str(_get(server_args, "radix_eviction_policy", "lru") or "lru").lower() == "tlru":
        out.append(Refusal("--radix-eviction-policy tlru",
                           "T-LRU's per-node tail bookkeeping exists only in SGLang's UnifiedRadixCache",
                           "use --radix-eviction-policy lru (the default), lfu, slru or priority"))
    if _get(server_args, "enable_hisparse"):
        out.append(Refusal("--enable-hisparse", "HiSparse is another KV sparsification; it cannot stack with vlcache",
                           "choose one: drop --enable-hisparse or serve with another --attention-backend"))
    if _get(server_args, "enable_torch_compile"):
        out.append(Refusal("--enable-torch-compile", "the backend's host-side compaction cannot be compiled",
                           "drop the flag (decode CUDA graphs are supported)"))
    for phase in ("prefill", "decode"):
        other = _get(server_args, f"{phase}_attention_backend")
        if other and other != "vlcache":
            out.append(Refusal(f"--{phase}-attention-backend {other}",
                               f"{phase} would run {other}, which neither gathers statistics nor reads compacted cells",
                               f"drop --{phase}-attention-backend (vlcache serves both phases)"))
    if str(_get(server_args, "device", "") or "").startswith("cuda") and settings.compression.compresses \
            and settings.cuda_executor not in COMPRESSING_CUDA_EXECUTORS:
        out.append(Refusal(
            f"--vlcache-budget {settings.compression.budget:g} on CUDA",
            "by default CUDA serves SGLang's FlashInfer backend uncompressed (the compressing FlashInfer "
            "executor has not yet passed a whole-server run on a GPU)",
            f"opt in with {CUDA_OPT_IN} (or {TORCH_OPT_IN}: eager, any dtype), or launch with --vlcache-budget 1.0"))
    return out


def compresses_on(server_args: Any, settings: ServerSettings) -> bool:
    """Whether this server's backend compresses at all (CUDA without the opt-in does not)."""
    on_cuda = str(_get(server_args, "device", "") or "").startswith("cuda")
    return not on_cuda or settings.cuda_executor in COMPRESSING_CUDA_EXECUTORS


def not_compressing_message() -> str:
    return ("vlcache: this server does not compress (CUDA without the opt-in serves SGLang's FlashInfer "
            f"backend uncompressed); relaunch with {CUDA_OPT_IN}, or send the request without a budget below 1.0")
