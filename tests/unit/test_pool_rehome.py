"""Re-homing SGLang's KV pool as one contiguous K/V, on SGLang's real pool class (CPU).

The pool fills the device, so building the backend may not allocate a second pool: with the
memory hook the pool is allocated contiguous and re-homing allocates nothing; without it the
layers move one at a time. Afterwards every pointer SGLang caches for the pool points at the live
tensors, and SGLang's own pointer-based ``move_kv_cache`` (speculative decoding) moves the data.
Peak memory is the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import gc
import inspect
import os
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

from vlcache_sglang.backend import memory_budget
from vlcache_sglang.backend.attention_backend import VLCacheAttnBackend
from vlcache_sglang.backend.cell_store import contiguous_storage, rehome_pool_buffers
from vlcache_sglang.settings import ServerSettings

MiB = 1 << 20
L, HKV, D = 8, 4, 64  # fp32: 16 KiB per slot (K+V, all layers)
BIG = 16384 - 1  # 256 MiB pool


def make_pool(size, layers=L, enable_kv_cache_copy=False, dtype=torch.float32):
    return MHATokenToKVPool(size=size, page_size=1, dtype=dtype, head_num=HKV, head_dim=D, layer_num=layers,
                            device="cpu", enable_memory_saver=False, enable_kv_cache_copy=enable_kv_cache_copy)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def build_backend(pool, size):
    req_pool = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", pool, need_sort=False)
    config = SimpleNamespace(num_attention_heads=8, get_num_kv_heads=lambda tp: HKV, context_len=64)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=req_pool, token_to_kv_pool=pool,
                             token_to_kv_pool_allocator=allocator, model_config=config, tp_size=1, dtype=torch.float32)
    return VLCacheAttnBackend(runner)


def pool_bytes(pool) -> int:
    k, v = pool.get_kv_size_bytes()
    return k + v


def measure_build(pool, size):
    """Peak RSS growth while the backend is built, and the backend's own device tables."""
    gc.collect()
    if not reset_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    rss0 = _status("VmRSS")
    backend = build_backend(pool, size)
    peak = _status("VmHWM") - rss0
    return peak, backend


def fix_mmap_threshold() -> None:
    """glibc raises its mmap threshold (up to 32 MiB) each time a large mmapped block is freed;
    after earlier tests did so, a pool's 32 MiB layers come from the heap, and freeing a moved
    layer no longer lowers RSS (it did in isolation, not in the full suite: peak +96 MiB there).
    A fixed threshold keeps every layer mmapped, so a freed layer leaves RSS as it leaves a
    device allocator."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@pytest.fixture(autouse=True)
def hooks():
    fix_mmap_threshold()  # before any pool of the test is allocated
    memory_budget.install_memory_hooks()
    yield


def _measure_hooked() -> dict:
    with memory_budget.forced(True):
        pool = make_pool(BIG)
    k_before = pool.k_buffer[3].data_ptr()
    contiguous = contiguous_storage(pool) is not None
    peak, backend = measure_build(pool, BIG)
    kv = backend.global_kv
    return {"contiguous": contiguous, "pool": pool_bytes(pool), "peak": peak,
            "tables": backend.compressor.vkv.device_bytes(),
            "unmoved": pool.k_buffer[3].data_ptr() == k_before,
            "global_view": kv.k.shape[0] == L * (BIG + 1) and kv.k[3 * (BIG + 1)].data_ptr() == k_before}


def _measure_unhooked() -> dict:
    with memory_budget.forced(False):
        pool = make_pool(BIG)
    contiguous_before = contiguous_storage(pool) is not None
    pool.k_buffer[0].copy_(torch.randn_like(pool.k_buffer[0]))
    data0 = pool.k_buffer[0].clone()
    peak, backend = measure_build(pool, BIG)
    return {"contiguous_before": contiguous_before, "contiguous": contiguous_storage(pool) is not None,
            "layer": pool_bytes(pool) // L, "pool": pool_bytes(pool), "peak": peak,
            "tables": backend.compressor.vkv.device_bytes(),
            "data_moved": torch.equal(backend.global_kv.k[: BIG + 1], data0)}


def measured_in_a_fresh_process(which: str) -> dict:
    """Peak RSS is the process's: measured in a fresh interpreter, so that what earlier tests left
    in glibc's heap (and its raised mmap threshold) cannot count (in the full suite it once did:
    +96 MiB)."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "tests.unit.test_pool_rehome", which], cwd=repo,
                         env={**os.environ, "PYTHONPATH": repo}, capture_output=True, text=True, timeout=300)
    if out.returncode == 77:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hooked_pool_is_contiguous_and_the_backend_build_allocates_no_second_pool():
    r = measured_in_a_fresh_process("hooked")
    assert r["contiguous"] and r["pool"] >= 256 * MiB - 64 * 1024
    print(f"\npool {r['pool'] / MiB:.1f} MiB; peak during build +{r['peak'] / MiB:.2f} MiB "
          f"(tables {r['tables'] / MiB:.2f} MiB)")
    assert r["peak"] <= r["tables"] + 8 * MiB  # a second pool would be +256 MiB
    assert r["unmoved"] and r["global_view"]  # nothing moved; the global view is the pool itself


