/* Few-row matrix products against weights as they lie.

   A decode step of B streams multiplies B rows (B = 2..32) by every weight
   matrix. MLX hands each such product to cblas_sgemm with the weights stored
   n x k, row by row (C = A . W^T). OpenBLAS 0.3.21 packs all of W first and
   then runs a kernel made for many rows: at 16 rows on a 2-core EPYC it
   reaches about 43 GFLOP/s per core, half of what the core can do. This
   library, preloaded before gemv_forward.c and OpenBLAS (preload.sh), takes
   those products itself: each output is a dot product of a row of A and a
   row of W along k, 4 rows of A by 6 of W at a time in AVX-512 registers,
   W read once from memory a block of its rows at a time (the next block
   prefetched while this one is reused from cache for every 4 rows of A),
   the blocks shared among a few threads. Anything else (other layouts, one
   row, many rows, small W, alpha 0, no AVX-512) goes on to the next
   library's cblas_sgemm.

   Every output's sum is added in one fixed order that depends only on k and
   where W lies (its address mod 64 bytes), not on how many rows come with
   the row nor on the thread that computes it: within a process a row gets
   the same bits whether 1 other row or 31 come with it. They are not
   OpenBLAS's bits (nor are OpenBLAS's the same for 1 and 16 rows). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, CONJ_TRANS = 113 };
enum { MIN_ROWS = 2, MAX_ROWS = 32 };   /* one row: gemv; more: OpenBLAS's own kernels */
enum { MIN_ELEMENTS = 1 << 16 };        /* of W: smaller products are not worth it */
enum { MIN_FLOPS_PER_THREAD = 1 << 20 };  /* ~15 us: less is not worth waking a worker */
enum { MAX_THREADS = 4 };
enum { MR = 4, NR = 6 };                /* the register tile */
enum { BLOCK_ROWS = 48, BLOCK_BYTES = 384 << 10 };  /* a block of W and the next fit in L2 */
enum { SPIN_NS = 50000 };               /* a worker's wait before it sleeps */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int,
                         const float *, int, float, float *, int);
static sgemm_fn next_sgemm;
static int usable;  /* this CPU has AVX-512 and a BLAS follows */
static atomic_ulong taken;  /* products computed here (small_gemm_products) */

struct product {
  int m, k, head, block;  /* head: k's elements before W's 64-byte boundary */
  long lda, ldb, ldc;
  const float *a, *b;
  float *c, alpha, beta;
};

#define TARGET __attribute__((target("avx512f,avx512dq"), always_inline)) static inline

/* The sums of a, b, c and d, in that order, each added in the same order. */
TARGET __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                              _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

TARGET void store(const struct product *p, float *c, float sum) {
  *c = p->beta == 0.0f ? p->alpha * sum : p->alpha * sum + p->beta * *c;
}

/* C[i][j] for i < MB, j < NB (a, b, c at the tile's corner). k is walked as
   a masked head up to W's 64-byte boundary, aligned steps, a masked tail;
   `next` (or NULL) is W's next block, prefetched alongside. */
TARGET void tile(const int MB, const int NB, const struct product *p, const float *a,
                 const float *b, float *c, const float *next) {
  __m512 acc[MR * NR];
  for (int t = 0; t < MB * NB; t++) acc[t] = _mm512_setzero_ps();
#define STEP(LOAD_A, LOAD_B)                                                  \
  {                                                                           \
    __m512 av[MR];                                                            \
    for (int i = 0; i < MB; i++) av[i] = LOAD_A(a + i * p->lda + kk);         \
    for (int j = 0; j < NB; j++) {                                            \
      __m512 bv = LOAD_B(b + j * p->ldb + kk);                                \
      for (int i = 0; i < MB; i++) acc[i * NB + j] = _mm512_fmadd_ps(av[i], bv, acc[i * NB + j]); \
    }                                                                         \
  }
#define MASKED(ptr) _mm512_maskz_loadu_ps(mask, ptr)
  int kk = 0, k = p->k;
  if (p->head) {
    __mmask16 mask = (__mmask16)((1u << p->head) - 1);
    STEP(MASKED, MASKED)
    kk = p->head;
  }
  for (; kk + 16 <= k; kk += 16) {
    if (next)
      for (int j = 0; j < NB; j++) _mm_prefetch((const char *)(next + j * p->ldb + kk), _MM_HINT_T1);
    STEP(_mm512_loadu_ps, _mm512_load_ps)
  }
  if (kk < k) {
    __mmask16 mask = (__mmask16)((1u << (k - kk)) - 1);
    STEP(MASKED, MASKED)
  }
#undef STEP
#undef MASKED
  for (int t = 0; t < MB * NB; t += 4) {
    __m512 z = _mm512_setzero_ps();
    float s[4];
    _mm_storeu_ps(s, sum4(acc[t], t + 1 < MB * NB ? acc[t + 1] : z,
                          t + 2 < MB * NB ? acc[t + 2] : z, t + 3 < MB * NB ? acc[t + 3] : z));
    for (int u = 0; u < 4 && t + u < MB * NB; u++)
      store(p, c + ((t + u) / NB) * p->ldc + (t + u) % NB, s[u]);
  }
}

