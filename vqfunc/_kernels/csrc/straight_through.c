/* The straight-through output and commitment loss of vqfunc/_kernels/straight_through.py, forward and backward,
 * for float32 rows: one pass over the rows each way, no temporaries. Two paths: AVX2 + FMA on
 * x86-64 (also used when the search runs its AVX-512 path: these kernels are bound by memory,
 * not by arithmetic), and plain C for any CPU (the portable path). Built with nearest.c into
 * one library by vqfunc/_kernels/cpu.py.
 *
 * Rows z [n, d] with codes [n] into codebook [num_codes, d]; diff_i = z_i - c_{codes_i}, w_i the
 * optional row weights (1 without).
 *
 * Forward (vq_st_forward_f32): out_i = z_q_i = c_{codes_i}, and the loss sum
 * sum_i w_i ||diff_i||^2, accumulated in double per slice of rows.
 *
 * Backward (vq_st_backward_f32), with g, gq the gradients of out and z_q (either may be NULL;
 * rows at a row stride, elements at a column stride, which is 0 for an expanded gradient):
 *   grad_z_i            = g_i + a_z w_i diff_i
 *   grad_cb_{codes_i}  += a_q w_i diff_i + nu g_i + gq_i
 * in one sweep over the rows (each row is read once for both). Each thread owns a range of rows
 * of grad_z and, up to `books` threads, a codebook-gradient buffer of its own, so no locks are
 * needed; the buffers are summed in order at the end, and each sums its rows in row order.
 *
 * Status: the VQ_* codes of vqfunc_kernels.h.
 */
#include <stdint.h>
#include <stdlib.h>

#include "vqfunc_kernels.h"

/* Row i of a gradient with element stride cs, as a contiguous pointer: the row itself when
 * cs == 1, else a copy in scratch. */
static const float *gradient_row(const float *g, int64_t rs, int64_t cs, int64_t i, int64_t d,
                                 float *scratch) {
    const float *row = g + i * rs;
    if (cs == 1) return row;
    if (cs == 0) {
        for (int64_t j = 0; j < d; ++j) scratch[j] = row[0];
    } else {
        for (int64_t j = 0; j < d; ++j) scratch[j] = row[j * cs];
    }
    return scratch;
}

/* The portable path: plain C loops (the compiler vectorises what it can). */
static int forward_rows_portable(const float *z, const float *codebook, const int64_t *codes,
                                 const float *weights, int64_t num_codes, int64_t d,
                                 int64_t row_begin, int64_t row_end, float *out, float *z_q,
                                 double *loss) {
    double total = 0.0;
    for (int64_t i = row_begin; i < row_end; ++i) {
        const int64_t k = codes[i];
        if (k < 0 || k >= num_codes) return VQ_BAD_CODE;
        const float *zi = z + i * d, *c = codebook + k * d;
        float *o = out + i * d, *q = z_q + i * d;
        float sq = 0.0f;
        for (int64_t j = 0; j < d; ++j) {
            o[j] = q[j] = c[j];
            const float e = zi[j] - c[j];
            sq += e * e;
        }
        total += weights ? (double)weights[i] * sq : (double)sq;
    }
    *loss = total;
    return VQ_OK;
}

static int backward_rows_portable(const float *z, const float *codebook, const int64_t *codes,
                                  const float *weights, int64_t num_codes, int64_t d,
                                  const float *g, int64_t g_rs, int64_t g_cs, const float *gq,
                                  int64_t gq_rs, int64_t gq_cs, float a_z, float a_q, float nu,
                                  float *grad_z, int64_t z_begin, int64_t z_end,
                                  float *grad_cb, int64_t cb_begin, int64_t cb_end) {
    float *scratch = malloc(sizeof(float) * 2 * (size_t)(d > 0 ? d : 1));
    if (scratch == NULL) return VQ_NO_MEMORY;
    int status = VQ_OK;
    const int64_t begin = z_begin < cb_begin ? z_begin : cb_begin;
    const int64_t end = z_end > cb_end ? z_end : cb_end;
    const int g_fixed = g != NULL && g_rs == 0 && g_cs == 0;
    const int gq_fixed = gq != NULL && gq_rs == 0 && gq_cs == 0;
    if (g_fixed) gradient_row(g, 0, 0, 0, d, scratch);
    if (gq_fixed) gradient_row(gq, 0, 0, 0, d, scratch + d);
    for (int64_t i = begin; i < end; ++i) {
        const int do_z = grad_z != NULL && i >= z_begin && i < z_end;
        const int do_cb = grad_cb != NULL && i >= cb_begin && i < cb_end;
        if (!do_z && !do_cb) continue;
        const int64_t k = codes[i];
        if (k < 0 || k >= num_codes) {
            status = VQ_BAD_CODE;
            break;
        }
        const float *zi = z + i * d, *c = codebook + k * d;
        const float *gi = !g ? NULL : g_fixed ? scratch : gradient_row(g, g_rs, g_cs, i, d, scratch);
        const float *qi = !gq || !do_cb ? NULL
                          : gq_fixed    ? scratch + d
                                        : gradient_row(gq, gq_rs, gq_cs, i, d, scratch + d);
        const float w = weights ? weights[i] : 1.0f;
        float *out = do_z ? grad_z + i * d : NULL;
        float *acc = do_cb ? grad_cb + k * d : NULL;
        for (int64_t j = 0; j < d; ++j) {
            const float e = zi[j] - c[j];
            const float gv = gi ? gi[j] : 0.0f;
            if (out) out[j] = gv + a_z * w * e;
            if (acc) acc[j] += nu * gv + a_q * w * e + (qi ? qi[j] : 0.0f);
        }
    }
    free(scratch);
    return status;
}