def test_unhooked_pool_moves_layer_by_layer_within_one_layer_of_extra_memory():
    r = measured_in_a_fresh_process("unhooked")
    assert not r["contiguous_before"] and r["contiguous"]
    print(f"\npool {r['pool'] / MiB:.1f} MiB, one layer {r['layer'] / MiB:.1f} MiB; "
          f"peak while moving +{(r['peak'] - r['tables']) / MiB:.2f} MiB beyond the tables")
    assert r["peak"] <= r["tables"] + r["layer"] + 4 * MiB
    assert r["data_moved"]


def cached_pointers_match(pool) -> None:
    buffers = pool._slot_move_pointer_buffers()
    assert pool.k_data_ptrs.tolist() == [t.data_ptr() for t in pool.k_buffer]
    assert pool.v_data_ptrs.tolist() == [t.data_ptr() for t in pool.v_buffer]
    assert pool.data_ptrs.tolist() == [t.data_ptr() for t in buffers]
    assert pool.data_strides.tolist() == [t.stride(0) * t.dtype.itemsize for t in buffers]
    ptrs, lens, item_lens = pool.get_contiguous_buf_infos()
    assert ptrs == [t.data_ptr() for t in pool.k_buffer + pool.v_buffer]


@pytest.mark.parametrize("hooked", [True, False])
def test_sglang_move_kv_cache_moves_data_on_the_rehomed_pool(hooked, monkeypatch):
    """SGLang's own move_kv_cache reads data_ptrs/data_strides (its Triton kernel, run here by
    Triton's interpreter): after re-homing it must move the rows of the live global storage."""
    from triton.runtime.interpreter import InterpretedFunction

    from sglang.kernels.ops.kvcache import cache_move

    fn = cache_move.copy_all_layer_kv_cache_tiled
    if not isinstance(fn, InterpretedFunction):
        monkeypatch.setattr(cache_move, "copy_all_layer_kv_cache_tiled", InterpretedFunction(fn.fn))
    monkeypatch.setattr(cache_move, "_is_cpu", False)
    size, layers = 63, 3
    with memory_budget.forced(hooked):
        pool = make_pool(size, layers=layers, enable_kv_cache_copy=True)
    kv = rehome_pool_buffers(pool)
    cached_pointers_match(pool)
    kv.k.copy_(torch.randn_like(kv.k))
    kv.v.copy_(torch.randn_like(kv.v))
    before_k, before_v = kv.k.clone(), kv.v.clone()
    src, tgt = torch.tensor([10, 11, 40]), torch.tensor([3, 50, 7])
    pool.move_kv_cache(tgt, src)
    rows = size + 1
    for l in range(layers):
        assert torch.equal(kv.k[l * rows + tgt], before_k[l * rows + src])
        assert torch.equal(kv.v[l * rows + tgt], before_v[l * rows + src])
        untouched = torch.ones(rows, dtype=torch.bool)
        untouched[tgt] = False
        assert torch.equal(kv.k[l * rows:(l + 1) * rows][untouched], before_k[l * rows:(l + 1) * rows][untouched])


OPT_IN = ServerSettings(cuda_executor="flashinfer")  # a launch with VLCACHE_CUDA_EXECUTOR=flashinfer


