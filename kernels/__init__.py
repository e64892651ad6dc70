"""Triton kernels (installed as ``vlcache_sglang.kernels``)."""
