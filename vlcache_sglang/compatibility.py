"""Which SGLang features the ``vlcache`` backend serves, and launch refusals for the rest.

Checked after ``ServerArgs.resolve_once`` (launcher and ``sglang.Engine``), before any model is loaded, so an
unsupported combination stops with a message that names the flag and what to do instead, rather
than crashing inside a forward or serving uncompressed in silence. The README's compatibility
matrix lists the rows users ask about; docs/sglang-flags.md (from ``sglang_flags.tsv``) every field.
Pure: reads ``ServerArgs`` (its fields and SGLang's resolution record) only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlcache_sglang.settings import COMPRESSING_CUDA_EXECUTORS, ENV_CUDA_EXECUTOR, ServerSettings

#: ``--kv-cache-dtype`` values whose pool keeps one scale per block of tokens.
BLOCK_SCALED_KV_DTYPES = ("mxfp8", "nvfp4", "fp4_mx_block16")
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
    """The value SGLang's resolution settled on (it turns some features on itself: ``--attn-dp-size``
    for ``--dwdp-size``, a platform's page size), else the field as given."""
    try:
        from sglang.srt.arg_groups.overrides import resolution_result
    except ImportError:  # the policy-only install: plain attributes
        return getattr(server_args, name, default)
    if not hasattr(type(server_args), "__struct_fields__"):
        return getattr(server_args, name, default)
    value = resolution_result(server_args, name, default)
    return getattr(server_args, name, default) if value is None else value


def _both(server_args: Any, name: str, default: Any = None) -> tuple[Any, Any]:
    """The resolved value and the value as typed: a refusal fires whether the user typed the
    feature or SGLang's resolution turned it on."""
    return _get(server_args, name, default), getattr(server_args, name, default)


def _largest(server_args: Any, name: str) -> int:
    """The larger of :func:`_both` for a size (unset counts as 1)."""
    return max(int(v or 1) for v in _both(server_args, name, 1))


def _other_than(server_args: Any, name: str, *served: Any) -> Any:
    """The first of :func:`_both` that is set and not one of ``served`` (else ``None``)."""
    return next((v for v in _both(server_args, name) if v not in (None, "", *served)), None)


