/* What the compiled CPU kernels of vqfunc share: status codes, the CPU check, the target
 * attribute of the vector code and small helpers. Plain C (no torch headers, no Python API);
 * vqfunc/_kernels/cpu.py builds nearest.c and straight_through.c with this header into one
 * library and maps the status codes below to Python errors.
 */
#ifndef VQFUNC_KERNELS_H
#define VQFUNC_KERNELS_H

#include <stdint.h>

/* Status codes of every entry point; vqfunc/_kernels/cpu.py keeps the same table. */
#define VQ_OK 0
#define VQ_UNSUPPORTED (-1)   /* an ISA path this CPU lacks, or bad sizes */
#define VQ_NO_MEMORY (-2)     /* a scratch allocation failed */
#define VQ_BAD_CODE (-3)      /* a code outside [0, num_codes) */
#define VQ_BAD_THREADS (-4)   /* inconsistent thread or buffer counts */

/* Codes per panel of the packed codebook (see nearest.c); cpu.py packs with the same value. */
#define PANEL 16

/* The ISA paths, chosen per call (cpu.py keeps the same numbers): plain C with GCC vector
 * extensions for any CPU, AVX2 + FMA, AVX-512 (F, with AVX2 and FMA), and AVX-512 with the
 * search's scores on the AMX tiles (AMX-TILE and AMX-BF16; the other kernels take their AVX2
 * code there). One library carries all of them; the CPU's features, read at run time, say
 * which may run. */
#define VQ_ISA_PORTABLE 0
#define VQ_ISA_AVX2 1
#define VQ_ISA_AVX512 2
#define VQ_ISA_AMX 3

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define VQ_X86 1
#define VQ_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define VQ_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define TARGET VQ_TARGET_AVX2

/* Whether this CPU runs the AVX2 + FMA code. */
static inline int vq_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Whether this CPU (and its OS, which must save the zmm registers) runs the AVX-512 code. */
static inline int vq_cpu_avx512(void) {
    __builtin_cpu_init();
    return vq_cpu_supported() && __builtin_cpu_supports("avx512f");
}

/* The AMX path needs a compiler with the tile intrinsics and Linux, whose processes ask for the
 * tile registers (arch_prctl). */
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) ||                 \
                           (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define VQ_HAVE_AMX 1
#define VQ_TARGET_AMX __attribute__((target("avx512f,avx2,fma,amx-tile,amx-bf16")))
/* Whether this process may run the AMX code (see nearest.c). */
int vq_cpu_amx(void);
#else
static inline int vq_cpu_amx(void) { return 0; }
#endif

/* Sum of the 8 lanes of v. */
TARGET static inline float vq_lane_sum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif

/* Whether this CPU runs the path `isa` (VQ_ISA_*). */
static inline int vq_isa_supported(int isa) {
#ifdef VQ_X86
    if (isa == VQ_ISA_AMX) return vq_cpu_amx();
    if (isa == VQ_ISA_AVX512) return vq_cpu_avx512();
    if (isa == VQ_ISA_AVX2) return vq_cpu_supported();
#endif
    return isa == VQ_ISA_PORTABLE;
}

/* What the search writes besides codes and distances when it also does quantize's forward
 * (vq_quantize_f32 in nearest.c): for each row block, once its codes are known and while its
 * rows are still in cache, the row's validity, z (the row, zeros where invalid), out and z_q
 * (the selected code, code 0 where invalid) and, per slice of rows, the weighted squared
 * distances, the weight sum, the invalid count and the weighted code counts. */
typedef struct {
    const float *mask;  /* [n] row weights, or NULL (all 1) */
    float *z, *out, *z_q; /* [n, d] */
    uint8_t *valid;     /* [n] */
    double *counts;     /* [slices, num_codes] */
    double *loss, *weight; /* [slices] */
    int64_t *invalid;   /* [slices] */
    int stream;         /* write z, out, z_q with non-temporal stores where they are aligned */
} vq_forward_outputs;

/* Records a thread's failure in the shared status of a parallel loop. */
#define VQ_RECORD_FAILURE(status, result)                                                  \
    do {                                                                                   \
        if ((result) != VQ_OK) {                                                           \
            _Pragma("omp atomic write") status = (result);                                 \
        }                                                                                  \
    } while (0)

#endif
