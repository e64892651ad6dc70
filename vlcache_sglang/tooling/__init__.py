"""Launchers used by tests, benchmarks, tuning and the demo, outside the serving path.

* ``serving``: a real SGLang server on loopback (start, wait, stop);
* ``engine_worker``: SGLang's offline ``Engine`` in a child process;
* ``demo``: the README demo (``bash scripts/demo.sh``, ``python -m vlcache_sglang.tooling.demo``);
* ``gpu_kit``: the GPU server kit (wheels in parts, installed offline on the GPU machine).

Nothing the SGLang server imports imports this package; ``tests/unit/test_layout.py`` checks that.
"""
