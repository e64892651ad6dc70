#!/usr/bin/env bash
# Stage 3 (decode-time dependence) of tinyvlm-docvqa continued on a lent GPU: three variants in
# parallel from the shipped stage-3 checkpoint, each composed with the stage-2 vision tower and
# evaluated (full cache, target cells removed, top/random 10 %) at 256 and 1,024 visual tokens.
#
#   bash scripts/gpu_train_decode_variants.sh      # on the GPU machine; carry .gpucarry
#
# .gpucarry holds runs/tinyvlm_swap3/{decode_step300.pt,lookup.pt,vision.pt} (the shipped model's
# checkpoints, docs/tinyvlm.md) and the transformers wheel SGLang pins (5.19.0; the GPU image has
# 5.17). Results: $OUT/<variant>.safetensors, $OUT/eval_<variant>.jsonl, $OUT/train_logs.txt.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/out/gpu_train}"; mkdir -p "$OUT"
CARRY="${CARRY:-.gpucarry}"
STEPS="${STEPS:-1000}"; TRAIN_TIMEOUT="${TRAIN_TIMEOUT:-270}"; EVAL_TIMEOUT="${EVAL_TIMEOUT:-150}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --target /tmp/tfsite "$CARRY"/transformers-*.whl
export PYTHONPATH="$ROOT:/tmp/tfsite"
python3 -c "import torch, transformers; print('transformers', transformers.__version__, torch.cuda.get_device_name())"
declare -A VARIANT=(
  [a]="--w-swap 2 --w-droponly 3 --decode-grids 8,16,24,32"    # the shipped recipe, continued
  [b]="--w-swap 4 --w-droponly 6 --decode-grids 8,16,24,32"    # stronger swap + dependence losses
  [c]="--w-swap 4 --w-droponly 6 --decode-grids 16,32,48"      # same, larger pages
)
for k in a b c; do
  d="/tmp/gv_$k"; mkdir -p "$d"; cp "$CARRY/lookup.pt" "$CARRY/vision.pt" "$d/"
  # shellcheck disable=SC2086
  timeout "$TRAIN_TIMEOUT" python3 scripts/train_tinyvlm.py --out "$d" --stage decode \
    --decode-init "$CARRY/decode_step300.pt" --decode-steps "$STEPS" --decode-lr 3e-4 --w-full 1 \
    ${VARIANT[$k]} --device cuda --threads 4 > "$d/train.log" 2>&1 &
done
wait
for k in a b c; do
  d="/tmp/gv_$k"
  python3 scripts/train_tinyvlm.py --out "$d" --stage compose --model-out "/tmp/model_$k" --device cpu >> "$d/train.log" 2>&1 \
    && cp "/tmp/model_$k/model.safetensors" "$OUT/$k.safetensors"
  timeout "$EVAL_TIMEOUT" python3 -m vlcache_sglang.research.tinyvlm.evaluate --model "/tmp/model_$k" --grids 16,32 --n 64 \
    --threads 5 > "$OUT/eval_$k.jsonl" 2>"$d/eval.err" &
done
wait
for k in a b c; do
  d="/tmp/gv_$k"
  { echo "== variant $k: ${VARIANT[$k]}"; cat "$d/decode.jsonl"; tail -c 1500 "$d/train.log"; tail -c 800 "$d/eval.err"; } >> "$OUT/train_logs.txt"
done
ls -la "$OUT"; cat "$OUT"/eval_*.jsonl
