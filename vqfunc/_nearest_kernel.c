/* Fused distance + argmin for exact nearest-code search on x86-64 CPUs with AVX2 and FMA.
 *
 * Scores are s(x, k) = h_k - x . c_k with h_k = ||c_k||^2 / 2: the same argmin as ||x - c_k||.
 * The codebook arrives packed in panels of 16 codes, transposed so that one dimension of 16
 * codes is two 8-float vectors: packed[p][j][0..15] = c[16 p + 0..15][j]. Padding codes carry
 * h = +inf so they are never chosen.
 *
 * The inner loop keeps no indices: a register tile of 6 rows x 16 codes accumulates scores with
 * FMAs, and each row only folds them into a running minimum vector (one vminps per 8 scores).
 * After every group of 64 codes each of the 8 lanes compares its group minimum with its best so
 * far and, on the rare improvement, remembers the group. At the end, the lanes holding the
 * row's minimum name one group and at most 8 candidate codes each; those are recomputed with
 * the very same FMA sequence (so the scores match bit for bit) and the first code reaching the
 * minimum is returned, as argmin would. Memory: about 16 KiB of stack per thread.
 *
 * Loops: row blocks of ROW_BLOCK rows (their per-lane minima on the stack), code blocks that
 * fit in L2, row tiles of TILE_ROWS rows whose vectors stay in L1.
 *
 * Built on first use by vqfunc/_cpu_kernel.py with the system C compiler; no torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16
#define GROUP_PANELS 4
#define GROUP (PANEL * GROUP_PANELS)
#define TILE_ROWS 6
#define ROW_BLOCK 240

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

int vq_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

#define TARGET __attribute__((target("avx2,fma")))

/* Score of code k for row x: the scalar twin of one lane of the tile loop (same order of
 * fused multiply-adds, so the same rounding). */
TARGET static float score_of(const float *x, int64_t d, const float *packed,
                             const float *half_norms, int64_t k) {
    const float *lane = packed + (k / PANEL) * d * PANEL + (k % PANEL);
    __m128 acc = _mm_set_ss(half_norms[k]);
    for (int64_t j = 0; j < d; ++j)
        acc = _mm_fnmadd_ss(_mm_set_ss(x[j]), _mm_set_ss(lane[j * PANEL]), acc);
    return _mm_cvtss_f32(acc);
}

/* Per-lane minima of the scores of the TILE_ROWS rows at xt (row stride d) against the codes of groups [g0, g1), folded
 * into best/best_group (rows past `rows` are ignored). `d` is a compile-time constant at the
 * specialised call sites, which lets the compiler unroll the dimension loop. */
TARGET static inline __attribute__((always_inline)) void tile(
    const float *xt, int rows, int64_t d, const float *packed, const float *half_norms,
    int64_t g0, int64_t g1, float (*best)[8], int32_t (*best_group)[8]) {
    for (int64_t g = g0; g < g1; ++g) {
        __m256 m[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; ++i) m[i] = _mm256_set1_ps(INFINITY);
        for (int64_t p = g * GROUP_PANELS; p < (g + 1) * GROUP_PANELS; ++p) {
            const float *pp = packed + p * d * PANEL;
            const __m256 h0 = _mm256_loadu_ps(half_norms + p * PANEL);
            const __m256 h1 = _mm256_loadu_ps(half_norms + p * PANEL + 8);
            /* An opaque copy of the row pointer: keeps the compiler from hoisting one address
             * per row and dimension out of this loop (and spilling them). */
            const float *xr = xt;
            __asm__("" : "+r"(xr));
            __m256 a[TILE_ROWS][2];
            const __m256 b00 = _mm256_loadu_ps(pp), b01 = _mm256_loadu_ps(pp + 8);
            for (int i = 0; i < TILE_ROWS; ++i) {
                const __m256 x0 = _mm256_broadcast_ss(xr + i * d);
                a[i][0] = _mm256_fnmadd_ps(x0, b00, h0);
                a[i][1] = _mm256_fnmadd_ps(x0, b01, h1);
            }
            for (int64_t j = 1; j < d; ++j) {
                const __m256 b0 = _mm256_loadu_ps(pp + j * PANEL);
                const __m256 b1 = _mm256_loadu_ps(pp + j * PANEL + 8);
                for (int i = 0; i < TILE_ROWS; ++i) {
                    const __m256 xj = _mm256_broadcast_ss(xr + i * d + j);
                    a[i][0] = _mm256_fnmadd_ps(xj, b0, a[i][0]);
                    a[i][1] = _mm256_fnmadd_ps(xj, b1, a[i][1]);
                }
            }
            /* min(score, m) keeps m when a score is NaN. */
            for (int i = 0; i < TILE_ROWS; ++i)
                m[i] = _mm256_min_ps(_mm256_min_ps(a[i][0], a[i][1]), m[i]);
        }
        for (int i = 0; i < rows; ++i) {
            const __m256 prev = _mm256_loadu_ps(best[i]);
            const int better = _mm256_movemask_ps(_mm256_cmp_ps(m[i], prev, _CMP_LT_OQ));
            if (better) {
                _mm256_storeu_ps(best[i], _mm256_min_ps(m[i], prev));
                for (int l = 0; l < 8; ++l)
                    if (better & (1 << l)) best_group[i][l] = (int32_t)g;
            }
        }
    }
}

