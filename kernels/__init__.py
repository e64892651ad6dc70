"""Triton kernels (installed as ``vlcache_sglang.kernels``).

* ``attention_stats``: fused VL-Cache statistics, batched over requests (indptr layout);
* ``kv_move``: moving kept K/V rows into cells for many requests at once;
* ``dispatch``: Triton on CUDA, the torch reference elsewhere.

Importing this package imports nothing heavy; the modules import ``triton.language``.
"""
