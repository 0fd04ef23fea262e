/* Sparse weight x dense input products for lightning_selfish.inference (CPU, float32).
 *
 * Two weight layouts, both row-major over the weight's rows (out_features):
 *   bitmask: bits[r * words + w] (uint64) holds columns 64w .. 64w+63 of row r, column c at bit c % 64 (LSB first,
 *            as lightning_selfish.analysis.pack_mask); values are the non-zero weights in row-major order, row r's
 *            starting at row_start[r]. It is the compressed export's layout with each row padded to 64 bits.
 *   csr16:   cols (uint16) and values of the non-zeros in row-major order, row r's from row_start[r] to
 *            row_start[r + 1]; for the matrix product also panel_start[r * (panels + 1) + p], the first of row r's
 *            non-zeros at a column >= p * panel_width (panel_start[r * (panels + 1) + panels] = row_start[r + 1]).
 *
 * Two products each:
 *   *_mv: y[r] = sum_c W[r, c] x[c]                (one input row: generation at batch 1)
 *   *_mm: yt[r, i] = sum_c W[r, c] xt[c, i], i < n (n input rows, given transposed: xt is (in_features, n));
 *         csr16_mm takes the rows as they are and gives the product as torch wants it, row-major:
 *         y[i, r] = bias[r] + sum_c x[i, c] W[r, c] (x is (n, in_features), y is (n, rows), bias NULL for none);
 *         it is register-blocked (SPMM).
 *
 * Every function exists once per instruction set (generic C, AVX2+FMA, AVX-512F); selfish_best_isa() says which
 * ones this CPU runs, and the caller picks (so a test can force any path the CPU supports). Rows are split over
 * `threads` OpenMP threads when the library was built with OpenMP (else the pragmas are ignored). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define SELFISH_X86 1
#include <immintrin.h>
#else
#define SELFISH_X86 0
#endif

#define ROW_BLOCK 64

int selfish_abi_version(void) { return 3; }

/* 0: generic C, 1: AVX2+FMA, 2: AVX-512F. */
int selfish_best_isa(void) {
#if SELFISH_X86 && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

static inline int popcount64(uint64_t m) { return __builtin_popcountll(m); }

/* ------------------------------------------------------------------------------------------------ generic C */

void bitmask_mv_generic(int64_t rows, int64_t words, const uint64_t *bits, const float *values,
                        const int64_t *row_start, const float *x, float *y, int threads, int all_finite) {
    (void)all_finite; /* reads only the row's values */
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t *b = bits + r * words;
        const float *v = values + row_start[r];
        float acc = 0.0f;
        for (int64_t w = 0; w < words; ++w) {
            uint64_t m = b[w];
            const float *xw = x + w * 64;
            while (m) {
                acc += *v++ * xw[__builtin_ctzll(m)];
                m &= m - 1;
            }
        }
        y[r] = acc;
    }
}

void csr16_mv_generic(int64_t rows, const uint16_t *cols, const float *values, const int64_t *row_start,
                      const float *x, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        float acc = 0.0f;
        for (int64_t k = row_start[r]; k < row_start[r + 1]; ++k) acc += values[k] * x[cols[k]];
        y[r] = acc;
    }
}

#define GENERIC_TILE 16

static inline void generic_axpy_tile(float *acc, float v, const float *p, int64_t width) {
    for (int64_t i = 0; i < width; ++i) acc[i] += v * p[i];
}

void bitmask_mm_generic(int64_t rows, int64_t words, const uint64_t *bits, const float *values,
                        const int64_t *row_start, const float *xt, int64_t n, float *yt, int threads) {
    int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t r_end = (blk + 1) * ROW_BLOCK < rows ? (blk + 1) * ROW_BLOCK : rows;
        for (int64_t i0 = 0; i0 < n; i0 += GENERIC_TILE) {
            int64_t width = n - i0 < GENERIC_TILE ? n - i0 : GENERIC_TILE;
            for (int64_t r = blk * ROW_BLOCK; r < r_end; ++r) {
                float acc[GENERIC_TILE] = {0};
                const uint64_t *b = bits + r * words;
                const float *v = values + row_start[r];
                for (int64_t w = 0; w < words; ++w) {
                    uint64_t m = b[w];
                    while (m) {
                        int64_t c = w * 64 + __builtin_ctzll(m);
                        m &= m - 1;
                        generic_axpy_tile(acc, *v++, xt + c * n + i0, width);
                    }
                }
                memcpy(yt + r * n + i0, acc, (size_t)width * sizeof(float));
            }
        }
    }
}