#ifdef VQ_X86

TARGET static int forward_rows_avx2(const float *z, const float *codebook, const int64_t *codes,
                               const float *weights, int64_t num_codes, int64_t d,
                               int64_t row_begin, int64_t row_end, float *out, float *z_q,
                               double *loss) {
    double total = 0.0;
    for (int64_t i = row_begin; i < row_end; ++i) {
        const int64_t k = codes[i];
        if (k < 0 || k >= num_codes) return VQ_BAD_CODE;
        const float *zi = z + i * d, *c = codebook + k * d;
        float *o = out + i * d, *q = z_q + i * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            const __m256 v = _mm256_loadu_ps(c + j);
            _mm256_storeu_ps(o + j, v);
            _mm256_storeu_ps(q + j, v);
            const __m256 e = _mm256_sub_ps(_mm256_loadu_ps(zi + j), v);
            acc = _mm256_fmadd_ps(e, e, acc);
        }
        float sq = vq_lane_sum(acc);
        for (; j < d; ++j) {
            o[j] = q[j] = c[j];
            const float e = zi[j] - c[j];
            sq += e * e;
        }
        total += weights ? (double)weights[i] * sq : (double)sq;
    }
    *loss = total;
    return VQ_OK;
}

TARGET static int backward_rows_avx2(const float *z, const float *codebook, const int64_t *codes,
                                const float *weights, int64_t num_codes, int64_t d,
                                const float *g, int64_t g_rs, int64_t g_cs, const float *gq,
                                int64_t gq_rs, int64_t gq_cs, float a_z, float a_q, float nu,
                                float *grad_z, int64_t z_begin, int64_t z_end, float *grad_cb,
                                int64_t cb_begin, int64_t cb_end) {
    float *scratch = malloc(sizeof(float) * 2 * (size_t)(d > 0 ? d : 1));
    if (scratch == NULL) return VQ_NO_MEMORY;
    int status = VQ_OK;
    const int64_t begin = z_begin < cb_begin ? z_begin : cb_begin;
    const int64_t end = z_end > cb_end ? z_end : cb_end;
    const __m256 nuv = _mm256_set1_ps(nu);
    /* A fully expanded gradient (both strides 0, what `out.sum()` sends back) is one row for
     * all rows: copied once here. */
    const int g_fixed = g != NULL && g_rs == 0 && g_cs == 0;
    const int gq_fixed = gq != NULL && gq_rs == 0 && gq_cs == 0;
    if (g_fixed) gradient_row(g, 0, 0, 0, d, scratch);
    if (gq_fixed) gradient_row(gq, 0, 0, 0, d, scratch + d);
    for (int64_t i = begin; i < end; ++i) {
        const int do_z = grad_z != NULL && i >= z_begin && i < z_end;
        const int do_cb = grad_cb != NULL && i >= cb_begin && i < cb_end;
        if (!do_z && !do_cb) continue;
        const int64_t k = codes[i];
        if (k < 0 || k >= num_codes) {
            status = VQ_BAD_CODE;
            break;
        }
        const float *zi = z + i * d, *c = codebook + k * d;
        const float *gi = !g ? NULL : g_fixed ? scratch : gradient_row(g, g_rs, g_cs, i, d, scratch);
        const float *qi = !gq || !do_cb ? NULL
                          : gq_fixed    ? scratch + d
                                        : gradient_row(gq, gq_rs, gq_cs, i, d, scratch + d);
        const float w = weights ? weights[i] : 1.0f;
        const __m256 szv = _mm256_set1_ps(a_z * w), sqv = _mm256_set1_ps(a_q * w);
        float *out = do_z ? grad_z + i * d : NULL;
        float *acc = do_cb ? grad_cb + k * d : NULL;
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            const __m256 e = _mm256_sub_ps(_mm256_loadu_ps(zi + j), _mm256_loadu_ps(c + j));
            const __m256 gv = gi ? _mm256_loadu_ps(gi + j) : _mm256_setzero_ps();
            if (out) _mm256_storeu_ps(out + j, _mm256_fmadd_ps(szv, e, gv));
            if (acc) {
                __m256 row = _mm256_fmadd_ps(nuv, gv, _mm256_mul_ps(sqv, e));
                if (qi) row = _mm256_add_ps(row, _mm256_loadu_ps(qi + j));
                _mm256_storeu_ps(acc + j, _mm256_add_ps(_mm256_loadu_ps(acc + j), row));
            }
        }
        for (; j < d; ++j) {
            const float e = zi[j] - c[j];
            const float gv = gi ? gi[j] : 0.0f;
            if (out) out[j] = gv + a_z * w * e;
            if (acc) acc[j] += nu * gv + a_q * w * e + (qi ? qi[j] : 0.0f);
        }
    }
    free(scratch);
    return status;
}