/* MB rows of A against W's rows [j0, j1). */
#define ROWS(MB)                                                                     \
  __attribute__((target("avx512f,avx512dq"))) static void rows_##MB(                 \
      const struct product *p, const float *a, float *c, int j0, int j1,             \
      const float *next) {                                                           \
    int j = j0;                                                                      \
    for (; j + NR <= j1; j += NR)                                                    \
      tile(MB, NR, p, a, p->b + j * p->ldb, c + j, next ? next + (j - j0) * p->ldb : 0); \
    for (; j < j1; j++) tile(MB, 1, p, a, p->b + j * p->ldb, c + j, 0);              \
  }
ROWS(1) ROWS(2) ROWS(3) ROWS(4)

/* All of A's rows against W's rows [j0, j0 + block), `next` (or NULL) the
   block to prefetch while the first rows of A go through this one. */
static void product_block(const struct product *p, int n, int j0, const float *next) {
  int j1 = j0 + p->block < n ? j0 + p->block : n;
  int i = 0;
  for (; i + MR <= p->m; i += MR, next = 0)
    rows_4(p, p->a + i * p->lda, p->c + i * p->ldc, j0, j1, next);
  const float *a = p->a + i * p->lda;
  float *c = p->c + i * p->ldc;
  switch (p->m - i) {
    case 3: rows_3(p, a, c, j0, j1, next); break;
    case 2: rows_2(p, a, c, j0, j1, next); break;
    case 1: rows_1(p, a, c, j0, j1, next); break;
  }
}

/* W's block `index` when it is a whole one (worth prefetching), else NULL. */
static const float *whole_block(const struct product *p, int n, int index) {
  long j0 = (long)index * p->block;
  return j0 + p->block <= n ? p->b + j0 * p->ldb : 0;
}

/* The whole product in the calling thread. */
static void product_alone(const struct product *p, int n) {
  for (int index = 0; (long)index * p->block < n; index++)
    product_block(p, n, index * p->block, whole_block(p, n, index + 1));
}

/* The blocks of W not yet claimed by another thread, each thread claiming
   one ahead (the one it prefetches). Claimed rather than dealt: a worker
   that wakes late (it sleeps after a pause between products) leaves more
   blocks to the others instead of keeping them waiting. The threads still
   work on neighbouring blocks: two far apart in a large W (the LM head, in
   halves) ran no faster than one. */
static void product_shared(const struct product *p, int n, atomic_int *claims) {
  int blocks = (n + p->block - 1) / p->block;
  int index = atomic_fetch_add_explicit(claims, 1, memory_order_relaxed);
  while (index < blocks) {
    int next = atomic_fetch_add_explicit(claims, 1, memory_order_relaxed);
    product_block(p, n, index * p->block, next < blocks ? whole_block(p, n, next) : 0);
    index = next;
  }
}

/* Workers: up to `parts - 1` of them share the product in `job` with the
   caller, claiming W's blocks as they go (product_shared). They spin a
   little between products (a decode step makes them back to back), then
   sleep on a condition variable. */
static struct {
  pthread_mutex_t busy;  /* one caller at a time; others compute alone */
  pthread_mutex_t lock;
  pthread_cond_t wake;
  atomic_uint generation;
  atomic_int pending;
  atomic_int claims;  /* W's blocks handed out so far */
  int sleeping, threads, started;
  unsigned first_generation;  /* the one before a worker's first product */
  const struct product *job;  /* the product, its width and how many share it */
  int n, parts;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER,
          .wake = PTHREAD_COND_INITIALIZER};

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *worker(void *arg) {
  int part = (int)(long)arg;
  unsigned seen = pool.first_generation;
  for (;;) {
    double until = seconds() + SPIN_NS * 1e-9;
    while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen
           && seconds() < until)
      _mm_pause();
    pthread_mutex_lock(&pool.lock);
    while (atomic_load(&pool.generation) == seen) {
      pool.sleeping++;
      pthread_cond_wait(&pool.wake, &pool.lock);
      pool.sleeping--;
    }
    pthread_mutex_unlock(&pool.lock);
    seen = atomic_load(&pool.generation);
    const struct product *p = pool.job;
    if (part < pool.parts) product_shared(p, pool.n, &pool.claims);
    atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
  }
  return NULL;
}

