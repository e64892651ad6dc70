"""Attention executors against dense float64 attention over the kept set.

Parametrised over executors: the torch executor always (CPU, float32), the FlashInfer executor
where CUDA and flashinfer are present (CUDA, bf16/fp16), and for decode over per-layer lists the
plan-free Triton kernel on its own (compiled on CUDA, Triton's interpreter on the CPU). Cases: ragged batches, GQA, decode over
per-layer kept lists of different lengths (and layers sharing lengths, which share a plan),
extend with a cached prefix.
"""
from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor
from vlcache_sglang.backend.metadata import ForwardMetadata, RaggedKV


def _flashinfer_ok() -> bool:
    from vlcache_sglang.backend.executors.flashinfer_executor import flashinfer_available

    return flashinfer_available()


EXECUTORS = [
    pytest.param("torch", id="torch"),
    pytest.param("flashinfer", id="flashinfer", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not _flashinfer_ok(), reason="needs CUDA and flashinfer"),
    ]),
    # FlashInfer for uncompressed steps, the plan-free Triton kernel for steps with per-layer lists
    pytest.param("flashinfer+triton", id="flashinfer+triton", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not _flashinfer_ok(), reason="needs CUDA and flashinfer"),
    ]),
]
# steps with per-layer lists never reach FlashInfer: the plan-free Triton kernel alone, compiled on
# CUDA, on the CPU through Triton's interpreter (as in tests/kernels), so it runs without a GPU
TRITON_ONLY = pytest.param("triton", id="triton")


class Env:
    def __init__(self, name: str):
        self.name = name
        if name == "torch":
            self.executor, self.device, self.dtypes, self.tol = TorchAttentionExecutor(), torch.device("cpu"), [torch.float32], 2e-5
        else:
            from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor

            mode = "flashinfer" if name == "flashinfer" else "triton"
            if name == "triton" and not torch.cuda.is_available():
                self.executor = FlashInferAttentionExecutor(torch.device("cpu"), compressed_decode=mode)
                self.device, self.dtypes, self.tol = torch.device("cpu"), [torch.float32], 1e-4
                return
            self.executor = FlashInferAttentionExecutor(compressed_decode=mode)
            # bf16 only: each dtype is a separate FlashInfer JIT build (minutes of nvcc on first use),
            # and fp16 runs the same templates
            self.device, self.dtypes, self.tol = torch.device("cuda"), [torch.bfloat16], 2e-2


@pytest.fixture(params=EXECUTORS)
def env(request) -> Env:
    return Env(request.param)


def ragged(lists: list[torch.Tensor], device) -> RaggedKV:
    indptr = [0]
    for t in lists:
        indptr.append(indptr[-1] + t.numel())
    indices = torch.cat(lists).to(device=device, dtype=torch.int64) if lists else torch.empty(0, dtype=torch.int64)
    return RaggedKV(torch.tensor(indptr, dtype=torch.int64, device=device), indices, indptr)


