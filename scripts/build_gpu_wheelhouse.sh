#!/usr/bin/env bash
# Build the offline wheelhouse for the GPU machine (run on a machine WITH network access).
#
#   bash scripts/build_gpu_wheelhouse.sh [DEST]     # default DEST: out/gpu-wheelhouse (git-ignored)
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13.0), triton 3.6, transformers 5.17, nvcc 13.0
# and no network. FlashInfer 0.7.2 is pure Python plus CUDA sources that it compiles just in time
# with that nvcc; what it imports that the machine may lack is downloaded here (wheels only, no
# dependency resolution: the list below is what `import flashinfer` and its decode/prefill
# wrappers load, checked with flashinfer-python 0.7.2). At most 64 MiB reaches the GPU machine per
# run, repository included, so files above PART_MIB (default 20) are split into parts and all
# files are then packed into folders batch1, batch2, ... of at most BATCH_MIB (default 42) each:
# one folder per run (docs/gpu-suite.md). SHA256SUMS (in the last batch) lists the whole wheels.
# Nothing here is committed (out/ is git-ignored).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/out/gpu-wheelhouse}"
PART_MIB="${PART_MIB:-20}"
BATCH_MIB="${BATCH_MIB:-42}"
PY="${PYTHON:-python3}"
PKGS=(
  "flashinfer-python==0.7.2"
  "apache-tvm-ffi>=0.1.11,<0.2"   # compiled: cp312 manylinux wheel
  "ninja"                          # the JIT build driver (binary wheel)
  "nvidia-ml-py" "einops" "tabulate" "click"
  "requests" "urllib3" "idna" "certifi" "charset-normalizer"
  "filelock" "packaging" "tqdm"
)
mkdir -p "$DEST"
rm -rf "$DEST"/*.whl "$DEST"/*.part.* "$DEST"/SHA256SUMS "$DEST"/batch*
"$PY" -m pip download --no-deps --only-binary=:all: -d "$DEST" \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform linux_x86_64 --platform any \
  "${PKGS[@]}"
cd "$DEST"
sha256sum ./*.whl > SHA256SUMS
limit=$((PART_MIB * 1024 * 1024))
for f in ./*.whl; do
  if [ "$(stat -c %s "$f")" -gt "$limit" ]; then
    split -b "${PART_MIB}m" -d -a 2 "$f" "$f.part."
    rm "$f"
  fi
done
# pack into batches (largest first), SHA256SUMS last
batch=1; used=0; blimit=$((BATCH_MIB * 1024 * 1024))
mkdir -p "batch$batch"
for f in $(ls -S ./*.whl ./*.part.* 2>/dev/null) SHA256SUMS; do
  size=$(stat -c %s "$f")
  if [ $((used + size)) -gt "$blimit" ] && [ "$used" -gt 0 ]; then
    batch=$((batch + 1)); used=0; mkdir -p "batch$batch"
  fi
  mv "$f" "batch$batch/"; used=$((used + size))
done
echo "wheelhouse: $DEST ($batch batches; send one batch per run, the last one with the install)"
du -sh "$DEST"/batch*
ls -l "$DEST"/batch*
