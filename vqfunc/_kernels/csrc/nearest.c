/* Fused distance + argmin for exact nearest-code search on CPUs, one path per ISA (AVX-512,
 * AVX2 + FMA, and a portable one in plain C with GCC vector extensions), chosen per call.
 *
 * Scores are s(x, k) = h_k - x . c_k with h_k = ||c_k||^2 / 2: the same argmin as ||x - c_k||.
 * The codebook arrives packed in panels of 16 codes, transposed so that one dimension of 16
 * codes is contiguous: packed[p][j][0..15] = c[16 p + 0..15][j]. Padding codes and codes with a
 * non-finite entry carry h = +inf so they are never chosen. Codes and rows are centred on the
 * codebook's mean before they are scored, so a large common offset does not cancel the scores.
 *
 * The inner loop keeps no code indices: a register tile of rows x codes accumulates scores
 * with FMAs, and each row folds them into a running minimum vector (one min per vector of
 * scores) and, for d > 16, the vector of the group where each lane's minimum first occurs (one
 * compare and blend more). After every group of codes each lane compares its group minimum
 * with its best so far and, on an improvement, remembers the group (and that vector). At the
 * end, the lanes holding the row's minimum name the first group where it occurs, and the first
 * code reaching the minimum is returned, as argmin would: for d > 16 the smallest of the codes
 * the lanes' tracked vectors name; for d <= 16, where the tracking would cost more than it
 * saves, the whole group scored again by the very same multiply-subtract sequence (so the
 * scores match bit for bit). Memory: the register tiles on the stack, and on the
 * heap the centred rows of one row block with their per-lane minima.
 *
 * Loops: row blocks of ROW_BLOCK rows (their per-lane minima on the heap), code blocks that
 * fit in L1, swept by one register tile of rows after another. The loops are written once, in
 * nearest_path.h, and instantiated per path with its vector width and tile shape.
 *
 * vq_quantize_f32 runs the same search and, for each row block once its codes are known,
 * quantize's forward on its rows while they are in cache (z, out, z_q, validity, the loss
 * sums and the code counts, see vq_forward_outputs): one pass over the rows instead of two.
 *
 * Built by vqfunc/_kernels/cpu.py (or the package build) with the system C compiler; no torch
 * headers.
 */
#define _POSIX_C_SOURCE 199309L
#define _DEFAULT_SOURCE /* syscall, for the AMX grant */
#include <math.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>

#include "vqfunc_kernels.h"

/* Codes are grouped in runs of gp panels (group_panels, by d); the codebook is padded to whole
 * groups of every path (vq_padded_codes). */
#define MAX_GROUP_PANELS 8
/* The panels of the widest register tile (the AVX-512 path's). */
#define WIDEST_TILE_PANELS 4
#define ROW_BLOCK 240
/* The panels a row tile sweeps before the next tile (one group at least): a third of a 48 KiB
 * L1 (half of a 32 KiB one), so that they are read from L1, with room for the tile's rows and
 * minima. Blocks of 192 KiB, swept from L2, were 5-7 % slower for d = 8 to 64 (2-core Intel
 * Xeon, AVX-512); from d = 128 on, where a group is one panel, the size made no difference. */
#define CODE_BLOCK_BYTES (16 * 1024)
/* From this code dimension on, a panel is swept over all row tiles of a block (see
 * panel_tile); below it, a row tile is swept over all panels of a code block (tile). */
/* Up to this code dimension the final recomputation scores a row's whole group with vectors
 * (rescan_group: at most 8 KiB of panels); above it, the tile loop tracks where each lane's
 * minimum first occurs and those records name the code (tracked_code), nothing recomputed. */
#define SMALL_RESCAN_D 16
/* Up to this code dimension a path may take register tiles of SMALL_TILE_ROWS rows (see the
 * AVX-512 path). */
#define SMALL_TILE_D 8
#ifndef PANEL_MAJOR_D
#define PANEL_MAJOR_D 128
#endif

/* Panels per group for k codes of dimension d (a path whose register tile holds more panels
 * takes a group of one tile): the per-group bookkeeping costs a few operations per row and
 * lane, against gp 16 d FMAs of scoring. For d <= SMALL_RESCAN_D the final recomputation of
 * one group per row costs gp 16 d FMAs too, against k d of the whole search: 4 panels below
 * SMALL_RESCAN_K codes, 8 from there on (d = 8, K = 8192: 4-5 % faster; at K = 2048, 8 panels
 * cost more in the recomputation than they save). From d = 64 on the scoring dwarfs
 * the bookkeeping and a short group keeps the padding small. */