static void forked_child(void) {  /* the workers did not come along */
  pthread_mutex_init(&pool.busy, NULL);
  pthread_mutex_init(&pool.lock, NULL);
  pthread_cond_init(&pool.wake, NULL);
  pool.started = pool.sleeping = 0;
}

static int threads_wanted(void) {
  int (*blas_threads)(void) = (int (*)(void))dlsym(RTLD_NEXT, "openblas_get_num_threads");
  cpu_set_t cpus;
  int n = sched_getaffinity(0, sizeof cpus, &cpus) == 0 ? CPU_COUNT(&cpus) : 1;
  if (blas_threads && blas_threads() > 0 && blas_threads() < n) n = blas_threads();
  return n < 1 ? 1 : n > MAX_THREADS ? MAX_THREADS : n;
}

static void start_workers(void) {  /* under pool.busy */
  pool.started = 1;
  pool.threads = threads_wanted();
  pool.first_generation = atomic_load(&pool.generation);
  for (int part = 1; part < pool.threads; part++) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attr, worker, (void *)(long)part) != 0) pool.threads = part;
    pthread_attr_destroy(&attr);
    if (pool.threads == part) break;
  }
}

static void run(const struct product *p, int n) {
  long flops = 2L * p->m * n * p->k;
  if (flops < 2L * MIN_FLOPS_PER_THREAD || pthread_mutex_trylock(&pool.busy) != 0) {
    product_alone(p, n);
    return;
  }
  if (!pool.started) start_workers();
  int parts = pool.threads;
  while (parts > 1 && flops / parts < MIN_FLOPS_PER_THREAD) parts--;
  if (parts < 2) {
    product_alone(p, n);
  } else {
    pool.job = p;
    pool.n = n;
    pool.parts = parts;  /* workers past `parts` take nothing */
    atomic_store_explicit(&pool.claims, 0, memory_order_relaxed);
    atomic_store(&pool.pending, pool.threads - 1);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_mutex_lock(&pool.lock);
    if (pool.sleeping) pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    product_shared(p, n, &pool.claims);
    while (atomic_load_explicit(&pool.pending, memory_order_acquire) > 0) _mm_pause();
  }
  pthread_mutex_unlock(&pool.busy);
}

__attribute__((constructor)) static void resolve(void) {
  next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  __builtin_cpu_init();
  usable = next_sgemm && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  pthread_atfork(NULL, NULL, forked_child);
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c,
                 int ldc) {
  /* ldb a multiple of 16 floats: W's rows share one alignment (see tile) */
  if (usable && order == ROW_MAJOR && trans_a == NO_TRANS
      && (trans_b == TRANS || trans_b == CONJ_TRANS) && m >= MIN_ROWS && m <= MAX_ROWS
      && k >= 16 && (long)n * k >= MIN_ELEMENTS && lda >= k && ldb >= k && ldb % 16 == 0
      && ldc >= n && alpha != 0.0f) {
    int head = (int)((64 - ((unsigned long)b & 63)) & 63) / 4;
    int block = BLOCK_BYTES / 2 / ((int)sizeof(float) * k) / NR * NR;
    block = block < NR ? NR : block > BLOCK_ROWS ? BLOCK_ROWS : block;
    struct product p = {m, k, head, block, lda, ldb, ldc, a, b, c, alpha, beta};
    run(&p, n);
    atomic_fetch_add_explicit(&taken, 1, memory_order_relaxed);
    return;
  }
  if (!next_sgemm) {
    fputs("small_gemm: no BLAS after it provides cblas_sgemm\n", stderr);
    abort();
  }
  next_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* How many products this library computed itself (for logs and tests), and
   with how many threads (0: it takes none on this CPU; before the first
   product, how many it will start). */
unsigned long small_gemm_products(void) { return atomic_load(&taken); }
int small_gemm_threads(void) { return !usable ? 0 : pool.started ? pool.threads : threads_wanted(); }
