#!/usr/bin/env bash
# On the offline GPU machine: unpack the pack built by scripts/build_gpu_pack.sh into a site folder
# and print the PYTHONPATH line to use (FlashInfer + apache-tvm-ffi; everything else it imports is
# already on that machine).
#
#   eval "$(bash scripts/gpu_install_pack.sh out/gpu-pack)"      # sets PYTHONPATH
set -euo pipefail
SRC="${1:?pack folder}"
SITE="${SITE:-/tmp/vlcache-site}"
PY="${PYTHON:-python3}"
mkdir -p "$SITE"
(cd "$SRC" && sha256sum -c --quiet SHA256SUMS) >&2
if [ ! -d "$SITE/flashinfer" ]; then
  xz -dc "$SRC"/flashinfer-*-site.tar.xz | tar -C "$SITE" -xf -
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$SRC"/apache_tvm_ffi-*.whl >&2
fi
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
  "import flashinfer, flashinfer.jit.env as e; from flashinfer.decode import BatchDecodeWithPagedKVCacheWrapper; \
print('flashinfer', flashinfer.__version__, 'prebuilt modules:', sum(1 for p in e.FLASHINFER_AOT_DIR.glob('*/*.so')))" >&2
echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