#define SMALL_RESCAN_K 4096
static int64_t group_panels(int64_t d, int64_t k) {
    if (d <= SMALL_RESCAN_D) return k >= SMALL_RESCAN_K ? 8 : 4;
    return d >= 128 ? 1 : d >= 64 ? 2 : 8;
}

/* The padded size of a codebook of k codes of dimension d: whole groups on every path (a
 * multiple of 16 max(group_panels(d, k), WIDEST_TILE_PANELS) codes), at least one. */
int64_t vq_padded_codes(int64_t k, int64_t d) {
    int64_t gp = group_panels(d, k);
    if (gp < WIDEST_TILE_PANELS) gp = WIDEST_TILE_PANELS;
    const int64_t unit = PANEL * gp;
    return (k > 0 ? (k + unit - 1) / unit : 1) * unit;
}

/* Whether `panels` panels hold a codebook of num_codes codes of dimension d as vq_pack_f32
 * packs it (vq_padded_codes codes). */
static int whole_groups(int64_t panels, int64_t num_codes, int64_t d) {
    return d >= 1 && panels * PANEL == vq_padded_codes(num_codes, d);
}

/* Whether the d floats at v are all finite: no entry has an exponent of all ones (inf, NaN).
 * An integer OR over the entries, which the compiler vectorises (a float reduction it may
 * not reorder, and an early exit it cannot vectorise). */
static int all_finite(const float *v, int64_t d) {
    const uint32_t *bits = (const uint32_t *)v;
    uint32_t special = 0;
    for (int64_t j = 0; j < d; ++j) special |= (bits[j] & 0x7f800000u) == 0x7f800000u;
    return special == 0;
}

/* Codes per partial sum of vq_center_f32: a fixed split, so that the sums, added in order,
 * do not depend on the thread count. */
#define CENTER_CHUNK 256

/* The mean center [d] of the codes of codebook [k, d] whose entries are all finite (zeros when
 * none is), accumulated in double: one partial sum per chunk of CENTER_CHUNK codes (chunks
 * shared out among `threads` OpenMP threads), added in chunk order. Status VQ_OK, or
 * VQ_NO_MEMORY. */
int vq_center_f32(const float *codebook, int64_t k, int64_t d, float *center, int threads) {
    if (threads < 1) return VQ_BAD_THREADS;
    const int64_t chunks = k > 0 ? (k + CENTER_CHUNK - 1) / CENTER_CHUNK : 1;
    const int64_t width = d > 0 ? d : 1;
    double *sums = calloc((size_t)(chunks * width), sizeof(double));
    int64_t *counts = calloc((size_t)chunks, sizeof(int64_t));
    if (sums == NULL || counts == NULL) {
        free(sums);
        free(counts);
        return VQ_NO_MEMORY;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        double *sum = sums + chunk * width;
        const int64_t end = (chunk + 1) * CENTER_CHUNK < k ? (chunk + 1) * CENTER_CHUNK : k;
        for (int64_t c = chunk * CENTER_CHUNK; c < end; ++c) {
            const float *code = codebook + c * d;
            if (!all_finite(code, d)) continue;
            for (int64_t j = 0; j < d; ++j) sum[j] += code[j];
            ++counts[chunk];
        }
    }
    int64_t count = counts[0];
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
        for (int64_t j = 0; j < d; ++j) sums[j] += sums[chunk * width + j];
        count += counts[chunk];
    }
    for (int64_t j = 0; j < d; ++j) center[j] = count > 0 ? (float)(sums[j] / (double)count) : 0.0f;
    free(sums);
    free(counts);
    return VQ_OK;
}

/* Packs codebook [k, d], less center [d] (NULL: none), into panels [padded_k / 16][d][16] and
 * half squared norms [padded_k]. Padding codes and codes with a non-finite entry (after the
 * subtraction) get h = +inf and zero entries, so they are never chosen (and add no NaN to a
 * score). One panel at a time, dimension by dimension: its 16 codes' sums of squares are 16
 * independent chains (one code's d additions in a row would wait on each other), and each
 * dimension's 16 entries are one contiguous store. A code's sum is a + v v over its entries in
 * order, as before; it is finite exactly when every entry is (an inf or NaN entry leaves it
 * inf or NaN) and the sum does not overflow. Panels are shared out among `threads` OpenMP
 * threads. */
