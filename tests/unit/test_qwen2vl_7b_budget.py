"""KV memory arithmetic for the real target, Qwen2-VL-7B on one H200 (no weights, no GPU).

Through the plugin's own pieces: the memory hook on SGLang's ``DefaultPoolConfigurator`` (the
tables' bytes per slot added to SGLang's cell size, :mod:`vlcache_sglang.backend.memory_budget`),
the budget functions that split a 0.1 budget over the layers, and :class:`VirtualKV`'s packing
of the kept rows into ``ceil(sum_l k_l / L)`` slots (:mod:`vlcache_sglang.backend.cell_store`).
Figures for a 100 GiB KV budget (what an H200's 141 GB leaves after the 7B's ~16 GB of bf16
weights at SGLang's default static memory fraction, roughly).
"""
from __future__ import annotations

import math

import pytest
import torch

from tests.unit.test_pool_rehome import OPT_IN, _configurator_inputs
from vlcache_sglang.backend import memory_budget
from vlcache_sglang.backend.memory_budget import table_bytes_per_slot
from vlcache_sglang.settings import ServerSettings

# Qwen/Qwen2-VL-7B-Instruct config.json (public, huggingface.co/Qwen/Qwen2-VL-7B-Instruct; hard-coded,
# there is no hub access here): num_hidden_layers 28, num_attention_heads 28, num_key_value_heads 4,
# hidden_size 3584 (head dim 3584 / 28 = 128), torch_dtype bfloat16.
LAYERS, Q_HEADS, KV_HEADS, HIDDEN = 28, 28, 4, 3584
HEAD_DIM = HIDDEN // Q_HEADS
BF16 = 2
KV_BUDGET = 100 << 30  # bytes SGLang leaves for the KV pool on an H200 (about)
IMAGE_TOKENS = 1000  # one request: a 1,000-token image prompt (text and generated tokens left out)


@pytest.fixture(autouse=True)
def hooks():
    memory_budget.install_memory_hooks()
    yield


def configurators(monkeypatch, **kw):
    """(stock CUDA server, vlcache with the opt-in CUDA executor) for the 7B's KV shape."""
    shape = dict(layers=LAYERS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=torch.bfloat16)
    return (_configurator_inputs(monkeypatch, "flashinfer", "cuda", **shape),
            _configurator_inputs(monkeypatch, "vlcache", "cuda", **shape, **kw))


def test_cell_size_and_table_overhead_on_cuda(monkeypatch):
    assert HEAD_DIM == 128
    stock, ours = configurators(monkeypatch, settings=OPT_IN)
    kv_bytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * BF16  # K and V, every layer
    assert stock._cell_size == kv_bytes == 57_344
    extra = ours._cell_size - stock._cell_size
    # the hook adds exactly the plugin's tables: 4 int32 ids per slot and layer, 4 birth stamps,
    # one int32 decode-graph index per layer
    assert extra == table_bytes_per_slot(LAYERS, graph_buffers=True) == 4 * LAYERS * 4 + 4 * 4 + LAYERS * 4 == 576
    assert 100.0 * extra / stock._cell_size == pytest.approx(1.0045, abs=1e-4)  # % of the 7B's cell
    # the table is sized from the launch's setting (VLCACHE_VIRTUAL_IDS_PER_SLOT)
    _, half = configurators(monkeypatch, settings=ServerSettings(cuda_executor="flashinfer", virtual_ids_per_slot=2.0))
    assert half._cell_size - stock._cell_size == 2 * LAYERS * 4 + 2 * 4 + LAYERS * 4 == 344
    # CUDA without the opt-in executor serves with SGLang's stock backend: nothing is charged
    _, off = configurators(monkeypatch, settings=ServerSettings())
    assert off._cell_size == stock._cell_size


def pool_sizes(monkeypatch) -> tuple[int, int, int]:
    stock, ours = configurators(monkeypatch, settings=OPT_IN)
    n_stock = stock.calculate_pool_sizes(KV_BUDGET, 1).max_total_num_tokens
    n_ours = ours.calculate_pool_sizes(KV_BUDGET, 1).max_total_num_tokens
    return n_stock, n_ours, ours._cell_size - stock._cell_size


