"""fp8 KV caches (``--kv-cache-dtype fp8_e5m2`` / ``fp8_e4m3``) on SGLang's real pool class (CPU).

SGLang stores fp8 KV as ``uint8`` and reads it through an fp8 view; its CPU server refuses fp8, so
the backend is driven here directly on ``MHATokenToKVPool(dtype=float8_*)``:

* budget 1.0: the vlcache backend's outputs equal SGLang's ``torch_native`` backend's, bitwise;
* compression: on K/V that an fp8 pool holds exactly, the fp8 path and the 16-bit path make the
  same plan and keep the same cells (same bytes), and their extend outputs are equal;
* a compressed decode step is within fp8 tolerance of dense attention over the kept positions of
  the original (unquantized) K/V, through the torch executor and through the Triton kernel
  (interpreter on CPU) with the layer's KV scales.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend
from vlcache_sglang.backend.metadata import decode_metadata
from vlcache_sglang.backend.request_info import RequestInfo
from vlcache_sglang.kernels.ragged_decode import ragged_decode, ragged_decode_torch
from vlcache_sglang.policy import PolicyConfig

L, H, HKV, D, POOL, CTX = 3, 4, 2, 16, 256, 96
FP8 = [torch.float8_e5m2, torch.float8_e4m3fn]
MODEL_DTYPE = torch.bfloat16
TOL = {torch.float8_e5m2: 0.25, torch.float8_e4m3fn: 0.12}  # abs, on unit-variance values


class Server:
    def __init__(self, kv_dtype, stock=False):
        self.req_pool = ReqToTokenPool(size=4, max_context_len=CTX, device="cpu", enable_memory_saver=False)
        self.pool = MHATokenToKVPool(size=POOL, page_size=1, dtype=kv_dtype, head_num=HKV, head_dim=D, layer_num=L,
                                     device="cpu", enable_memory_saver=False)
        self.allocator = TokenToKVPoolAllocator(POOL, kv_dtype, "cpu", self.pool, need_sort=False)
        config = SimpleNamespace(num_attention_heads=H, get_num_kv_heads=lambda tp: HKV, context_len=CTX)
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.req_pool, token_to_kv_pool=self.pool,
                                 token_to_kv_pool_allocator=self.allocator, model_config=config, tp_size=1,
                                 dtype=MODEL_DTYPE, kv_cache_dtype=kv_dtype)
        self.backend = TorchNativeAttnBackend(runner) if stock else VLCacheAttnBackend(runner)
        self.layers = [RadixAttention(H, D, 1 / math.sqrt(D), HKV, layer_id=l) for l in range(L)]


def fb(mode, rows, seq_lens, ext, prefix, loc, rids):
    return SimpleNamespace(
        forward_mode=mode, out_cache_loc=loc, req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens),
        seq_lens_cpu=torch.tensor(seq_lens), extend_seq_lens=torch.tensor(ext), extend_seq_lens_cpu=list(ext),
        extend_prefix_lens=torch.tensor(prefix), extend_prefix_lens_cpu=list(prefix), encoder_lens=None, rids=rids)


def inputs(m, seed, kv_dtype=None):
    """Per layer q [m, H*D], k/v [m, HKV, D] in the model dtype; K/V rounded through ``kv_dtype``
    (values an fp8 pool holds exactly) when given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(L):
        q = torch.randn(m, H * D, generator=g)
        k, v = torch.randn(m, HKV, D, generator=g), torch.randn(m, HKV, D, generator=g)
        if kv_dtype is not None:
            k, v = k.to(kv_dtype).float(), v.to(kv_dtype).float()
        out.append((q.to(MODEL_DTYPE), k.to(MODEL_DTYPE), v.to(MODEL_DTYPE)))
    return out


def prefill(server, m, layer_inputs, policy=None, row=0):
    slots = server.allocator.alloc(m)
    server.req_pool.req_to_token[row, :m] = slots.to(torch.int32)
    batch = fb(ForwardMode.EXTEND, [row], [m], [m], [0], slots, [f"r{row}"])
    be = server.backend
    if policy is not None:
        info = RequestInfo(rid=f"r{row}", req_pool_idx=row, prompt_len=m, image_spans=((4, m - 13),),
                           is_last_chunk=True, protected_len=0, policy=policy)
        be.init_forward_metadata(batch)
        be.forward_metadata.requests = [info]
    else:
        be.init_forward_metadata(batch)
    return [be.forward_extend(q.clone(), k.clone(), v.clone(), layer, batch)
            for layer, (q, k, v) in zip(server.layers, layer_inputs)]