void vq_pack_f32(const float *codebook, int64_t k, int64_t d, int64_t padded_k,
                 const float *center, float *packed, float *half_norms, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 1 ? threads : 1) if (threads > 1)
    for (int64_t c0 = 0; c0 < padded_k; c0 += PANEL) {
        float *panel = packed + (c0 / PANEL) * d * PANEL;
        const float *first = codebook + c0 * d;
        const int live = k - c0 >= PANEL ? PANEL : k > c0 ? (int)(k - c0) : 0;
        float sq[PANEL] = {0};
        for (int64_t j = 0; j < d; ++j) {
            const float m = center ? center[j] : 0.0f; /* v - 0 is v, -0 included */
            float *lane = panel + j * PANEL;
            for (int l = 0; l < live; ++l) {
                const float v = first[l * d + j] - m;
                lane[l] = v;
                sq[l] += v * v;
            }
            for (int l = live; l < PANEL; ++l) lane[l] = 0.0f;
        }
        for (int l = 0; l < PANEL; ++l) {
            const int finite = l < live && isfinite(sq[l]);
            half_norms[c0 + l] = finite ? 0.5f * sq[l] : INFINITY;
            if (!finite)
                for (int64_t j = 0; j < d; ++j) panel[j * PANEL + l] = 0.0f;
        }
    }
}

/* Whether path `isa` (VQ_ISA_*) runs on this CPU: 1 or 0. */
int vq_isa_available(int isa) { return vq_isa_supported(isa); }

/* The library runs on any CPU (the portable path at least). */
int vq_supported(void) { return 1; }

/* An empty asm that makes the compiler keep vector v in a register as it is (used by the FMA
 * probe, so that its chains are neither merged nor moved to memory). */
#if defined(__x86_64__)
#define VQ_IN_REGISTER(v) __asm__ volatile("" : "+v"(v))
#elif defined(__aarch64__)
#define VQ_IN_REGISTER(v) __asm__ volatile("" : "+w"(v))
#else
#define VQ_IN_REGISTER(v) __asm__ volatile("" : "+g"(v))
#endif

#include "nearest_amx.h"
_Static_assert(ROW_BLOCK <= AMX_MAX_ROWS, "the AMX path takes a row block at once");

#ifdef VQ_HAVE_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Whether this CPU has AMX-TILE and AMX-BF16, the OS saves the tile state (XCR0 bits 17 and
 * 18), and it granted this process the tile data: asked once (the grant holds for every thread
 * of the process). */
int vq_cpu_amx(void) {
    static int answer = -1;
    if (answer >= 0) return answer;
    unsigned a, b, c, d; /* leaf 7: EDX bit 24 AMX-TILE, bit 22 AMX-BF16 */
    int ok = vq_cpu_avx512() && __get_cpuid_count(7, 0, &a, &b, &c, &d) &&
             (d & (1u << 24)) && (d & (1u << 22));
    if (ok) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        ok = (lo & (3u << 17)) == (3u << 17);
    }
    if (ok) ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    answer = ok;
    return answer;
}
#endif

/* The paths, one instantiation of nearest_path.h each. */

/* Portable: GCC vector extensions only, for any architecture (lowered to SSE2 on x86-64, to
 * NEON on aarch64). */
#define PATH(name) name##_portable
#define PATH_TARGET
#define LANES 4
#define TILE_ROWS 4
#define SMALL_TILE_ROWS 4
#define TILE_PANELS 1
#define FMA_CHAINS 12
#define V_MIN(a, b) PATH(select)((a) < (b), (a), (b))
/* A plain expression: the compiler contracts it by the rules of the target (no FMA on x86-64's
 * baseline, one fused step on aarch64), the same in the tile loop and the recomputation. */
#define V_STEP(a, x, b) ((a) - (x) * (b))
#define V_TRACK(w, a, m, i) PATH(selecti)((a) < (m), (i), (w))
#define V_STREAMS 0
#define V_STREAM(p, v) PATH(store)((p), (v))
#define V_STREAM_FENCE() ((void)0)
#define PATH_AMX 0
#include "nearest_path.h"
#undef PATH
#undef PATH_TARGET
#undef LANES
#undef TILE_ROWS
#undef SMALL_TILE_ROWS
#undef TILE_PANELS
#undef FMA_CHAINS
#undef V_MIN
#undef V_STEP
#undef V_TRACK
#undef V_STREAMS
#undef V_STREAM
#undef V_STREAM_FENCE
#undef PATH_AMX