#endif

/* The entry points: n rows on `threads` OpenMP threads (the runtime torch uses, when it is
 * loaded: one pool, no oversubscription). */

/* Forward: rows in `slices` equal slices, handed out dynamically; slice s writes its sum to
 * partial[s] (the caller adds them in order, so the loss does not depend on the threads). */
int vq_st_forward_f32(const float *z, const float *codebook, const int64_t *codes,
                      const float *weights, int64_t num_codes, int64_t d, int64_t n, float *out,
                      float *z_q, double *partial, int64_t slices, int threads, int isa) {
    if (!vq_isa_supported(isa)) return VQ_UNSUPPORTED;
    int (*rows)(const float *, const float *, const int64_t *, const float *, int64_t, int64_t,
                int64_t, int64_t, float *, float *, double *) = forward_rows_portable;
#ifdef VQ_X86
    if (isa != VQ_ISA_PORTABLE) rows = forward_rows_avx2;
#endif
    int status = VQ_OK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t s = 0; s < slices; ++s) {
        const int result = rows(z, codebook, codes, weights, num_codes, d,
                                        n * s / slices, n * (s + 1) / slices, out, z_q,
                                        partial + s);
        VQ_RECORD_FAILURE(status, result);
    }
    return status;
}

/* Backward: job t < threads computes rows [n t / T, n (t + 1) / T) of grad_z and, for t < books,
 * scatter-adds rows [n t / B, n (t + 1) / B) into its codebook-gradient buffer: grad_cb for
 * job 0, extra + (t - 1) num_codes d for the others, all zero on entry. The extra buffers are
 * then added to grad_cb in order (so the result depends on `books`, not on thread timing). */
int vq_st_backward_f32(const float *z, const float *codebook, const int64_t *codes,
                       const float *weights, int64_t num_codes, int64_t d, int64_t n,
                       const float *g, int64_t g_rs, int64_t g_cs, const float *gq,
                       int64_t gq_rs, int64_t gq_cs, float a_z, float a_q, float nu,
                       float *grad_z, float *grad_cb, float *extra, int64_t books, int threads,
                       int isa) {
    if (!vq_isa_supported(isa)) return VQ_UNSUPPORTED;
    int (*rows)(const float *, const float *, const int64_t *, const float *, int64_t, int64_t,
                const float *, int64_t, int64_t, const float *, int64_t, int64_t, float, float,
                float, float *, int64_t, int64_t, float *, int64_t, int64_t) =
        backward_rows_portable;
#ifdef VQ_X86
    if (isa != VQ_ISA_PORTABLE) rows = backward_rows_avx2;
#endif
    if (threads < 1 || books > threads || (grad_cb != NULL && books < 1)) return VQ_BAD_THREADS;
    int status = VQ_OK;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
    for (int t = 0; t < threads; ++t) {
        const int owns = grad_cb != NULL && t < books;
        float *buffer = owns ? (t == 0 ? grad_cb : extra + (t - 1) * num_codes * d) : NULL;
        const int result = rows(
            z, codebook, codes, weights, num_codes, d, g, g_rs, g_cs, gq, gq_rs, gq_cs, a_z,
            a_q, nu, grad_z, n * t / threads, n * (t + 1) / threads, buffer,
            owns ? n * t / books : 0, owns ? n * (t + 1) / books : 0);
        VQ_RECORD_FAILURE(status, result);
    }
    if (status != 0 || grad_cb == NULL || books < 2) return status;
    const int64_t size = num_codes * d;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t e = 0; e < size; ++e)
        for (int64_t b = 0; b + 1 < books; ++b) grad_cb[e] += extra[b * size + e];
    return VQ_OK;
}
