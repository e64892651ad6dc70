"""The vlcache backend against SGLang's TorchNativeAttnBackend on SGLang's real KV pools.

Same inputs through both backends (extend with and without a cached prefix, then decode): with
nothing compressed the outputs must be bitwise equal, and both must match a dense reference.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend
from vlcache_sglang.backend.metadata import build_ragged_kv

H, HKV, D = 4, 2, 16


def make_pools():
    req_pool = ReqToTokenPool(size=8, max_context_len=128, device="cpu", enable_memory_saver=False)
    kv_pool = MHATokenToKVPool(size=512, page_size=1, dtype=torch.float32, head_num=HKV, head_dim=D,
                               layer_num=1, device="cpu", enable_memory_saver=False)
    return SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=kv_pool)


def dense_reference(q, k, v, first_pos):
    """q: [Sq,H,D] at positions first_pos.., k/v: [Skv,HKV,D] at positions 0..; causal."""
    k = k.repeat_interleave(H // HKV, 1).double()
    v = v.repeat_interleave(H // HKV, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(D)
    qpos = torch.arange(q.shape[0])[:, None] + first_pos
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > qpos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).float()


def batch(mode, runner, rows, seq_lens, extend_lens, prefix_lens, out_cache_loc):
    return SimpleNamespace(
        forward_mode=mode, out_cache_loc=out_cache_loc, req_pool_indices=torch.tensor(rows),
        seq_lens=torch.tensor(seq_lens), seq_lens_cpu=torch.tensor(seq_lens),
        extend_seq_lens=torch.tensor(extend_lens), extend_seq_lens_cpu=list(extend_lens),
        extend_prefix_lens=torch.tensor(prefix_lens), extend_prefix_lens_cpu=list(prefix_lens),
        encoder_lens=None,
    )


@pytest.mark.parametrize("seq_lens,prefix_lens", [([5], [0]), ([3, 7], [0, 0]), ([9, 6, 4], [4, 0, 3])])
def test_extend_and_decode_match_torch_native_bitwise(seq_lens, prefix_lens):
    torch.manual_seed(0)
    runner = make_pools()
    stock, ours = TorchNativeAttnBackend(runner), VLCacheAttnBackend(runner)
    layer = RadixAttention(H, D, 1 / math.sqrt(D), HKV, layer_id=0)
    pool = runner.token_to_kv_pool
    rows = list(range(len(seq_lens)))
    # slots: request i owns a scattered, non-contiguous set (as after radix reuse and frees)
    perm = torch.randperm(400)[: sum(seq_lens) + len(seq_lens)] + 1
    slots, start = [], 0
    for i, n in enumerate(seq_lens):
        s = perm[start : start + n]
        runner.req_to_token_pool.req_to_token[i, :n] = s.to(torch.int32)
        slots.append(s)
        start += n
    k_all = [torch.randn(n, HKV, D) for n in seq_lens]
    v_all = [torch.randn(n, HKV, D) for n in seq_lens]
    # the cached prefix is already in the pool
    for i, p in enumerate(prefix_lens):
        if p:
            pool.set_kv_buffer(layer, slots[i][:p], k_all[i][:p], v_all[i][:p])
    ext = [n - p for n, p in zip(seq_lens, prefix_lens)]
    loc = torch.cat([slots[i][p:] for i, p in enumerate(prefix_lens)])
    q = torch.randn(sum(ext), H * D)
    k = torch.cat([k_all[i][p:] for i, p in enumerate(prefix_lens)])
    v = torch.cat([v_all[i][p:] for i, p in enumerate(prefix_lens)])
    fb = batch(ForwardMode.EXTEND, runner, rows, seq_lens, ext, prefix_lens, loc)
    stock.init_forward_metadata(fb)
    ours.init_forward_metadata(fb)
    o_stock = stock.forward_extend(q, k, v, layer, fb)
    o_ours = ours.forward_extend(q, k, v, layer, fb)
    assert torch.equal(o_stock, o_ours)
    off = 0
    for i, (n, p) in enumerate(zip(seq_lens, prefix_lens)):
        exp = dense_reference(q.view(-1, H, D)[off : off + n - p], k_all[i], v_all[i], p)
        torch.testing.assert_close(o_ours.view(-1, H, D)[off : off + n - p], exp, atol=1e-5, rtol=1e-5)
        off += n - p

    # one decode step per request, new slot appended to each row
    new = perm[start : start + len(seq_lens)]
    for i, n in enumerate(seq_lens):
        runner.req_to_token_pool.req_to_token[i, n] = int(new[i])
    dec_lens = [n + 1 for n in seq_lens]
    qd, kd, vd = torch.randn(len(rows), H * D), torch.randn(len(rows), HKV, D), torch.randn(len(rows), HKV, D)
    fbd = batch(ForwardMode.DECODE, runner, rows, dec_lens, [1] * len(rows), seq_lens, new)
    stock.init_forward_metadata(fbd)
    ours.init_forward_metadata(fbd)
    assert torch.equal(stock.forward_decode(qd, kd, vd, layer, fbd), ours.forward_decode(qd, kd, vd, layer, fbd))


def test_ragged_kv_layout_matches_req_to_token():
    runner = make_pools()
    r2t = runner.req_to_token_pool.req_to_token
    r2t[3, :4] = torch.tensor([10, 11, 12, 13], dtype=torch.int32)
    r2t[1, :2] = torch.tensor([7, 5], dtype=torch.int32)
    kv = build_ragged_kv(r2t, torch.tensor([3, 1]), [4, 2])
    assert kv.kv_indptr.tolist() == [0, 4, 6] and kv.kv_indptr_cpu == [0, 4, 6]
    assert kv.kv_indices.tolist() == [10, 11, 12, 13, 7, 5]
    assert kv.slots(1).tolist() == [7, 5] and kv.length(0) == 4
