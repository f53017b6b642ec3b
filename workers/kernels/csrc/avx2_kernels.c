/* The CPU kernels of moeserve's AVX2 path, for x86 hosts without native bf16 (AVX2 only), where
 * torch's bf16 matmuls take scalar-widening paths and decode is bound by reading bytes. Two kernels:
 *
 * linear: y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) with x, y, bias fp32 and w bf16. The weight is
 *   read as bf16 (half the bytes of fp32) and widened to fp32 in registers (a bf16 value is the top
 *   half of an fp32 one: a 16-bit shift), then multiplied and accumulated in fp32 with FMA.
 *   Blocking: 4 weight rows x up to 3 tokens per tile (12 accumulators, 3 token vectors, 1 weight
 *   vector: the 16 ymm registers); a tile's 4 rows stay in L1 while every token group passes over
 *   them. Threads split N into contiguous ranges, so each streams its own rows of the weight.
 *   Python side and reference: workers/kernels/widen_gemm.py.
 *
 * mla_decode: the absorbed MLA decode attention over the paged fp32 latent cache, read in place
 *   through the block tables (no gather), one pass with an online softmax (flash-decoding): the
 *   scores of a run of cached rows for every head (the same dot tiles as `linear`), then those rows
 *   weighted into every head's output while they are in cache. A long context is split between the
 *   threads and merged by log-sum-exp. Python side and reference: workers/kernels/mla_decode_cpu.py.
 *
 * Layout: row-major, unit stride along the reduced dimension; ld* are row strides in elements.
 * Threads: OpenMP, the runtime torch has loaded (one thread pool). The AVX2 code is compiled with
 * target attributes and chosen at run time (`supported`); without AVX2 + FMA, or off x86, the
 * module still builds and `supported()` is False.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
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

/* `tokens` (1..3) rows of x against `rows` (1..ROWS) weight rows starting at w, bf16 (`wide` 0)
 * or fp32 (`wide` 1); y[i * ldy + j] = scale * dot (+ bias[j]). All three are constants at every
 * call site, so the compiler unrolls the loops and keeps acc in registers. */
AVX2 __attribute__((always_inline)) static inline void tile(
    int wide, int tokens, int rows, const float *x, int64_t ldx, const void *w, int64_t ldw,
    const float *bias, float scale, float *y, int64_t ldy, int64_t k_len) {
    const uint16_t *wh = (const uint16_t *)w;
    const float *wf = (const float *)w;
    __m256 acc[3][ROWS];
    for (int i = 0; i < tokens; i++)
        for (int j = 0; j < rows; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= k_len; k += 8) {
        __m256 xv[3];
        for (int i = 0; i < tokens; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
        for (int j = 0; j < rows; j++) {
            __m256 wv = wide ? _mm256_loadu_ps(wf + j * ldw + k) : load_widened(wh + j * ldw + k);
            for (int i = 0; i < tokens; i++) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < tokens; i++)
        for (int j = 0; j < rows; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t kk = k; kk < k_len; kk++)
                s += x[i * ldx + kk] * (wide ? wf[j * ldw + kk] : bf16_to_float(wh[j * ldw + kk]));
            s *= scale;
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
        for (; i + 3 <= m; i += 3) tile(0, 3, ROWS, x + i * ldx, ldx, wn, ldw, bn, 1.0f, y + i * ldy + n, ldy, k_len);
        if (m - i == 2) tile(0, 2, ROWS, x + i * ldx, ldx, wn, ldw, bn, 1.0f, y + i * ldy + n, ldy, k_len);
        if (m - i == 1) tile(0, 1, ROWS, x + i * ldx, ldx, wn, ldw, bn, 1.0f, y + i * ldy + n, ldy, k_len);
    }
    for (; n < n1; n++) {
        const float *bn = bias ? bias + n : NULL;
        for (int64_t i = 0; i < m; i++)
            tile(0, 1, 1, x + i * ldx, ldx, w + n * ldw, ldw, bn, 1.0f, y + i * ldy + n, ldy, k_len);
    }
}

#define RUN 32 /* cached rows scored, then weighted, together: they and their scores stay in L1/L2 */
#define MAX_HEADS 256

/* e^x, 8 lanes (Cephes' polynomial on x - n ln2, times 2^n): relative error ~2e-7; x below -88
 * gives 0, as expf underflows. */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* o[h][c..c+8*cols) += sum_j p[h][j] rows[j][c..]: `heads` (1..3) x `cols` (1..4) ymm accumulators. */
AVX2 __attribute__((always_inline)) static inline void weigh_tile(
    int heads, int cols, const float *p, const float *rows, int64_t ld, int64_t n, float *o, int64_t ldo) {
    __m256 acc[3][4];
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < cols; c++) acc[h][c] = _mm256_loadu_ps(o + h * ldo + 8 * c);
    for (int64_t j = 0; j < n; j++) {
        __m256 v[4];
        for (int c = 0; c < cols; c++) v[c] = _mm256_loadu_ps(rows + j * ld + 8 * c);
        for (int h = 0; h < heads; h++) {
            __m256 w = _mm256_broadcast_ss(p + h * RUN + j);
            for (int c = 0; c < cols; c++) acc[h][c] = _mm256_fmadd_ps(w, v[c], acc[h][c]);
        }
    }
    for (int h = 0; h < heads; h++)
        for (int c = 0; c < cols; c++) _mm256_storeu_ps(o + h * ldo + 8 * c, acc[h][c]);
}

