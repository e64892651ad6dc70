#!/usr/bin/env bash
# Everything this project checks on a lent GPU, as one command (docs/gpu-suite.md):
#
#   bash scripts/gpu_session.sh            # on the GPU machine, with out/gpu-pack carried along
#   PACK_TO="$OUT/gpu_session.tgz" OUT=/tmp/gs STEPS="smoke speed" bash scripts/gpu_session.sh
#
# Unpacks FlashInfer (scripts/build_gpu_pack.sh made the pack) and starts its JIT builds for the
# executor's modules in the background; installs the whole-server kit when all its parts are here;
# then runs STEPS in order (default "smoke speed bench suite"):
#   smoke  benchmarks/gpu_server_smoke.py, a whole SGLang server's correctness (SERVER_TIMEOUT s)
#   speed  benchmarks/gpu_server_speed.py, stock FlashInfer vs vlcache on Qwen2-VL-7B's shapes with
#          dummy weights (SPEED_BUDGET s)
#   bench  benchmarks/gpu_server_bench.py on the bundled model, only after a smoke that passed
#          (BENCH_BUDGET s)
#   suite  benchmarks/gpu_suite.py: compiled Triton kernel tests, executor tests, kernel figures
#   sweeps (not in the default: suite includes them) only the suite's two launch sweeps, before
#          FlashInfer is unpacked (SWEEPS_TIMEOUT s, default 90, into $OUT/sweeps): what
#          python -m vlcache_sglang.tooling.adopt_kernel_sweeps turns into kernels/tuned_launches/
#   graphs (not in the default: suite includes them) the decode-graph tests over SGLang's real
#          pools (tests/unit/test_backend_cuda_graph.py, the executor's graph-mode tests), after the
#          kit is installed, so SGLang imports and the CUDA variants capture real CUDA graphs,
#          and the fused-merge decode's stress test under concurrent programs (GRAPHS_TIMEOUT s,
#          default 90; $OUT/graph_tests.log and .xml)
# FlashInfer's JIT cache lives in out/flashinfer-ws (ignored, kept on the machine between calls).
# Results (markdown, JSON, logs) go to $OUT (or out/gpu_suite); with PACK_TO set, all of $OUT is
# also packed into that one file at the end, however the script ends (the device tool brings at
# most 8 files back).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/gpu_suite}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"   # H100/H200: build for sm_90a only
export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-$ROOT/out/flashinfer-ws}"
mkdir -p "$FLASHINFER_WORKSPACE_BASE"
STEPS="${STEPS-smoke speed bench suite}"
# every FlashInfer module this session still had to compile (the pack's prebuilt ones load instead;
# vlcache_sglang/tooling/flashinfer_aot.py) and every prebuilt one that failed to load, with its
# error, counted over all logs; then all of $OUT in one file
finish() {
  grep -rhoE "Building JIT module [^;]+|Failed to load AOT artifact [^ ]+: .{0,300}" "$OUT" --include='*.log' \
    2>/dev/null | sort | uniq -c > "$OUT/flashinfer_jit_built.txt"
  [ -n "${PACK_TO:-}" ] && tar -czf "$PACK_TO" -C "$OUT" . 2>/dev/null; true
}
trap finish EXIT
trap 'exit 143' TERM INT
has_step() { case " $STEPS " in *" $1 "*) return 0;; esac; return 1; }
{
  date -u; nvidia-smi -L; nvcc --version | tail -n 2
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if has_step sweeps; then
  # Triton and torch only (the GPU image has both): fits the first kit call, which otherwise only
  # copies a part; the report is written after each sweep, so a timeout keeps the first
  # the decode sweep first: its target (80 % of copy bandwidth) is the further off
  timeout -k 10 "${SWEEPS_TIMEOUT:-90}" python3 benchmarks/gpu_suite.py --only decode_sweep stats_sweep \
    --iters "${SWEEPS_ITERS:-10}" ${SWEEPS_ARGS:-} --out "$OUT/sweeps" 2>&1 | tee "$OUT/sweeps.log"
fi
if [ -d out/gpu-pack ]; then
  if eval "$(bash scripts/gpu_install_pack.sh out/gpu-pack)"; then
    # the executor's FlashInfer modules build while the servers import (a minute or more of nvcc each)
    for spec in ${WARM_SPECS:-extend,4,2,64 extend,28,4,128 decode,4,2,64 decode,4,4,128}; do
      PYTHONPATH="$ROOT:$PYTHONPATH" nohup python3 benchmarks/gpu_suite.py --warm-one "$spec" \
        >> "$OUT/flashinfer_jit.log" 2>&1 &
    done
  else
    echo "FlashInfer pack failed to install: FlashInfer parts skip"
  fi
fi
# The whole-server kit (scripts/build_gpu_server_kit.sh): its parts arrive over earlier calls into
# out/gpu-server-kit (ignored, kept on the machine); once all are here it is installed into
# out/gpu-site, and a whole SGLang server runs first (benchmarks/gpu_server_smoke.py).
kit_ready=0
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
    kit_ready=1
  fi
fi
if has_step graphs; then
  # the kit's profile (gpu_kit.GPU_SERVER_ENV) so SGLang's modules import without sgl-kernel
  SGLANG_FORCE_FUSED_OP_BACKEND=torch SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    timeout -k 10 "${GRAPHS_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider -rs \
    --junitxml="$OUT/graph_tests.xml" tests/unit/test_backend_cuda_graph.py tests/unit/test_executors.py \
    tests/kernels/test_kernel_ragged_decode.py -k "graph or concurrent_programs" \
    2>&1 | tee "$OUT/graph_tests.log"
fi
if [ "$kit_ready" = 1 ]; then
  smoke_rc=skipped
  if has_step smoke; then
    SERVER_TIMEOUT="${SERVER_TIMEOUT:-420}"
    # phases that would not finish before the backstop are skipped (60 s kept for the last one's end)
    timeout -k 20 "$SERVER_TIMEOUT" python3 benchmarks/gpu_server_smoke.py --out "$OUT" \
      --deadline "$((SERVER_TIMEOUT - 60))" ${SMOKE_ARGS:-} 2>&1 | tee "$OUT/server_smoke.log"
    smoke_rc=${PIPESTATUS[0]}
  fi
  # serving speed on Qwen2-VL-7B's shapes, stock FlashInfer against vlcache (issue 21 item 3);
  # it keeps within SPEED_BUDGET seconds by itself, server starts included
  if has_step speed; then
    SPEED_BUDGET="${SPEED_BUDGET:-300}"
    timeout -k 20 "$((SPEED_BUDGET + 40))" python3 benchmarks/gpu_server_speed.py --out "$OUT" \
      --time-budget "$SPEED_BUDGET" ${SPEED_ARGS:-} 2>&1 | tee "$OUT/server_speed_run.log"
  fi
  # serving figures on the bundled model (benchmarks/gpu_server_bench.py), only after a smoke that passed
  if has_step bench && [ "$smoke_rc" = 0 ] && [ "${SKIP_BENCH:-0}" != 1 ]; then
    BENCH_BUDGET="${BENCH_BUDGET:-180}"
    timeout -k 20 "${BENCH_TIMEOUT:-$((BENCH_BUDGET + 40))}" python3 benchmarks/gpu_server_bench.py --out "$OUT" \
      --time-budget "$BENCH_BUDGET" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/server_bench_run.log"
  elif has_step bench; then
    echo "server benchmark skipped (smoke exit status $smoke_rc, SKIP_BENCH=${SKIP_BENCH:-0})" | tee "$OUT/server_bench_run.log"
  fi
fi
{ [ "${SKIP_SUITE:-0}" = 1 ] || ! has_step suite; } && exit 0
timeout "${SUITE_TIMEOUT:-540}" python3 benchmarks/gpu_suite.py --out "$OUT" "$@" 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"