def _configurator_inputs(monkeypatch, attention_backend, device, layers=28, settings=OPT_IN, kv_heads=4,
                         head_dim=128, dtype=torch.bfloat16):
    """SGLang's DefaultPoolConfigurator for a Qwen2-VL-7B-like MHA model (4 KV heads of 128,
    bf16), with the process-wide parallel context SGLang would have published and the launch's
    settings on the server args."""
    from transformers import PretrainedConfig

    import sglang.srt.layers.cp.utils as cp_utils
    import sglang.srt.model_executor.pool_configurator as pc

    par = SimpleNamespace(attn_tp_size=1, attn_dcp_size=1, attn_cp_size=1, enable_dsa_cache_layer_split=False)
    monkeypatch.setattr(pc, "get_parallel", lambda: par)
    monkeypatch.setattr(cp_utils, "get_parallel", lambda: par)
    model = SimpleNamespace(get_num_kv_heads=lambda tp, dcp=1: kv_heads, head_dim=head_dim, v_head_dim=head_dim,
                            hf_config=PretrainedConfig(), quantization=None)
    args = SimpleNamespace(enable_hisparse=False, attention_backend=attention_backend, _vlcache_settings=settings,
                           prefill_attention_backend=None, decode_attention_backend=None)
    kvc = SimpleNamespace(model_config=model, kv_cache_dtype=dtype, server_args=args, use_mla_backend=False,
                          device=device, kv_cache_dtype_str="auto", is_draft_worker=False)
    conf = object.__new__(pc.DefaultPoolConfigurator)
    conf.kv_cache_dtype_str = "auto"
    conf._cell_size = conf._compute_cell_size(kvc, layers)
    conf._fixed_overhead_bytes, conf._zero_kv_max_tokens = 0, 0
    return conf


def test_memory_hook_charges_the_device_tables_in_sglangs_cell_size(monkeypatch, caplog):
    import logging

    stock = _configurator_inputs(monkeypatch, "flashinfer", "cuda")
    assert stock._cell_size == 4 * 256 * 28 * 2  # 57,344 B: SGLang's own figure
    with caplog.at_level(logging.INFO, logger=memory_budget.__name__):
        ours = _configurator_inputs(monkeypatch, "vlcache", "cuda")
    extra = ours._cell_size - stock._cell_size
    assert extra == 28 * 4 * 4 + 4 * 4 + 28 * 4 == 576  # ids table + birth stamps + graph index buffers
    assert "device tables 576 B/slot (1.0% of the 57,344 B cell) counted in the pool budget" in caplog.text
    budget = 100 << 30
    n_stock = stock.calculate_pool_sizes(budget, 1).max_total_num_tokens
    n_ours = ours.calculate_pool_sizes(budget, 1).max_total_num_tokens
    # what the smaller pool leaves is what the tables take, to within a slot
    assert abs((n_stock - n_ours) * stock._cell_size - n_ours * extra) <= ours._cell_size
    # CPU: no graph buffers; the stock CUDA path (no VLCACHE_CUDA_EXECUTOR) is left alone
    assert _configurator_inputs(monkeypatch, "vlcache", "cpu")._cell_size - stock._cell_size == 464
    assert _configurator_inputs(monkeypatch, "vlcache", "cuda", settings=ServerSettings())._cell_size == stock._cell_size


def test_install_memory_hooks_is_idempotent():
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    create, cell = MHATokenToKVPool._create_buffers_normal, DefaultPoolConfigurator._compute_cell_size
    memory_budget.install_memory_hooks()  # as if a second register() ran
    assert MHATokenToKVPool._create_buffers_normal is create and DefaultPoolConfigurator._compute_cell_size is cell
    assert inspect.unwrap(create) is not create and inspect.unwrap(cell) is not cell  # wrapped once, by us


if __name__ == "__main__":  # the fresh-process measurements above
    import json
    import sys

    fix_mmap_threshold()
    memory_budget.install_memory_hooks()
    if not reset_peak():
        sys.exit(77)
    result = {"hooked": _measure_hooked, "unhooked": _measure_unhooked}[sys.argv[1]]()
    print(json.dumps({k: v if isinstance(v, bool) else int(v) for k, v in result.items()}))
