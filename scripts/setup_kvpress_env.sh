#!/usr/bin/env bash
# Build (or reuse) the small virtual environment for the kvpress peer cross-check
# (tests/policy/test_kvpress_crosscheck.py). kvpress 0.5.5 needs transformers<5.3 while the main
# environment pins transformers 5.19.0, so it lives apart from scripts/setup_env.sh's venv.
#
#   bash scripts/setup_kvpress_env.sh      # prints the venv path on its last line
#
# Idempotent: keyed by a hash of requirements/kvpress.txt and this script; skipped when the
# stamp matches. Override the location with VLCACHE_KVPRESS_VENV=/path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLCACHE_KVPRESS_VENV:-$HOME/.cache/vlcache-sglang/venv-kvpress}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
REQ="$ROOT/requirements/kvpress.txt"
REQ_HASH="$(cat "$REQ" "$ROOT/scripts/setup_kvpress_env.sh" | sha256sum | cut -c1-16)"
STAMP="$VENV/.vlcache-kvpress-stamp"
log() { printf '[setup_kvpress_env] %s\n' "$*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]] \
    && compgen -G "$VENV/lib/python3*/site-packages/kvpress/__init__.py" >/dev/null; then
  log "reusing $VENV (requirements unchanged)"
else
  t0=$SECONDS
  log "building $VENV"
  mkdir -p "$(dirname "$VENV")"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip 2>/dev/null || true
  # 1. The CPU torch wheel that lies on this machine's disk (a plain `pip install torch` would
  #    pull a multi-GB CUDA build). Same constraint file as the main environment.
  "$VENV/bin/pip" install -q -c "$ROOT/requirements/constraints-cpu.txt" torch==2.13.0
  # 2. kvpress and a transformers it accepts; torch stays pinned to the wheel above.
  "$VENV/bin/pip" install -q torch==2.13.0 -r "$REQ"
  "$VENV/bin/python" -c "import kvpress, transformers, torch; print(kvpress.__name__, transformers.__version__, torch.__version__)" >&2
  echo "$REQ_HASH" > "$STAMP"
  log "environment built in $((SECONDS - t0)) s"
fi
echo "$VENV"