/* ------------------------------------------------------------------------------------------------ SPMM
 *
 * csr16_mm: the weight (CSR16) times many input rows, register-blocked. Per tile of up to TILE input rows, the
 * tile is packed transposed (xp[c * R + j] = x[i0 + j, c], R = the tile's width rounded up to whole vectors, zero
 * padded), so that one non-zero W[r, c] is one broadcast of its value and R / LANES vector FMAs with the R
 * contiguous floats of column c, into accumulators that stay in registers across the row's non-zeros. The columns
 * are taken in panels of panel_width (a panel of xp, panel_width x R floats, 32 KB at 128 x 64, stays in L1 while
 * BLOCK weight rows go through it; their partial sums wait in `acc` between panels), so each non-zero reads xp from
 * L1, not L2. The weight is streamed once per tile; the rows of the weight are split over the threads, each with
 * its own packed tile and partial sums (one allocation, made before any work: -1 if it fails). */

#define SPMM_BLOCK 128

static inline void spmm_pack(const float *x, int64_t in, int64_t i0, int64_t width, int64_t R, float *xp) {
    for (int64_t c0 = 0; c0 < in; c0 += 16) {
        int64_t c1 = c0 + 16 < in ? c0 + 16 : in;
        for (int64_t j = 0; j < width; ++j) {
            const float *src = x + (i0 + j) * in;
            for (int64_t c = c0; c < c1; ++c) xp[c * R + j] = src[c];
        }
        for (int64_t j = width; j < R; ++j)
            for (int64_t c = c0; c < c1; ++c) xp[c * R + j] = 0.0f;
    }
}

/* The rows of a block are read one panel's segment at a time, ~100 bytes in each of 128 places: more streams than
 * the hardware prefetchers follow, so the segment SPMM_AHEAD rows ahead is fetched by hand. */
#define SPMM_AHEAD 4

static inline void spmm_prefetch(const uint16_t *cols, const float *values, const int64_t *split, int64_t span) {
    for (const char *a = (const char *)(values + split[0]); a < (const char *)(values + split[span]); a += 64)
        __builtin_prefetch(a);
    for (const char *a = (const char *)(cols + split[0]); a < (const char *)(cols + split[span]); a += 64)
        __builtin_prefetch(a);
}

static inline size_t spmm_round64(size_t bytes) { return (bytes + 63) / 64 * 64; }

/* The block's sums (acc, one R-float row per weight row), plus the bias, into y's rows i0 .. i0 + width, columns
 * r0 .. r1. */
static inline void spmm_store(const float *acc, int64_t R, int64_t r0, int64_t r1, int64_t i0, int64_t width,
                              int64_t rows, const float *bias, float *y) {
    for (int64_t j = 0; j < width; ++j) {
        float *out = y + (i0 + j) * rows;
        if (bias)
            for (int64_t r = r0; r < r1; ++r) out[r] = acc[(r - r0) * R + j] + bias[r];
        else
            for (int64_t r = r0; r < r1; ++r) out[r] = acc[(r - r0) * R + j];
    }
}

/* SPMM_DRIVER(ATTR, NAME, LANES, TILE, SEGMENT): the product for one instruction set. SEGMENT(nv) accumulates the
 * non-zeros k .. e - 1 of row r (starting from zero when p == 0, else from o[0 .. nv * LANES)), xp's rows being
 * nv * LANES floats apart, and stores the sums to o. */
