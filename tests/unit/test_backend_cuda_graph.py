"""Decode CUDA graphs through the backend's SGLang hooks, on SGLang's real pools and allocator.

What a CUDA graph does is replay the kernel launches it recorded, with the tensors (addresses)
and scalar arguments it recorded; only tensor *contents* change between replays. Off CUDA this is
reproduced exactly: during "capture" every launch the decode step makes (the K/V write and the
two Triton launches per layer, run by Triton's interpreter) is recorded with its arguments, and a
"replay" re-issues those recorded calls without running any Python of the backend again; the
per-replay hook (``init_forward_metadata_out_graph``, with SGLang's own padded replay view) may
only rewrite buffers. Every replay must equal the eager torch executor on the live batch, over
batches that mix compressed and plain requests, padding, and other lengths than at capture; the
step's new K/V slots are set to NaN between the eager reference (which writes them too) and the
replay, so what the replay reads there is its own K/V write.
On a CUDA machine the same steps run under a real ``torch.cuda.CUDAGraph``.

The same pools also show that the debug read check (``VLCACHE_DEBUG_CHECKS=1``, which the radix
e2e test trusts to report ``freed_reads == 0``) counts a forward that lists a freed slot.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang")  # the GPU machine has no SGLang unless its pack brings one

from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend
from vlcache_sglang.backend.executors.flashinfer_executor import FlashInferAttentionExecutor
from vlcache_sglang.backend.executors.torch_executor import TorchAttentionExecutor
from vlcache_sglang.scheduler_hooks import graph_fits_buffers as _graph_fits_buffers
from vlcache_sglang.settings import ServerSettings

L, H, HKV, D, POOL, CTX, MAX_BS = 3, 4, 2, 16, 512, 128, 4
# the CUDA variant is listed everywhere and shows as a skip where there is no CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


class Server:
    """SGLang's pools with the backend in graph mode, and requests to decode."""

    def __init__(self, device: str, seed: int = 0, cells: str = "layer", layers: int = L):
        self.device = device
        self.g = torch.Generator().manual_seed(seed)
        self.req_pool = ReqToTokenPool(size=8, max_context_len=CTX, device=device, enable_memory_saver=False)
        self.kv_pool = MHATokenToKVPool(size=POOL, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=D,
                                        layer_num=layers, device=device, enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(POOL, torch.float32, device, self.kv_pool, need_sort=False)
        config = SimpleNamespace(num_attention_heads=H, get_num_kv_heads=lambda tp: HKV, context_len=CTX,
                                 get_total_num_kv_heads=lambda: HKV)
        runner = SimpleNamespace(device=device, req_to_token_pool=self.req_pool, token_to_kv_pool=self.kv_pool,
                                 token_to_kv_pool_allocator=self.allocator, model_config=config, tp_size=1,
                                 dtype=torch.float32)
        self.cells = cells
        self.backend = VLCacheAttnBackend(runner, executor=FlashInferAttentionExecutor(device),
                                          settings=ServerSettings(cells=cells).validate())
        self.layers = [RadixAttention(H, D, 1 / math.sqrt(D), HKV, layer_id=l) for l in range(layers)]
        self.lens: dict[int, int] = {}  # request row -> tokens in its KV

    def add_request(self, n: int, compress: bool) -> int:
        row = self.req_pool.alloc_rows(1)[0]
        slots = self.allocator.alloc(n)
        self.req_pool.req_to_token[row, :n] = slots.to(torch.int32)
        kv = self.backend.global_kv
        for l in range(len(self.layers)):
            ids = kv.global_ids(l, slots)
            kv.k[ids] = torch.randn(n, HKV, D, generator=self.g).to(self.device)
            kv.v[ids] = torch.randn(n, HKV, D, generator=self.g).to(self.device)
        if compress:  # each layer (head cells: each layer's KV head) keeps its own subset, the rest is freed
            units = len(self.layers) * (HKV if self.cells == "head" else 1)
            kept = [torch.randperm(n, generator=self.g)[: max(1, n // (u % 5 + 2))].sort().values.to(self.device)
                    for u in range(units)]
            assert self.backend.compressor.compact_row(row, f"r{row}", kept, 0, n) is not None
        self.lens[row] = n
        return row

    def decode_batch(self, rows: list[int]):
        """Append one token to each request; the live ForwardBatch of that decode step."""
        new = self.allocator.alloc(len(rows))
        for r, s in zip(rows, new.tolist()):
            self.req_pool.req_to_token[r, self.lens[r]] = s
            self.lens[r] += 1
        seq = torch.tensor([self.lens[r] for r in rows])
        return SimpleNamespace(
            forward_mode=ForwardMode.DECODE, batch_size=len(rows), req_pool_indices=torch.tensor(rows, device=self.device),
            seq_lens=seq.to(self.device), seq_lens_cpu=seq, seq_lens_sum=int(seq.sum()), max_seq_len_host=int(seq.max()),
            out_cache_loc=new.to(self.device), out_cache_loc_virtual=None, kv_loc_plan=None, kv_loc_cols=None,
            max_seq_len_override=None, spec_info=None, lora_ids=None, can_run_decode_cuda_graph=True,
            encoder_lens=None, rids=[f"r{r}" for r in rows],
            extend_seq_lens=None, extend_seq_lens_cpu=None, extend_prefix_lens=None, extend_prefix_lens_cpu=None)


class StaticBuffers:
    """The decode graph runner's input buffers for one captured batch size, padded SGLang's way
    (request row 0, length = the backend's fill value, output slot 0)."""

    def __init__(self, bs: int, device: str, fill: int, layers: int = L):
        self.bs, self.fill = bs, fill
        self.req_pool_indices = torch.zeros(bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.full((bs,), fill, dtype=torch.int64, device=device)
        self.seq_lens_cpu = torch.full((bs,), fill, dtype=torch.int64)
        self.out_cache_loc = torch.zeros(bs, dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(bs, dtype=torch.int64, device=device)
        self.encoder_lens = None
        self.mamba_track_indices = None
        self.qkv = [(torch.zeros(bs, H * D, device=device), torch.zeros(bs, HKV, D, device=device),
                     torch.zeros(bs, HKV, D, device=device)) for _ in range(layers)]

    def capture_batch(self):
        return SimpleNamespace(forward_mode=ForwardMode.DECODE, batch_size=self.bs, req_pool_indices=self.req_pool_indices,
                               seq_lens=self.seq_lens, seq_lens_cpu=self.seq_lens_cpu, seq_lens_sum=self.bs * self.fill,
                               out_cache_loc=self.out_cache_loc, encoder_lens=None, spec_info=None)

    def load(self, live, inputs) -> SimpleNamespace:
        """Copy the live batch in (the padded tail reset) and return SGLang's replay view."""
        raw = live.batch_size
        self.req_pool_indices.zero_()
        self.req_pool_indices[:raw] = live.req_pool_indices
        self.seq_lens.fill_(self.fill)
        self.seq_lens[:raw] = live.seq_lens
        self.seq_lens_cpu.fill_(self.fill)
        self.seq_lens_cpu[:raw] = live.seq_lens_cpu
        self.out_cache_loc.zero_()
        self.out_cache_loc[:raw] = live.out_cache_loc
        for (q, k, v), (lq, lk, lv) in zip(self.qkv, inputs):
            for buf, val in ((q, lq), (k, lk), (v, lv)):
                buf.zero_()
                buf[:raw] = val
        return build_replay_fb_view(forward_batch=live, buffers=self, bs=self.bs, raw_bs=raw, num_tokens=self.bs,
                                    global_num_tokens_cpu=None, seq_len_fill_value=self.fill,
                                    capture_forward_mode=ForwardMode.DECODE, is_encoder_decoder=False)


class Recorder:
    """Off CUDA: record the launches of a decode step (the K/V write, the Triton decode) with their
    arguments, and replay exactly those."""

    def __init__(self, monkeypatch, server: Server):
        self.calls, self.recording = [], False
        ex = FlashInferAttentionExecutor
        original_ragged = ex._ragged
        pool = server.kv_pool
        original_write = pool.set_kv_buffer

        def ragged(*args, **kwargs):
            if self.recording:
                self.calls.append((original_ragged, args, kwargs))
            return original_ragged(*args, **kwargs)

        def write(*args, **kwargs):
            if self.recording:
                self.calls.append((original_write, args, kwargs))
            return original_write(*args, **kwargs)

        monkeypatch.setattr(ex, "_ragged", ragged)  # a method: the executor (its launch options) is args[0]
        monkeypatch.setattr(pool, "set_kv_buffer", write)

    def capture(self, step):
        self.recording = True
        try:
            return step()
        finally:
            self.recording = False

    def replay(self):
        for fn, args, kwargs in self.calls:
            fn(*args, **kwargs)


class CudaGraph:
    def __init__(self, monkeypatch, server):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, step):
        step()  # warm-up (Triton compiles), as SGLang's runner does before capturing
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            out = step()
        return out

    def replay(self):
        self.graph.replay()
        torch.cuda.synchronize()


def eager_reference(server: Server, live, inputs) -> list[torch.Tensor]:
    """The same step through the eager torch executor (it also writes the step's K/V)."""
    backend = server.backend
    graph_executor, backend.executor = backend.executor, TorchAttentionExecutor()
    try:
        backend.init_forward_metadata(live)
        return [backend.forward_decode(q, k, v, layer, live).clone()
                for layer, (q, k, v) in zip(server.layers, inputs)]
    finally:
        backend.executor = graph_executor


def poison_new_slots(server: Server, slots: torch.Tensor) -> None:
    kv = server.backend.global_kv
    for l in range(L):
        ids = kv.global_ids(l, slots)
        kv.k[ids] = float("nan")
        kv.v[ids] = float("nan")


@pytest.mark.parametrize("cells", ["layer", "head"])
@pytest.mark.parametrize("device", DEVICES)
def test_replays_equal_eager_decode_over_compressed_plain_and_padded_batches(device, cells, monkeypatch):
    """Head cells (``--vlcache-cells head``): every captured step reads one list per (request, KV
    head), plain requests' slots expanded per head, padding one key per head."""
    s = Server(device, cells=cells)
    backend = s.backend
    backend.init_cuda_graph_state(MAX_BS, MAX_BS)
    assert backend.executor.graph_list_heads == (HKV if cells == "head" else 1)
    static = StaticBuffers(MAX_BS, device, backend.get_cuda_graph_seq_len_fill_value())
    graph = Recorder(monkeypatch, s) if device == "cpu" else CudaGraph(monkeypatch, s)
    cap = static.capture_batch()
    backend.init_forward_metadata_out_graph(cap, in_capture=True)

    def step():
        return [backend.forward_decode(q, k, v, layer, cap) for layer, (q, k, v) in zip(s.layers, static.qkv)]

    outs = graph.capture(step)
    compressed_a = s.add_request(40, compress=True)
    plain_b = s.add_request(23, compress=False)
    plain_c = s.add_request(7, compress=False)
    compressed_d = s.add_request(61, compress=True)
    steps = [
        [compressed_a, plain_b, plain_c],  # mixed, one padded entry
        [plain_b, plain_c],  # nothing compressed: every layer reads the shared slots, shifted
        [compressed_d, compressed_a, plain_b, plain_c],  # full batch, two compressed
        [compressed_d],  # other lengths than at capture and at the last replay
    ]
    for rows in steps:
        live = s.decode_batch(rows)
        inputs = [(torch.randn(len(rows), H * D, generator=s.g).to(device),
                   torch.randn(len(rows), HKV, D, generator=s.g).to(device),
                   torch.randn(len(rows), HKV, D, generator=s.g).to(device)) for _ in range(L)]
        expected = eager_reference(s, live, inputs)
        # the reference wrote this step's K/V into its new slots already: poison them, so the replay
        # must write them again itself, into the right slots, or its outputs come out NaN
        poison_new_slots(s, live.out_cache_loc)
        view = static.load(live, inputs)
        for out in outs:
            out.fill_(float("nan"))
        backend.init_forward_metadata_out_graph(view)
        assert backend.forward_metadata.graph and backend.forward_metadata.batch_size == MAX_BS
        assert all(kv.heads == backend.executor.graph_list_heads for kv in backend.forward_metadata.layer_kv.values())
        graph.replay()
        for layer in range(L):
            torch.testing.assert_close(outs[layer][: len(rows)], expected[layer], rtol=1e-4, atol=1e-4)
    # the replays are counted (capture is not), and those with per-layer lists apart
    counters = backend.compressor.counters
    assert (counters.graph_decode_steps, counters.graph_decode_steps_compressed) == (len(steps), 3)


def test_batches_that_could_overflow_the_buffers_run_eagerly():
    s = Server("cpu")
    s.backend.init_cuda_graph_state(MAX_BS, MAX_BS)
    cap = s.backend.graph_capacity
    assert cap == min(MAX_BS * CTX, s.backend.global_kv.rows_per_layer)
    runner = SimpleNamespace(attn_backend=s.backend)
    assert _graph_fits_buffers(True, runner, SimpleNamespace(seq_lens_sum=cap - MAX_BS))
    assert not _graph_fits_buffers(True, runner, SimpleNamespace(seq_lens_sum=cap - MAX_BS + 1))
    assert not _graph_fits_buffers(False, runner, SimpleNamespace(seq_lens_sum=1))
    other = SimpleNamespace(attn_backend=object())  # another backend: SGLang's decision stands
    assert _graph_fits_buffers(True, other, SimpleNamespace(seq_lens_sum=10 ** 9))


def test_graph_mode_refuses_what_it_cannot_replay():
    s = Server("cpu")
    s.backend.init_cuda_graph_state(MAX_BS, MAX_BS)
    extend = SimpleNamespace(forward_mode=ForwardMode.EXTEND, batch_size=1)
    with pytest.raises(NotImplementedError, match="decode only"):
        s.backend.init_forward_metadata_out_graph(extend, in_capture=True)
    s.backend.executor = FlashInferAttentionExecutor("cpu", compressed_decode="flashinfer")
    with pytest.raises(NotImplementedError, match="plan-free Triton decode"):
        s.backend.init_cuda_graph_state(MAX_BS, MAX_BS)
    s.backend.executor = TorchAttentionExecutor()
    with pytest.raises(NotImplementedError, match="no CUDA-graph mode"):
        s.backend.init_cuda_graph_state(MAX_BS, MAX_BS)


def test_debug_check_counts_a_forward_that_reads_a_freed_slot():
    """``_check_reads`` counts each forward whose key lists hold a slot the allocator has as free,
    once per forward: a plain request's slot, then a compressed request's kept cell slot."""
    s = Server("cpu")
    backend = s.backend
    backend.executor = TorchAttentionExecutor()
    backend.debug_checks = True
    plain = s.add_request(20, compress=False)
    compressed = s.add_request(30, compress=True)
    live = s.decode_batch([plain, compressed])
    backend.init_forward_metadata(live)
    assert backend.freed_reads == 0  # nothing freed: nothing counted
    s.allocator.free(s.req_pool.req_to_token[plain, 3:5].to(torch.int64))  # two slots the plain list reads
    backend.init_forward_metadata(live)
    assert backend.freed_reads == 1  # one forward, counted once

    live = s.decode_batch([compressed])
    backend.init_forward_metadata(live)
    assert backend.freed_reads == 1  # the compressed request alone reads nothing freed
    lists = backend.forward_metadata.layer_kv
    assert lists, "the compressed request reads per-layer lists"
    cell = next(iter(lists.values())).kv_indices[:1] % backend.compressor.vkv.rows_per_layer
    assert not bool(torch.isin(cell, live.out_cache_loc).any())  # a kept prompt cell, not the new token
    s.allocator.free(cell)
    backend.init_forward_metadata(live)
    assert backend.freed_reads == 2


def test_replay_preparation_takes_a_fixed_number_of_device_ops_whatever_the_layers():
    """Before every replay the hook loads the step's lists into the graph buffers, on the replay's
    stream: each op is a host launch and a tiny kernel the GPU runs before the graph. With a
    compressed request in the batch every layer has its own list; loading them (and padding them)
    one layer at a time cost three ops per layer (84 of a 28-layer step's ~100). Counted on
    SGLang's pools with a ``TorchDispatchMode``, the lists built the way a server with the vlcache
    tree builds them (row rewrites reported): the same count at 4 and at 16 layers."""
    from test_layer_lists_host_work import VIEWS, CountOps

    views = VIEWS | {"select", "unsqueeze", "expand"}  # a view launches nothing

    def kernels(layers: int, cells: str) -> int:
        s = Server("cpu", cells=cells, layers=layers)
        backend = s.backend
        backend.compressor.layer_lists.rows_reported = True  # what the vlcache radix tree sets
        backend.init_cuda_graph_state(MAX_BS, MAX_BS)
        static = StaticBuffers(MAX_BS, "cpu", backend.get_cuda_graph_seq_len_fill_value(), layers=layers)
        backend.init_forward_metadata_out_graph(static.capture_batch(), in_capture=True)
        compressed, plain = s.add_request(40, compress=True), s.add_request(20, compress=False)
        count = None
        for _ in range(2):  # the second step is the steady state (resolutions cached)
            live = s.decode_batch([compressed, plain])
            inputs = [(torch.zeros(2, H * D), torch.zeros(2, HKV, D), torch.zeros(2, HKV, D)) for _ in range(layers)]
            view = static.load(live, inputs)
            count = CountOps(views)
            with count:
                backend.init_forward_metadata_out_graph(view)
            assert len(backend.forward_metadata.layer_kv) == layers  # every layer its own list, padded
        return sorted(count.kernels)

    for cells in ("layer", "head"):
        few, many = kernels(4, cells), kernels(16, cells)
        assert few == many, (cells, len(few), len(many), sorted(set(many) - set(few)) or many)
