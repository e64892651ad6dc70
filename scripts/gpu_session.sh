#!/usr/bin/env bash
# Everything this project checks on a lent GPU, as one command (docs/gpu-suite.md):
#
#   bash scripts/gpu_session.sh            # on the GPU machine, with out/gpu-pack carried along
#
# Unpacks FlashInfer (scripts/build_gpu_pack.sh made the pack), installs the whole-server kit when
# all its parts are here and runs a whole SGLang server first (benchmarks/gpu_server_smoke.py;
# when it passed, the serving benchmark benchmarks/gpu_server_bench.py, BENCH_BUDGET seconds),
# then runs benchmarks/gpu_suite.py:
# the FlashInfer JIT builds in parallel with the compiled Triton kernel tests, the executor tests,
# then the benchmarks. Results (markdown, JSON, logs) go to $OUT (or out/gpu_suite).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/gpu_suite}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"   # H100/H200: build for sm_90a only
{
  date -u; nvidia-smi -L; nvcc --version | tail -n 2
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ -d out/gpu-pack ]; then
  eval "$(bash scripts/gpu_install_pack.sh out/gpu-pack)" || echo "FlashInfer pack failed to install: FlashInfer parts skip"
fi
# The whole-server kit (scripts/build_gpu_server_kit.sh): its parts arrive over earlier calls into
# out/gpu-server-kit (ignored, kept on the machine); once all are here it is installed into
# out/gpu-site, and a whole SGLang server runs first (benchmarks/gpu_server_smoke.py).
if [ -f out/gpu-server-kit/MANIFEST.json ]; then
  if [ ! -f out/gpu-site/.installed ]; then
    if PYTHONPATH="$ROOT" python3 -m vlcache_sglang.tooling.gpu_kit status --kit out/gpu-server-kit; then
      PYTHONPATH="$ROOT" python3 -m vlcache_sglang.tooling.gpu_kit install --kit out/gpu-server-kit --target out/gpu-site \
        && touch out/gpu-site/.installed
    fi
  fi
  if [ -f out/gpu-site/.installed ]; then
    # the sgl_kernel placeholder goes last: SGLang imports sgl_kernel unconditionally on CUDA
    export PYTHONPATH="$ROOT/out/gpu-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}:$ROOT/vlcache_sglang/cpu_runtime/sgl_kernel_placeholder"
    SERVER_TIMEOUT="${SERVER_TIMEOUT:-420}"
    # phases that would not finish before the backstop are skipped (60 s kept for the last one's end)
    timeout -k 20 "$SERVER_TIMEOUT" python3 benchmarks/gpu_server_smoke.py --out "$OUT" \
      --deadline "$((SERVER_TIMEOUT - 60))" ${SMOKE_ARGS:-} 2>&1 | tee "$OUT/server_smoke.log"
    smoke_rc=${PIPESTATUS[0]}
    # serving figures (benchmarks/gpu_server_bench.py), only after a smoke that passed; it keeps
    # within BENCH_BUDGET seconds by itself (server start included), the timeout is a backstop
    if [ "$smoke_rc" = 0 ] && [ "${SKIP_BENCH:-0}" != 1 ]; then
      BENCH_BUDGET="${BENCH_BUDGET:-180}"
      timeout -k 20 "${BENCH_TIMEOUT:-$((BENCH_BUDGET + 40))}" python3 benchmarks/gpu_server_bench.py --out "$OUT" \
        --time-budget "$BENCH_BUDGET" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/server_bench_run.log"
    else
      echo "server benchmark skipped (smoke exit status $smoke_rc, SKIP_BENCH=${SKIP_BENCH:-0})" | tee "$OUT/server_bench_run.log"
    fi
  fi
fi
[ "${SKIP_SUITE:-0}" = 1 ] && exit 0
timeout "${SUITE_TIMEOUT:-540}" python3 benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
