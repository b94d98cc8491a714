#!/usr/bin/env bash
# Prints the libraries run.sh preloads on a Linux CPU (colon-separated; nothing
# when none): OpenBLAS, as MLX's wheel brings only the reference BLAS, and
# before it two cblas_sgemm forwarders built here on first use into
# ~/.cache/mlx-backend: small_gemm.c (products of 2-32 rows, on x86-64 CPUs
# with AVX-512) and gemv_forward.c (one-row products as matrix-vector products).
# MLX_BACKEND_NO_OPENBLAS (any value) prints nothing; MLX_BACKEND_SMALL_GEMM=0
# and MLX_BACKEND_GEMV=0 leave out a forwarder. Nothing about the forwarders
# can keep OpenBLAS out.
set -uo pipefail
[ "$(uname -s)" = Linux ] && [ -z "${MLX_BACKEND_NO_OPENBLAS:-}" ] || exit 0
blas=""
for lib in /usr/lib/*/openblas-pthread/libblas.so.3; do
  if [ -e "$lib" ]; then blas="$lib"; break; fi
done
[ -n "$blas" ] || exit 0

built() {  # built NAME PREFIX: the path of NAME.c's shared library
  # Built per source, flags, machine, compiler target and C library (a shared
  # home must not hand one host's build to another), and only in our own home.
  local src key out flags="-O3 -ffp-contract=off -shared -fPIC"
  src="$(cd -- "$(dirname -- "$0")" >/dev/null && pwd)/$1.c"
  [ -r "$src" ] && [ -n "${HOME:-}" ] && command -v cc >/dev/null 2>&1 || return 1
  key="$( { cat "$src"; echo "$flags"; uname -m; cc -dumpmachine; getconf GNU_LIBC_VERSION; } \
          2>/dev/null | sha1sum | cut -c1-16)" || return 1
  out="$HOME/.cache/mlx-backend/$2-$key.so"
  case "$out" in *[[:space:]:]*) return 1 ;; esac  # LD_PRELOAD splits paths there
  if [ ! -e "$out" ]; then
    mkdir -p "$(dirname "$out")" 2>/dev/null || return 1
    # Built aside and moved in: servers starting together never load half a file.
    # shellcheck disable=SC2086
    cc $flags -o "$out.$$" "$src" -ldl -lpthread >/dev/null 2>&1 \
      && mv -f "$out.$$" "$out" || { rm -f "$out.$$"; return 1; }
  fi
  [ -O "$out" ] && echo "$out"
}

if [ "${MLX_BACKEND_GEMV:-1}" != 0 ] && gemv="$(built gemv_forward gemv)" && [ -n "$gemv" ]; then
  blas="$gemv:$blas"
fi
if [ "${MLX_BACKEND_SMALL_GEMM:-1}" != 0 ] && [ "$(uname -m)" = x86_64 ] \
    && small="$(built small_gemm small-gemm)" && [ -n "$small" ]; then
  blas="$small:$blas"
fi
echo "$blas"
