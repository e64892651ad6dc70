"""Decode-step attention time at long contexts: budget 0.1 against full cache, in one run.

    python benchmarks/bench_decode_step.py [--contexts 2048 8192 32768] [--batch 4]

Drives the real `VLCacheAttnBackend` on SGLang's real `ReqToTokenPool` / `MHATokenToKVPool` /
allocator (no HTTP, no model): every request is prefilled into the pool, one copy is compacted
with a 10% per-layer plan through the same `compact_request` the server uses, and the decode
step (metadata + all layers' attention) is timed for both, interleaved. CPU: ratios only.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from types import SimpleNamespace

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from torch.utils._python_dispatch import TorchDispatchMode

from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend


def setup(context: int, batch: int, layers: int, q_heads: int, kv_heads: int, dim: int, compressed: bool):
    size = batch * (context + 8 + ROOM) + 16
    req_pool = ReqToTokenPool(size=batch, max_context_len=context + 8 + ROOM, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=kv_heads, head_dim=dim,
                               layer_num=layers, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", kv_pool, need_sort=False)
    model_config = SimpleNamespace(num_attention_heads=q_heads, get_num_kv_heads=lambda tp: kv_heads)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=kv_pool,
                             token_to_kv_pool_allocator=allocator, model_config=model_config, tp_size=1)
    backend = VLCacheAttnBackend(runner)
    g = torch.Generator().manual_seed(0)
    for b in range(batch):
        slots = allocator.alloc(context + 1)
        req_pool.req_to_token[b, : context + 1] = slots.to(torch.int32)
        for layer in range(layers):
            backend.global_kv.k[backend.global_kv.global_ids(layer, slots[:context])] = torch.randn(
                context, kv_heads, dim, generator=g)
            backend.global_kv.v[backend.global_kv.global_ids(layer, slots[:context])] = torch.randn(
                context, kv_heads, dim, generator=g)
        if compressed:  # a 10% plan per layer, compacted as the server compacts a request
            k = max(1, context // 10)
            kept = [torch.randperm(context, generator=g)[:k].sort().values for _ in range(layers)]
            backend.compressor.compact_row(b, f"r{b}", kept, 0, context)
    fb = SimpleNamespace(
        forward_mode=ForwardMode.DECODE, batch_size=batch, num_padding=0,
        req_pool_indices=torch.arange(batch), rids=[f"r{b}" for b in range(batch)],
        seq_lens=torch.full((batch,), context + 1), seq_lens_cpu=torch.full((batch,), context + 1),
        out_cache_loc=req_pool.req_to_token[:batch, context].long(),
    )
    atts = [RadixAttention(q_heads, dim, 1 / math.sqrt(dim), kv_heads, layer_id=l) for l in range(layers)]
    return backend, fb, atts, allocator


ROOM = 64  # decode steps the metadata timing may append


class CountOps(TorchDispatchMode):
    """ATen ops dispatched (on a GPU each is a launch or at least dispatcher time on the host)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def append_token(backend, fb, allocator) -> None:
    """What SGLang does between two decode steps: one new slot per request, lengths + 1."""
    new = allocator.alloc(fb.batch_size)
    lens = fb.seq_lens_cpu
    backend.req_to_token_pool.req_to_token[fb.req_pool_indices, lens] = new.to(torch.int32)
    fb.seq_lens_cpu = fb.seq_lens = lens + 1
    fb.out_cache_loc = new.long()


def step(backend, fb, atts, q_heads, kv_heads, dim, batch):
    backend.init_forward_metadata(fb)
    for att in atts:
        q = torch.randn(batch, q_heads * dim)
        k = torch.randn(batch, kv_heads, dim)
        backend.forward_decode(q, k, k, att, fb)


def metadata_times(backend, fb, allocator, batch: int, repeats: int) -> tuple[float, float, int, int]:
    """Host time per step of the eager metadata and of CUDA-graph mode's per-replay preparation
    (``init_forward_metadata_out_graph``: the same lists, copied into the executor's fixed buffers),
    each after appending a token as a decode step does, and the ATen ops of one of each (views
    included: on a GPU a replay's preparation runs on the replay's stream, each kernel before it)."""
    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor

    eager = []
    for _ in range(repeats):
        append_token(backend, fb, allocator)
        t0 = time.perf_counter()
        backend.init_forward_metadata(fb)
        eager.append(time.perf_counter() - t0)
    append_token(backend, fb, allocator)
    counter = CountOps()
    with counter:
        backend.init_forward_metadata(fb)
    executor, backend.executor = backend.executor, FlashInferAttentionExecutor("cpu")
    try:
        backend.init_cuda_graph_state(batch, batch)
        graph = []
        for _ in range(repeats):
            append_token(backend, fb, allocator)
            t0 = time.perf_counter()
            backend.init_forward_metadata_out_graph(fb)
            graph.append(time.perf_counter() - t0)
        append_token(backend, fb, allocator)
        graph_counter = CountOps()
        with graph_counter:
            backend.init_forward_metadata_out_graph(fb)
    finally:
        backend.executor = executor
    return statistics.median(eager), statistics.median(graph), counter.ops, graph_counter.ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--q-heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(1)
    dims = (args.q_heads, args.kv_heads, args.head_dim, args.batch)
    print(f"{args.layers} layers, {args.q_heads}/{args.kv_heads} heads, dim {args.head_dim}, batch {args.batch}, "
          f"1 thread, median of {args.repeats} interleaved steps")
    print("| context | full cache | budget 0.1 | speed-up | KV slots held full / 0.1 |")
    print("|---|---|---|---|---|")
    prep = {}
    for context in args.contexts:
        setups = {c: setup(context, args.batch, args.layers, *dims[:3], compressed=c) for c in (False, True)}
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for c, (backend, fb, atts, _) in setups.items():
                t0 = time.perf_counter()
                step(backend, fb, atts, *dims)
                times[c].append(time.perf_counter() - t0)
        full, comp = statistics.median(times[False]), statistics.median(times[True])
        held = {c: setups[c][3].size - setups[c][3].available_size() for c in setups}
        print(f"| {context} | {full * 1e3:.1f} ms | {comp * 1e3:.1f} ms | {full / comp:.1f}x | "
              f"{held[False]} / {held[True]} ({held[False] / held[True]:.1f}x) |")
        prep[context] = {c: metadata_times(b, fb, alloc, args.batch, args.repeats)
                         for c, (b, fb, _, alloc) in setups.items()}
        backend, fb, _, alloc = setups[True]
        backend.compressor.layer_lists.rows_reported = True  # what the server's vlcache radix tree sets
        prep[context]["reported"] = metadata_times(backend, fb, alloc, args.batch, args.repeats)
    print("\nper-step host metadata (eager init_forward_metadata / CUDA-graph replay preparation); budget 0.1 "
          "without / with the radix tree's rewrite reports (the server runs with them)")
    print("| context | full cache | budget 0.1, rows compared | budget 0.1, rewrites reported |")
    print("|---|---|---|---|")
    for context, t in prep.items():
        cells = [f"{t[c][0] * 1e3:.2f} / {t[c][1] * 1e3:.2f} ms, {t[c][2]} / {t[c][3]} ops"
                 for c in (False, True, "reported")]
        print(f"| {context} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
