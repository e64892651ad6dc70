#!/usr/bin/env bash
# Build, on a machine with PyPI, everything a whole SGLang server needs on the lent GPU machine
# (docs/gpu-suite.md, "A whole server on the GPU"):
#   out/gpu-server-kit/  SGLang 0.5.23 + the packages its server imports (requirements/gpu/server-lock.txt),
#                        CPython 3.12 wheels in parts of <= 52 MiB with MANIFEST.json (vlcache_sglang/tooling/gpu_kit.py)
#   out/gpu-pack/        FlashInfer (scripts/build_gpu_pack.sh)
# Both are git-ignored and carried with the device tool's `carry` (one part per call).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHONPATH="$ROOT" "${PYTHON:-python3}" -m vlcache_sglang.tooling.gpu_kit build --lock requirements/gpu/server-lock.txt \
  --out out/gpu-server-kit "$@"
bash scripts/build_gpu_pack.sh out/gpu-pack
du -sh out/gpu-server-kit/* out/gpu-pack/*