#ifdef VQ_X86
/* AVX2 + FMA: 16 ymm registers, a tile of 6 rows x 16 codes. */
#define PATH(name) name##_avx2
#define PATH_TARGET VQ_TARGET_AVX2
#define LANES 8
#define TILE_ROWS 6
#define SMALL_TILE_ROWS 6
#define TILE_PANELS 1
#define FMA_CHAINS 12
#define V_MIN(a, b) ((PATH(vf))_mm256_min_ps((a), (b)))
#define V_STEP(a, x, b) ((PATH(vf))_mm256_fnmadd_ps(_mm256_set1_ps(x), (b), (a)))
#define V_TRACK(w, a, m, i)                                                               \
    ((PATH(vi))_mm256_blendv_ps((__m256)(w), (__m256)(i), _mm256_cmp_ps((a), (m), _CMP_LT_OQ)))
#define V_STREAMS 1
#define V_STREAM(p, v) _mm256_stream_ps((p), (__m256)(v))
#define V_STREAM_FENCE() _mm_sfence()
#define PATH_AMX 0
#include "nearest_path.h"
#undef PATH
#undef PATH_TARGET
#undef LANES
#undef TILE_ROWS
#undef SMALL_TILE_ROWS
#undef TILE_PANELS
#undef FMA_CHAINS
#undef V_MIN
#undef V_STEP
#undef V_TRACK
#undef V_STREAMS
#undef V_STREAM
#undef V_STREAM_FENCE
#undef PATH_AMX

/* AVX-512: 32 zmm registers, a tile of 6 rows x 64 codes (24 accumulators, 4 code vectors,
 * the row values broadcast from memory by the FMAs themselves); for d <= SMALL_TILE_D, 5 rows,
 * which leaves registers for the rows' running minima: 5-11 % faster for d = 4 and 8 on an AMD
 * EPYC (no change from d = 16 on). */
#define PATH(name) name##_avx512
#define PATH_TARGET VQ_TARGET_AVX512
#define LANES 16
#define TILE_ROWS 6
#define SMALL_TILE_ROWS 5
#define TILE_PANELS 4
#define FMA_CHAINS 24
#define V_MIN(a, b) ((PATH(vf))_mm512_min_ps((a), (b)))
#define V_STEP(a, x, b) ((PATH(vf))_mm512_fnmadd_ps(_mm512_set1_ps(x), (b), (a)))
#define V_TRACK(w, a, m, i)                                                               \
    ((PATH(vi))_mm512_mask_mov_epi32((__m512i)(w), _mm512_cmp_ps_mask((a), (m), _CMP_LT_OQ), \
                                     (__m512i)(i)))
#define V_STREAMS 1
#define V_STREAM(p, v) _mm512_stream_ps((p), (__m512)(v))
#define V_STREAM_FENCE() _mm_sfence()
#ifdef VQ_HAVE_AMX
#define PATH_AMX 1 /* with vq_amx_codes, the rows' scores on the AMX tiles */
#else
#define PATH_AMX 0
#endif
#include "nearest_path.h"
#undef PATH
#undef PATH_TARGET
#undef LANES
#undef TILE_ROWS
#undef SMALL_TILE_ROWS
#undef TILE_PANELS
#undef FMA_CHAINS
#undef V_MIN
#undef V_STEP
#undef V_TRACK
#undef V_STREAMS
#undef V_STREAM
#undef V_STREAM_FENCE
#undef PATH_AMX
#endif

typedef int (*rows_fn)(const float *, int64_t, int64_t, int64_t, int64_t, const float *,
                       const float *, int64_t, int64_t, const float *, const float *, int64_t *,
                       float *, const vq_forward_outputs *, int64_t, const vq_amx_codes *);

static rows_fn rows_for(int isa) {
    switch (isa) {
#ifdef VQ_X86
        case VQ_ISA_AMX: /* with the codebook's bf16 tiles, or as AVX-512 without them */
        case VQ_ISA_AVX512:
            return nearest_rows_avx512;
        case VQ_ISA_AVX2:
            return nearest_rows_avx2;
#endif
        default:
            return nearest_rows_portable;
    }
}