#define TILE_CASE(D)                                                                      \
    case D:                                                                               \
        tile(xt, rows, D, packed, half_norms, g0, g1, best + (t - r0),                   \
             best_group + (t - r0));                                                      \
        break;

/* Rows [row_begin, row_end) of x [*, d] against the packed codebook of `groups` groups of
 * GROUP codes, the first `num_codes` of them real. Writes codes[row_begin:row_end]. */
TARGET int vq_nearest_f32(const float *x, int64_t row_begin, int64_t row_end, int64_t d,
                          const float *packed, const float *half_norms, int64_t groups,
                          int64_t num_codes, int64_t *codes) {
    if (!vq_supported() || d < 1) return -1;
    float *short_tile = malloc(sizeof(float) * TILE_ROWS * d);
    if (short_tile == NULL) return -2;
    /* A code block of about 192 KiB stays in L2 while a row block sweeps it. */
    int64_t block_groups = (192 * 1024) / (GROUP * d * (int64_t)sizeof(float));
    if (block_groups < 1) block_groups = 1;
    float best[ROW_BLOCK][8];
    int32_t best_group[ROW_BLOCK][8];
    for (int64_t r0 = row_begin; r0 < row_end; r0 += ROW_BLOCK) {
        const int64_t r1 = r0 + ROW_BLOCK < row_end ? r0 + ROW_BLOCK : row_end;
        for (int64_t i = 0; i < r1 - r0; ++i)
            for (int l = 0; l < 8; ++l) {
                best[i][l] = INFINITY;
                best_group[i][l] = 0;
            }
        for (int64_t g0 = 0; g0 < groups; g0 += block_groups) {
            const int64_t g1 = g0 + block_groups < groups ? g0 + block_groups : groups;
            for (int64_t t = r0; t < r1; t += TILE_ROWS) {
                const int rows = (int)(r1 - t < TILE_ROWS ? r1 - t : TILE_ROWS);
                const float *xt = x + t * d;
                if (rows < TILE_ROWS) {
                    /* A short last tile is copied and padded with its last row; only real
                     * rows are recorded. */
                    for (int i = 0; i < TILE_ROWS; ++i)
                        for (int64_t j = 0; j < d; ++j)
                            short_tile[i * d + j] = xt[(i < rows ? i : rows - 1) * d + j];
                    xt = short_tile;
                }
                switch (d) {
                    TILE_CASE(4)
                    TILE_CASE(8)
                    TILE_CASE(16)
                    TILE_CASE(32)
                    TILE_CASE(64)
                    default:
                        tile(xt, rows, d, packed, half_norms, g0, g1, best + (t - r0),
                             best_group + (t - r0));
                }
            }
        }
        for (int64_t i = 0; i < r1 - r0; ++i) {
            const float *row = x + (r0 + i) * d;
            float v = best[i][0];
            for (int l = 1; l < 8; ++l) v = best[i][l] < v ? best[i][l] : v;
            int32_t g = INT32_MAX;
            for (int l = 0; l < 8; ++l)
                if (best[i][l] == v && best_group[i][l] < g) g = best_group[i][l];
            /* Candidates: in group g, the codes of every lane whose minimum is v there. */
            int64_t k_best = -1;
            for (int l = 0; l < 8 && g != INT32_MAX; ++l) {
                if (!(best[i][l] == v && best_group[i][l] == g)) continue;
                for (int64_t p = (int64_t)g * GROUP_PANELS; p < (g + 1) * GROUP_PANELS; ++p)
                    for (int half = 0; half < 2; ++half) {
                        const int64_t k = p * PANEL + half * 8 + l;
                        if ((k_best < 0 || k < k_best) && k < num_codes &&
                            score_of(row, d, packed, half_norms, k) == v)
                            k_best = k;
                    }
            }
            /* No finite minimum (NaN inputs or overflow): code 0. */
            codes[r0 + i] = k_best < 0 ? 0 : k_best;
        }
    }
    free(short_tile);
    return 0;
}

#else

int vq_supported(void) { return 0; }

int vq_nearest_f32(const float *x, int64_t row_begin, int64_t row_end, int64_t d,
                   const float *packed, const float *half_norms, int64_t groups,
                   int64_t num_codes, int64_t *codes) {
    (void)x;
    (void)row_begin;
    (void)row_end;
    (void)d;
    (void)packed;
    (void)half_norms;
    (void)groups;
    (void)num_codes;
    (void)codes;
    return -1;
}

#endif
