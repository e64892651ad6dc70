#!/usr/bin/env bash
# Install the offline wheelhouse on the GPU machine (no network).
#
#   bash scripts/gpu_install_wheelhouse.sh --stash out/gpu-wheelhouse/batch1   # run 1: stash only
#   bash scripts/gpu_install_wheelhouse.sh out/gpu-wheelhouse/batch2           # run 2: stash + install
#
# Files (whole wheels and ".part.NN" pieces) are first copied to a stash under /tmp
# (STASH, default /tmp/vlcache-wheelhouse), so a wheelhouse larger than one transfer can arrive
# over several runs made in quick succession: run with --stash for all but the last batch.
# Then every split wheel is reassembled, checked against SHA256SUMS, and each wheel whose
# distribution is not installed yet is installed with `pip install --no-index --no-deps`
# (FORCE=1 reinstalls all). Finally `import flashinfer` is checked.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STASH_ONLY=0
if [ "${1:-}" = "--stash" ]; then STASH_ONLY=1; shift; fi
SRC="${1:-$ROOT/out/gpu-wheelhouse}"
# a wheelhouse folder may hold batch* subfolders (all copied) or the files themselves
STASH="${STASH:-/tmp/vlcache-wheelhouse}"
PY="${PYTHON:-python3}"
mkdir -p "$STASH"
if [ -d "$SRC" ]; then
  find "$SRC" -maxdepth 2 -type f \( -name '*.whl' -o -name '*.whl.part.*' -o -name SHA256SUMS \) -exec cp -f {} "$STASH"/ \;
fi
echo "stash $STASH:"; ls -l "$STASH"
[ "$STASH_ONLY" = 1 ] && exit 0

cd "$STASH"
for first in ./*.whl.part.00; do
  [ -e "$first" ] || continue
  whl="${first%.part.00}"
  cat "$whl".part.* > "$whl.tmp" && mv "$whl.tmp" "$whl"
done
if [ -f SHA256SUMS ]; then
  sha256sum -c SHA256SUMS
fi
to_install=()
for whl in ./*.whl; do
  dist="$(basename "$whl" | cut -d- -f1)"
  if [ "${FORCE:-0}" != 1 ] && "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
    echo "already installed: $dist"
  else
    to_install+=("$whl")
  fi
done
if [ "${#to_install[@]}" -gt 0 ] && [ "${DRY_RUN:-0}" != 1 ]; then
  "$PY" -m pip install --no-index --no-deps "${to_install[@]}"
fi
if [ "${DRY_RUN:-0}" = 1 ]; then echo "would install: ${to_install[*]:-nothing}"; exit 0; fi
"$PY" -c "import flashinfer; from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper; print('flashinfer', flashinfer.__version__)"
