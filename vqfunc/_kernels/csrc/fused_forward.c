/* Everything quantize does after the search, for float32 rows, in one pass over the rows: the
 * row validity, the searched vectors z, the straight-through output and z_q (the selected
 * codes), the commitment-loss sum, the code histogram and the count of invalid rows. Called by
 * vqfunc/_kernels/fused_forward_cpu.py once the search (nearest.c) has run on the raw rows
 * (it gives a non-finite row some code in range, which this pass overwrites), for grouped
 * rows; one group against one codebook takes vq_quantize_f32 (nearest.c), which does this
 * pass inside the search, a row block at a time.
 *
 * Rows x [m, groups, d]: row i has groups sub-rows of d floats; its codes and distances are
 * codes[i * groups + g], distances[i * groups + g] (the search's, indices into the group's own
 * book). The books: codebook [books * num_codes, d] with books = 1 (one shared codebook) or
 * books = groups (book g for group g). mask [m] holds optional row weights (1 without).
 *
 * Row i is valid when every one of its groups * d entries is finite. Then
 *   z_i = x_i, out_i = z_q_i = (c_{codes_ig})_g, loss += w_i sum_g ||x_ig - c_{codes_ig}||^2,
 *   weight += w_i, hist[book g][codes_ig] += w_i;
 * else z_i = 0, codes_ig = 0, distances_ig = NaN, out_i = z_q_i = (c_0 of each group's book),
 * and the row counts nowhere but in the invalid count.
 *
 * Threads: thread t takes rows [m t / T, m (t + 1) / T) with its own sums and a float64
 * histogram; these are added in thread order at the end, so the results depend on the thread
 * count, not on thread timing (and 0/1 weights give exact counts for any thread count).
 *
 * Status: the VQ_* codes of vqfunc_kernels.h.
 */
#define _DEFAULT_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "vqfunc_kernels.h"

/* The sums of one thread. */
typedef struct {
    double loss, weight;
    int64_t invalid;
} fused_sums;

/* Row i invalid: z_i = 0, its codes 0, distances NaN, out_i = z_q_i = code 0 of each group's
 * book. */
static void invalid_row(int64_t i, int64_t groups, int64_t d, const float *codebook,
                        int64_t books, int64_t num_codes, int64_t *codes, float *distances,
                        float *z, float *out, float *z_q) {
    const int64_t f = groups * d;
    memset(z + i * f, 0, sizeof(float) * (size_t)f);
    for (int64_t g = 0; g < groups; ++g) {
        const float *c0 = codebook + (books == 1 ? 0 : g) * num_codes * d;
        codes[i * groups + g] = 0;
        distances[i * groups + g] = NAN;
        memcpy(out + i * f + g * d, c0, sizeof(float) * (size_t)d);
        memcpy(z_q + i * f + g * d, c0, sizeof(float) * (size_t)d);
    }
}

/* The portable path: plain C loops. */
static int fused_rows_portable(const float *x, int64_t groups, int64_t d, const float *codebook,
                               int64_t books, int64_t num_codes, const float *mask,
                               int64_t *codes, float *distances, float *z, float *out, float *z_q,
                               uint8_t *valid, int64_t begin, int64_t end, double *hist,
                               fused_sums *sums) {
    const int64_t f = groups * d;
    double loss = 0.0, weight = 0.0;
    int64_t invalid = 0;
    for (int64_t i = begin; i < end; ++i) {
        const float *xi = x + i * f;
        float *zi = z + i * f;
        /* x * 0 is NaN exactly for NaN and +-inf: the probe is 0 when the row is finite. */
        float probe = 0.0f;
        for (int64_t j = 0; j < f; ++j) {
            zi[j] = xi[j];
            probe += xi[j] * 0.0f;
        }
        valid[i] = probe == 0.0f;
        if (!valid[i]) {
            ++invalid;
            invalid_row(i, groups, d, codebook, books, num_codes, codes, distances, z, out, z_q);
            continue;
        }
        const float w = mask ? mask[i] : 1.0f;
        double sq = 0.0;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t k = codes[i * groups + g], book = books == 1 ? 0 : g;
            if (k < 0 || k >= num_codes) return VQ_BAD_CODE;
            const float *c = codebook + (book * num_codes + k) * d, *xg = xi + g * d;
            float *o = out + i * f + g * d, *q = z_q + i * f + g * d;
            float part = 0.0f;
            for (int64_t j = 0; j < d; ++j) {
                o[j] = q[j] = c[j];
                const float e = xg[j] - c[j];
                part += e * e;
            }
            sq += part;
            hist[book * num_codes + k] += w;
        }
        loss += (double)w * sq;
        weight += w;
    }
    sums->loss = loss;
    sums->weight = weight;
    sums->invalid = invalid;
    return VQ_OK;
}

