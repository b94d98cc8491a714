/* One-row matrix products as BLAS matrix-vector products.

   MLX's CPU backend calls cblas_sgemm for every float32 product, also for one
   row: a single stream's decode step (every linear layer, the LM head) and
   each row's attention scores. At one row OpenBLAS's gemm streams the weights
   from memory at about half the rate its gemv does (13 vs 22-27 GB/s on a
   2-core EPYC: it packs them first); newer OpenBLAS releases forward gemm to
   gemv themselves. Preloaded before OpenBLAS (preload.sh), this cblas_sgemm
   hands the one-row products that gain (the other operand stored row by row,
   as weights and keys are, and at least 256 KiB of it; the rest measured
   slower as gemv) to the next library's cblas_sgemv, and everything else to
   its cblas_sgemm. The sums are the same but added in another order: the last
   bits of a one-row product may differ from gemm's, as they already differ
   between gemm's own kernels for different row counts. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };
enum { MIN_ELEMENTS = 1 << 16 };  /* 256 KiB of float32 */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int,
                         float, float *, int);

static sgemm_fn next_sgemm;
static sgemv_fn next_sgemv;

__attribute__((constructor)) static void resolve(void) {
  next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  next_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
}

static int transposed(int trans) { return trans == TRANS || trans == CONJ_TRANS; }

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  if (order == ROW_MAJOR && m == 1 && transposed(trans_b)
      && (trans_a == NO_TRANS || transposed(trans_a)) && n > 0 && k > 0
      && (long)n * k >= MIN_ELEMENTS && next_sgemv) {
    /* c (1 x n) = alpha * a (1 x k) . b^T + beta * c with b stored n x k, as
       c = alpha * b a + beta * c; the row a is strided when stored transposed. */
    if (beta == 0.0f)  /* gemm never reads c then: no NaN left there may leak */
      memset(c, 0, (size_t)n * sizeof(float));
    next_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, trans_a == NO_TRANS ? 1 : lda,
               beta, c, 1);
    return;
  }
  if (!next_sgemm) {
    fputs("gemv_forward: no BLAS after it provides cblas_sgemm\n", stderr);
    abort();
  }
  next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