def dense(q, k, v, scale, causal_offset=None):
    """float64 softmax(q k^T) v for one request; q [n, Hq, D], k/v [m, Hkv, D]. With
    ``causal_offset`` row i sees keys ``j <= i + causal_offset`` (bottom-right aligned)."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal_offset is not None:
        mask = torch.arange(k.shape[0])[None, :] <= (torch.arange(q.shape[0])[:, None] + causal_offset)
        s = s.masked_fill(~mask, -math.inf)
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)


def make_pool(rows, hkv, d, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, hkv, d, generator=g).to(dtype).to(device)
    v = torch.randn(rows, hkv, d, generator=g).to(dtype).to(device)
    return k, v


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 64), (8, 1, 64), (4, 4, 128)])
def test_decode_ragged_batch(env, hq, hkv, d):
    for dtype in env.dtypes:
        g = torch.Generator().manual_seed(hq * 7 + hkv)
        k_cache, v_cache = make_pool(300, hkv, d, dtype, env.device, seed=hq)
        lens = [1, 7, 33, 120]
        perm = torch.randperm(300, generator=g)
        lists, off = [], 0
        for n in lens:
            lists.append(perm[off:off + n])
            off += n
        kv = ragged(lists, env.device)
        meta = ForwardMetadata(is_decode=True, kv=kv, qo_indptr_cpu=list(range(len(lens) + 1)), prefix_lens_cpu=[0] * len(lens))
        q = torch.randn(len(lens), hq, d, generator=g).to(dtype).to(env.device)
        out = torch.full_like(q, float("nan"))
        env.executor.decode(q, out, k_cache, v_cache, kv, meta, d ** -0.5, hq != hkv)
        for b, sl in enumerate(lists):
            ref = dense(q[b:b + 1].cpu(), k_cache[sl].cpu(), v_cache[sl].cpu(), d ** -0.5)
            torch.testing.assert_close(out[b:b + 1].cpu().double(), ref, rtol=env.tol, atol=env.tol)


@pytest.mark.parametrize("env", EXECUTORS + [TRITON_ONLY], indirect=True)
def test_decode_per_layer_kept_lists(env):
    """Compressed decode: every layer reads its own list (global row ids) of its own length;
    layers 1 and 3 have equal lengths (one plan for both in FlashInfer)."""
    L, R, hq, hkv, d = 4, 128, 8, 2, 64
    for dtype in env.dtypes:
        g = torch.Generator().manual_seed(3)
        k_glob, v_glob = make_pool(L * R, hkv, d, dtype, env.device, seed=5)
        per_layer_lens = [[5, 40, 1], [12, 3, 60], [30, 30, 30], [12, 3, 60]]
        layer_kv, lists_by_layer = {}, {}
        for layer, lens in enumerate(per_layer_lens):
            lists = [torch.randperm(R, generator=g)[:n] + layer * R for n in lens]
            lists_by_layer[layer] = lists
            layer_kv[layer] = ragged(lists, env.device)
        base = ragged([torch.arange(n) for n in (70, 70, 70)], env.device)  # unused for compressed layers
        meta = ForwardMetadata(is_decode=True, kv=base, qo_indptr_cpu=[0, 1, 2, 3], prefix_lens_cpu=[0, 0, 0],
                               layer_kv=layer_kv)
        if env.name != "torch":
            env.executor.reset_counters()
        for layer in range(L):
            q = torch.randn(3, hq, d, generator=g).to(dtype).to(env.device)
            out = torch.full_like(q, float("nan"))
            env.executor.decode(q, out, k_glob, v_glob, layer_kv[layer], meta, d ** -0.5, True)
            for b, sl in enumerate(lists_by_layer[layer]):
                ref = dense(q[b:b + 1].cpu(), k_glob[sl].cpu(), v_glob[sl].cpu(), d ** -0.5)
                torch.testing.assert_close(out[b:b + 1].cpu().double(), ref, rtol=env.tol, atol=env.tol)
        if env.name == "flashinfer":
            assert env.executor.plan_count == 3  # layers 1 and 3 share a plan
        elif env.name in ("flashinfer+triton", "triton"):
            assert env.executor.plan_count == 0  # per-layer lists: no FlashInfer plan at all


@pytest.mark.parametrize("compressed_prefix", [False, True])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
def test_extend_with_prefix(env, hq, hkv, compressed_prefix):
    """Causal extend after a cached prefix. With ``compressed_prefix`` the layer's list holds fewer
    cached keys than the request has cached positions (a compressed prompt): the new rows are the
    list's last keys and see every key before them (bottom-right causal alignment)."""
    d = 64
    for dtype in env.dtypes:
        g = torch.Generator().manual_seed(hq)
        k_cache, v_cache = make_pool(400, hkv, d, dtype, env.device, seed=hq + 1)
        prefix = [0, 13, 40, 5]
        new = [9, 1, 30, 17]
        perm = torch.randperm(400, generator=g)
        lists, off = [], 0
        for p, n in zip(prefix, new):
            lists.append(perm[off:off + p + n])
            off += p + n
        kv = ragged(lists, env.device)
        qo = [0]
        for n in new:
            qo.append(qo[-1] + n)
        cached = [p + (25 if compressed_prefix else 0) for p in prefix]
        meta = ForwardMetadata(is_decode=False, kv=kv, qo_indptr_cpu=qo, prefix_lens_cpu=cached)
        q = torch.randn(qo[-1], hq, d, generator=g).to(dtype).to(env.device)
        out = torch.full_like(q, float("nan"))
        env.executor.extend(q, out, k_cache, v_cache, kv, meta, d ** -0.5, hq != hkv)
        for b, sl in enumerate(lists):
            ref = dense(q[qo[b]:qo[b + 1]].cpu(), k_cache[sl].cpu(), v_cache[sl].cpu(), d ** -0.5,
                        causal_offset=prefix[b])
            torch.testing.assert_close(out[qo[b]:qo[b + 1]].cpu().double(), ref, rtol=env.tol, atol=env.tol)


