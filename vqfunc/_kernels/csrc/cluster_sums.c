/* The centroid update of Lloyd's k-means (vqfunc/_kmeans.py), for float32 rows: per code, the
 * sum of the rows assigned to it and their number, in one pass.
 *
 * Rows x [n, d] with codes [n] in [0, k): sums[c] = sum of x_i over codes_i == c, counts[c] =
 * the number of such rows. Each thread owns a contiguous range of codes and scans every code
 * (8 bytes a row), adding only the rows of its own codes, in row order. Every sum is therefore
 * accumulated in the same order as a serial pass over the rows, whatever the thread count: the
 * result is bit-identical to `torch.index_add_` on CPU and to itself on any machine, with no
 * per-thread buffers and no reduction. Rows are read once in all; the codes once per thread.
 *
 * Status: the VQ_* codes of vqfunc_kernels.h (VQ_BAD_CODE for a code outside [0, k), in which
 * case nothing is written).
 */
#include <stdint.h>
#include <string.h>

#include "vqfunc_kernels.h"

int vq_cluster_sums_f32(const float *x, int64_t n, int64_t d, const int64_t *codes, int64_t k,
                        float *sums, int64_t *counts, int threads) {
    if (n < 0 || d < 0 || k < 1 || threads < 1) return VQ_UNSUPPORTED;
    for (int64_t i = 0; i < n; ++i) {
        if (codes[i] < 0 || codes[i] >= k) return VQ_BAD_CODE;
    }
    /* One iteration per thread (serial without OpenMP: the same sums, in the same order). */
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
        const int64_t begin = k * t / threads, end = k * (t + 1) / threads;
        memset(sums + begin * d, 0, (size_t)((end - begin) * d) * sizeof(float));
        memset(counts + begin, 0, (size_t)(end - begin) * sizeof(int64_t));
        for (int64_t i = 0; i < n; ++i) {
            const int64_t c = codes[i];
            if (c < begin || c >= end) continue;
            float *s = sums + c * d;
            const float *row = x + i * d;
            for (int64_t j = 0; j < d; ++j) s[j] += row[j];
            counts[c] += 1;
        }
    }
    return VQ_OK;
}
