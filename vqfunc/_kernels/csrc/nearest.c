/* Fused distance + argmin for exact nearest-code search on x86-64 CPUs with AVX2 and FMA.
 *
 * Scores are s(x, k) = h_k - x . c_k with h_k = ||c_k||^2 / 2: the same argmin as ||x - c_k||.
 * The codebook arrives packed in panels of 16 codes, transposed so that one dimension of 16
 * codes is two 8-float vectors: packed[p][j][0..15] = c[16 p + 0..15][j]. Padding codes and
 * codes with a non-finite entry carry h = +inf so they are never chosen. Codes and rows are
 * centred on the codebook's mean before they are scored, so a large common offset does not
 * cancel the scores (see nearest_rows).
 *
 * The inner loop keeps no indices: a register tile of 6 rows x 16 codes accumulates scores with
 * FMAs, and each row only folds them into a running minimum vector (one vminps per 8 scores).
 * After every group of 64 codes each of the 8 lanes compares its group minimum with its best so
 * far and, on the rare improvement, remembers the group. At the end, the lanes holding the
 * row's minimum name the first group where it occurs; that group alone is recomputed with the
 * very same FMA sequence (so the scores match bit for bit) and the first code reaching the
 * minimum is returned, as argmin would. Memory: a few hundred bytes of stack per thread (the
 * register tiles), and on the heap the centred rows of one row block, (ROW_BLOCK + TILE_ROWS) d
 * floats, with their per-lane minima (about 23 KiB).
 *
 * Loops: row blocks of ROW_BLOCK rows (their per-lane minima on the heap), code blocks that
 * fit in L2, row tiles of TILE_ROWS rows whose vectors stay in L1.
 *
 * Built by vqfunc/_kernels/cpu.py with the system C compiler; no torch headers.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "vqfunc_kernels.h"

/* Codes are grouped in runs of gp panels (gp = 1, 2 or 4, by d, see vq_nearest_f32); the
 * codebook is padded to a multiple of PADDING codes. */
#define MAX_GROUP_PANELS 4
#define PADDING (PANEL * MAX_GROUP_PANELS)
#define TILE_ROWS 6
#define ROW_BLOCK 240
/* From this code dimension on, a panel is swept over all row tiles of a block (see
 * panel_tile); below it, a row tile is swept over all panels of a code block (tile). */
#ifndef PANEL_MAJOR_D
#define PANEL_MAJOR_D 128
#endif

/* Packs codebook [k, d] into panels [padded_k / 16][d][16] and half squared norms [padded_k].
 * Padding codes and codes with a non-finite entry get h = +inf and zero entries, so they are
 * never chosen (and add no NaN to a score). Plain loops: the codebook is small next to the
 * search. */
void vq_pack_f32(const float *codebook, int64_t k, int64_t d, int64_t padded_k, float *packed,
                 float *half_norms) {
    for (int64_t c = 0; c < padded_k; ++c) {
        const float *code = codebook + c * d;
        float *lane = packed + (c / PANEL) * d * PANEL + (c % PANEL);
        int finite = c < k;
        float sq = 0.0f;
        for (int64_t j = 0; j < d && finite; ++j) {
            finite = isfinite(code[j]);
            sq += code[j] * code[j];
        }
        finite = finite && isfinite(sq);
        for (int64_t j = 0; j < d; ++j) lane[j * PANEL] = finite ? code[j] : 0.0f;
        half_norms[c] = finite ? 0.5f * sq : INFINITY;
    }
}

#ifdef VQ_X86

int vq_supported(void) { return vq_cpu_supported(); }

/* First code of group g whose score for row x equals `target`, or -1. The same FMA sequence
 * as the tile loop, so the same inputs give bit-identical scores; the 8 accumulators are
 * independent, so this runs at FMA throughput, not latency. */
TARGET static inline __attribute__((always_inline)) int64_t rescan_panels(
    const float *x, int64_t d, const float *packed, const float *half_norms, int64_t gp,
    int64_t g, float target) {
    const float *pp = packed + g * gp * d * PANEL;
    const float *hn = half_norms + g * gp * PANEL;
    __m256 a[MAX_GROUP_PANELS][2];
    for (int p = 0; p < gp; ++p) {
        a[p][0] = _mm256_loadu_ps(hn + p * PANEL);
        a[p][1] = _mm256_loadu_ps(hn + p * PANEL + 8);
    }
    for (int64_t j = 0; j < d; ++j) {
        const __m256 xj = _mm256_broadcast_ss(x + j);
        for (int p = 0; p < gp; ++p) {
            const float *panel = pp + p * d * PANEL + j * PANEL;
            a[p][0] = _mm256_fnmadd_ps(xj, _mm256_loadu_ps(panel), a[p][0]);
            a[p][1] = _mm256_fnmadd_ps(xj, _mm256_loadu_ps(panel + 8), a[p][1]);
        }
    }
    const __m256 want = _mm256_set1_ps(target);
    for (int p = 0; p < gp; ++p) {
        const int lo = _mm256_movemask_ps(_mm256_cmp_ps(a[p][0], want, _CMP_EQ_OQ));
        const int hi = _mm256_movemask_ps(_mm256_cmp_ps(a[p][1], want, _CMP_EQ_OQ));
        const int mask = lo | (hi << 8);
        if (mask) return (g * gp + p) * PANEL + __builtin_ctz((unsigned)mask);
    }
    return -1;
}