@pytest.mark.gpu
@pytest.mark.skipif(not _flashinfer_ok(), reason="needs CUDA and flashinfer")
@pytest.mark.parametrize("mode", ["flashinfer", "triton"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 2)])  # tensor-core decode and the plain decode kernel
def test_flashinfer_cuda_graph_decode_replans_between_replays(hq, hkv, mode):
    """CUDA-graph mode: plan every layer outside the graph, capture one decode step of all layers,
    then re-plan with other per-layer lists (other lengths, other rows) and replay: each replay must
    equal dense attention over that step's lists."""
    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor

    L, R, d, bs, dtype, tol = 3, 256, 64, 3, torch.bfloat16, 2e-2
    dev = torch.device("cuda")
    k_glob, v_glob = make_pool(L * R, hkv, d, dtype, dev, seed=11)
    ex = FlashInferAttentionExecutor(cuda_graph=True, max_batch_size=4, max_kv_tokens=bs * R, num_layers=L,
                                     compressed_decode=mode)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(L, bs, hq, d, generator=g).to(dtype).to(dev)
    out = torch.zeros_like(q)

    def step_meta(lens_by_layer):
        lists = {l: [torch.randperm(R, generator=g)[:n] + l * R for n in lens] for l, lens in enumerate(lens_by_layer)}
        layer_kv = {l: ragged(ls, dev) for l, ls in lists.items()}
        meta = ForwardMetadata(is_decode=True, kv=layer_kv[0], qo_indptr_cpu=list(range(bs + 1)),
                               prefix_lens_cpu=[0] * bs, layer_kv=layer_kv)
        return lists, meta

    def run_all(meta):
        for l in range(L):
            ex.decode(q[l], out[l], k_glob, v_glob, meta.layer_kv[l], meta, d ** -0.5, True, layer_id=l)

    lists, meta = step_meta([[5, 40, 1], [12, 3, 60], [30, 30, 30]])
    ex.plan_decode(meta, hq, hkv, d, dtype, dtype, d ** -0.5)
    run_all(meta)  # eager warm-up before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all(meta)
    for lens in ([[5, 40, 1], [12, 3, 60], [30, 30, 30]], [[200, 7, 64], [1, 1, 1], [90, 256, 17]]):
        lists, meta = step_meta(lens)
        out.fill_(float("nan"))
        ex.plan_decode(meta, hq, hkv, d, dtype, dtype, d ** -0.5)
        graph.replay()
        torch.cuda.synchronize()
        for l in range(L):
            for b, sl in enumerate(lists[l]):
                ref = dense(q[l, b:b + 1].cpu(), k_glob[sl].cpu(), v_glob[sl].cpu(), d ** -0.5)
                torch.testing.assert_close(out[l, b:b + 1].cpu().double(), ref, rtol=tol, atol=tol)