#ifdef VQ_X86
/* AVX2 + FMA (also for the AVX-512 path: the pass is bound by memory, not arithmetic). With
 * `stream`, the rows, codes and outputs are whole aligned vectors (d % 8 == 0, 32-byte aligned
 * pointers) and the outputs are written with non-temporal stores: they go to memory without
 * first reading the lines they overwrite, a third less traffic when the outputs exceed the
 * caches. */
TARGET static inline __attribute__((always_inline)) int fused_rows_avx2_body(
    const float *x, int64_t groups, int64_t d, const float *codebook, int64_t books,
    int64_t num_codes, const float *mask, int64_t *codes, float *distances, float *z, float *out,
    float *z_q, uint8_t *valid, int64_t begin, int64_t end, double *hist, fused_sums *sums,
    const int stream) {
    const int64_t f = groups * d;
    const __m256 zero = _mm256_setzero_ps();
    double loss = 0.0, weight = 0.0;
    int64_t invalid = 0;
    for (int64_t i = begin; i < end; ++i) {
        const float *xi = x + i * f;
        float *zi = z + i * f;
        __m256 probe = zero;
        int64_t j = 0;
        for (; j + 8 <= f; j += 8) {
            const __m256 v = _mm256_loadu_ps(xi + j);
            if (stream)
                _mm256_stream_ps(zi + j, v);
            else
                _mm256_storeu_ps(zi + j, v);
            probe = _mm256_add_ps(probe, _mm256_mul_ps(v, zero));
        }
        float tail = 0.0f;
        for (; j < f; ++j) {
            zi[j] = xi[j];
            tail += xi[j] * 0.0f;
        }
        const int ok = tail == 0.0f &&
                       _mm256_movemask_ps(_mm256_cmp_ps(probe, probe, _CMP_UNORD_Q)) == 0;
        valid[i] = (uint8_t)ok;
        if (!ok) {
            ++invalid;
            invalid_row(i, groups, d, codebook, books, num_codes, codes, distances, z, out, z_q);
            continue;
        }
        const float w = mask ? mask[i] : 1.0f;
        double sq = 0.0;
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t k = codes[i * groups + g], book = books == 1 ? 0 : g;
            if (k < 0 || k >= num_codes) return VQ_BAD_CODE;
            const float *c = codebook + (book * num_codes + k) * d, *xg = xi + g * d;
            float *o = out + i * f + g * d, *q = z_q + i * f + g * d;
            __m256 acc = zero;
            int64_t l = 0;
            for (; l + 8 <= d; l += 8) {
                const __m256 v = _mm256_loadu_ps(c + l);
                if (stream) {
                    _mm256_stream_ps(o + l, v);
                    _mm256_stream_ps(q + l, v);
                } else {
                    _mm256_storeu_ps(o + l, v);
                    _mm256_storeu_ps(q + l, v);
                }
                const __m256 e = _mm256_sub_ps(_mm256_loadu_ps(xg + l), v);
                acc = _mm256_fmadd_ps(e, e, acc);
            }
            float part = vq_lane_sum(acc);
            for (; l < d; ++l) {
                o[l] = q[l] = c[l];
                const float e = xg[l] - c[l];
                part += e * e;
            }
            sq += part;
            hist[book * num_codes + k] += w;
        }
        loss += (double)w * sq;
        weight += w;
    }
    sums->loss = loss;
    sums->weight = weight;
    sums->invalid = invalid;
    if (stream) _mm_sfence();
    return VQ_OK;
}

TARGET static int fused_rows_avx2(const float *x, int64_t groups, int64_t d,
                                  const float *codebook, int64_t books, int64_t num_codes,
                                  const float *mask, int64_t *codes, float *distances, float *z,
                                  float *out, float *z_q, uint8_t *valid, int64_t begin,
                                  int64_t end, double *hist, fused_sums *sums) {
    return fused_rows_avx2_body(x, groups, d, codebook, books, num_codes, mask, codes, distances,
                                z, out, z_q, valid, begin, end, hist, sums, 0);
}

TARGET static int fused_rows_avx2_stream(const float *x, int64_t groups, int64_t d,
                                         const float *codebook, int64_t books,
                                         int64_t num_codes, const float *mask, int64_t *codes,
                                         float *distances, float *z, float *out, float *z_q,
                                         uint8_t *valid, int64_t begin, int64_t end,
                                         double *hist, fused_sums *sums) {
    return fused_rows_avx2_body(x, groups, d, codebook, books, num_codes, mask, codes, distances,
                                z, out, z_q, valid, begin, end, hist, sums, 1);
}