/* rescan_panels with gp a compile-time constant, so that its accumulators stay in registers. */
TARGET static int64_t rescan_group(const float *x, int64_t d, const float *packed,
                                   const float *half_norms, int64_t gp, int64_t g,
                                   float target) {
    switch (gp) {
        case 1:
            return rescan_panels(x, d, packed, half_norms, 1, g, target);
        case 2:
            return rescan_panels(x, d, packed, half_norms, 2, g, target);
        default:
            return rescan_panels(x, d, packed, half_norms, MAX_GROUP_PANELS, g, target);
    }
}

/* ||x - c|| over d floats, in 8-lane partial sums. */
TARGET static float distance(const float *x, const float *c, int64_t d) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) {
        const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(c + j));
        acc = _mm256_fmadd_ps(diff, diff, acc);
    }
    float sq = vq_lane_sum(acc);
    for (; j < d; ++j) sq += (x[j] - c[j]) * (x[j] - c[j]);
    return sqrtf(sq);
}

TARGET static inline void record_group(__m256 m, int64_t g, float *best, int32_t *best_group);

/* The minimum v of a row's 8 lane minima, and the first group g holding it (the smallest group
 * among the lanes that hold v), with vector reductions. Lane minima are never NaN. */
TARGET static inline void row_minimum(const float *best, const int32_t *best_group, float *v,
                                      int32_t *g) {
    const __m256 b = _mm256_loadu_ps(best);
    __m256 m = _mm256_min_ps(b, _mm256_permute2f128_ps(b, b, 1));
    m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
    m = _mm256_min_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m256i holds = _mm256_castps_si256(_mm256_cmp_ps(b, m, _CMP_EQ_OQ));
    const __m256i groups = _mm256_loadu_si256((const __m256i *)best_group);
    __m256i c = _mm256_blendv_epi8(_mm256_set1_epi32(INT32_MAX), groups, holds);
    c = _mm256_min_epi32(c, _mm256_permute2x128_si256(c, c, 1));
    c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, _MM_SHUFFLE(1, 0, 3, 2)));
    c = _mm256_min_epi32(c, _mm256_shuffle_epi32(c, _MM_SHUFFLE(2, 3, 0, 1)));
    *v = _mm256_cvtss_f32(m);
    *g = _mm256_cvtsi256_si32(c);
}

/* The scores of one panel of 16 codes (at pp, half norms at hn) for the TILE_ROWS rows at xt
 * (row stride d), reduced to each row's per-lane minimum of its two 8-code halves. The same FMA
 * sequence as rescan_panels, so equal inputs give bit-identical scores. `d` is a compile-time
 * constant at the specialised call sites, which lets the compiler unroll the dimension loop. */
TARGET static inline __attribute__((always_inline)) void panel_minima(
    const float *xt, int64_t d, const float *pp, const float *hn, __m256 minima[TILE_ROWS]) {
    const __m256 h0 = _mm256_loadu_ps(hn), h1 = _mm256_loadu_ps(hn + 8);
    /* An opaque copy of the row pointer: keeps the compiler from hoisting one address per row
     * and dimension out of the loop (and spilling them). */
    const float *xr = xt;
    __asm__("" : "+r"(xr));
    __m256 a[TILE_ROWS][2];
    const __m256 b00 = _mm256_loadu_ps(pp), b01 = _mm256_loadu_ps(pp + 8);
    for (int i = 0; i < TILE_ROWS; ++i) {
        const __m256 x0 = _mm256_broadcast_ss(xr + i * d);
        a[i][0] = _mm256_fnmadd_ps(x0, b00, h0);
        a[i][1] = _mm256_fnmadd_ps(x0, b01, h1);
    }
#pragma GCC unroll 4
    for (int64_t j = 1; j < d; ++j) {
        const __m256 b0 = _mm256_loadu_ps(pp + j * PANEL);
        const __m256 b1 = _mm256_loadu_ps(pp + j * PANEL + 8);
        for (int i = 0; i < TILE_ROWS; ++i) {
            const __m256 xj = _mm256_broadcast_ss(xr + i * d + j);
            a[i][0] = _mm256_fnmadd_ps(xj, b0, a[i][0]);
            a[i][1] = _mm256_fnmadd_ps(xj, b1, a[i][1]);
        }
    }
    for (int i = 0; i < TILE_ROWS; ++i) minima[i] = _mm256_min_ps(a[i][0], a[i][1]);
}