/* The codebook's bf16 tiles for the AMX path (see nearest_amx.h) into *amx and *buffer (the
 * caller frees it): VQ_OK with *buffer set where the path takes them (isa VQ_ISA_AMX, a code
 * dimension from AMX_MIN_D, at least AMX_MIN_ROWS rows, four times as many past AMX_LARGE_BOOK
 * floats of codes), VQ_OK with *buffer NULL where the rows are searched as on the AVX-512 path,
 * or VQ_NO_MEMORY. Panels are shared out among `threads` OpenMP threads. */
static int amx_prepare(int isa, int64_t n, int64_t d, const float *packed,
                       const float *half_norms, int64_t panels, int threads, vq_amx_codes *amx,
                       uint16_t **buffer) {
    *buffer = NULL;
#ifdef VQ_HAVE_AMX
    const int64_t min_rows = panels * PANEL * d > AMX_LARGE_BOOK ? 4 * AMX_MIN_ROWS : AMX_MIN_ROWS;
    if (isa != VQ_ISA_AMX || !vq_cpu_amx() || d < AMX_MIN_D || d > AMX_MAX_D || n < min_rows)
        return VQ_OK;
    const int64_t tiles = (d + AMX_DIMS - 1) / AMX_DIMS;
    const size_t half = (size_t)(panels * tiles * AMX_DIMS * PANEL);
    uint16_t *hi = malloc(2 * half * sizeof(uint16_t));
    if (hi == NULL) return VQ_NO_MEMORY;
    float largest = 0.0f;
    for (int64_t k = 0; k < panels * PANEL; ++k)
        if (isfinite(half_norms[k]) && half_norms[k] > largest) largest = half_norms[k];
    amx->hi = hi;
    amx->lo = hi + half;
    amx->tiles = tiles;
    amx->half_norm = largest;
    /* The half norm is the float sum of d squares over 2, within d 2^-24 of the true one: a
     * factor 1 + 2^-8 covers d <= AMX_MAX_D. */
    amx->code_norm = sqrt(2.0 * (double)largest * (1.0 + 0x1p-8));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t p = 0; p < panels; ++p) amx_pack_panel(packed, d, tiles, p, hi, hi + half);
    *buffer = hi;
#else
    (void)isa, (void)n, (void)d, (void)packed, (void)half_norms, (void)panels, (void)threads,
        (void)amx;
#endif
    return VQ_OK;
}

/* The AMX path's codes alone (for its tests): the n rows of x [n, d], centred on center [d],
 * scored on the AMX tiles against vq_pack_f32's packing (its `panels` panels hold num_codes
 * codes), in blocks of ROW_BLOCK rows on one thread; codes[i] is the first code of row i's
 * least exact score, or -1 where the row is left to the AVX-512 tiles. VQ_UNSUPPORTED where
 * the AMX path does not run (nor for d below AMX_MIN_D); any n >= 0. */
int vq_amx_codes_f32(const float *x, int64_t n, int64_t d, const float *packed,
                     const float *half_norms, int64_t panels, int64_t num_codes,
                     const float *center, int64_t *codes) {
#ifdef VQ_HAVE_AMX
    if (!whole_groups(panels, num_codes, d)) return VQ_UNSUPPORTED;
    vq_amx_codes amx = {0};
    uint16_t *tiles;
    /* As for a search of enough rows that the path takes any codebook: no tiles, no path. */
    const int status = amx_prepare(VQ_ISA_AMX, 4 * AMX_MIN_ROWS, d, packed, half_norms, panels,
                                   1, &amx, &tiles);
    if (status != VQ_OK || tiles == NULL) return status != VQ_OK ? status : VQ_UNSUPPORTED;
    char *scratch = malloc(sizeof(float) * (size_t)(ROW_BLOCK * d) + amx_scratch_bytes(amx.tiles) +
                           64);
    if (scratch == NULL) {
        free(tiles);
        return VQ_NO_MEMORY;
    }
    float *block = (float *)scratch;
    void *aligned = (void *)(((uintptr_t)(block + ROW_BLOCK * d) + 63) & ~(uintptr_t)63);
    for (int64_t r0 = 0; r0 < n; r0 += ROW_BLOCK) {
        const int rows = (int)(n - r0 < ROW_BLOCK ? n - r0 : ROW_BLOCK);
        for (int64_t i = 0; i < rows * d; ++i) block[i] = x[r0 * d + i] - center[i % d];
        amx_rows(block, rows, d, &amx, packed, half_norms, panels, aligned, codes + r0);
    }
    free(scratch);
    free(tiles);
    return VQ_OK;
#else
    (void)x, (void)n, (void)d, (void)packed, (void)half_norms, (void)panels, (void)num_codes,
        (void)center, (void)codes;
    return VQ_UNSUPPORTED;
#endif
}

