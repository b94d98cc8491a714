#!/usr/bin/env bash
# Prints the libraries run.sh preloads on a Linux CPU (colon-separated; nothing
# when none): OpenBLAS, as MLX's wheel brings only the reference BLAS, and
# before it gemv_forward.c (one-row products as matrix-vector products), built
# here on first use into ~/.cache/mlx-backend. MLX_BACKEND_NO_OPENBLAS=1 prints
# nothing; MLX_BACKEND_GEMV=0 leaves out the forwarder.
set -euo pipefail
[ "$(uname -s)" = Linux ] && [ -z "${MLX_BACKEND_NO_OPENBLAS:-}" ] || exit 0
blas=""
for lib in /usr/lib/*/openblas-pthread/libblas.so.3; do
  if [ -e "$lib" ]; then blas="$lib"; break; fi
done
[ -n "$blas" ] || exit 0
src="$(cd "$(dirname "$0")" && pwd)/gemv_forward.c"
if [ "${MLX_BACKEND_GEMV:-1}" != 0 ] && command -v cc >/dev/null 2>&1; then
  out="${HOME:-/tmp}/.cache/mlx-backend/gemv-$(sha1sum < "$src" | cut -c1-16).so"
  case "$out" in *[[:space:]:]*) out="" ;; esac  # LD_PRELOAD splits paths there
  if [ -n "$out" ] && [ ! -e "$out" ] && mkdir -p "$(dirname "$out")" 2>/dev/null; then
    # Built aside and moved in: servers starting together never load half a file.
    cc -O2 -shared -fPIC -o "$out.$$" "$src" -ldl >/dev/null 2>&1 \
      && mv -f "$out.$$" "$out" || rm -f "$out.$$"
  fi
  if [ -n "$out" ] && [ -e "$out" ]; then blas="$out:$blas"; fi
fi
echo "$blas"
