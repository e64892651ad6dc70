"""Cost of gathering a request's statistics across two tensor-parallel ranks, relative to the
prefill attention of that request on one rank (CPU, gloo: SGLang's CPU collective backend).

    PYTHONPATH=. python benchmarks/bench_tp_gather.py [--lengths 1024 2048 4096]

Shapes are Qwen2-VL-7B's at ``--tp-size 2``: 28 layers, per rank 14 of 28 query heads and 2 of 4
KV heads, head dim 128. Per request and prompt length m, each rank all-gathers (two collectives,
:class:`vlcache_sglang.backend.tensor_parallel.StatsGather`):

* ``col``: ``[28, 2, m]`` float32 column scores (concatenated along the KV-head axis);
* ``counts``: ``[2, 28, 14]`` int64 sparsity counts (below threshold / causal).

``attention`` is the same rank's causal prefill attention for all 28 layers (one layer timed
with ``F.scaled_dot_product_attention``, times 28): what the engine computes anyway for that
request. Ratios are ``gather / attention`` (best of ``--repeats``). Not a test: numbers depend on
the machine and its load; on a GPU the gather goes over NCCL and the attention is far faster.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

LAYERS, HQ, HKV, D = 28, 14, 2, 128  # per rank at --tp-size 2


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _rank(rank: int, port: int, lengths: list[int], repeats: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = []
    for m in lengths:
        col = torch.rand(LAYERS, HKV, m)
        counts = torch.randint(0, m, (2, LAYERS, HQ), dtype=torch.int64)
        gather = _best(lambda: (_gather(col, 1), _gather(counts, 2)), repeats)
        q = torch.randn(1, HQ, m, D)
        k = torch.randn(1, HKV, m, D).repeat_interleave(HQ // HKV, 1)
        v = torch.randn_like(k)
        layer = _best(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), max(1, repeats // 2))
        rows.append((m, gather, layer * LAYERS))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from vlcache_sglang.tooling.serving import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, args.lengths, args.repeats, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    rows = out.get()
    for p in procs:
        p.join()
    print("| prompt m | gather (2 collectives) | prefill attention, 28 layers, one rank | gather / attention |")
    print("|---|---|---|---|")
    for m, gather, attention in rows:
        print(f"| {m} | {gather * 1e3:.2f} ms | {attention * 1e3:.0f} ms | {100 * gather / attention:.2f}% |")


if __name__ == "__main__":
    main()
