#!/usr/bin/env bash
# Build the offline FlashInfer pack for the GPU machine (run on a machine WITH network access).
#
#   bash scripts/build_gpu_pack.sh [DEST]     # default DEST: out/gpu-pack (git-ignored)
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13.0), triton 3.6, nvcc 13.0 and the small
# pure-Python packages FlashInfer imports (requests, tqdm, einops, ninja, ...), but no network and
# no FlashInfer. At most 64 MiB reaches it per run, repository included, and the flashinfer-python
# 0.7.2 wheel alone is 65 MB (zip). So the wheel is unpacked here, the CUDA sources of kernel
# families the attention wrappers never compile (MoE, GEMM, Blackwell-only, linear attention, ...)
# are left out, and the rest is packed with xz: about 15 MB, one file, one run.
# `scripts/gpu_install_pack.sh` unpacks it on the GPU machine. Nothing here is committed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/out/gpu-pack}"
PY="${PYTHON:-python3}"
FI_VERSION="${FI_VERSION:-0.7.2}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/flashinfer-*.tar.xz "$DEST"/SHA256SUMS
"$PY" -m pip download --no-deps --only-binary=:all: -d "$WORK" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any \
  "flashinfer-python==$FI_VERSION" "apache-tvm-ffi>=0.1.11,<0.2"
cp "$WORK"/apache_tvm_ffi-*.whl "$DEST"/
mkdir "$WORK/site"
(cd "$WORK/site" && unzip -q "$WORK"/flashinfer_python-*.whl)
csrc="$WORK/site/flashinfer/data/csrc"
# sources of kernel families the paged decode/prefill (fa2) modules do not include
for d in cake_dsv4 cake_sampling kda fused_moe cake_fmha gdn experimental blackwell_msa \
         blackwell_bf16_fp4 cake_bgmv_moe bgmv_moe; do
  rm -rf "${csrc:?}/$d"
done
rm -rf "$csrc"/alphamoe_*
# FlashInfer's kernels for the GPU session, built here ahead of time (vlcache_sglang/tooling/
# flashinfer_aot.py) where a CUDA 13 nvcc is found: the GPU then loads them instead of spending its
# minutes in nvcc. Without nvcc the pack still works; the GPU builds them on first use.
CUDA_HOME="${CUDA_HOME:-$(ls -d /usr/local/cuda-13* /usr/local/cuda 2>/dev/null | head -n 1)}"
if [ "${SKIP_AOT:-0}" != 1 ] && [ -x "$CUDA_HOME/bin/nvcc" ] && "$CUDA_HOME/bin/nvcc" --version | grep -q "release 13\."; then
  tvm_version="$(ls "$WORK"/apache_tvm_ffi-*.whl | sed -E 's/.*apache_tvm_ffi-([^-]+)-.*/\1/')"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$WORK/local" "apache-tvm-ffi==$tvm_version" "nvidia-curand>=10.4,<11"
  mkdir -p "$WORK/local/site" && (cd "$WORK/local/site" && for w in "$WORK"/local/*.whl; do unzip -q -o "$w"; done)
  PYTHONPATH="$WORK/site:$WORK/local/site:$ROOT" "$PY" -m vlcache_sglang.tooling.flashinfer_aot \
    --aot-dir "$WORK/site/flashinfer/data/aot" --cuda-home "$CUDA_HOME" \
    --curand-include "$(dirname "$(find "$WORK/local/site/nvidia" -name curand_kernel.h | head -n 1)")"
else
  echo "no CUDA 13 nvcc at CUDA_HOME=${CUDA_HOME:-unset} (or SKIP_AOT=1): FlashInfer's kernels will build on the GPU"
fi
tar -C "$WORK/site" -cf - . | xz -T0 -6 > "$DEST/flashinfer-$FI_VERSION-site.tar.xz"
(cd "$DEST" && sha256sum ./*.whl ./*.tar.xz > SHA256SUMS)
du -sh "$DEST"/*