#define SPMM_DRIVER(ATTR, NAME, LANES, TILE, SEGMENT)                                                          \
    ATTR int NAME(int64_t rows, int64_t in, const uint16_t *cols, const float *values,                       \
                  const int64_t *panel_start, int64_t panels, const float *x, int64_t n, const float *bias,    \
                  float *y,                                                                                    \
                  int threads) {                                                                               \
        if (threads < 1) threads = 1;                                                                          \
        size_t xp_bytes = spmm_round64((size_t)(in > 0 ? in : 1) * TILE * sizeof(float));                      \
        size_t per_thread = xp_bytes + (size_t)SPMM_BLOCK * TILE * sizeof(float);                              \
        char *work = aligned_alloc(64, per_thread * (size_t)threads);                                          \
        if (work == NULL) return -1;                                                                           \
        int64_t blocks = (rows + SPMM_BLOCK - 1) / SPMM_BLOCK;                                                 \
        _Pragma("omp parallel num_threads(threads) if (threads > 1)")                                          \
        {                                                                                                      \
            int me = 0;                                                                                        \
            SPMM_THREAD_NUM(me);                                                                               \
            float *xp = (float *)(work + per_thread * (size_t)me);                                             \
            float *acc = (float *)(work + per_thread * (size_t)me + xp_bytes);                                 \
            for (int64_t i0 = 0; i0 < n; i0 += TILE) {                                                         \
                int64_t width = n - i0 < TILE ? n - i0 : TILE;                                                 \
                int nv = (int)((width + LANES - 1) / LANES);                                                   \
                int64_t R = (int64_t)nv * LANES;                                                               \
                int64_t group = TILE / R;  /* panels taken at once: a narrower tile takes wider ones */         \
                spmm_pack(x, in, i0, width, R, xp);                                                            \
                _Pragma("omp for schedule(static) nowait")                                                     \
                for (int64_t blk = 0; blk < blocks; ++blk) {                                                   \
                    int64_t r0 = blk * SPMM_BLOCK, r1 = r0 + SPMM_BLOCK < rows ? r0 + SPMM_BLOCK : rows;       \
                    for (int64_t p = 0; p < panels; p += group) {                                              \
                        int64_t span = p + group < panels ? group : panels - p;                                \
                        for (int64_t r = r0; r < r1; ++r) {                                                    \
                            const int64_t *split = panel_start + r * (panels + 1) + p;                         \
                            int64_t k = split[0], e = split[span];                                             \
                            if (r + SPMM_AHEAD < r1)                                                           \
                                spmm_prefetch(cols, values, split + SPMM_AHEAD * (panels + 1), span);          \
                            float *o = acc + (r - r0) * R;                                                     \
                            SEGMENT(nv);                                                                       \
                        }                                                                                      \
                    }                                                                                          \
                    spmm_store(acc, R, r0, r1, i0, width, rows, bias, y);                                       \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        free(work);                                                                                            \
        return 0;                                                                                              \
    }

#ifdef _OPENMP
#define SPMM_THREAD_NUM(me) (me) = omp_get_thread_num()
#else
#define SPMM_THREAD_NUM(me) (void)(me)
#endif

/* generic C: tiles of 16 rows, plain loops (the compiler may vectorize them) */
#define GENERIC_SEGMENT(nv)                                                                                    \
    do {                                                                                                       \
        float a[16] = {0};                                                                                     \
        if (p) memcpy(a, o, sizeof(a));                                                                        \
        for (; k < e; ++k) generic_axpy_tile(a, values[k], xp + (int64_t)cols[k] * 16, 16);                    \
        memcpy(o, a, sizeof(a));                                                                               \
    } while (0)

SPMM_DRIVER(, csr16_mm_generic, 16, 16, GENERIC_SEGMENT)

#if SELFISH_X86 && defined(__GNUC__)

/* ------------------------------------------------------------------------------------------------ AVX2 + FMA */

#define AVX2 __attribute__((target("avx2,fma,popcnt")))

/* For an 8-bit mask m: EXPAND[m][i] = the rank of lane i among the set lanes (where to read its packed value),
 * LANES[m][i] = -1 where bit i is set, 0 elsewhere; FIRST[k] = -1 in the first k lanes. Filled once. */
static int32_t EXPAND[256][8] __attribute__((aligned(32)));
static int32_t LANES[256][8] __attribute__((aligned(32)));
static int32_t FIRST[9][8] __attribute__((aligned(32)));

__attribute__((constructor)) static void fill_tables(void) {
    for (int m = 0; m < 256; ++m) {
        int rank = 0;
        for (int i = 0; i < 8; ++i) {
            int set = (m >> i) & 1;
            EXPAND[m][i] = set ? rank : 0;
            LANES[m][i] = set ? -1 : 0;
            rank += set;
        }
    }
    for (int k = 0; k <= 8; ++k)
        for (int i = 0; i < 8; ++i) FIRST[k][i] = i < k ? -1 : 0;
}

AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* values must be readable 8 floats past the last non-zero (the caller pads them). */
AVX2 void bitmask_mv_avx2(int64_t rows, int64_t words, const uint64_t *bits, const float *values,
                          const int64_t *row_start, const float *x, float *y, int threads, int all_finite) {
    (void)all_finite; /* the expanded values are masked to the set lanes */
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t *b = bits + r * words;
        const float *v = values + row_start[r];
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t w = 0; w < words; ++w) {
            uint64_t m = b[w];
            if (!m) continue;
            const float *xw = x + w * 64;
            for (int q = 0; q < 8; ++q) {
                unsigned m8 = (unsigned)(m >> (8 * q)) & 0xffu;
                if (!m8) continue;
                int offset = q ? popcount64(m & ((1ull << (8 * q)) - 1)) : 0;
                __m256i lanes = _mm256_load_si256((const __m256i *)LANES[m8]);
                __m256 packed = _mm256_loadu_ps(v + offset);
                __m256 expanded = _mm256_permutevar8x32_ps(packed, _mm256_load_si256((const __m256i *)EXPAND[m8]));
                expanded = _mm256_and_ps(expanded, _mm256_castsi256_ps(lanes));
                __m256 xs = _mm256_maskload_ps(xw + 8 * q, lanes);
                acc[q & 3] = _mm256_fmadd_ps(expanded, xs, acc[q & 3]);
            }
            v += popcount64(m);
        }
        y[r] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
}

AVX2 void csr16_mv_avx2(int64_t rows, const uint16_t *cols, const float *values, const int64_t *row_start,
                        const float *x, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int64_t k = row_start[r], end = row_start[r + 1];
        for (; k + 16 <= end; k += 16) {
            __m256i i0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(cols + k)));
            __m256i i1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(cols + k + 8)));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k), _mm256_i32gather_ps(x, i0, 4), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k + 8), _mm256_i32gather_ps(x, i1, 4), acc1);
        }
        float tail = 0.0f;
        for (; k < end; ++k) tail += values[k] * x[cols[k]];
        y[r] = hsum256(_mm256_add_ps(acc0, acc1)) + tail;
    }
}

