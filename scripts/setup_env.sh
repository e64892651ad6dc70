#!/usr/bin/env bash
# CPU runtime profile: build (or reuse) the virtual environment that serves SGLang 0.5.23 on a
# machine without a GPU, and install this project into it (editable).
#
#   bash scripts/setup_env.sh            # prints the venv path on its last line
#
# Idempotent: the heavy part (torch, SGLang and its requirements) is keyed by a hash of the
# requirement files and skipped when the stamp matches; only the project itself is reinstalled.
# Override the location with VLCACHE_VENV=/path.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLCACHE_VENV:-$HOME/.cache/vlcache-sglang/venv-py311}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
REQ_HASH="$(cat "$ROOT"/requirements/*.txt "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16)"
STAMP="$VENV/.vlcache-stamp"
log() { printf '[setup_env] %s\n' "$*" >&2; }

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]]; then
  log "reusing $VENV (requirements unchanged)"
else
  t0=$SECONDS
  log "building $VENV"
  [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
  # 1. The CPU torch wheel that lies on this machine's disk (a plain `pip install torch` would
  #    pull a multi-GB CUDA build).
  "$VENV/bin/pip" install -q -c "$ROOT/requirements/constraints-cpu.txt" torch==2.13.0
  # 2. SGLang's requirements minus GPU-only packages, then SGLang itself without its deps
  #    (it pins torch 2.14.1 + sglang-kernel, which have no CPU build).
  "$VENV/bin/pip" install -q -c "$ROOT/requirements/constraints-cpu.txt" \
      -r "$ROOT/requirements/sglang-cpu.txt" -r "$ROOT/requirements/dev.txt"
  "$VENV/bin/pip" install -q --no-deps "sglang==0.5.23"
  echo "$REQ_HASH" > "$STAMP"
  log "environment built in $((SECONDS - t0)) s"
fi
# 3. The project (editable, no deps: everything it needs is above). Cheap, always redone so the
#    venv points at this checkout.
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
  || "$VENV/bin/pip" install -q --no-deps -e "$ROOT"
# 4. CPU bootstrap (.pth): the torchvision op shim and the sgl_kernel placeholder, each inert
#    unless needed (see vlcache_sglang/cpu_runtime/bootstrap.py).
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "import vlcache_sglang_cpu_bootstrap" > "$SITE/vlcache_cpu_runtime.pth"
cp "$ROOT/vlcache_sglang/cpu_runtime/bootstrap.py" "$SITE/vlcache_sglang_cpu_bootstrap.py"
log "venv size: $(du -sh "$VENV" | cut -f1)"
echo "$VENV"