AVX2 static void weigh_heads(int heads, const float *p, const float *rows, int64_t ld, int64_t n,
                             float *o, int64_t c_len) {
    int64_t c = 0;
    for (; c + 32 <= c_len; c += 32) {
        if (heads == 3) weigh_tile(3, 4, p, rows + c, ld, n, o + c, c_len);
        if (heads == 2) weigh_tile(2, 4, p, rows + c, ld, n, o + c, c_len);
        if (heads == 1) weigh_tile(1, 4, p, rows + c, ld, n, o + c, c_len);
    }
    for (; c < c_len; c += 8) { /* c_len is a multiple of 8 (checked by the caller) */
        if (heads == 3) weigh_tile(3, 1, p, rows + c, ld, n, o + c, c_len);
        if (heads == 2) weigh_tile(2, 1, p, rows + c, ld, n, o + c, c_len);
        if (heads == 1) weigh_tile(1, 1, p, rows + c, ld, n, o + c, c_len);
    }
}

/* Context rows [r0, r1) of one sequence into every head's running max m, sum l and unnormalized
 * output o [H][C]. q [H][D]: the absorbed queries; rows are found through the block table. */
AVX2 static void attend_rows(const float *q, int64_t heads, int64_t d, int64_t c_len, float scale,
                             const float *cache, int64_t block_size, const int64_t *table,
                             int64_t r0, int64_t r1, float *m, float *l, float *o) {
    float s[MAX_HEADS * RUN];
    for (int64_t r = r0; r < r1;) {
        int64_t off = r % block_size, n = block_size - off;
        if (n > r1 - r) n = r1 - r;
        if (n > RUN) n = RUN;
        const float *rows = cache + (table[r / block_size] * block_size + off) * d;
        int64_t j = 0; /* s[h][j] = scale * q[h] . rows[j]: heads as the tokens of `linear`'s tiles */
        for (; j + ROWS <= n; j += ROWS) {
            int64_t h = 0;
            for (; h + 3 <= heads; h += 3) tile(1, 3, ROWS, q + h * d, d, rows + j * d, d, NULL, scale, s + h * RUN + j, RUN, d);
            if (heads - h == 2) tile(1, 2, ROWS, q + h * d, d, rows + j * d, d, NULL, scale, s + h * RUN + j, RUN, d);
            if (heads - h == 1) tile(1, 1, ROWS, q + h * d, d, rows + j * d, d, NULL, scale, s + h * RUN + j, RUN, d);
        }
        for (; j < n; j++)
            for (int64_t h = 0; h < heads; h++)
                tile(1, 1, 1, q + h * d, d, rows + j * d, d, NULL, scale, s + h * RUN + j, RUN, d);
        for (int64_t h = 0; h < heads; h++) { /* online softmax: rescale what came before */
            float *sh = s + h * RUN, top = m[h];
            for (j = 0; j < n; j++) top = sh[j] > top ? sh[j] : top;
            float corr = expf(m[h] - top), sum = 0.0f;
            for (j = 0; j + 8 <= n; j += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + j), _mm256_set1_ps(top)));
                _mm256_storeu_ps(sh + j, e);
                sum += hsum(e);
            }
            for (; j < n; j++) sum += sh[j] = expf(sh[j] - top);
            l[h] = l[h] * corr + sum;
            m[h] = top;
            if (corr != 1.0f) {
                __m256 cv = _mm256_set1_ps(corr);
                for (int64_t c = 0; c < c_len; c += 8)
                    _mm256_storeu_ps(o + h * c_len + c, _mm256_mul_ps(cv, _mm256_loadu_ps(o + h * c_len + c)));
            }
        }
        int64_t h = 0;
        for (; h + 3 <= heads; h += 3) weigh_heads(3, s + h * RUN, rows, d, n, o + h * c_len, c_len);
        if (heads - h) weigh_heads((int)(heads - h), s + h * RUN, rows, d, n, o + h * c_len, c_len);
        r += n;
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
        PyErr_SetString(PyExc_RuntimeError, "avx2_kernels: this CPU has no AVX2 + FMA");
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
    PyErr_SetString(PyExc_RuntimeError, "avx2_kernels: built without the x86 AVX2 kernels");
    return NULL;
