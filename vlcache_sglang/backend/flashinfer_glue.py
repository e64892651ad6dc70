"""CUDA path of the ``vlcache`` backend at budget 1.0: SGLang's own FlashInfer backend.

The per-layer indptr/indices FlashInfer executor (compressed decode) replaces this once it
lands; until then CUDA requests are served uncompressed, exactly like ``--attention-backend
flashinfer``, and a warning says so when a request asks for a budget below 1.0.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def create_flashinfer_backend(model_runner):
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    logger.warning("vlcache on CUDA: FlashInfer attention without compression (per-layer executor pending)")
    return FlashInferAttnBackend(model_runner)