#: Features that run their own copy, transfer, layout or kernel over the KV cache, or change which
#: tokens a request's rows hold, none of which knows about compacted cells or virtual ids:
#: (field, the flag as typed, why, what to do instead). Refused when the field is truthy.
UNSERVED_SWITCHES: tuple[tuple[str, str, str, str], ...] = (
    ("enable_hierarchical_cache", "--enable-hierarchical-cache", "HiCache's host copies do not know about "
     "compacted cells", "drop the flag (the vlcache radix cache shares compressed prefixes on the device)"),
    # SGLang's registry refuses these two as well, but only in the scheduler after the model has loaded,
    # pointing at its own issue tracker; the vlcache tree extends RadixCache, not UnifiedRadixCache
    ("enable_streaming_session", "--enable-streaming-session", "streaming sessions keep each turn's KV in "
     "SGLang's UnifiedRadixCache, which the vlcache radix cache (compressed prefixes, virtual ids) does not extend",
     "drop the flag and open sessions without `streaming` (served: each turn is prefilled and planned over the "
     "whole conversation)"),
    ("enable_session_radix_cache", "--enable-session-radix-cache", "session radix caching lives in SGLang's "
     "UnifiedRadixCache, which the vlcache radix cache does not extend", "drop the flag (sessions without it are served)"),
    ("enable_hisparse", "--enable-hisparse", "HiSparse is another KV sparsification; it cannot stack with vlcache",
     "choose one: drop --enable-hisparse or serve with another --attention-backend"),
    ("enable_torch_compile", "--enable-torch-compile", "the backend's host-side compaction cannot be compiled",
     "drop the flag (decode CUDA graphs are supported)"),
    ("enable_lmcache", "--enable-lmcache", "LMCache offloads and reloads KV pages by slot, and its tree is "
     "replaced by the vlcache radix cache", "drop the flag (the vlcache radix cache shares prefixes on the device)"),
    ("enable_flexkv", "--enable-flexkv", "FlexKV offloads and reloads KV by slot, and its tree is replaced by the "
     "vlcache radix cache", "drop the flag"),
    ("hicache_storage_backend", "--hicache-storage-backend", "HiCache storage writes and prefetches KV by slot "
     "through tree methods the vlcache radix cache does not have", "drop the flag"),
    ("enable_unified_cache_external_linker", "--enable-unified-cache-external-linker",
     "the external L3 linker belongs to SGLang's UnifiedRadixCache", "drop the flag"),
    ("enable_pdmux", "--enable-pdmux", "PD multiplexing builds several attention backends over one pool and "
     "splits prefills by layer range", "drop the flag"),
    ("enable_two_batch_overlap", "--enable-two-batch-overlap", "two-batch overlap splits each batch into "
     "sub-batches, each with its own attention backend", "drop the flag"),
    ("enable_mis", "--enable-mis", "multi-item scoring needs FlashInfer's custom masks", "serve scoring with "
     "--attention-backend flashinfer"),
    ("enable_deterministic_inference", "--enable-deterministic-inference", "the vlcache kernels are not "
     "batch-invariant", "drop the flag, or serve deterministic inference with --attention-backend flashinfer/triton/fa3"),
    ("rl_on_policy_target", "--rl-on-policy-target", "on-policy RL needs batch-invariant (deterministic) "
     "attention, which vlcache is not", "drop the flag, or use --attention-backend flashinfer/triton/fa3"),
    ("enable_nvidia_megakernel", "--enable-nvidia-megakernel", "the megakernel replaces the decode forward and "
     "reads the KV pool itself, past vlcache's per-layer lists", "drop the flag"),
    ("enable_amd_monokernel", "--enable-amd-monokernel", "the monokernel replaces the decode forward and reads "
     "the KV pool itself, past vlcache's per-layer lists", "drop the flag"),
    ("moe_dense_tp_size", "--moe-dense-tp-size", "it turns on attention-TP gathering, which pads batches with rows "
     "that belong to no request", "drop the flag"),
    ("language_only", "--language-only", "in encoder disaggregation the image spans arrive from the encoder "
     "server, a path not validated with compression", "serve the vision encoder in the same server (drop the flag)"),
    ("enable_memory_saver", "--enable-memory-saver", "releasing and resuming the KV pool has not been validated "
     "with compacted cells and the backend's device tables", "drop the flag"),
    ("is_embedding", "--is-embedding", "an embedding request keeps no KV after its prefill, so compression only "
     "costs", "serve embeddings with another --attention-backend"),
    ("enable_prefill_cp", "--enable-prefill-cp", "prefill context parallelism gives each rank a slice of the "
     "prompt; the vlcache backend would plan and keep from that slice only", "drop the flag"),
    ("enable_return_routed_experts", "--enable-return-routed-experts", "a finished request's routed experts are "
     "read from a host buffer indexed by its req_to_token row, which after compaction holds virtual ids past that "
     "buffer and slots freed to other requests", "drop the flag (MoE models are served without it)"),
)