#endif
}

/* linear_batched(x, sx, ldx, w, sw, ldw, y, sy, ldy, batches, m, n, k, threads): `linear` for each
 * of `batches` (x, w, y) triples `sx` / `sw` / `sy` elements apart (the absorbed MLA weights, one
 * per head), in one parallel region over every batch's weight rows. No bias. */
static PyObject *widen_linear_batched(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pw, py;
    long long sx, ldx, sw, ldw, sy, ldy, batches, m, n, k;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLKLLKLLLLLLi", &px, &sx, &ldx, &pw, &sw, &ldw, &py, &sy, &ldy, &batches, &m,
                          &n, &k, &threads))
        return NULL;
#ifdef WIDEN_X86
    if (!cpu_has_avx2_fma()) {
        PyErr_SetString(PyExc_RuntimeError, "avx2_kernels: this CPU has no AVX2 + FMA");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)px;
    const uint16_t *w = (const uint16_t *)(uintptr_t)pw;
    float *y = (float *)(uintptr_t)py;
    int64_t tiles = (n + ROWS - 1) / ROWS, total = batches * tiles;
    if (threads < 1) threads = 1;
    if (threads > (total + 3) / 4) threads = (int)((total + 3) / 4 > 0 ? (total + 3) / 4 : 1);
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
        int64_t first = total * t / nt, last = total * (t + 1) / nt; /* flattened (batch, tile) */
        for (int64_t b = first / tiles; b * tiles < last; b++) {
            int64_t t0 = first > b * tiles ? first - b * tiles : 0;
            int64_t t1 = last < (b + 1) * tiles ? last - b * tiles : tiles;
            int64_t n0 = t0 * ROWS, n1 = t1 * ROWS < n ? t1 * ROWS : n;
            if (n0 < n1) rows_avx2(x + b * sx, ldx, w + b * sw, ldw, NULL, y + b * sy, ldy, m, n0, n1, k);
        }
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
#else
    (void)px; (void)pw; (void)py; (void)sx; (void)ldx; (void)sw; (void)ldw; (void)sy; (void)ldy;
    (void)batches; (void)m; (void)n; (void)k; (void)threads;
    PyErr_SetString(PyExc_RuntimeError, "avx2_kernels: built without the x86 AVX2 kernels");
    return NULL;
#endif
}

/* mla_decode(q, b, h, d, c, scale, cache, block_size, tables, table_width, lens, out, threads):
 * q [B][H][D] fp32 (absorbed queries), cache [blocks][block_size][D] fp32 (one layer), tables
 * [B][table_width] int64, lens [B] int64 (context rows, the new one included), out [B][H][C] fp32,
 * the softmax-weighted sum of each context's rows' first C columns. Addresses as integers,
 * validated by the Python wrapper; releases the GIL while it computes. */