#define AVX2_TILE 32

/* As AVX512_MM_ROW, with two accumulator sets (16 ymm registers). */
#define AVX2_STEP(S, NV)                                                                                         \
    do {                                                                                                      \
        const float *p = xt + col * n + i0;                                                                   \
        __m256 vb = _mm256_set1_ps(val);                                                                      \
        S##0 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(p, mk0), S##0);                                         \
        if (NV > 1) S##1 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(p + 8, mk1), S##1);                         \
        if (NV > 2) S##2 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(p + 16, mk2), S##2);                        \
        if (NV > 3) S##3 = _mm256_fmadd_ps(vb, _mm256_maskload_ps(p + 24, mk3), S##3);                        \
    } while (0)

#define AVX2_MM_ROW(NV, NEXT_NONZERO)                                                                         \
    do {                                                                                                      \
        __m256 A0 = _mm256_setzero_ps(), A1 = A0, A2 = A0, A3 = A0, B0 = A0, B1 = A0, B2 = A0, B3 = A0;       \
        int64_t col;                                                                                          \
        float val;                                                                                            \
        for (;;) {                                                                                            \
            if (!(NEXT_NONZERO)) break;                                                                       \
            AVX2_STEP(A, NV);                                                                                     \
            if (!(NEXT_NONZERO)) break;                                                                       \
            AVX2_STEP(B, NV);                                                                                     \
        }                                                                                                     \
        float *out = yt + r * n + i0;                                                                         \
        _mm256_maskstore_ps(out, mk0, _mm256_add_ps(A0, B0));                                                 \
        if (NV > 1) _mm256_maskstore_ps(out + 8, mk1, _mm256_add_ps(A1, B1));                                 \
        if (NV > 2) _mm256_maskstore_ps(out + 16, mk2, _mm256_add_ps(A2, B2));                                \
        if (NV > 3) _mm256_maskstore_ps(out + 24, mk3, _mm256_add_ps(A3, B3));                                \
    } while (0)

#define AVX2_TILE_MASKS                                                                                       \
    int64_t width = n - i0 < AVX2_TILE ? n - i0 : AVX2_TILE;                                                  \
    int nv = (int)((width + 7) / 8);                                                                          \
    __m256i mk0 = _mm256_load_si256((const __m256i *)FIRST[width > 8 ? 8 : width]);                         \
    __m256i mk1 = _mm256_load_si256((const __m256i *)FIRST[width > 16 ? 8 : (width > 8 ? width - 8 : 0)]);   \
    __m256i mk2 = _mm256_load_si256((const __m256i *)FIRST[width > 24 ? 8 : (width > 16 ? width - 16 : 0)]); \
    __m256i mk3 = _mm256_load_si256((const __m256i *)FIRST[width > 24 ? width - 24 : 0]);

