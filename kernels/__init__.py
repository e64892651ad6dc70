"""Triton kernels (installed as ``vlcache_sglang.kernels``).

* ``attention_stats``: fused VL-Cache statistics, batched over requests (indptr layout);
* ``kv_move``: moving kept K/V rows into cells for many requests at once;
* ``dispatch``: Triton on CUDA, the torch reference elsewhere;
* ``launch_configs``: the kernels' launch options per GPU model (``tuned_launches/``), no Triton import.

Importing this package imports nothing heavy; the modules import ``triton.language``.
"""