/* Whether p is 32-byte aligned. */
static int aligned32(const void *p) { return ((uintptr_t)p & 31u) == 0; }
#endif

/* Asks the OS to back the whole 2 MiB pages of [p, p + bytes) with huge pages (on Linux, where
 * transparent huge pages are enabled for regions that ask): fresh output memory then costs one
 * fault per 2 MiB instead of one per 4 KiB page. Advisory; a refusal changes nothing. */
static void advise_huge_pages(void *p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    const uintptr_t begin = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    const uintptr_t end = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (end > begin) (void)madvise((void *)begin, end - begin, MADV_HUGEPAGE);
#if defined(MADV_POPULATE_WRITE)
    const uintptr_t page = 4096;
    const uintptr_t first = ((uintptr_t)p + page - 1) & ~(page - 1);
    const uintptr_t last = ((uintptr_t)p + bytes) & ~(page - 1);
    if (last > first) (void)madvise((void *)first, last - first, MADV_POPULATE_WRITE);
#endif
#else
    (void)p;
    (void)bytes;
#endif
}

/* The entry point: m rows on `threads` OpenMP threads. Writes z, out, z_q [m * groups * d],
 * valid [m], hist [books * num_codes] (the weighted counts, float32), *loss (the weighted sum
 * of squared differences over F = groups * d times the weight sum, at least 1: the commitment
 * loss) and *num_invalid; fixes codes and distances of invalid rows in place. With `stream`
 * (and sizes that allow it) the outputs are written with non-temporal stores. */
int vq_fused_forward_f32(const float *x, int64_t m, int64_t groups, int64_t d,
                         const float *codebook, int64_t books, int64_t num_codes,
                         const float *mask, int64_t *codes, float *distances, float *z,
                         float *out, float *z_q, uint8_t *valid, float *hist, float *loss,
                         int64_t *num_invalid, int stream, int threads, int isa) {
    if (!vq_isa_supported(isa) || groups < 1 || d < 1 || num_codes < 1) return VQ_UNSUPPORTED;
    if (books != 1 && books != groups) return VQ_UNSUPPORTED;
    if (threads < 1) return VQ_BAD_THREADS;
    int (*rows)(const float *, int64_t, int64_t, const float *, int64_t, int64_t, const float *,
                int64_t *, float *, float *, float *, float *, uint8_t *, int64_t, int64_t,
                double *, fused_sums *) = fused_rows_portable;
#ifdef VQ_X86
    if (isa != VQ_ISA_PORTABLE) {
        const int whole = d % 8 == 0 && aligned32(x) && aligned32(codebook) && aligned32(z) &&
                          aligned32(out) && aligned32(z_q);
        rows = stream && whole ? fused_rows_avx2_stream : fused_rows_avx2;
    }
#endif
    if (stream) {
        const size_t bytes = sizeof(float) * (size_t)(m * groups * d);
        advise_huge_pages(z, bytes);
        advise_huge_pages(out, bytes);
        advise_huge_pages(z_q, bytes);
    }
    const int64_t bins = books * num_codes;
    double *counts = calloc((size_t)threads * (size_t)bins, sizeof(double));
    fused_sums *sums = calloc((size_t)threads, sizeof(fused_sums));
    if (counts == NULL || sums == NULL) {
        free(counts);
        free(sums);
        return VQ_NO_MEMORY;
    }
    int status = VQ_OK;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
        const int result = rows(x, groups, d, codebook, books, num_codes, mask, codes, distances,
                                z, out, z_q, valid, m * t / threads, m * (t + 1) / threads,
                                counts + (int64_t)t * bins, sums + t);
        VQ_RECORD_FAILURE(status, result);
    }
    if (status == VQ_OK) {
        for (int64_t b = 0; b < bins; ++b) {
            double total = 0.0;
            for (int t = 0; t < threads; ++t) total += counts[(int64_t)t * bins + b];
            hist[b] = (float)total;
        }
        double total = 0.0, weight = 0.0;
        int64_t invalid = 0;
        for (int t = 0; t < threads; ++t) {
            total += sums[t].loss;
            weight += sums[t].weight;
            invalid += sums[t].invalid;
        }
        const double count = weight * (double)(groups * d);
        *loss = (float)(total / (count > 1.0 ? count : 1.0));
        *num_invalid = invalid;
    }
    free(counts);
    free(sums);
    return status;
}
