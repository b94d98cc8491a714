#!/usr/bin/env bash
# Starts the backend from the project's environment, as LocalAI does:
#   run.sh --addr HOST:PORT
# On Linux CPUs it preloads OpenBLAS (the CPU fast path). Signals reach the
# server directly (exec), so SIGTERM stops it gracefully.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
if [ "$(uname -s)" = Linux ] && [ -z "${MLX_BACKEND_NO_OPENBLAS:-}" ]; then
  for lib in /usr/lib/*/openblas-pthread/libblas.so.3; do
    if [ -e "$lib" ]; then
      export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
      break
    fi
  done
fi
exec "$dir/.venv/bin/python" "$dir/backend.py" "$@"