/* The rows of x in slices of rows_per_slice rows, handed out dynamically to `threads` OpenMP
 * threads, each slice searched (and, with fwd, quantized) on path `isa`: slice s is rows
 * [s rows_per_slice, (s + 1) rows_per_slice) and fills entry s of fwd's per-slice sums. */
static int search_slices(int isa, const float *x, int64_t n, int64_t d, int64_t stride,
                         const float *packed, const float *half_norms, int64_t panels,
                         int64_t num_codes, const float *codebook, const float *center,
                         int64_t *codes, float *distances, const vq_forward_outputs *fwd,
                         int64_t rows_per_slice, int threads) {
    const rows_fn rows = rows_for(isa);
    vq_amx_codes amx = {0};
    uint16_t *tiles;
    int status = amx_prepare(isa, n, d, packed, half_norms, panels, threads, &amx, &tiles);
    if (status != VQ_OK) return status;
    const vq_amx_codes *with = tiles != NULL ? &amx : NULL;
    const int64_t slices = (n + rows_per_slice - 1) / rows_per_slice;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t s = 0; s < slices; ++s) {
        const int64_t begin = s * rows_per_slice;
        const int64_t end = begin + rows_per_slice < n ? begin + rows_per_slice : n;
        const int result = rows(x, begin, end, d, stride, packed, half_norms, panels, num_codes,
                                codebook, center, codes, distances, fwd, s, with);
        VQ_RECORD_FAILURE(status, result);
    }
    free(tiles);
    return status;
}

/* All n rows of x (row r at x + r stride: x [n, d] itself where stride = d, or a view of every
 * stride-th float, such as a column slice of a wider matrix; rows are only read, so any
 * stride >= 0 will do) on the path `isa` (VQ_ISA_*), in slices of rows_per_slice rows handed
 * out dynamically to `threads` OpenMP threads (the runtime torch uses, when it is loaded: one pool,
 * no oversubscription). The packed codes are centred on `center` [d] (the codebook's mean) and
 * each row block is centred the same way before it is scored: distances are invariant to the
 * translation, and the scores h - x.c then do not cancel catastrophically when the data share
 * a large offset. `packed` and `half_norms` are vq_pack_f32's, `panels` panels of 16 codes
 * (vq_padded_codes(num_codes, d) / 16). Writes codes[0:n] and the Euclidean distances
 * ||x - codebook[code]|| (of the uncentred vectors) to distances[0:n]. */
int vq_nearest_f32(const float *x, int64_t n, int64_t d, int64_t stride, const float *packed,
                   const float *half_norms, int64_t panels, int64_t num_codes,
                   const float *codebook, const float *center,
                   int64_t *codes, float *distances, int64_t rows_per_slice, int threads,
                   int isa) {
    if (!vq_isa_supported(isa) || !whole_groups(panels, num_codes, d) || rows_per_slice < 1 ||
        stride < 0)
        return VQ_UNSUPPORTED;
    return search_slices(isa, x, n, d, stride, packed, half_norms, panels, num_codes,
                         codebook, center, codes, distances, NULL, rows_per_slice, threads);
}

/* vq_nearest_f32 and, in the same pass over each row block, quantize's forward on the rows x
 * [n, d] as given (see vq_forward_outputs): z, out, z_q [n, d], valid [n] and codes [n] (0 for
 * an invalid row, one with a non-finite entry; its distance NaN, z zeros, out = z_q = code 0),
 * the weighted code counts hist [num_codes] of the valid rows (float32), *loss (their weighted
 * sum of squared distances over d times the weight sum, at least 1: the commitment loss),
 * *num_invalid and *perplexity (exp of the entropy of the counts; 1 when they are all zero).
 * mask [n] holds optional row weights (NULL: 1). With `stream`, z, out and z_q are written
 * with non-temporal stores where they are vector-aligned (for outputs larger than the caches,
 * which such stores do not first read). The sums are kept per slice of rows and added
 * in slice order, so the results depend on the thread count (which sets the slices), never on
 * which thread ran which slice. */