/* Per-lane minima of the scores of the TILE_ROWS rows at xt against the codes of groups
 * [g0, g1) of gp panels, folded into best/best_group (rows past `rows` are ignored). */
TARGET static inline __attribute__((always_inline)) void tile(
    const float *xt, int rows, int64_t d, const float *packed, const float *half_norms,
    int64_t gp, int64_t g0, int64_t g1, float (*best)[8], int32_t (*best_group)[8]) {
    for (int64_t g = g0; g < g1; ++g) {
        __m256 m[TILE_ROWS];
        for (int i = 0; i < TILE_ROWS; ++i) m[i] = _mm256_set1_ps(INFINITY);
        for (int64_t p = g * gp; p < (g + 1) * gp; ++p) {
            __m256 minima[TILE_ROWS];
            panel_minima(xt, d, packed + p * d * PANEL, half_norms + p * PANEL, minima);
            /* min(score, m) keeps m when a score is NaN. */
            for (int i = 0; i < TILE_ROWS; ++i) m[i] = _mm256_min_ps(minima[i], m[i]);
        }
        for (int i = 0; i < rows; ++i) record_group(m[i], g, best[i], best_group[i]);
    }
}

/* Large d: one panel of 16 codes against the TILE_ROWS rows at xt, folded into the rows'
 * running minima m (in memory). The caller sweeps every row tile of a row block over one
 * panel, so the panel (16 d floats) stays in L1 instead of streaming from L2 per tile. */
TARGET static void panel_tile(const float *xt, int64_t d, const float *pp, const float *hn,
                              float (*m)[8]) {
    __m256 minima[TILE_ROWS];
    panel_minima(xt, d, pp, hn, minima);
    for (int i = 0; i < TILE_ROWS; ++i)
        _mm256_storeu_ps(m[i], _mm256_min_ps(minima[i], _mm256_loadu_ps(m[i])));
}

/* Fold one group's per-lane minima m into best / best_group (branch-free: improvements are
 * frequent in the first groups of a row). */
TARGET static inline void record_group(__m256 m, int64_t g, float *best, int32_t *best_group) {
    const __m256 group_id = _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)g));
    const __m256 prev = _mm256_loadu_ps(best);
    const __m256 better = _mm256_cmp_ps(m, prev, _CMP_LT_OQ);
    const __m256 groups_so_far = _mm256_loadu_ps((const float *)best_group);
    _mm256_storeu_ps(best, _mm256_blendv_ps(prev, m, better));
    _mm256_storeu_ps((float *)best_group, _mm256_blendv_ps(groups_so_far, group_id, better));
}

#define TILE_CASE(D)                                                                      \
    case D:                                                                               \
        tile(xt, rows, D, packed, half_norms, gp, g0, g1, best + (t - r0),                   \
             best_group + (t - r0));                                                      \
        break;

/* Rows [row_begin, row_end) of x [*, d] against the packed codebook of `groups` groups of
 * PADDING codes, the first `num_codes` of them real (`codebook` [num_codes, d] is the same
 * codebook unpacked). The packed codes are centred on `center` [d] (the codebook's mean) and
 * each row block is centred the same way before it is scored: distances are invariant to the
 * translation, and the scores h - x.c then do not cancel catastrophically when the data share
 * a large offset. Writes codes[row_begin:row_end] and the Euclidean distances
 * ||x - codebook[code]|| (of the uncentred vectors) to distances[row_begin:row_end]. */
