"""Device-specific attention executors over :class:`~vlcache_sglang.backend.metadata.ForwardMetadata`."""