int vq_quantize_f32(const float *x, int64_t n, int64_t d, const float *packed,
                    const float *half_norms, int64_t panels, int64_t num_codes,
                    const float *codebook, const float *center, const float *mask,
                    int64_t *codes, float *distances, float *z, float *out, float *z_q,
                    uint8_t *valid, float *hist, float *loss, int64_t *num_invalid,
                    float *perplexity, int stream, int64_t rows_per_slice, int threads,
                    int isa) {
    if (!vq_isa_supported(isa) || !whole_groups(panels, num_codes, d) || num_codes < 1 ||
        rows_per_slice < 1)
        return VQ_UNSUPPORTED;
    if (threads < 1) return VQ_BAD_THREADS;
    const int64_t slices = (n + rows_per_slice - 1) / rows_per_slice;
    const size_t per_slice = (size_t)(slices > 0 ? slices : 1);
    double *counts = calloc(per_slice * (size_t)(num_codes + 2), sizeof(double));
    int64_t *invalid = calloc(per_slice, sizeof(int64_t));
    if (counts == NULL || invalid == NULL) {
        free(counts);
        free(invalid);
        return VQ_NO_MEMORY;
    }
    const vq_forward_outputs fwd = {
        .mask = mask, .z = z, .out = out, .z_q = z_q, .valid = valid,
        .counts = counts, .loss = counts + per_slice * (size_t)num_codes,
        .weight = counts + per_slice * (size_t)(num_codes + 1), .invalid = invalid,
        .stream = stream,
    };
    const int status = search_slices(isa, x, n, d, d, packed, half_norms, panels, num_codes,
                                     codebook, center, codes, distances, &fwd, rows_per_slice,
                                     threads);
    if (status == VQ_OK) {
        double total = 0.0, weight = 0.0, all = 0.0;
        int64_t bad = 0;
        for (int64_t s = 0; s < slices; ++s) {
            total += fwd.loss[s];
            weight += fwd.weight[s];
            bad += invalid[s];
        }
        for (int64_t k = 0; k < num_codes; ++k) {
            double count = 0.0;
            for (int64_t s = 0; s < slices; ++s) count += counts[s * num_codes + k];
            hist[k] = (float)count;
            counts[k] = count; /* slice 0's row now holds the totals */
            all += count;
        }
        double entropy = 0.0;
        for (int64_t k = 0; k < num_codes && all > 0.0; ++k)
            if (counts[k] > 0.0) entropy -= counts[k] / all * log(counts[k] / all);
        const double count = weight * (double)d;
        *loss = (float)(total / (count > 1.0 ? count : 1.0));
        *num_invalid = bad;
        *perplexity = (float)exp(entropy);
    }
    free(counts);
    free(invalid);
    return status;
}

static float fma_chains(int isa, int64_t iterations, float seed) {
    switch (isa) {
#ifdef VQ_X86
        case VQ_ISA_AMX: /* the FMA units are the AVX-512 path's */
        case VQ_ISA_AVX512:
            return fma_chains_avx512(iterations, seed);
        case VQ_ISA_AVX2:
            return fma_chains_avx2(iterations, seed);
#endif
        default:
            return fma_chains_portable(iterations, seed);
    }
}

/* The FMA probe: `threads` OpenMP threads each run `iterations` rounds of independent
 * multiply-adds on the vectors of path `isa`. Writes the flops done to *flops and the wall
 * time in seconds to *seconds (the caller divides). */
int vq_fma_probe(int isa, int64_t iterations, int threads, double *flops, double *seconds) {
    if (!vq_isa_supported(isa) || iterations < 1 || threads < 1) return VQ_UNSUPPORTED;
    static const int lanes[] = {4, 8, 16, 16}, chains[] = {12, 12, 24, 24};
    float sink = 0.0f;
    int ran = 0; /* threads that ran (one in a build without OpenMP) */
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
#pragma omp parallel num_threads(threads) reduction(+ : sink, ran)
    {
        sink += fma_chains(isa, iterations, 1.0f);
        ran += 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    *flops = 2.0 * lanes[isa] * chains[isa] * (double)iterations * ran;
    /* The sum is never NaN for these seeds; comparing it keeps the work observable. */
    return sink != sink ? VQ_UNSUPPORTED : VQ_OK;
}