/* the bit-mask row's next non-zero: column c, value val */
#define BITMASK_NEXT (next_bit(b, words, &w, &m, &col) ? (val = *v++, 1) : 0)

static inline int next_bit(const uint64_t *b, int64_t words, int64_t *w, uint64_t *m, int64_t *c) {
    while (!*m) {
        if (++*w >= words) return 0;
        *m = b[*w];
    }
    *c = *w * 64 + __builtin_ctzll(*m);
    *m &= *m - 1;
    return 1;
}

#define BITMASK_ROW_SETUP                                                                                     \
    const uint64_t *b = bits + r * words;                                                                     \
    const float *v = values + row_start[r];                                                                   \
    int64_t w = 0;                                                                                            \
    uint64_t m = b[0];


AVX2 void bitmask_mm_avx2(int64_t rows, int64_t words, const uint64_t *bits, const float *values,
                          const int64_t *row_start, const float *xt, int64_t n, float *yt, int threads) {
    int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t r_end = (blk + 1) * ROW_BLOCK < rows ? (blk + 1) * ROW_BLOCK : rows;
        for (int64_t i0 = 0; i0 < n; i0 += AVX2_TILE) {
            AVX2_TILE_MASKS
            for (int64_t r = blk * ROW_BLOCK; r < r_end; ++r) {
                BITMASK_ROW_SETUP
                switch (nv) {
                    case 1: AVX2_MM_ROW(1, BITMASK_NEXT); break;
                    case 2: AVX2_MM_ROW(2, BITMASK_NEXT); break;
                    case 3: AVX2_MM_ROW(3, BITMASK_NEXT); break;
                    default: AVX2_MM_ROW(4, BITMASK_NEXT); break;
                }
            }
        }
    }
}


/* AVX2: tiles of up to 32 rows (four ymm per non-zero), two sets of accumulators (the FMA latency) */
#define AVX2_SPMM_STEP(S, NV, K)                                                                               \
    do {                                                                                                       \
        const float *q = xp + (int64_t)cols[K] * (NV * 8);                                                     \
        __m256 vb = _mm256_broadcast_ss(values + (K));                                                         \
        S##0 = _mm256_fmadd_ps(vb, _mm256_load_ps(q), S##0);                                                   \
        if (NV > 1) S##1 = _mm256_fmadd_ps(vb, _mm256_load_ps(q + 8), S##1);                                   \
        if (NV > 2) S##2 = _mm256_fmadd_ps(vb, _mm256_load_ps(q + 16), S##2);                                  \
        if (NV > 3) S##3 = _mm256_fmadd_ps(vb, _mm256_load_ps(q + 24), S##3);                                  \
    } while (0)

#define AVX2_SPMM_ROW(NV)                                                                                      \
    do {                                                                                                       \
        __m256 A0 = _mm256_setzero_ps(), A1 = A0, A2 = A0, A3 = A0, B0 = A0, B1 = A0, B2 = A0, B3 = A0;        \
        if (p) {                                                                                               \
            A0 = _mm256_load_ps(o);                                                                            \
            if (NV > 1) A1 = _mm256_load_ps(o + 8);                                                            \
            if (NV > 2) A2 = _mm256_load_ps(o + 16);                                                           \
            if (NV > 3) A3 = _mm256_load_ps(o + 24);                                                           \
        }                                                                                                      \
        for (; k + 2 <= e; k += 2) {                                                                           \
            AVX2_SPMM_STEP(A, NV, k);                                                                          \
            AVX2_SPMM_STEP(B, NV, k + 1);                                                                      \
        }                                                                                                      \
        if (k < e) AVX2_SPMM_STEP(A, NV, k);                                                                   \
        _mm256_store_ps(o, _mm256_add_ps(A0, B0));                                                             \
        if (NV > 1) _mm256_store_ps(o + 8, _mm256_add_ps(A1, B1));                                             \
        if (NV > 2) _mm256_store_ps(o + 16, _mm256_add_ps(A2, B2));                                            \
        if (NV > 3) _mm256_store_ps(o + 24, _mm256_add_ps(A3, B3));                                            \
    } while (0)

