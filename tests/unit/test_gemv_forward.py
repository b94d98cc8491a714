"""mlx_backend/blas/gemv_forward.c: what run.sh preloads hands MLX's one-row
products with weights (and long keys) to OpenBLAS's gemv, to its bits, and
every other product to OpenBLAS's gemm, to its bits (small_gemm.c, which takes
2-32 row products before them, left out: test_small_gemm.py)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from .conftest import PRELOAD, blas_preload, run_preloaded

# Runs with run.sh's LD_PRELOAD. `gemm`/`gemv` are OpenBLAS's own (looked up in
# its library); `forwarder` is the cblas_sgemm every library sees (the preload).
PROBE = r"""
import ctypes, json, sys
import numpy as np
import mlx.core as mx

openblas = ctypes.CDLL(sys.argv[1])
forwarder = ctypes.CDLL(None).cblas_sgemm
ROW, NO, T = 101, 111, 112
f32, ptr = ctypes.c_float, lambda a: a.ctypes.data_as(ctypes.c_void_p)
rng = np.random.default_rng(0)
normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)

def gemm(a, b, trans_b, fn=openblas.cblas_sgemm, alpha=1.0, beta=0.0, c=None):
    m, k = a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    c = np.zeros((m, n), np.float32) if c is None else c.copy()
    fn(ROW, NO, T if trans_b else NO, m, n, k, f32(alpha), ptr(a), k, ptr(b), b.shape[1],
       f32(beta), ptr(c), n)
    return c

def gemv(x, w, alpha=1.0, beta=0.0, c=None, inc_x=1):
    n, k = w.shape
    c = np.zeros(n, np.float32) if c is None else c.copy()
    openblas.cblas_sgemv(ROW, NO, n, k, f32(alpha), ptr(w), k, ptr(x), inc_x, f32(beta),
                         ptr(c), 1)
    return c[None]

same = lambda x, y: bool(np.array_equal(np.asarray(x), y))
w, keys, values = normal(300, 576), normal(100, 64), normal(300, 64)
x, rows, q, p = normal(1, 576), normal(4, 576), normal(1, 64), normal(1, 300)
long_keys, c0 = normal(2048, 64), normal(1, 300)
out = {
    # MLX's products: one row by weights forwarded, the rest left to gemm
    "weights": same(mx.array(x) @ mx.array(w).T, gemv(x, w)),
    "long_keys": same(mx.array(q) @ mx.array(long_keys).T, gemv(q, long_keys)),
    "rows": same(mx.array(rows) @ mx.array(w).T, gemm(rows, w, True)),
    "short_keys": same(mx.array(q) @ mx.array(keys).T, gemm(q, keys, True)),
    "values": same(mx.array(p) @ mx.array(values), gemm(p, values, False)),
    "addmm": same(mx.addmm(mx.array(c0), mx.array(x), mx.array(w).T, alpha=2.0, beta=0.5),
                  gemv(x, w, 2.0, 0.5, c0[0])),
    # The forwarder itself: beta 0 ignores what c held; a transposed row is strided
    "ignores_c": same(gemm(x, w, True, forwarder, c=np.full((1, 300), np.nan, np.float32)),
                      gemv(x, w)),
}
xt = np.ascontiguousarray(np.repeat(x.T, 3, axis=1))  # k x 3: the row is column 0
c = np.zeros((1, 300), np.float32)
forwarder(ROW, T, T, 1, 300, 576, f32(1.0), ptr(xt), 3, ptr(w), 576, f32(0.0), ptr(c), 300)
out["strided_row"] = same(c, gemv(xt, w, inc_x=3))
from mlx_backend.model_loader import gemv_forwarder
out["logged"] = gemv_forwarder() is not None  # LoadModel's log names it
# Which path ran shows only where gemv's bits differ from gemm's (not in a
# BLAS that forwards one-row products itself)
print(json.dumps({"checks": out, "distinct": not same(gemv(x, w), gemm(x, w, True))}))
"""


def preload(home, **env):
    return blas_preload(home, **{"MLX_BACKEND_SMALL_GEMM": "0", **env})


@pytest.fixture(scope="module")
def libraries(blas_home):
    libs = preload(blas_home).split(":")
    if len(libs) != 2 or "gemv-" not in libs[0]:
        pytest.skip(f"no one-row forwarder on this machine (preload: {libs})")
    return libs


def test_mlx_products_reach_gemv_or_gemm_to_the_bit(libraries):
    done = run_preloaded(PROBE, ":".join(libraries), libraries[1])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    if not result["distinct"]:
        pytest.skip("this BLAS's gemv and gemm agree to the bit: the paths look alike")
    checks = result["checks"]
    assert checks == {name: True for name in checks}, checks


def test_switches_and_reuse(blas_home, libraries):
    built = Path(libraries[0]).stat()
    assert preload(blas_home, MLX_BACKEND_GEMV="0") == libraries[1]
    assert preload(blas_home, MLX_BACKEND_NO_OPENBLAS="1") == ""
    assert preload(blas_home) == ":".join(libraries)
    again = Path(libraries[0]).stat()
    assert (again.st_ino, again.st_mtime_ns) == (built.st_ino, built.st_mtime_ns)  # not rebuilt
    env_without_home = {k: v for k, v in os.environ.items() if k != "HOME"}
    done = subprocess.run(["bash", str(PRELOAD)], capture_output=True, text=True, timeout=120,
                          env=env_without_home)
    assert done.stdout.strip() == libraries[1]  # no home: OpenBLAS alone, never a shared folder