def test_flashinfer_module_imports_without_flashinfer_or_sglang():
    import os
    import subprocess
    import sys
    from pathlib import Path

    import vlcache_sglang

    code = ("import sys; sys.modules['sglang'] = None; sys.modules['flashinfer'] = None\n"
            "import vlcache_sglang.backend.metadata\n"
            "from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor\n"
            "FlashInferAttentionExecutor()\n")
    env = dict(os.environ, PYTHONPATH=str(Path(vlcache_sglang.__file__).parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


@pytest.mark.parametrize("launch", [None, (16, 8.0), (128, 0.5), (64, 2.0, None, None, True)],
                         ids=["defaults", "block16-8perSM", "block128-half", "fused-merge"])
@pytest.mark.parametrize("graph_mode", [False, True])
def test_triton_compressed_decode_path_without_flashinfer(graph_mode, launch):
    """The FlashInfer executor sends steps with per-layer lists to the plan-free Triton kernel, which
    needs no FlashInfer: here it runs on the CPU (Triton's interpreter), eager and through the
    fixed buffers of CUDA-graph mode (no graph captured), against dense attention. A tuned decode
    launch (``kernels/launch_configs.py``: key block, programs per SM) sizes the graph workspace's
    splits and gives the same attention."""
    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor
    from vlcache_sglang.kernels.launch_configs import DecodeLaunch
    from vlcache_sglang.kernels.ragged_decode import num_splits_for

    decode_launch = DecodeLaunch(*launch) if launch else None

    L, R, hq, hkv, d, bs = 2, 64, 4, 2, 16, 3
    dev = torch.device("cpu")
    g = torch.Generator().manual_seed(13)
    k_glob, v_glob = make_pool(L * R, hkv, d, torch.float32, dev, seed=17)
    lists = {l: [torch.randperm(R, generator=g)[:n] + l * R for n in lens]
             for l, lens in enumerate([[5, 40, 1], [12, 3, 60]])}
    layer_kv = {l: ragged(ls, dev) for l, ls in lists.items()}
    meta = ForwardMetadata(is_decode=True, kv=layer_kv[0], qo_indptr_cpu=list(range(bs + 1)),
                           prefix_lens_cpu=[0] * bs, layer_kv=layer_kv)
    if graph_mode:
        ex = FlashInferAttentionExecutor(dev, cuda_graph=True, max_batch_size=4, max_kv_tokens=bs * R, num_layers=L,
                                         compressed_decode="triton", decode_launch=decode_launch)
        ex.plan_decode(meta, hq, hkv, d, torch.float32, torch.float32, d ** -0.5)
        chosen = decode_launch or DecodeLaunch()
        assert ex._graph_splits == num_splits_for(bs * R, bs, hkv, dev, **chosen.split_choice())
        assert ex._graph_ws[0].shape[:3] == (bs, hq, ex._graph_splits)
        # the fused merge's counters exist before any launch (a capture must not allocate them)
        assert (ex.graph_buffers.counters is not None) == chosen.fused_merge
    else:
        ex = FlashInferAttentionExecutor(dev, compressed_decode="triton", decode_launch=decode_launch)
    for layer in range(L):
        q = torch.randn(bs, hq, d, generator=g)
        out = torch.full_like(q, float("nan"))
        ex.decode(q, out, k_glob, v_glob, layer_kv[layer], meta, d ** -0.5, True, layer_id=layer if graph_mode else None)
        for b, sl in enumerate(lists[layer]):
            ref = dense(q[b:b + 1], k_glob[sl], v_glob[sl], d ** -0.5)
            torch.testing.assert_close(out[b:b + 1].double(), ref, rtol=1e-4, atol=1e-4)
    assert ex.plan_count == 0
    assert all(int(c.abs().sum()) == 0 for c in ex.merge_counters)  # left ready for the next step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("fused", [False, True], ids=["two-launch", "fused-merge"])
def test_graph_mode_one_capture_serves_shared_and_per_layer_lists(device, fused):
    """The kernel a graph holds is fixed at construction: one capture (here of a step where every
    layer reads the batch's shared slots, shifted by ``layer * layer_row_stride``) replays steps with
    per-layer lists and steps with shared slots alike. On CUDA a real graph is captured and
    replayed; on the CPU (Triton's interpreter) the captured step is re-run over the same buffers.
    A ``decode`` with a meta that was not planned runs eagerly. The fused merge (one launch per
    layer, counters kept across replays) serves the same steps."""
    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor
    from vlcache_sglang.kernels.launch_configs import DecodeLaunch

    L, R, hq, hkv, d, bs = 3, 64, 4, 2, 16, 3
    dev = torch.device(device)
    tol = 1e-4
    g = torch.Generator().manual_seed(21)
    k_glob, v_glob = make_pool(L * R, hkv, d, torch.float32, dev, seed=23)
    ex = FlashInferAttentionExecutor(dev, compressed_decode="triton", decode_launch=DecodeLaunch(fused_merge=fused))
    ex.enable_cuda_graph(4, bs * R, L)
    q = torch.randn(L, bs, hq, d, generator=g).to(dev)
    out = torch.zeros_like(q)

    def shared(lens):
        slots = [torch.randperm(R, generator=g)[:n] for n in lens]
        meta = ForwardMetadata(is_decode=True, kv=ragged(slots, dev), qo_indptr_cpu=list(range(bs + 1)),
                               prefix_lens_cpu=[0] * bs, layer_row_stride=R)
        return {l: [s + l * R for s in slots] for l in range(L)}, meta

    def per_layer(lens_by_layer):
        lists = {l: [torch.randperm(R, generator=g)[:n] + l * R for n in lens] for l, lens in enumerate(lens_by_layer)}
        layer_kv = {l: ragged(ls, dev) for l, ls in lists.items()}
        meta = ForwardMetadata(is_decode=True, kv=layer_kv[0], qo_indptr_cpu=list(range(bs + 1)),
                               prefix_lens_cpu=[0] * bs, layer_kv=layer_kv, layer_row_stride=R)
        return lists, meta

    lists, meta = shared([4, 9, 30])
    ex.plan_decode(meta, hq, hkv, d, torch.float32, torch.float32, d ** -0.5)
    captured = meta

    def step():
        for l in range(L):
            ex.decode(q[l], out[l], k_glob, v_glob, captured.kv, captured, d ** -0.5, True, layer_id=l)

    graph = None
    if device == "cuda":
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    for lists, meta in (shared([60, 1, 17]), per_layer([[5, 40, 1], [12, 3, 60], [64, 2, 9]]), shared([3, 3, 3])):
        ex.plan_decode(meta, hq, hkv, d, torch.float32, torch.float32, d ** -0.5)
        out.fill_(float("nan"))
        if graph is not None:
            graph.replay()
            torch.cuda.synchronize()
        else:
            captured = meta  # the CPU has no graph: re-run the step over the same fixed buffers
            step()
        for l in range(L):
            for b, sl in enumerate(lists[l]):
                ref = dense(q[l, b:b + 1].cpu(), k_glob[sl].cpu(), v_glob[sl].cpu(), d ** -0.5)
                torch.testing.assert_close(out[l, b:b + 1].cpu().double(), ref, rtol=tol, atol=tol)
    # a meta that was not planned runs eagerly (here: per-layer lists through the Triton kernel)
    lists, meta = per_layer([[7, 8, 9], [1, 2, 3], [10, 20, 30]])
    o = torch.full_like(q[1], float("nan"))
    ex.decode(q[1], o, k_glob, v_glob, meta.layer_kv[1], meta, d ** -0.5, True)
    for b, sl in enumerate(lists[1]):
        ref = dense(q[1, b:b + 1].cpu(), k_glob[sl].cpu(), v_glob[sl].cpu(), d ** -0.5)
        torch.testing.assert_close(o[b:b + 1].cpu().double(), ref, rtol=tol, atol=tol)
    assert ex.plan_count == 0
    assert all(int(c.abs().sum()) == 0 for c in ex.merge_counters) and (fused == bool(ex.merge_counters))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_graph_mode_splits_follow_each_captured_batch_size(device):
    """SGLang captures one decode graph per batch size up to ``max_bs`` (256 on an 80-160 GB GPU). A
    split count chosen once for ``max_bs`` gives a small batch a single split per (request, KV
    head): a batch of 8 with 4 KV heads would run 32 programs on a 132-SM GPU, each walking its
    whole kept list. So each captured batch size gets the split count the eager path would choose
    for it (the capacity as length), in a workspace view of one buffer sized for the largest
    ``batch x splits``; graphs of different sizes, captured in turn, replay with their own splits."""
    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor
    from vlcache_sglang.kernels.launch_configs import DecodeLaunch
    from vlcache_sglang.kernels.ragged_decode import num_splits_for

    L, R, hq, hkv, d, max_bs, capacity = 2, 96, 2, 1, 16, 16, 4096
    dev = torch.device(device)
    g = torch.Generator().manual_seed(31)
    k_glob, v_glob = make_pool(L * R, hkv, d, torch.float32, dev, seed=37)
    ex = FlashInferAttentionExecutor(dev, cuda_graph=True, max_batch_size=max_bs, max_kv_tokens=capacity,
                                     num_layers=L, compressed_decode="triton")
    choice = DecodeLaunch().split_choice()
    want = {bs: num_splits_for(capacity, bs, hkv, dev, **choice) for bs in range(1, max_bs + 1)}
    assert want[1] > want[max_bs]  # the case this test is about: small batches need more splits

    def per_layer(bs):
        lists = {l: [torch.randperm(R, generator=g)[:int(n)] + l * R
                     for n in torch.randint(1, R + 1, (bs,), generator=g)] for l in range(L)}
        layer_kv = {l: ragged(ls, dev) for l, ls in lists.items()}
        return lists, ForwardMetadata(is_decode=True, kv=layer_kv[0], qo_indptr_cpu=list(range(bs + 1)),
                                      prefix_lens_cpu=[0] * bs, layer_kv=layer_kv, layer_row_stride=R)

    graphs, queries = {}, {}  # per batch size: its CUDA graph (CUDA only), its queries and outputs
    for bs in (8, 1, 3):  # "capture" each size in turn, as SGLang's runner does
        lists, meta = per_layer(bs)
        ex.plan_decode(meta, hq, hkv, d, torch.float32, torch.float32, d ** -0.5)
        assert ex._graph_splits == want[bs], bs
        assert ex._graph_ws[0].shape == (bs, hq, want[bs], d) and ex._graph_ws[0].is_contiguous()
        q, out = torch.randn(L, bs, hq, d, generator=g).to(dev), torch.zeros(L, bs, hq, d, device=dev)
        queries[bs] = (q, out)

        def step(q=q, out=out, meta=meta):
            for l in range(L):
                ex.decode(q[l], out[l], k_glob, v_glob, meta.kv, meta, d ** -0.5, True, layer_id=l)

        if device == "cuda":
            step()
            torch.cuda.synchronize()
            graphs[bs] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[bs]):
                step()
    flat = max(bs * s for bs, s in want.items()) * hq * d
    assert ex._graph_ws[0].untyped_storage().nbytes() == flat * 4  # one buffer for every size
    for bs in (1, 8, 3, 1):  # replays in another order, each with new lists
        q, out = queries[bs]
        lists, meta = per_layer(bs)
        ex.plan_decode(meta, hq, hkv, d, torch.float32, torch.float32, d ** -0.5)
        out.fill_(float("nan"))
        if device == "cuda":
            graphs[bs].replay()
            torch.cuda.synchronize()
        else:
            for l in range(L):  # the CPU has no graph: the captured calls, over the same buffers
                ex.decode(q[l], out[l], k_glob, v_glob, meta.kv, meta, d ** -0.5, True, layer_id=l)
        for l in range(L):
            for b, sl in enumerate(lists[l]):
                ref = dense(q[l, b:b + 1].cpu(), k_glob[sl].cpu(), v_glob[sl].cpu(), d ** -0.5)
                torch.testing.assert_close(out[l, b:b + 1].cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_graph_list_helpers_expand_plain_lists_per_head_and_pad_one_key_per_head():
    """Head cells in graph mode: a plain request's list read per KV head is its rows as head-rows
    ``row * H + h`` in list ``b * H + h`` (empty requests stay empty), and a padded request gets one
    key per head, the padding row's head-row of that head."""
    from vlcache_sglang.backend.cuda_graph import pad_lists
    from vlcache_sglang.backend.metadata import per_head_lists

    H = 3
    plain = ragged([torch.tensor([5, 9]), torch.tensor([], dtype=torch.int64), torch.tensor([2, 7, 4])], "cpu")
    heads = per_head_lists(plain, H)
    assert heads.heads == H and heads.kv_indptr.tolist() == heads.kv_indptr_cpu
    for b in range(3):
        for h in range(H):
            assert heads.head_slots(b, h).tolist() == [r * H + h for r in plain.slots(b).tolist()]
    assert per_head_lists(plain, 1) is plain and per_head_lists(heads, H) is heads
    with pytest.raises(ValueError, match="per 3 heads cannot be read per 2"):
        per_head_lists(heads, 2)
    padded_plain, padded_heads = pad_lists([plain, heads], [40, 100], 2)
    assert padded_plain.kv_indptr_cpu == plain.kv_indptr_cpu + [6, 7]
    assert padded_plain.kv_indices[-2:].tolist() == [40, 40]
    assert padded_heads.kv_indptr_cpu[-2 * H - 1:] == list(range(heads.kv_indptr_cpu[-1], heads.kv_indptr_cpu[-1] + 2 * H + 1))
    for b in (3, 4):  # the padded requests: one key per head, the padding row's head-row
        for h in range(H):
            assert padded_heads.head_slots(b, h).tolist() == [100 * H + h]
    assert padded_heads.kv_indptr.tolist() == padded_heads.kv_indptr_cpu


def test_graph_mode_reads_one_kind_of_list():
    """A captured step's kernel reads per-request or per-(request, KV head) lists, fixed when graph
    mode is enabled: lists of the other kind are refused, naming what to enable; per-head lists
    need the plan-free Triton decode."""
    from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor
    from vlcache_sglang.backend.metadata import per_head_lists

    plain = ragged([torch.tensor([1, 2]), torch.tensor([3])], "cpu")
    heads = per_head_lists(plain, 2)
    meta = ForwardMetadata(is_decode=True, kv=plain, qo_indptr_cpu=[0, 1, 2], prefix_lens_cpu=[1, 0],
                           layer_kv={0: heads}, layer_row_stride=8)
    ex = FlashInferAttentionExecutor("cpu", cuda_graph=True, max_batch_size=2, max_kv_tokens=16, num_layers=1)
    with pytest.raises(NotImplementedError, match="list_heads=KV heads"):
        ex.plan_decode(meta, 4, 2, 16, torch.float32, torch.float32, 0.25)
    ex.enable_cuda_graph(2, 16, 1, list_heads=2)
    ex.plan_decode(meta, 4, 2, 16, torch.float32, torch.float32, 0.25)  # accepted
    three = per_head_lists(plain, 3)
    with pytest.raises(NotImplementedError, match="per 2 KV heads"):
        ex.plan_decode(ForwardMetadata(is_decode=True, kv=plain, qo_indptr_cpu=[0, 1, 2], prefix_lens_cpu=[1, 0],
                                       layer_kv={0: three}), 4, 2, 16, torch.float32, torch.float32, 0.25)
    with pytest.raises(NotImplementedError, match="plan-free Triton decode"):
        FlashInferAttentionExecutor("cpu", compressed_decode="flashinfer").enable_cuda_graph(2, 16, 1, list_heads=2)