#define AVX2_SPMM_SEGMENT(nv)                                                                                  \
    switch (nv) {                                                                                              \
        case 1: AVX2_SPMM_ROW(1); break;                                                                       \
        case 2: AVX2_SPMM_ROW(2); break;                                                                       \
        case 3: AVX2_SPMM_ROW(3); break;                                                                       \
        default: AVX2_SPMM_ROW(4); break;                                                                      \
    }

SPMM_DRIVER(AVX2, csr16_mm_avx2, 8, 32, AVX2_SPMM_SEGMENT)

/* ------------------------------------------------------------------------------------------------ AVX-512F */

#define AVX512 __attribute__((target("avx512f,popcnt")))

AVX512 static inline __mmask16 first_lanes(int64_t k) {
    return (__mmask16)(k >= 16 ? 0xffff : (k <= 0 ? 0 : (1u << k) - 1));
}

/* Per 16 columns (one 16-bit slice of the row's mask): x's entries at the set bits compressed into the low lanes in
 * registers (vcompressps reg-reg, zeroing the rest) and multiplied by the row's next packed values, loaded
 * contiguously: no expand-load from memory (microcoded and slow on Intel and AMD). The last word reads x with its
 * mask (nothing read past x's end). The four slices of a 64-bit word take their value offsets from popcounts of that one
 * word, so the only chain from slice to slice is the row's value pointer, advanced once per word; two words per
 * step into eight accumulators.
 *
 * all_finite: the values load 16 floats whatever the slice's count (the caller pads 16 past the end); lanes past
 * the count meet compressed zeros, which is exact only for finite neighbours (0 * inf is nan), so with a non-finite
 * weight each load is masked to the slice's count instead. */
#define AVX512_LOAD_VALUES(p, count) \
    (all_finite ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first_lanes(count), (p)))

/* LOAD_X(mask, p): x's 16 floats at p; the last word masks them (x ends at in_features, maybe inside the word) */
#define AVX512_X_WHOLE(k, p) _mm512_loadu_ps(p)
#define AVX512_X_MASKED(k, p) _mm512_maskz_loadu_ps((k), (p))
#define AVX512_BITMASK_WORD(W, A0, A1, A2, A3, LOAD_X)                                                         \
    do {                                                                                                      \
        uint64_t m = b[W];                                                                                    \
        const float *xw = x + 64 * (W);                                                                       \
        __mmask16 k0 = (__mmask16)m, k1 = (__mmask16)(m >> 16), k2 = (__mmask16)(m >> 32),                    \
                  k3 = (__mmask16)(m >> 48);                                                                  \
        int o1 = popcount64(m & 0xffffull), o2 = popcount64(m & 0xffffffffull),                               \
            o3 = popcount64(m & 0xffffffffffffull), o4 = popcount64(m);                                       \
        A0 = _mm512_fmadd_ps(AVX512_LOAD_VALUES(v, o1), _mm512_maskz_compress_ps(k0, LOAD_X(k0, xw)), A0);   \
        A1 = _mm512_fmadd_ps(AVX512_LOAD_VALUES(v + o1, o2 - o1),                                             \
                             _mm512_maskz_compress_ps(k1, LOAD_X(k1, xw + 16)), A1);                          \
        A2 = _mm512_fmadd_ps(AVX512_LOAD_VALUES(v + o2, o3 - o2),                                             \
                             _mm512_maskz_compress_ps(k2, LOAD_X(k2, xw + 32)), A2);                          \
        A3 = _mm512_fmadd_ps(AVX512_LOAD_VALUES(v + o3, o4 - o3),                                             \
                             _mm512_maskz_compress_ps(k3, LOAD_X(k3, xw + 48)), A3);                          \
        v += o4;                                                                                              \
    } while (0)

AVX512 static inline void bitmask_mv_avx512_rows(int64_t r0, int64_t r1, int64_t words, const uint64_t *bits,
                                                 const float *values, const int64_t *row_start, const float *x,
                                                 float *y, const int all_finite) {
    for (int64_t r = r0; r < r1; ++r) {
        const uint64_t *b = bits + r * words;
        const float *v = values + row_start[r];
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        int64_t w = 0, whole = words - 1;
        for (; w + 2 <= whole; w += 2) {
            AVX512_BITMASK_WORD(w, a0, a1, a2, a3, AVX512_X_WHOLE);
            AVX512_BITMASK_WORD(w + 1, c0, c1, c2, c3, AVX512_X_WHOLE);
        }
        if (w < whole) {
            AVX512_BITMASK_WORD(w, a0, a1, a2, a3, AVX512_X_WHOLE);
            ++w;
        }
        AVX512_BITMASK_WORD(w, c0, c1, c2, c3, AVX512_X_MASKED);
        __m512 s = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3))));
    }
}