def decode(server, row, n, g):
    new = server.allocator.alloc(1)
    server.req_pool.req_to_token[row, n] = int(new)
    batch = fb(ForwardMode.DECODE, [row], [n + 1], [1], [n], new, [f"r{row}"])
    server.backend.init_forward_metadata(batch)
    step = [(torch.randn(1, H * D, generator=g).to(MODEL_DTYPE), torch.randn(1, HKV, D, generator=g).to(MODEL_DTYPE),
             torch.randn(1, HKV, D, generator=g).to(MODEL_DTYPE)) for _ in range(L)]
    outs = [server.backend.forward_decode(q.clone(), k.clone(), v.clone(), layer, batch)
            for layer, (q, k, v) in zip(server.layers, step)]
    return outs, step


@pytest.mark.parametrize("kv_dtype", FP8)
def test_budget_one_is_bitwise_sglang_torch_native_on_an_fp8_pool(kv_dtype):
    m = 40
    x = inputs(m, 0)
    ours, stock = Server(kv_dtype), Server(kv_dtype, stock=True)
    assert ours.backend.global_kv.k.dtype == kv_dtype  # the fp8 view, not SGLang's uint8 bytes
    for a, b in zip(prefill(ours, m, x), prefill(stock, m, x)):
        assert torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for a, b in zip(decode(ours, 0, m, g1)[0], decode(stock, 0, m, g2)[0]):
        assert torch.equal(a, b)


def kept_state(server, row, m):
    """Per layer: the positions it holds and the bytes of their K/V cells (as floats)."""
    be = server.backend
    meta = decode_metadata(server.req_pool.req_to_token, torch.tensor([row]), [m])
    layer_kv, positions = be.compressor.layer_lists.build(meta, [row], [f"r{row}"])
    kv = be.global_kv
    out = []
    for l in range(L):
        ids = layer_kv[l].kv_indices
        out.append((positions[l][0].tolist(), ids.tolist(), kv.k[ids].float(), kv.v[ids].float()))
    return out


@pytest.mark.parametrize("kv_dtype", FP8)
def test_fp8_compression_plans_and_keeps_what_the_16_bit_path_does(kv_dtype):
    m = 48
    policy = PolicyConfig(method="vlcache", alpha=0.3, window_size=8)
    x = inputs(m, 2, kv_dtype)  # values the fp8 pool holds exactly
    fp8, bf16 = Server(kv_dtype), Server(torch.bfloat16)
    out8, out16 = prefill(fp8, m, x, policy), prefill(bf16, m, x, policy)
    for a, b in zip(out8, out16):
        assert torch.equal(a, b)
    rec8, rec16 = fp8.backend.compressor.rows[0], bf16.backend.compressor.rows[0]
    assert rec8.kept_counts == rec16.kept_counts and sum(rec8.kept_counts) < L * m
    assert rec8.tokens_saved == rec16.tokens_saved > 0
    assert fp8.allocator.available_size() == bf16.allocator.available_size()
    for (p8, ids8, k8, v8), (p16, ids16, k16, v16) in zip(kept_state(fp8, 0, m), kept_state(bf16, 0, m)):
        assert p8 == p16 and ids8 == ids16
        assert torch.equal(k8, k16) and torch.equal(v8, v16)  # the fp8 bytes moved intact
        # and they are the inputs' kept rows
    for l, (pos, _, k, _) in enumerate(kept_state(fp8, 0, m)):
        assert torch.equal(k, x[l][1][pos].float())


def dense(q, k, v, scale):
    g = H // HKV
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.einsum("hd,khd->hk", q.double().view(H, D), k) * scale
    return torch.einsum("hk,khd->hd", s.softmax(-1), v)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("scales", [(None, None), (0.25, 4.0)])
