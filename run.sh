#!/usr/bin/env bash
# Starts the backend from the project's environment, as LocalAI does:
#   run.sh --addr HOST:PORT
# On Linux CPUs it preloads OpenBLAS and two forwarders before it (one-row and
# few-row products; the CPU fast path: mlx_backend/blas/preload.sh). Signals reach the
# server directly (exec), so SIGTERM stops it gracefully.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
preload="$(bash "$dir/mlx_backend/blas/preload.sh" || true)"
if [ -n "$preload" ]; then
  export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec "$dir/.venv/bin/python" "$dir/backend.py" "$@"
