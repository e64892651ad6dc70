"""Prometheus counters for compression, exported through SGLang's ``/metrics``.

With ``--enable-metrics`` (:attr:`ServerSettings.metrics`) SGLang runs prometheus_client in
multiprocess mode (it sets ``PROMETHEUS_MULTIPROC_DIR`` before the scheduler is spawned), so
counters created in the scheduler process appear in the HTTP server's ``/metrics``. Without it,
nothing is created.
"""
from __future__ import annotations


class CompressionMetrics:
    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        if not self.enabled:
            return
        from prometheus_client import Counter

        self.requests = Counter("vlcache_requests_compressed", "Requests whose KV cache vlcache compressed")
        self.prompt_tokens = Counter("vlcache_prompt_tokens_compressed", "Prompt tokens covered by compression plans")
        self.saved = Counter("vlcache_kv_tokens_saved", "KV token slots returned to the pool by compression")
        self.skipped = Counter("vlcache_requests_not_compressed",
                               "Requests that asked for compression and were served as stock, by reason",
                               ["reason"])

    def record(self, prompt_len: int, tokens_saved: int) -> None:
        if self.enabled:
            self.requests.inc()
            self.prompt_tokens.inc(prompt_len)
            self.saved.inc(tokens_saved)

    def not_compressed(self, reason: str) -> None:
        if self.enabled:
            self.skipped.labels(reason=reason).inc()