AVX512 void bitmask_mv_avx512(int64_t rows, int64_t words, const uint64_t *bits, const float *values,
                              const int64_t *row_start, const float *x, float *y, int threads, int all_finite) {
    int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t r0 = blk * ROW_BLOCK, r1 = r0 + ROW_BLOCK < rows ? r0 + ROW_BLOCK : rows;
        if (all_finite)  /* (two instances: the load's form is fixed inside the loops) */
            bitmask_mv_avx512_rows(r0, r1, words, bits, values, row_start, x, y, 1);
        else
            bitmask_mv_avx512_rows(r0, r1, words, bits, values, row_start, x, y, 0);
    }
}

AVX512 void csr16_mv_avx512(int64_t rows, const uint16_t *cols, const float *values, const int64_t *row_start,
                            const float *x, float *y, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        int64_t k = row_start[r], end = row_start[r + 1];
        for (; k + 32 <= end; k += 32) {
            __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(cols + k)));
            __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(cols + k + 16)));
            acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k), _mm512_i32gather_ps(i0, x, 4), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k + 16), _mm512_i32gather_ps(i1, x, 4), acc1);
        }
        for (; k < end; k += 16) {
            int left = (int)(end - k);
            __mmask16 mk = (__mmask16)(left >= 16 ? 0xffff : (1u << left) - 1);
            uint16_t tail[16] = {0};
            memcpy(tail, cols + k, (size_t)(left >= 16 ? 16 : left) * sizeof(uint16_t));
            __m512i idx = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)tail));
            acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, values + k),
                                   _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mk, idx, x, 4), acc0);
        }
        y[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
}

#define AVX512_TILE 64

/* One output row's tile: acc += val * xt[col, i0 .. i0 + width) over the row's non-zeros, four non-zeros at a time
 * into four sets of accumulators (one set would wait out the FMA latency at every non-zero). */
#define AVX512_STEP(S, NV)                                                                                       \
    do {                                                                                                      \
        const float *p = xt + col * n + i0;                                                                   \
        __m512 vb = _mm512_set1_ps(val);                                                                      \
        S##0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk0, p), S##0);                                      \
        if (NV > 1) S##1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk1, p + 16), S##1);                     \
        if (NV > 2) S##2 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk2, p + 32), S##2);                     \
        if (NV > 3) S##3 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(mk3, p + 48), S##3);                     \
    } while (0)

#define AVX512_MM_ROW(NV, NEXT_NONZERO)                                                                       \
    do {                                                                                                      \
        __m512 A0 = _mm512_setzero_ps(), A1 = A0, A2 = A0, A3 = A0, B0 = A0, B1 = A0, B2 = A0, B3 = A0;       \
        __m512 C0 = A0, C1 = A0, C2 = A0, C3 = A0, D0 = A0, D1 = A0, D2 = A0, D3 = A0;                        \
        int64_t col;                                                                                          \
        float val;                                                                                            \
        for (;;) {                                                                                            \
            if (!(NEXT_NONZERO)) break;                                                                       \
            AVX512_STEP(A, NV);                                                                                   \
            if (!(NEXT_NONZERO)) break;                                                                       \
            AVX512_STEP(B, NV);                                                                                   \
            if (!(NEXT_NONZERO)) break;                                                                       \
            AVX512_STEP(C, NV);                                                                                   \
            if (!(NEXT_NONZERO)) break;                                                                       \
            AVX512_STEP(D, NV);                                                                                   \
        }                                                                                                     \
        float *out = yt + r * n + i0;                                                                         \
        _mm512_mask_storeu_ps(out, mk0, _mm512_add_ps(_mm512_add_ps(A0, B0), _mm512_add_ps(C0, D0)));        \
        if (NV > 1) _mm512_mask_storeu_ps(out + 16, mk1, _mm512_add_ps(_mm512_add_ps(A1, B1), _mm512_add_ps(C1, D1))); \
        if (NV > 2) _mm512_mask_storeu_ps(out + 32, mk2, _mm512_add_ps(_mm512_add_ps(A2, B2), _mm512_add_ps(C2, D2))); \
        if (NV > 3) _mm512_mask_storeu_ps(out + 48, mk3, _mm512_add_ps(_mm512_add_ps(A3, B3), _mm512_add_ps(C3, D3))); \
    } while (0)