def test_compressed_fp8_decode_is_within_fp8_tolerance_of_dense_attention(kv_dtype, scales):
    """With the layer's KV scales (checkpoint-calibrated) the cells hold K/k_scale, V/v_scale and
    every read multiplies back, as SGLang's FlashInfer backend does."""
    m = 48
    x = inputs(m, 3)  # not pre-rounded: the pool quantizes
    server = Server(kv_dtype)
    for layer in server.layers:
        layer.k_scale_float, layer.v_scale_float = scales
    prefill(server, m, x, PolicyConfig(method="vlcache", alpha=0.3, window_size=8))

    assert 0 in server.backend.compressor.rows
    outs, step = decode(server, 0, m, torch.Generator().manual_seed(4))
    if scales[0] is not None:  # the decode token's real slot holds K / k_scale, V / v_scale
        slot = server.req_pool.req_to_token[0, m : m + 1].long()
        for buf, want, sc in ((server.pool.get_key_buffer(0), step[0][1], scales[0]),
                              (server.pool.get_value_buffer(0), step[0][2], scales[1])):
            torch.testing.assert_close(buf[slot].float() * sc, want.float(), atol=0.3, rtol=0.15)
    state = kept_state(server, 0, m + 1)
    for l in range(L):
        pos = state[l][0]
        own = [p for p in pos if p < m]
        k = torch.cat([x[l][1][own].float(), step[l][1].float()])
        v = torch.cat([x[l][2][own].float(), step[l][2].float()])
        ref = dense(step[l][0].float(), k, v, 1 / math.sqrt(D))
        err = (outs[l].float().view(H, D) - ref).abs().max().item()
        assert err < TOL[kv_dtype], (l, err)


@pytest.mark.parametrize("kv_dtype", FP8)
@pytest.mark.parametrize("scales", [(None, None), (0.5, 2.0)])
@pytest.mark.parametrize("fused", [False, True], ids=["two-launch", "fused-merge"])
def test_triton_ragged_decode_dequantizes_fp8_with_the_layer_scales(kv_dtype, scales, fused):
    """The plan-free kernel on fp8 views (Triton interpreter on CPU) equals the torch reference,
    and with scales the dequantized values (stored x scale) are what it attends over (``v_scale``
    applied by whichever merge runs)."""
    k_scale, v_scale = scales
    g = torch.Generator().manual_seed(5)
    rows, lens = 200, [1, 37, 130]
    k_true = torch.randn(rows, HKV, D, generator=g)
    v_true = torch.randn(rows, HKV, D, generator=g)
    # stored as SGLang writes with scales: divided, then cast
    k8 = (k_true / (k_scale or 1.0)).to(kv_dtype)
    v8 = (v_true / (v_scale or 1.0)).to(kv_dtype)
    k_store, v_store = k8.view(torch.uint8).clone(), v8.view(torch.uint8).clone()  # SGLang's storage
    k_cache, v_cache = k_store.view(kv_dtype), v_store.view(kv_dtype)
    perm = torch.randperm(rows, generator=g)[: sum(lens)]
    indptr = [0]
    for n in lens:
        indptr.append(indptr[-1] + n)
    q = torch.randn(len(lens), H, D, generator=g).to(MODEL_DTYPE)
    scale = 1 / math.sqrt(D)
    out = ragged_decode(q, k_cache, v_cache, torch.tensor(indptr), perm, scale, k_scale=k_scale, v_scale=v_scale,
                        num_splits=3, fused_merge=fused)
    ref = ragged_decode_torch(q, k_cache, v_cache, indptr, perm, scale, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    for b in range(len(lens)):
        sel = perm[indptr[b]:indptr[b + 1]]
        exact = dense(q[b].float(), k_true[sel], v_true[sel], scale)
        assert (out[b].float() - exact).abs().max().item() < TOL[kv_dtype] * 2


@pytest.mark.parametrize("kv_dtype", FP8)
def test_triton_statistics_read_fp8_keys_as_the_torch_path_reads_their_values(kv_dtype):
    """On CUDA the prefill statistics run through the fused Triton kernel on the pool's keys (here
    the interpreter): fp8 keys give what the torch statistics give on the same values."""
    from vlcache_sglang.kernels.dispatch import attention_stats_auto
    from vlcache_sglang.policy.stats import attention_stats

    g = torch.Generator().manual_seed(6)
    n_k, n_q = 70, 9
    k8 = torch.randn(n_k, HKV, D, generator=g).to(kv_dtype)
    q = torch.randn(n_q, H, D, generator=g).to(MODEL_DTYPE)
    pos = torch.arange(n_k - n_q, n_k)
    ref = attention_stats(q, pos, k8.to(MODEL_DTYPE), 1 / math.sqrt(D), 0.01)
    got = attention_stats_auto(q, pos, k8, 1 / math.sqrt(D), 0.01, mode="triton")
    torch.testing.assert_close(got.col.float(), ref.col.float(), atol=1e-3, rtol=1e-3)
