/* y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) with x, y, bias fp32 and w bf16: the weight is read as
 * bf16 (half the bytes of fp32) and widened to fp32 in registers (a bf16 value is the top half of
 * an fp32 one: a 16-bit shift), then multiplied and accumulated in fp32 with FMA.
 *
 * Why: on x86 hosts without native bf16 (AVX2 only), torch's bf16 matmuls take scalar-widening
 * paths and fp32 ones read twice the bytes; decode is bound by reading weights. See
 * workers/kernels/widen_gemm.py, which calls this and holds the torch reference.
 *
 * Layout: row-major, unit stride along K; ldx / ldw / ldy are the row strides in elements.
 * Blocking: 4 weight rows x up to 3 tokens per tile (12 accumulators, 3 token vectors, 1 weight
 * vector: the 16 ymm registers), one tile's 4 rows stay in L1 while every token group passes over
 * them. Threads (OpenMP, the runtime torch loads: one thread pool) split N into contiguous ranges,
 * so each streams its own rows of the weight.
 * The AVX2 code is compiled with target attributes and chosen at run time (`supported`); without
 * AVX2 + FMA, or off x86, the module still builds and `supported()` is False.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define WIDEN_X86 1
#include <immintrin.h>
#endif

#define ROWS 4 /* weight rows per tile */

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef WIDEN_X86
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 static inline __m256 load_widened(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* `tokens` (1..3) rows of x against `rows` (1..ROWS) weight rows starting at w; constants at every
 * call site, so the compiler unrolls the loops and keeps acc in registers. */
AVX2 __attribute__((always_inline)) static inline void tile(
    int tokens, int rows, const float *x, int64_t ldx, const uint16_t *w, int64_t ldw,
    const float *bias, float *y, int64_t ldy, int64_t k_len) {
    __m256 acc[3][ROWS];
    for (int i = 0; i < tokens; i++)
        for (int j = 0; j < rows; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8) {
        __m256 xv[3];
        for (int i = 0; i < tokens; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
        for (int j = 0; j < rows; j++) {
            __m256 wv = load_widened(w + j * ldw + k);
            for (int i = 0; i < tokens; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < tokens; i++)
        for (int j = 0; j < rows; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t kk = k; kk < k_len; kk++) s += x[i * ldx + kk] * bf16_to_float(w[j * ldw + kk]);
            y[i * ldy + j] = bias ? s + bias[j] : s;
        }
}

/* Every token against weight rows [n0, n1). */
AVX2 static void rows_avx2(const float *x, int64_t ldx, const uint16_t *w, int64_t ldw,
                           const float *bias, float *y, int64_t ldy, int64_t m, int64_t n0,
                           int64_t n1, int64_t k_len) {
    int64_t n = n0;
    for (; n + ROWS <= n1; n += ROWS) {
        const uint16_t *wn = w + n * ldw;
        const float *bn = bias ? bias + n : NULL;
        int64_t i = 0;
        for (; i + 3 <= m; i += 3) tile(3, ROWS, x + i * ldx, ldx, wn, ldw, bn, y + i * ldy + n, ldy, k_len);
        if (m - i == 2) tile(2, ROWS, x + i * ldx, ldx, wn, ldw, bn, y + i * ldy + n, ldy, k_len);
        if (m - i == 1) tile(1, ROWS, x + i * ldx, ldx, wn, ldw, bn, y + i * ldy + n, ldy, k_len);
    }
    for (; n < n1; n++) {
        const float *bn = bias ? bias + n : NULL;
        for (int64_t i = 0; i < m; i++)
            tile(1, 1, x + i * ldx, ldx, w + n * ldw, ldw, bn, y + i * ldy + n, ldy, k_len);
    }
}

static int cpu_has_avx2_fma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int cpu_has_avx2_fma(void) { return 0; }
#endif

/* linear(x, ldx, w, ldw, bias or 0, y, ldy, m, n, k, threads): addresses as integers (torch's
 * data_ptr()), validated by the Python wrapper. Releases the GIL while it computes. */
static PyObject *widen_linear(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pw, pb, py;
    long long ldx, ldw, ldy, m, n, k;
    int threads;
    if (!PyArg_ParseTuple(args, "KLKLKKLLLLi", &px, &ldx, &pw, &ldw, &pb, &py, &ldy, &m, &n, &k, &threads))
        return NULL;
#ifdef WIDEN_X86
    if (!cpu_has_avx2_fma()) {
        PyErr_SetString(PyExc_RuntimeError, "widen_gemm: this CPU has no AVX2 + FMA");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)px;
    const uint16_t *w = (const uint16_t *)(uintptr_t)pw;
    const float *bias = (const float *)(uintptr_t)pb;
    float *y = (float *)(uintptr_t)py;
    if (threads < 1) threads = 1;
    /* at least 16 rows per thread: below that the fork costs more than it saves */
    int64_t most = (n + 15) / 16;
    if (threads > most) threads = (int)(most > 0 ? most : 1);
    Py_BEGIN_ALLOW_THREADS;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        int t = 0, nt = 1;
#endif
        int64_t tiles = (n + ROWS - 1) / ROWS;
        int64_t n0 = tiles * t / nt * ROWS, n1 = tiles * (t + 1) / nt * ROWS;
        if (n1 > n) n1 = n;
        if (n0 < n1) rows_avx2(x, ldx, w, ldw, bias, y, ldy, m, n0, n1, k);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
#else
    (void)px; (void)pw; (void)pb; (void)py; (void)ldx; (void)ldw; (void)ldy; (void)m; (void)n; (void)k;
    (void)threads;
    PyErr_SetString(PyExc_RuntimeError, "widen_gemm: built without the x86 AVX2 kernel");
    return NULL;
#endif
}

static PyObject *widen_supported(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(cpu_has_avx2_fma());
}

static PyObject *widen_openmp(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"linear", widen_linear, METH_VARARGS, "y = x @ w^T (+ bias): fp32 x, bf16 w, fp32 y (addresses)."},
    {"supported", widen_supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX2 + FMA)."},
    {"openmp", widen_openmp, METH_NOARGS, "Whether the kernel was built with OpenMP threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_widen_gemm", NULL, -1, methods};

PyMODINIT_FUNC PyInit__widen_gemm(void) { return PyModule_Create(&module); }