def test_h200_pool_shrinks_by_the_tables_share(monkeypatch):
    n_stock, n_ours, extra = pool_sizes(monkeypatch)
    cell = 2 * LAYERS * KV_HEADS * HEAD_DIM * BF16
    assert n_stock == KV_BUDGET // cell == 1_872_457
    assert n_ours == KV_BUDGET // (cell + extra) == 1_853_836
    # the slots lost are the tables' share of the budget, to within one slot
    exact = KV_BUDGET * extra / (cell * (cell + extra))
    assert abs((n_stock - n_ours) - exact) < 1.0 and n_stock - n_ours == 18_621
    assert (n_stock - n_ours) / n_stock == pytest.approx(extra / (cell + extra), abs=1e-6)  # 0.99 %
    # KV and tables together fill the budget, and less than one hooked cell is left over
    used = n_ours * (cell + extra)
    assert used <= KV_BUDGET < used + cell + extra
    assert n_ours * extra / (1 << 30) == pytest.approx(0.9945, abs=1e-3)  # GiB of tables


def layer_budgets_at(alpha: float) -> list[int]:
    """VL-Cache's per-layer split of ``alpha`` for a 1,000-token prompt whose layers get sparser
    with depth (the paper's picture), through the plugin's budget functions."""
    from vlcache_sglang.policy.budgets import BudgetContext, adaptive_budgets, finalize_budgets
    from vlcache_sglang.policy.config import PolicyConfig

    cfg = PolicyConfig(alpha=alpha)
    sparsity = torch.linspace(0.5, 0.99, LAYERS)
    raw = adaptive_budgets(BudgetContext(IMAGE_TOKENS, LAYERS, cfg, sparsity))
    recent = math.ceil(cfg.recent_share * alpha * IMAGE_TOKENS)
    budgets, notes = finalize_budgets(raw, IMAGE_TOKENS, cfg, recent)
    assert not notes
    return budgets


def packed_slots(budgets: list[int]) -> tuple[int, int]:
    """(slots holding the cells, slots freed) when VirtualKV compacts one request keeping
    ``budgets[l]`` positions in layer ``l`` (SGLang's real pool and allocator, CPU, 1-wide heads)."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from vlcache_sglang.backend.cell_store import rehome_pool_buffers
    from vlcache_sglang.backend.virtual_kv import VirtualKV, install_free_filter

    size = IMAGE_TOKENS + 24
    pool = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=1, head_dim=1,
                            layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    kv = rehome_pool_buffers(pool)
    allocator = TokenToKVPoolAllocator(size, torch.float32, "cpu", pool, need_sort=False)
    vkv = VirtualKV(kv.rows_per_layer, LAYERS, capacity=2 * kv.rows_per_layer, kernels="torch")
    install_free_filter(allocator, vkv)
    row = allocator.alloc(IMAGE_TOKENS).to(torch.int32)
    g = torch.Generator().manual_seed(0)
    kept = [torch.randperm(IMAGE_TOKENS, generator=g)[:k].sort().values for k in budgets]
    free_before = allocator.available_size()
    c = vkv.compact(kv.k, kv.v, row, kept, protected=0, prompt_len=IMAGE_TOKENS)
    assert c is not None and c.kept_counts == budgets
    assert allocator.available_size() - free_before == c.freed_slots
    return c.cell_slots, c.freed_slots


def test_requests_that_fit_at_budget_1_and_01(monkeypatch):
    n_stock, n_ours, _ = pool_sizes(monkeypatch)
    budgets = layer_budgets_at(0.1)
    assert sum(budgets) == round(0.1 * IMAGE_TOKENS * LAYERS) == 2800  # redistribute: the total is exact
    assert max(budgets) > 1.5 * 0.1 * IMAGE_TOKENS  # adaptive: the dense layers keep much more
    cells, freed = packed_slots(budgets)
    assert cells == math.ceil(sum(budgets) / LAYERS) == 100 and freed == IMAGE_TOKENS - cells
    full = n_ours // IMAGE_TOKENS  # budget 1.0 leaves a request whole: 1,000 slots
    packed = n_ours // cells
    assert (n_stock // IMAGE_TOKENS, full, packed) == (1872, 1853, 18538)
    assert packed >= 10 * full  # ten times the requests at budget 0.1
    # without packing a request would hold its largest layer's positions at least
    assert n_ours // max(budgets) < packed / 1.9
    # the tables cost the full-cache server 1 % of its requests
    assert (n_stock // IMAGE_TOKENS - full) / (n_stock // IMAGE_TOKENS) == pytest.approx(0.0101, abs=5e-4)
