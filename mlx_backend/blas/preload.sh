#!/usr/bin/env bash
# Prints the libraries run.sh preloads on a Linux CPU (colon-separated; nothing
# when none): OpenBLAS, as MLX's wheel brings only the reference BLAS, and
# before it gemv_forward.c (one-row products as matrix-vector products), built
# here on first use into ~/.cache/mlx-backend. MLX_BACKEND_NO_OPENBLAS (any
# value) prints nothing; MLX_BACKEND_GEMV=0 leaves out the forwarder. Nothing
# about the forwarder can keep OpenBLAS out.
set -uo pipefail
[ "$(uname -s)" = Linux ] && [ -z "${MLX_BACKEND_NO_OPENBLAS:-}" ] || exit 0
blas=""
for lib in /usr/lib/*/openblas-pthread/libblas.so.3; do
  if [ -e "$lib" ]; then blas="$lib"; break; fi
done
[ -n "$blas" ] || exit 0

forwarder() {
  # Built per source, machine, compiler target and C library (a shared home
  # must not hand one host's build to another), and only from our own home.
  local src key out
  src="$(cd -- "$(dirname -- "$0")" >/dev/null && pwd)/gemv_forward.c"
  [ -r "$src" ] && [ -n "${HOME:-}" ] && command -v cc >/dev/null 2>&1 || return 1
  key="$( { cat "$src"; uname -m; cc -dumpmachine; getconf GNU_LIBC_VERSION; } 2>/dev/null \
          | sha1sum | cut -c1-16)" || return 1
  out="$HOME/.cache/mlx-backend/gemv-$key.so"
  case "$out" in *[[:space:]:]*) return 1 ;; esac  # LD_PRELOAD splits paths there
  if [ ! -e "$out" ]; then
    mkdir -p "$(dirname "$out")" 2>/dev/null || return 1
    # Built aside and moved in: servers starting together never load half a file.
    cc -O2 -shared -fPIC -o "$out.$$" "$src" -ldl >/dev/null 2>&1 \
      && mv -f "$out.$$" "$out" || { rm -f "$out.$$"; return 1; }
  fi
  [ -O "$out" ] && echo "$out"
}

if [ "${MLX_BACKEND_GEMV:-1}" != 0 ] && gemv="$(forwarder)" && [ -n "$gemv" ]; then
  blas="$gemv:$blas"
fi
echo "$blas"
