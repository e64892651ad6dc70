"""Optuna tuning of the policy (installed as ``vlcache_sglang.tuning``)."""
