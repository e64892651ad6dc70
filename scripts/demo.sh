#!/usr/bin/env bash
# The main job: serve the bundled model with `--attention-backend vlcache` on 127.0.0.1, ask it a
# question about a real image through the OpenAI API, print the answer, stop the server.
#   bash scripts/demo.sh [--budget 0.1] [--method vlcache]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$(bash "$ROOT/scripts/setup_env.sh" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/python" -m vlcache_sglang.tooling.demo "$@"