TARGET static int nearest_rows(const float *x, int64_t row_begin, int64_t row_end, int64_t d,
                               const float *packed, const float *half_norms,
                               int64_t padded_groups, int64_t num_codes, const float *codebook,
                               const float *center, int64_t *codes, float *distances) {
    /* One heap buffer (nothing large on the thread stack, so a small OMP_STACKSIZE works):
     * the centred rows of one block, padded with its last row to whole tiles, then the
     * per-lane minima of the block's rows (best, best_group) and of one group (minima). */
    const size_t block_floats = (size_t)(ROW_BLOCK + TILE_ROWS) * (size_t)d;
    float *block = malloc(sizeof(float) * (block_floats + (3 * ROW_BLOCK + TILE_ROWS) * 8));
    if (block == NULL) return VQ_NO_MEMORY;
    float (*best)[8] = (float (*)[8])(block + block_floats);
    int32_t (*best_group)[8] = (int32_t (*)[8])(block + block_floats + ROW_BLOCK * 8);
    float (*minima)[8] = (float (*)[8])(block + block_floats + 2 * ROW_BLOCK * 8);
    /* A code block of about 192 KiB stays in L2 while a row block sweeps it. */
    /* Panels per group: the final recomputation of one group per row costs gp 16 d FMAs,
     * the per-group bookkeeping a few operations per row; gp = 128 / d balances them. */
    const int64_t gp = d >= 128 ? 1 : d >= 64 ? 2 : MAX_GROUP_PANELS;
    const int64_t groups = padded_groups * (MAX_GROUP_PANELS / gp);
    int64_t block_groups = (192 * 1024) / (gp * PANEL * d * (int64_t)sizeof(float));
    if (block_groups < 1) block_groups = 1;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += ROW_BLOCK) {
        const int64_t r1 = r0 + ROW_BLOCK < row_end ? r0 + ROW_BLOCK : row_end;
        for (int64_t i = 0; i < r1 - r0; ++i)
            for (int l = 0; l < 8; ++l) {
                best[i][l] = INFINITY;
                best_group[i][l] = 0;
            }
        /* Centred copy; a short last tile is padded with the last row (only real rows are
         * recorded). */
        for (int64_t i = 0; i < r1 - r0 + TILE_ROWS; ++i) {
            const float *src = x + (r0 + i < r1 ? r0 + i : r1 - 1) * d;
            for (int64_t j = 0; j < d; ++j) block[i * d + j] = src[j] - center[j];
        }
        for (int64_t g0 = 0; g0 < groups; g0 += block_groups) {
            const int64_t g1 = g0 + block_groups < groups ? g0 + block_groups : groups;
            if (d >= PANEL_MAJOR_D) {
                for (int64_t g = g0; g < g1; ++g) {
                    for (int64_t i = 0; i < r1 - r0 + TILE_ROWS; ++i)
                        _mm256_storeu_ps(minima[i], _mm256_set1_ps(INFINITY));
                    for (int64_t p = g * gp; p < (g + 1) * gp; ++p)
                        for (int64_t t = r0; t < r1; t += TILE_ROWS)
                            panel_tile(block + (t - r0) * d, d, packed + p * d * PANEL,
                                       half_norms + p * PANEL, minima + (t - r0));
                    for (int64_t i = 0; i < r1 - r0; ++i)
                        record_group(_mm256_loadu_ps(minima[i]), g, best[i], best_group[i]);
                }
                continue;
            }
            for (int64_t t = r0; t < r1; t += TILE_ROWS) {
                const int rows = (int)(r1 - t < TILE_ROWS ? r1 - t : TILE_ROWS);
                const float *xt = block + (t - r0) * d;
                switch (d) {
                    TILE_CASE(4)
                    TILE_CASE(8)
                    TILE_CASE(16)
                    TILE_CASE(32)
                    TILE_CASE(64)
                    default:
                        tile(xt, rows, d, packed, half_norms, gp, g0, g1, best + (t - r0),
                             best_group + (t - r0));
                }
            }
        }
        for (int64_t i = 0; i < r1 - r0; ++i) {
            const float *row = block + i * d;
            float v;
            int32_t g;
            row_minimum(best[i], best_group[i], &v, &g);
            /* The first code reaching v lies in group g (every lane holding v there has g as
             * its first group reaching v), so one group is recomputed. */
            int64_t k_best = g == INT32_MAX ? -1 : rescan_group(row, d, packed, half_norms, gp, g, v);
            /* No finite minimum (NaN inputs or overflow), or a padding code: code 0. */
            if (k_best < 0 || k_best >= num_codes) k_best = 0;
            codes[r0 + i] = k_best;
            distances[r0 + i] = distance(x + (r0 + i) * d, codebook + k_best * d, d);
        }
    }
    free(block);
    return VQ_OK;
}

/* All n rows of x, in slices of rows_per_slice rows handed out dynamically to `threads`
 * OpenMP threads (the runtime torch uses, when it is loaded: one pool, no oversubscription). */
int vq_nearest_f32(const float *x, int64_t n, int64_t d, const float *packed,
                   const float *half_norms, int64_t padded_groups, int64_t num_codes,
                   const float *codebook, const float *center, int64_t *codes,
                   float *distances, int64_t rows_per_slice, int threads) {
    if (!vq_cpu_supported() || d < 1 || rows_per_slice < 1) return VQ_UNSUPPORTED;
    const int64_t slices = (n + rows_per_slice - 1) / rows_per_slice;
    int status = VQ_OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t s = 0; s < slices; ++s) {
        const int64_t begin = s * rows_per_slice;
        const int64_t end = begin + rows_per_slice < n ? begin + rows_per_slice : n;
        const int result = nearest_rows(x, begin, end, d, packed, half_norms, padded_groups,
                                        num_codes, codebook, center, codes, distances);
        VQ_RECORD_FAILURE(status, result);
    }
    return status;
}

#else

int vq_supported(void) { return 0; }

int vq_nearest_f32(void) { return VQ_UNSUPPORTED; }

#endif