#define AVX512_TILE_MASKS                                                                                     \
    int64_t width = n - i0 < AVX512_TILE ? n - i0 : AVX512_TILE;                                              \
    int nv = (int)((width + 15) / 16);                                                                        \
    __mmask16 mk0 = first_lanes(width), mk1 = first_lanes(width - 16), mk2 = first_lanes(width - 32),         \
              mk3 = first_lanes(width - 48);

AVX512 void bitmask_mm_avx512(int64_t rows, int64_t words, const uint64_t *bits, const float *values,
                              const int64_t *row_start, const float *xt, int64_t n, float *yt, int threads) {
    int64_t blocks = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t blk = 0; blk < blocks; ++blk) {
        int64_t r_end = (blk + 1) * ROW_BLOCK < rows ? (blk + 1) * ROW_BLOCK : rows;
        for (int64_t i0 = 0; i0 < n; i0 += AVX512_TILE) {
            AVX512_TILE_MASKS
            for (int64_t r = blk * ROW_BLOCK; r < r_end; ++r) {
                BITMASK_ROW_SETUP
                switch (nv) {
                    case 1: AVX512_MM_ROW(1, BITMASK_NEXT); break;
                    case 2: AVX512_MM_ROW(2, BITMASK_NEXT); break;
                    case 3: AVX512_MM_ROW(3, BITMASK_NEXT); break;
                    default: AVX512_MM_ROW(4, BITMASK_NEXT); break;
                }
            }
        }
    }
}

/* AVX-512: tiles of up to 64 rows (four zmm per non-zero), two sets of accumulators */
#define AVX512_SPMM_STEP(S, NV, K)                                                                             \
    do {                                                                                                       \
        const float *q = xp + (int64_t)cols[K] * (NV * 16);                                                   \
        __m512 vb = _mm512_set1_ps(values[K]);                                                                 \
        S##0 = _mm512_fmadd_ps(vb, _mm512_load_ps(q), S##0);                                                   \
        if (NV > 1) S##1 = _mm512_fmadd_ps(vb, _mm512_load_ps(q + 16), S##1);                                  \
        if (NV > 2) S##2 = _mm512_fmadd_ps(vb, _mm512_load_ps(q + 32), S##2);                                  \
        if (NV > 3) S##3 = _mm512_fmadd_ps(vb, _mm512_load_ps(q + 48), S##3);                                  \
    } while (0)

#define AVX512_SPMM_ROW(NV)                                                                                    \
    do {                                                                                                       \
        __m512 A0 = _mm512_setzero_ps(), A1 = A0, A2 = A0, A3 = A0, B0 = A0, B1 = A0, B2 = A0, B3 = A0;        \
        if (p) {                                                                                               \
            A0 = _mm512_load_ps(o);                                                                            \
            if (NV > 1) A1 = _mm512_load_ps(o + 16);                                                           \
            if (NV > 2) A2 = _mm512_load_ps(o + 32);                                                           \
            if (NV > 3) A3 = _mm512_load_ps(o + 48);                                                           \
        }                                                                                                      \
        for (; k + 2 <= e; k += 2) {                                                                           \
            AVX512_SPMM_STEP(A, NV, k);                                                                        \
            AVX512_SPMM_STEP(B, NV, k + 1);                                                                    \
        }                                                                                                      \
        if (k < e) AVX512_SPMM_STEP(A, NV, k);                                                                 \
        _mm512_store_ps(o, _mm512_add_ps(A0, B0));                                                             \
        if (NV > 1) _mm512_store_ps(o + 16, _mm512_add_ps(A1, B1));                                            \
        if (NV > 2) _mm512_store_ps(o + 32, _mm512_add_ps(A2, B2));                                            \
        if (NV > 3) _mm512_store_ps(o + 48, _mm512_add_ps(A3, B3));                                            \
    } while (0)

#define AVX512_SPMM_SEGMENT(nv)                                                                                \
    switch (nv) {                                                                                              \
        case 1: AVX512_SPMM_ROW(1); break;                                                                     \
        case 2: AVX512_SPMM_ROW(2); break;                                                                     \
        case 3: AVX512_SPMM_ROW(3); break;                                                                     \
        default: AVX512_SPMM_ROW(4); break;                                                                    \
    }

SPMM_DRIVER(AVX512, csr16_mm_avx512, 16, 64, AVX512_SPMM_SEGMENT)

#endif