static PyObject *mla_decode(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long pq, pc, pt, pl, po;
    long long b_len, heads, d, c_len, block_size, width;
    double scale_d;
    int threads;
    if (!PyArg_ParseTuple(args, "KLLLLdKLKLKKi", &pq, &b_len, &heads, &d, &c_len, &scale_d, &pc, &block_size,
                          &pt, &width, &pl, &po, &threads))
        return NULL;
#ifdef WIDEN_X86
    if (!cpu_has_avx2_fma()) {
        PyErr_SetString(PyExc_RuntimeError, "avx2_kernels: this CPU has no AVX2 + FMA");
        return NULL;
    }
    if (heads > MAX_HEADS || c_len % 8 || c_len > d) {
        PyErr_SetString(PyExc_ValueError, "mla_decode: needs heads <= 256 and C a multiple of 8, <= D");
        return NULL;
    }
    const float *q = (const float *)(uintptr_t)pq, *cache = (const float *)(uintptr_t)pc;
    const int64_t *tables = (const int64_t *)(uintptr_t)pt, *lens = (const int64_t *)(uintptr_t)pl;
    float *out = (float *)(uintptr_t)po, scale = (float)scale_d;
    if (threads < 1) threads = 1;
    /* a sequence's context in `splits` ranges of at least 256 rows, so that B * splits fills the
     * threads; each range keeps its own (m, l, o), merged by log-sum-exp below */
    int64_t longest = 0;
    for (int64_t b = 0; b < b_len; b++) longest = lens[b] > longest ? lens[b] : longest;
    int64_t splits = (threads + b_len - 1) / b_len, most = (longest + 255) / 256;
    if (splits > most) splits = most;
    if (splits < 1) splits = 1;
    int64_t items = b_len * splits, per = heads * (2 + c_len);
    float *part = (float *)malloc((size_t)(items * per) * sizeof(float));
    if (!part) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
#endif
    for (int64_t it = 0; it < items; it++) {
        int64_t b = it / splits, sp = it % splits, len = lens[b];
        float *m = part + it * per, *l = m + heads, *o = l + heads;
        for (int64_t h = 0; h < heads; h++) m[h] = -INFINITY, l[h] = 0.0f;
        memset(o, 0, (size_t)(heads * c_len) * sizeof(float));
        int64_t r0 = len * sp / splits, r1 = len * (sp + 1) / splits;
        if (r0 < r1)
            attend_rows(q + b * heads * d, heads, d, c_len, scale, cache, block_size, tables + b * width, r0,
                        r1, m, l, o);
    }
    for (int64_t b = 0; b < b_len; b++)
        for (int64_t h = 0; h < heads; h++) {
            float top = -INFINITY, total = 0.0f, *dst = out + (b * heads + h) * c_len;
            for (int64_t sp = 0; sp < splits; sp++) {
                float mh = part[(b * splits + sp) * per + h];
                top = mh > top ? mh : top;
            }
            memset(dst, 0, (size_t)c_len * sizeof(float));
            for (int64_t sp = 0; sp < splits; sp++) {
                const float *m = part + (b * splits + sp) * per, *l = m + heads, *o = l + heads + h * c_len;
                if (l[h] == 0.0f) continue; /* an empty range */
                float w = expf(m[h] - top);
                total += w * l[h];
                for (int64_t c = 0; c < c_len; c++) dst[c] += w * o[c];
            }
            float inv = total > 0.0f ? 1.0f / total : 0.0f;
            for (int64_t c = 0; c < c_len; c++) dst[c] *= inv;
        }
    Py_END_ALLOW_THREADS;
    free(part);
    Py_RETURN_NONE;
#else
    (void)pq; (void)pc; (void)pt; (void)pl; (void)po; (void)b_len; (void)heads; (void)d; (void)c_len;
    (void)block_size; (void)width; (void)scale_d; (void)threads;
    PyErr_SetString(PyExc_RuntimeError, "avx2_kernels: built without the x86 AVX2 kernels");
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
    {"linear_batched", widen_linear_batched, METH_VARARGS, "linear over a batch of (x, w, y) (addresses)."},
    {"mla_decode", mla_decode, METH_VARARGS, "Absorbed MLA decode over the paged fp32 cache (addresses)."},
    {"supported", widen_supported, METH_NOARGS, "Whether this CPU runs the kernel (AVX2 + FMA)."},
    {"openmp", widen_openmp, METH_NOARGS, "Whether the kernel was built with OpenMP threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_avx2_kernels", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__avx2_kernels(void) { return PyModule_Create(&module); }
