#!/usr/bin/env bash
# LocalAI's convention: run the backend's tests from its environment.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || ./install.sh
exec .venv/bin/python test.py "$@"