def refusals(server_args: Any, settings: ServerSettings) -> list[Refusal]:
    """Every reason this launch of ``--attention-backend vlcache`` cannot be served correctly."""
    out: list[Refusal] = []
    if algo := _other_than(server_args, "speculative_algorithm"):
        out.append(Refusal(
            f"--speculative-algorithm {algo}",
            "speculative decoding is not supported by the vlcache backend (target-verify forwards "
            "would be compacted again; the draft worker would wrap the KV allocator twice)",
            "drop the flag, or serve speculative decoding with --attention-backend flashinfer/triton"))
    if (pp := _largest(server_args, "pp_size")) > 1:
        out.append(Refusal(f"--pp-size {pp}",
                           "pipeline parallelism is not supported (per-layer plans need every layer in one process)",
                           "use --pp-size 1"))
    if (page := _largest(server_args, "page_size")) > 1:
        out.append(Refusal(f"--page-size {page}",
                           "compaction moves single KV slots; the paged allocator frees whole pages and "
                           "would bypass the plugin's virtual-id filter",
                           "use --page-size 1 (the default)"))
    if any(_both(server_args, "enable_lora")) or any(_both(server_args, "lora_paths")):
        out.append(Refusal("--enable-lora / --lora-paths", "LoRA adapters are not supported with compression yet",
                           "serve the adapter with another --attention-backend, or merge it into the weights"))
    if max(_largest(server_args, "dp_size"), _largest(server_args, "attn_dp_size")) > 1 \
            or any(_both(server_args, "enable_dp_attention")):
        out.append(Refusal("--dp-size / --attn-dp-size / --enable-dp-attention",
                           "data-parallel attention is not supported with compression",
                           "run one server per GPU behind SGLang's router (sglang_router) instead"))
    if mode := _other_than(server_args, "disaggregation_mode", "null"):
        out.append(Refusal(f"--disaggregation-mode {mode}",
                           "prefill/decode disaggregation would transfer the uncompacted pool layout",
                           "serve without disaggregation"))
    if any(str(v).lower() == "tlru" for v in _both(server_args, "radix_eviction_policy")):
        out.append(Refusal("--radix-eviction-policy tlru",
                           "T-LRU's per-node tail bookkeeping exists only in SGLang's UnifiedRadixCache",
                           "use --radix-eviction-policy lru (the default), lfu, slru or priority"))
    for phase in ("prefill", "decode"):
        if other := _other_than(server_args, f"{phase}_attention_backend", "vlcache"):
            out.append(Refusal(f"--{phase}-attention-backend {other}",
                               f"{phase} would run {other}, which neither gathers statistics nor reads compacted cells",
                               f"drop --{phase}-attention-backend (vlcache serves both phases)"))
    for phase_flag, field in (("--dcp-size", "dcp_size"), ("--attn-cp-size", "attn_cp_size")):
        if (size := _largest(server_args, field)) > 1:
            out.append(Refusal(f"{phase_flag} {size}",
                               "context parallelism spreads one request's KV over ranks (widened slot ids), "
                               "which compaction and virtual ids do not know", f"use {phase_flag} 1"))
    if backend := _other_than(server_args, "radix_cache_backend", "vlcache"):
        out.append(Refusal(f"--radix-cache-backend {backend}",
                           "only the vlcache radix cache can hold compressed KV (virtual ids); another tree "
                           "would index, offload or evict slots it does not understand",
                           "drop --radix-cache-backend (vlcache is chosen), or --disable-radix-cache"))
    if dtype := next((v for v in _both(server_args, "kv_cache_dtype") if v in BLOCK_SCALED_KV_DTYPES), None):
        out.append(Refusal(f"--kv-cache-dtype {dtype}",
                           "block-scaled KV keeps a scale per block of tokens, so moving single slots would "
                           "separate values from their scales", "use --kv-cache-dtype auto, fp8_e4m3 or fp8_e5m2"))
    if canary := _other_than(server_args, "kv_canary", "none"):
        out.append(Refusal(f"--kv-canary {canary}",
                           "the canary re-reads every cached position through req_to_token, where compressed "
                           "positions are virtual ids", "use --kv-canary none (VLCACHE_DEBUG_CHECKS=1 checks "
                           "the plugin's reads)"))
    if a2a := _other_than(server_args, "moe_a2a_backend", "none"):
        out.append(Refusal(f"--moe-a2a-backend {a2a}",
                           "expert all-to-all turns on attention-TP gathering, which pads batches with rows that "
                           "belong to no request", "use --moe-a2a-backend none"))
    if "breakable" in _both(server_args, "cuda_graph_backend_decode"):
        out.append(Refusal("--cuda-graph-backend-decode breakable",
                           "breakable decode graphs replay segments the vlcache graph buffers were not built for",
                           "use --cuda-graph-backend-decode full (the default) or disabled"))
    if "transformers" in _both(server_args, "model_impl"):
        out.append(Refusal("--model-impl transformers", "the vlcache hooks on the vision encoder and the model "
                           "are SGLang's implementations'", "use --model-impl auto or sglang"))
    for field, flag, why, instead in UNSERVED_SWITCHES:
        if any(_both(server_args, field)):
            out.append(Refusal(flag, why, instead))
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
