"""CUDA path of the ``vlcache`` backend without the opt-in: SGLang's own FlashInfer backend.

The compressing CUDA executor (:mod:`vlcache_sglang.backend.executors.flashinfer_executor`) is
opt-in with ``VLCACHE_CUDA_EXECUTOR=flashinfer`` until a whole SGLang server has run it on a GPU
(issue 21). Without it CUDA requests are served uncompressed, exactly like ``--attention-backend
flashinfer``; the launch refuses a server budget below 1.0 and requests asking for one get a 400
(:mod:`vlcache_sglang.compatibility`).
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def create_flashinfer_backend(model_runner):
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    logger.warning("vlcache on CUDA: SGLang's FlashInfer attention, uncompressed "
                   "(VLCACHE_CUDA_EXECUTOR=flashinfer opts in to the compressing executor)")
    return FlashInferAttnBackend(model_runner)
