"""mlx_backend/blas/small_gemm.c: what run.sh preloads computes MLX's 2-32 row
products with weights itself (and nothing else), to float32 accuracy, with
bits that do not depend on the rows beside a row, from several callers at
once and after a fork."""

import json
import os

import pytest

from .conftest import blas_preload, run_preloaded

# Runs with run.sh's LD_PRELOAD. `sgemm` is the cblas_sgemm every library sees.
PROBE = r"""
import ctypes, json, os, signal, threading
import numpy as np
import mlx.core as mx

lib = ctypes.CDLL(None)
lib.small_gemm_products.restype = ctypes.c_ulong
ROW, NO, T = 101, 111, 112
f32, ptr = ctypes.c_float, lambda a: a.ctypes.data_as(ctypes.c_void_p)
rng = np.random.default_rng(0)
normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)

def taken(product):
    # the product's value, and how many products the library computed for it
    before = lib.small_gemm_products()
    value = np.array(product)
    return value, lib.small_gemm_products() - before

def accurate(value, a, b_t, alpha=1.0, beta=0.0, c=None):
    # within float32 rounding of the exact a . b_t (scaled by what it adds up)
    exact = alpha * (a.astype(np.float64) @ b_t.astype(np.float64))
    size = abs(alpha) * (np.abs(a.astype(np.float64)) @ np.abs(b_t.astype(np.float64)))
    if c is not None:
        exact, size = exact + beta * c, size + abs(beta * c)
    return bool(np.all(np.abs(value - exact) <= 100 * np.finfo(np.float32).eps * size))

def sgemm(a, b, alpha=1.0, beta=0.0, c=None):  # a (m x k) . b^T, b stored n x k
    m, k = a.shape
    c = np.zeros((m, b.shape[0]), np.float32) if c is None else c.copy()
    lib.cblas_sgemm(ROW, NO, T, m, b.shape[0], k, f32(alpha), ptr(a), a.strides[0] // 4, ptr(b),
                    b.strides[0] // 4, f32(beta), ptr(c), c.shape[1])
    return c

W, X = normal(1536, 576), normal(40, 576)
w, x = mx.array(W), mx.array(X)
out = {}
for m in (2, 3, 4, 5, 16, 32):
    value, count = taken(x[:m] @ w.T)
    out[f"rows_{m}"] = count == 1 and accurate(value, X[:m], W.T)
batch = np.array(x[:32] @ w.T)
out["same_bits_beside_any_rows"] = all(
    np.array_equal(np.array(x[i:i + m] @ w.T), batch[i:i + m])
    for m in (2, 3, 5, 7, 16) for i in range(0, 33 - m, 5))
# Left to the libraries after it: one row, many rows, small W, W not transposed
for name, product in {"one_row": x[:1] @ w.T, "many_rows": x[:33] @ w.T,
                      "small_w": x[:8] @ w[:64].T, "values": x[:8, :64] @ w[:64]}.items():
    out[f"leaves_{name}"] = taken(product)[1] == 0
C = normal(7, 1536)
value, count = taken(mx.addmm(mx.array(C), x[:7], w.T, alpha=2.0, beta=0.5))
out["alpha_beta"] = count == 1 and accurate(value, X[:7], W.T, 2.0, 0.5, C)
out["beta_0_ignores_c"] = np.array_equal(
    sgemm(X[:5], W, c=np.full((5, 1536), np.nan, np.float32)), sgemm(X[:5], W))
# Every alignment of W (a masked head and tail along k), k a multiple of 16
# or not, a strided A; the same bits beside any rows at every alignment
store, A, rows = normal(700 * 592 + 16), normal(6, 600), normal(32, 592)
stored_at = lambda s: store[s:s + 700 * 592].reshape(700, 592)  # ldb 592
before = lib.small_gemm_products()
out["alignments"] = all(accurate(sgemm(A[:, :k], stored_at(s)[:, :k]), A[:, :k],
                                 stored_at(s)[:, :k].T)
                        for s in range(16) for k in (592, 583, 150)) \
    and lib.small_gemm_products() - before == 16 * 3
out["same_bits_beside_any_rows_at_every_alignment"] = all(
    np.array_equal(sgemm(rows[i:i + m], stored_at(s)), sgemm(rows, stored_at(s))[i:i + m])
    for s in range(16) for m in (2, 5, 13) for i in (0, 7, 32 - m))
# Callers at once: each gets what it gets alone
jobs = [(normal(m, 576), W[: 300 * (i + 1)]) for i, m in enumerate((2, 9, 16, 31))]
alone = [sgemm(a, b) for a, b in jobs]
together = [None] * len(jobs)
def call(i):
    for _ in range(20):
        if not np.array_equal(sgemm(*jobs[i]), alone[i]):
            return
    together[i] = True
threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
for t in threads: t.start()
for t in threads: t.join()
out["callers_at_once"] = all(together)
# A forked child has no workers: it starts its own
expected = sgemm(X[:16], W)
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # a child that waits for workers it lacks ends here
    os._exit(0 if np.array_equal(sgemm(X[:16], W), expected) else 1)
out["after_fork"] = os.waitpid(pid, 0)[1] == 0
print(json.dumps({"checks": out, "threads": lib.small_gemm_threads()}))
"""


@pytest.fixture(scope="module")
def libraries(blas_home):
    libs = blas_preload(blas_home).split(":")
    if not libs or "small-gemm-" not in libs[0]:
        pytest.skip(f"no small_gemm on this machine (preload: {libs})")
    return libs


def probe(libraries, **env):
    done = run_preloaded(PROBE, ":".join(libraries), **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_mlx_products_of_2_to_32_rows_are_computed_here(libraries):
    result = probe(libraries)
    if result["threads"] == 0:
        pytest.skip("this CPU has no AVX-512: small_gemm passes every product on")
    if len(os.sched_getaffinity(0)) > 1 and "OPENBLAS_NUM_THREADS" not in os.environ:
        assert result["threads"] > 1  # the checks above ran with workers
    checks = result["checks"]
    assert checks == {name: True for name in checks}, checks


def test_one_thread_when_openblas_is_told_so(libraries):
    result = probe(libraries, OPENBLAS_NUM_THREADS="1")
    if result["threads"] == 0:
        pytest.skip("this CPU has no AVX-512: small_gemm passes every product on")
    assert result["threads"] == 1
    checks = result["checks"]
    assert checks == {name: True for name in checks}, checks


def test_switch(blas_home, libraries):
    assert blas_preload(blas_home, MLX_BACKEND_SMALL_GEMM="0") == ":".join(libraries[1:])
    assert blas_preload(blas_home) == ":".join(libraries)
