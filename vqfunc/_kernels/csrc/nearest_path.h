/* One ISA path of the nearest-code search (see nearest.c), written once with GCC vector
 * extensions and instantiated by nearest.c for each path. Before including it, nearest.c
 * defines:
 *
 *   PATH(name)     the name with the path's suffix (name##_avx512, ...)
 *   PATH_TARGET    the function attribute of the path's code (a target, or nothing)
 *   LANES          floats per vector (16, 8 or 4)
 *   TILE_ROWS      rows of a register tile
 *   SMALL_TILE_ROWS  rows of a register tile for d <= SMALL_TILE_D (at most TILE_ROWS)
 *   TILE_PANELS    panels (of PANEL codes) of a register tile
 *   V_MIN(a, b)    the lane-wise minimum, b where either is NaN (as x86 minps)
 *   FMA_CHAINS     independent accumulators of the FMA probe
 *   V_STEP(a, x, b)      one step a - x b of the scores (vectors a, b, scalar x): one fused
 *                  multiply-subtract where the path has FMA
 *   V_TRACK(w, a, m, i)  the int vector i in the lanes where a < m (ordered), w elsewhere: a
 *                  compare and a blend
 *   V_STREAMS      1 where the path has non-temporal stores, else 0
 *   V_STREAM(p, v) a non-temporal store of v at the vector-aligned p (a plain store without)
 *   V_STREAM_FENCE()  orders the non-temporal stores before later stores
 *
 * A register tile holds TILE_ROWS x TILE_PANELS x (PANEL / LANES) accumulators; the scores are
 * s(x, k) = h_k - x . c_k, each one accumulated by the same sequence of steps (V_STEP in the
 * tile loop and in the small-d recomputation of a group: fused multiply-subtracts where the path
 * has FMA), so the two agree bit for bit. Everything is undefined again at the end of the file.
 */

#define VPP (PANEL / LANES)             /* vectors per panel */
#define NV (TILE_PANELS * VPP)          /* vectors per row of a register tile */

typedef float PATH(vf) __attribute__((vector_size(4 * LANES)));
typedef int32_t PATH(vi) __attribute__((vector_size(4 * LANES)));
typedef float PATH(vfu) __attribute__((vector_size(4 * LANES), aligned(4), may_alias));
typedef int32_t PATH(viu) __attribute__((vector_size(4 * LANES), aligned(4), may_alias));
#define VF PATH(vf)
#define VI PATH(vi)
#define INLINE PATH_TARGET static inline __attribute__((always_inline))

INLINE VF PATH(load)(const float *p) { return *(const PATH(vfu) *)p; }
INLINE VI PATH(loadi)(const int32_t *p) { return *(const PATH(viu) *)p; }
INLINE void PATH(store)(float *p, VF v) { *(PATH(vfu) *)p = v; }
INLINE void PATH(storei)(int32_t *p, VI v) { *(PATH(viu) *)p = v; }
/* x in every lane (x - 0 is x, -0 included). */
INLINE VF PATH(splat)(float x) { return x - (VF){0}; }
/* Lanes of a where mask is set, of b elsewhere. */
INLINE VF PATH(select)(VI mask, VF a, VF b) {
    return (VF)((mask & (VI)a) | (~mask & (VI)b));
}
INLINE VI PATH(selecti)(VI mask, VI a, VI b) { return (mask & a) | (~mask & b); }

/* 0, 1, ..., LANES - 1. */
INLINE VI PATH(iota)(void) {
    VI v;
#pragma GCC unroll 16
    for (int l = 0; l < LANES; ++l) v[l] = l;
    return v;
}
/* Lane-wise minimum of int vectors. */
INLINE VI PATH(imin)(VI a, VI b) {
    const VI lt = a < b;
    return (lt & a) | (~lt & b);
}
/* The minimum of the lanes of v in every lane: a butterfly of shuffles. */
INLINE VF PATH(all_min)(VF v) {
#pragma GCC unroll 8
    for (int s = LANES / 2; s >= 1; s /= 2) v = V_MIN(__builtin_shuffle(v, PATH(iota)() ^ s), v);
    return v;
}
/* The sum of the lanes of v in every lane: a butterfly of shuffles (log2 LANES dependent adds,
 * not LANES). */
INLINE VF PATH(all_sum)(VF v) {
#pragma GCC unroll 8
    for (int s = LANES / 2; s >= 1; s /= 2) v += __builtin_shuffle(v, PATH(iota)() ^ s);
    return v;
}
INLINE VI PATH(all_imin)(VI v) {
#pragma GCC unroll 8
    for (int s = LANES / 2; s >= 1; s /= 2)
        v = PATH(imin)(__builtin_shuffle(v, PATH(iota)() ^ s), v);
    return v;
}

/* First code of group g whose score for row x equals `target`, or -1. */
INLINE int64_t PATH(rescan_panels)(const float *x, int64_t d, const float *packed,
                                   const float *half_norms, int64_t gp, int64_t g,
                                   float target) {
    const float *pp = packed + g * gp * d * PANEL;
    const float *hn = half_norms + g * gp * PANEL;
    VF a[MAX_GROUP_PANELS * VPP];
    for (int v = 0; v < gp * VPP; ++v) a[v] = PATH(load)(hn + v * LANES);
    for (int64_t j = 0; j < d; ++j) {
        const float xj = x[j];
        for (int p = 0; p < gp; ++p)
            for (int v = 0; v < VPP; ++v)
                a[p * VPP + v] = V_STEP(a[p * VPP + v], xj,
                                        PATH(load)(pp + p * d * PANEL + j * PANEL + v * LANES));
    }
    /* The smallest code whose score equals the target, with vector compares. */
    const VF want = PATH(splat)(target);
    const VI none = INT32_MAX + (VI){0};
    VI first = none;
    for (int v = 0; v < gp * VPP; ++v) {
        const VI eq = a[v] == want;
        const VI code = PATH(iota)() + (int32_t)(g * gp * PANEL + v * LANES);
        first = PATH(imin)(first, (eq & code) | (~eq & none));
    }
    const int32_t code = PATH(all_imin)(first)[0];
    return code == INT32_MAX ? -1 : code;
}

/* rescan_panels with gp a compile-time constant, so that its accumulators stay in registers. */
PATH_TARGET static int64_t PATH(rescan_group)(const float *x, int64_t d, const float *packed,
                                              const float *half_norms, int64_t gp, int64_t g,
                                              float target) {
    switch (gp) {
        case 1:
            return PATH(rescan_panels)(x, d, packed, half_norms, 1, g, target);
        case 2:
            return PATH(rescan_panels)(x, d, packed, half_norms, 2, g, target);
        case 4:
            return PATH(rescan_panels)(x, d, packed, half_norms, 4, g, target);
        default:
            return PATH(rescan_panels)(x, d, packed, half_norms, MAX_GROUP_PANELS, g, target);
    }
}

/* The first code reaching the row's minimum, from the row's lane minima (d > SMALL_RESCAN_D,
 * where the tile loop tracks them): lane l of the minima covers the codes
 * c = g gp PANEL + q LANES + l (q < gp VPP) of every group g, and best_group[l], best_q[l] name
 * the first code of lane l reaching best[l]. Codes grow with the group, so the first code
 * reaching the minimum is the smallest of those named by the lanes that hold it: one
 * reduction for the minimum and one for the code, nothing recomputed. Lane minima are never
 * NaN (all +inf where every score was NaN: code 0 then). */
INLINE int64_t PATH(tracked_code)(const float *best, const int32_t *best_group,
                                  const int32_t *best_q, int64_t gp) {
    const VF b = PATH(load)(best);
    const VI holds = b == PATH(all_min)(b);
    const VI code = PATH(loadi)(best_group) * (int32_t)(gp * PANEL) +
                    PATH(loadi)(best_q) * LANES + PATH(iota)();
    return PATH(all_imin)(PATH(selecti)(holds, code, INT32_MAX + (VI){0}))[0];
}

/* out[0:d] = x[0:d] - center[0:d], with vectors (the buffers may not overlap; the compiler
 * cannot know that and would not vectorise the plain loop). */
INLINE void PATH(centre_row)(const float *x, const float *center, int64_t d, float *out) {
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES)
        PATH(store)(out + j, PATH(load)(x + j) - PATH(load)(center + j));
    for (; j < d; ++j) out[j] = x[j] - center[j];
}

/* ||x - c||^2 over d floats: LANES partial sums, then 4 for the next whole quarter-vectors
 * (d = 8 on the 16-lane path), then the last entries one by one. With `copy` (a compile-time
 * constant at every call), also z = x and out = z_q = c, and *finite = whether every entry of
 * x is finite (x * 0 is NaN exactly for NaN and +-inf); the caller fixes an invalid row. One
 * sequence of operations for both uses, so a search's distance and quantize's agree bit for
 * bit. */
typedef float PATH(v4u) __attribute__((vector_size(16), aligned(4), may_alias));
/* With `stream` (compile-time too; only where z, out and z_q are vector-aligned and d is whole
 * vectors) the copies go out with non-temporal stores, which do not read the lines they fill. */
INLINE float PATH(row_pass)(const float *x, const float *c, int64_t d, float *z, float *out,
                            float *z_q, int *finite, const int copy, const int stream) {
    VF acc = {0}, probe = {0};
    int64_t j = 0;
    for (; j + LANES <= d; j += LANES) {
        const VF xv = PATH(load)(x + j), cv = PATH(load)(c + j);
        if (copy && stream) {
            V_STREAM(z + j, xv);
            V_STREAM(out + j, cv);
            V_STREAM(z_q + j, cv);
        } else if (copy) {
            PATH(store)(z + j, xv);
            PATH(store)(out + j, cv);
            PATH(store)(z_q + j, cv);
        }
        if (copy) probe += xv * (VF){0};
        const VF diff = xv - cv;
        acc += diff * diff;
    }
    float sq = PATH(all_sum)(acc)[0];
    PATH(v4u) acc4 = {0}, probe4 = {0};
    for (; j + 4 <= d; j += 4) {
        const PATH(v4u) xv = *(const PATH(v4u) *)(x + j), cv = *(const PATH(v4u) *)(c + j);
        if (copy) {
            *(PATH(v4u) *)(z + j) = xv;
            *(PATH(v4u) *)(out + j) = cv;
            *(PATH(v4u) *)(z_q + j) = cv;
            probe4 += xv * (PATH(v4u)){0};
        }
        const PATH(v4u) diff = xv - cv;
        acc4 += diff * diff;
    }
    sq += (acc4[0] + acc4[2]) + (acc4[1] + acc4[3]);
    float tail = 0.0f;
    for (; j < d; ++j) {
        if (copy) {
            z[j] = x[j];
            out[j] = z_q[j] = c[j];
            tail += x[j] * 0.0f;
        }
        sq += (x[j] - c[j]) * (x[j] - c[j]);
    }
    if (copy) {
        /* NaN propagates through the sums: one compare says whether any lane saw one. */
        const float any = PATH(all_sum)(probe)[0] +
                          ((probe4[0] + probe4[1]) + (probe4[2] + probe4[3])) + tail;
        *finite = any == any;
    }
    return sq;
}

/* ||x - c|| over d floats (see row_pass). */
INLINE float PATH(distance)(const float *x, const float *c, int64_t d) {
    return sqrtf(PATH(row_pass)(x, c, d, NULL, NULL, NULL, NULL, 0, 0));
}

/* The minimum v of a row's lane minima, and the first group g holding it (the smallest group
 * among the lanes that hold v). Lane minima are never NaN. */
INLINE void PATH(row_minimum)(const float *best, const int32_t *best_group, float *v,
                              int32_t *g) {
    const VF b = PATH(load)(best);
    const VF m = PATH(all_min)(b);
    const VI holds = b == m;
    const VI groups = (holds & PATH(loadi)(best_group)) | (~holds & (INT32_MAX + (VI){0}));
    *v = m[0];
    *g = PATH(all_imin)(groups)[0];
}

/* Fold one group's lane minima m (first reached at vectors q of the group) into best /
 * best_group / best_q (branch-free; best_q only when `track`). */
INLINE void PATH(record_group)(VF m, VI q, int64_t g, float *best, int32_t *best_group,
                               int32_t *best_q, const int track) {
    const VF prev = PATH(load)(best);
    /* Neither is NaN, so the minimum is m exactly where m < prev, as the tracked ids are
     * (one compare for all three where the path has mask registers). */
    PATH(store)(best, V_MIN(m, prev));
    PATH(storei)(best_group, V_TRACK(PATH(loadi)(best_group), m, prev, (int32_t)g + (VI){0}));
    if (track) PATH(storei)(best_q, V_TRACK(PATH(loadi)(best_q), m, prev, q));
}

/* The scores of TILE_PANELS panels (at pp, half norms at hn) for the R rows at xt (row
 * stride d), reduced to each row's lane minima and, with `track`, the vector (0 .. NV - 1) of
 * each lane where its minimum first occurs: a lane moves on to vector v only where v's score
 * is below the minimum so far, exactly where the minimum itself moves (V_MIN(a, m) is a where
 * a < m, else m). `d` and `track` are compile-time constants at the specialised call sites,
 * which lets the compiler unroll the dimension loop. */
INLINE void PATH(panel_minima)(const float *xt, int64_t d, const float *pp, const float *hn,
                               VF minima[TILE_ROWS], VI which[TILE_ROWS], const int track,
                               const int R) {
    VF h[NV], b[NV], a[TILE_ROWS][NV];
    for (int v = 0; v < NV; ++v) h[v] = PATH(load)(hn + v * LANES);
    /* An opaque copy of the row pointer: keeps the compiler from hoisting one address per row
     * and dimension out of the loop (and spilling them). */
    const float *xr = xt;
    __asm__("" : "+r"(xr));
    for (int v = 0; v < NV; ++v) b[v] = PATH(load)(pp + (v / VPP) * d * PANEL + (v % VPP) * LANES);
    for (int i = 0; i < R; ++i) {
        const float x0 = xr[i * d];
        for (int v = 0; v < NV; ++v) a[i][v] = V_STEP(h[v], x0, b[v]);
    }
#pragma GCC unroll 4
    for (int64_t j = 1; j < d; ++j) {
        for (int v = 0; v < NV; ++v)
            b[v] = PATH(load)(pp + (v / VPP) * d * PANEL + j * PANEL + (v % VPP) * LANES);
        for (int i = 0; i < R; ++i) {
            const float xj = xr[i * d + j];
            for (int v = 0; v < NV; ++v) a[i][v] = V_STEP(a[i][v], xj, b[v]);
        }
    }
    for (int i = 0; i < R; ++i) {
        VF m = a[i][0];
        VI w = (VI){0};
        for (int v = 1; v < NV; ++v) {
            if (track) w = V_TRACK(w, a[i][v], m, v + (VI){0});
            m = V_MIN(a[i][v], m);
        }
        minima[i] = m;
        which[i] = w;
    }
}

/* Lane minima of the scores of the R rows at xt (R a compile-time constant) against the codes
 * of groups [g0, g1) of gp panels, folded into best/best_group/best_q (rows past `rows` are
 * ignored). */
INLINE void PATH(tile)(const float *xt, int rows, int64_t d, const float *packed,
                       const float *half_norms, int64_t gp, int64_t g0, int64_t g1,
                       float (*best)[LANES], int32_t (*best_group)[LANES],
                       int32_t (*best_q)[LANES], const int track, const int R) {
    for (int64_t g = g0; g < g1; ++g) {
        VF m[TILE_ROWS];
        VI q[TILE_ROWS];
        for (int i = 0; i < R; ++i) {
            m[i] = PATH(splat)(INFINITY);
            q[i] = (VI){0};
        }
        for (int64_t p = g * gp; p < (g + 1) * gp; p += TILE_PANELS) {
            VF minima[TILE_ROWS];
            VI which[TILE_ROWS];
            PATH(panel_minima)(xt, d, packed + p * d * PANEL, half_norms + p * PANEL, minima,
                               which, track, R);
            /* The vectors of this call are q = (p - g gp) VPP + which of the group; the first
             * call's are taken as they are (where its minima are not below +inf, the lane
             * records nothing for this group). */
            const int32_t first = (int32_t)((p - g * gp) * VPP);
            /* min(score, m) keeps m when a score is NaN. */
            for (int i = 0; i < R; ++i) {
                if (track) q[i] = first == 0 ? which[i] : V_TRACK(q[i], minima[i], m[i], which[i] + first);
                m[i] = V_MIN(minima[i], m[i]);
            }
        }
        for (int i = 0; i < rows; ++i)
            PATH(record_group)(m[i], q[i], g, best[i], best_group[i], best_q[i], track);
    }
}

/* Large d: TILE_PANELS panels against the TILE_ROWS rows at xt, folded into the rows' running
 * minima m (in memory). The caller sweeps every row tile of a row block over them, so the
 * panels stay in L1 instead of streaming from L2 per tile. */
PATH_TARGET static void PATH(panel_tile)(const float *xt, int64_t d, const float *pp,
                                         const float *hn, float (*m)[LANES],
                                         int32_t (*mq)[LANES], int32_t first) {
    VF minima[TILE_ROWS];
    VI which[TILE_ROWS];
    PATH(panel_minima)(xt, d, pp, hn, minima, which, 1, TILE_ROWS);
    for (int i = 0; i < TILE_ROWS; ++i) {
        const VF prev = PATH(load)(m[i]);
        PATH(storei)(mq[i], V_TRACK(PATH(loadi)(mq[i]), minima[i], prev, which[i] + first));
        PATH(store)(m[i], V_MIN(minima[i], prev));
    }
}

/* The first code reaching the row's minimum, from the lane minima of its row block (best,
 * best_group, best_q), or -1: for small d the row's minimum v first occurs in group g, which
 * is recomputed with vectors (a few KiB of panels; the tile loop tracks nothing there); for
 * larger d the vectors the tile loop tracked name the code. */
INLINE int64_t PATH(row_code)(const float *row, int64_t d, const float *packed,
                              const float *half_norms, int64_t gp, const float *best,
                              const int32_t *best_group, const int32_t *best_q) {
    if (d > SMALL_RESCAN_D) return PATH(tracked_code)(best, best_group, best_q, gp);
    float v;
    int32_t g;
    PATH(row_minimum)(best, best_group, &v, &g);
    return g != INT32_MAX ? PATH(rescan_group)(row, d, packed, half_norms, gp, g, v) : -1;
}

/* The rows of a register tile for code dimension D (see SMALL_TILE_D). */
#define TILE_ROWS_FOR(D) ((D) <= SMALL_TILE_D ? SMALL_TILE_ROWS : TILE_ROWS)
/* The row tile at xt against a code block, for dimension D in tiles of R rows (both
 * compile-time constants at the specialised call sites). */
#define TILE_CALL(D, R)                                                                   \
    PATH(tile)(xt, rows, D, packed, half_norms, gp, g0, g1, best + (t - r0),              \
               best_group + (t - r0), best_q + (t - r0), (D) > SMALL_RESCAN_D, R)
#define TILE_CASE(D)                                                                      \
    case D:                                                                               \
        TILE_CALL(D, TILE_ROWS_FOR(D));                                                   \
        break;

/* Rows [row_begin, row_end) of x (row r at x + r stride): see vq_nearest_f32 in nearest.c
 * (the arguments are the same). With `fwd` (not NULL), also quantize's forward of these rows,
 * its sums and counts into entry `slice` of fwd's per-slice arrays (see vq_forward_outputs).
 * With `amx` (not NULL, on a path with PATH_AMX), the rows' codes come from the AMX tiles (see
 * nearest_amx.h) and a row they leave open from this path's register tiles. */
PATH_TARGET static int PATH(nearest_rows)(const float *x, int64_t row_begin, int64_t row_end,
                                          int64_t d, int64_t stride, const float *packed,
                                          const float *half_norms, int64_t panels,
                                          int64_t num_codes, const float *codebook,
                                          const float *center, int64_t *codes,
                                          float *distances, const vq_forward_outputs *fwd,
                                          int64_t slice, const vq_amx_codes *amx) {
    double loss = 0.0, weight = 0.0;
    int64_t invalid = 0;
    double *counts = fwd ? fwd->counts + slice * num_codes : NULL;
    const uintptr_t vector_bytes = 4 * LANES;
    const int stream = V_STREAMS && fwd != NULL && fwd->stream && d % LANES == 0 &&
                       (((uintptr_t)fwd->z | (uintptr_t)fwd->out | (uintptr_t)fwd->z_q) &
                        (vector_bytes - 1)) == 0;
    /* One heap buffer (nothing large on the thread stack): the centred rows of one block,
     * padded with its last row to whole tiles, then the lane minima of the block's rows (best,
     * best_group, best_q) and of one group (minima, minima_q). */
    const size_t block_floats = (size_t)(ROW_BLOCK + TILE_ROWS) * (size_t)d;
    const size_t lanes = (size_t)(5 * ROW_BLOCK + 2 * TILE_ROWS) * LANES;
#if PATH_AMX
    /* The AMX path's scratch (64-byte aligned) and codes of one block. */
    const size_t amx_bytes =
        amx ? amx_scratch_bytes(amx->tiles) + ROW_BLOCK * sizeof(int64_t) + 64 : 0;
#else
    const size_t amx_bytes = 0;
    (void)amx;
#endif
    float *block = malloc(sizeof(float) * (block_floats + lanes) + amx_bytes);
    if (block == NULL) return VQ_NO_MEMORY;
    float *lane_rows = block + block_floats;
    float (*best)[LANES] = (float (*)[LANES])lane_rows;
    int32_t (*best_group)[LANES] = (int32_t (*)[LANES])(lane_rows + ROW_BLOCK * LANES);
    int32_t (*best_q)[LANES] = (int32_t (*)[LANES])(lane_rows + 2 * ROW_BLOCK * LANES);
    float (*minima)[LANES] = (float (*)[LANES])(lane_rows + 3 * ROW_BLOCK * LANES);
    int32_t (*minima_q)[LANES] =
        (int32_t (*)[LANES])(lane_rows + (4 * ROW_BLOCK + TILE_ROWS) * LANES);
#if PATH_AMX
    /* With amx: the AMX path's scratch, and its codes of a block (-1: left open); NULL once
     * the slice goes without it. */
    void *amx_scratch = (void *)(((uintptr_t)(lane_rows + lanes) + 63) & ~(uintptr_t)63);
    int64_t *amx_code =
        amx ? (int64_t *)((char *)amx_scratch + amx_scratch_bytes(amx->tiles)) : NULL;
#endif
    /* Panels per group (see group_panels); a group holds whole register tiles. The packed
     * codebook holds whole groups (vq_padded_codes). */
    int64_t gp = group_panels(d, num_codes);
    if (gp < TILE_PANELS) gp = TILE_PANELS;
    const int64_t groups = panels / gp;
    /* A code block of about CODE_BLOCK_BYTES stays in L1 while a row tile sweeps it. */
    int64_t block_groups = CODE_BLOCK_BYTES / (gp * PANEL * d * (int64_t)sizeof(float));
    if (block_groups < 1) block_groups = 1;
    for (int64_t r0 = row_begin; r0 < row_end; r0 += ROW_BLOCK) {
        const int64_t r1 = r0 + ROW_BLOCK < row_end ? r0 + ROW_BLOCK : row_end;
        for (int64_t i = 0; i < r1 - r0; ++i) {
            PATH(store)(best[i], PATH(splat)(INFINITY));
            PATH(storei)(best_group[i], (VI){0});
            PATH(storei)(best_q[i], (VI){0});
        }
        for (int64_t i = 0; i < r1 - r0 + TILE_ROWS; ++i) {
            const int64_t r = r0 + i < r1 ? r0 + i : r1 - 1;
            PATH(centre_row)(x + r * stride, center, d, block + i * d);
        }
        /* The AMX tiles' codes of the block, unless they left more than AMX_OPEN_ROWS rows
         * open: then this path's tiles score the whole block, and the rest of the slice
         * (data the bound does not suit: a slice pays for one such block, not every one). */
        const int64_t *tile_code = NULL;
#if PATH_AMX
        if (amx_code) {
            amx_rows(block, (int)(r1 - r0), d, amx, packed, half_norms, panels, amx_scratch,
                     amx_code);
            int64_t open = 0;
            for (int64_t i = 0; i < r1 - r0; ++i) open += amx_code[i] < 0;
            if (open <= AMX_OPEN_ROWS)
                tile_code = amx_code;
            else
                amx_code = NULL;
        }
#endif
        for (int64_t g0 = 0; g0 < (tile_code ? 0 : groups); g0 += block_groups) {
            const int64_t g1 = g0 + block_groups < groups ? g0 + block_groups : groups;
            if (d >= PANEL_MAJOR_D) {
                for (int64_t g = g0; g < g1; ++g) {
                    for (int64_t i = 0; i < r1 - r0 + TILE_ROWS; ++i) {
                        PATH(store)(minima[i], PATH(splat)(INFINITY));
                        PATH(storei)(minima_q[i], (VI){0});
                    }
                    for (int64_t p = g * gp; p < (g + 1) * gp; p += TILE_PANELS)
                        for (int64_t t = r0; t < r1; t += TILE_ROWS)
                            PATH(panel_tile)(block + (t - r0) * d, d, packed + p * d * PANEL,
                                             half_norms + p * PANEL, minima + (t - r0),
                                             minima_q + (t - r0), (int32_t)((p - g * gp) * VPP));
                    for (int64_t i = 0; i < r1 - r0; ++i)
                        PATH(record_group)(PATH(load)(minima[i]), PATH(loadi)(minima_q[i]), g,
                                           best[i], best_group[i], best_q[i], 1);
                }
                continue;
            }
            /* Small d: tiles of fewer rows (see SMALL_TILE_D); ROW_BLOCK holds whole tiles of
             * either size. */
            const int tile_rows = TILE_ROWS_FOR(d);
            for (int64_t t = r0; t < r1; t += tile_rows) {
                const int rows = (int)(r1 - t < tile_rows ? r1 - t : tile_rows);
                const float *xt = block + (t - r0) * d;
                switch (d) {
                    TILE_CASE(4)
                    TILE_CASE(8)
                    TILE_CASE(16)
                    TILE_CASE(32)
                    TILE_CASE(64)
                    default: /* R must be a constant: one instantiation per tile size */
                        if (d <= SMALL_TILE_D)
                            TILE_CALL(d, SMALL_TILE_ROWS);
                        else
                            TILE_CALL(d, TILE_ROWS);
                }
            }
        }
        for (int64_t i = 0; i < r1 - r0; ++i) {
            const float *row = block + i * d;
            /* The same row of the next block, asked into L2 now, so that centring that block
             * does not wait for memory (perf put that wait at ~4 % of a d = 32, K = 512 search). */
            if (r1 + i < row_end)
                for (int64_t o = 0; o < d; o += 64 / (int64_t)sizeof(float))
                    __builtin_prefetch(x + (r1 + i) * stride + o, 0, 2);
            int64_t k_best = tile_code ? tile_code[i] : -1;
            if (k_best < 0) {
                /* A row the AMX tiles left open (d > SMALL_RESCAN_D there): this path's tiles,
                 * the row alone against every group. */
                if (tile_code)
                    PATH(tile)(row, 1, d, packed, half_norms, gp, 0, groups, best + i,
                               best_group + i, best_q + i, 1, 1);
                k_best = PATH(row_code)(row, d, packed, half_norms, gp, best[i], best_group[i],
                                        best_q[i]);
            }
            /* No finite minimum (NaN inputs or overflow), or a padding code: code 0. */
            if (k_best < 0 || k_best >= num_codes) k_best = 0;
            const int64_t r = r0 + i;
            if (fwd == NULL) {
                codes[r] = k_best;
                distances[r] = PATH(distance)(x + r * stride, codebook + k_best * d, d);
                continue;
            }
            int finite;
            float *z = fwd->z + r * d, *out = fwd->out + r * d, *z_q = fwd->z_q + r * d;
            const float *row_x = x + r * stride, *c = codebook + k_best * d;
            const float sq = stream ? PATH(row_pass)(row_x, c, d, z, out, z_q, &finite, 1, 1)
                                    : PATH(row_pass)(row_x, c, d, z, out, z_q, &finite, 1, 0);
            fwd->valid[r] = (uint8_t)finite;
            if (finite) {
                const float w = fwd->mask ? fwd->mask[r] : 1.0f;
                codes[r] = k_best;
                distances[r] = sqrtf(sq);
                loss += (double)w * (double)sq;
                weight += w;
                counts[k_best] += w;
            } else {
                /* An invalid row: z = 0, code 0 (out = z_q = code 0), distance NaN. */
                ++invalid;
                codes[r] = 0;
                distances[r] = NAN;
                for (int64_t j = 0; j < d; ++j) {
                    z[j] = 0.0f;
                    out[j] = z_q[j] = codebook[j];
                }
            }
        }
    }
    if (stream) V_STREAM_FENCE(); /* the non-temporal stores, ordered before what follows */
    if (fwd != NULL) {
        fwd->loss[slice] = loss;
        fwd->weight[slice] = weight;
        fwd->invalid[slice] = invalid;
    }
    free(block);
    return VQ_OK;
}

/* FMA_CHAINS independent chains of `iterations` multiply-adds on vectors of LANES floats:
 * 2 LANES FMA_CHAINS iterations flops. The result keeps the work from being optimised away. */
PATH_TARGET static float PATH(fma_chains)(int64_t iterations, float seed) {
    VF acc[FMA_CHAINS];
    const VF scale = PATH(splat)(0.999999f), step = PATH(splat)(1e-7f);
#pragma GCC unroll 32
    for (int c = 0; c < FMA_CHAINS; ++c) acc[c] = PATH(splat)(seed + (float)c);
    for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 32
        for (int c = 0; c < FMA_CHAINS; ++c) {
            acc[c] = acc[c] * scale + step;
            VQ_IN_REGISTER(acc[c]); /* one round of all chains per iteration, in registers */
        }
    }
    VF sum = acc[0];
#pragma GCC unroll 32
    for (int c = 1; c < FMA_CHAINS; ++c) sum += acc[c];
    float total = 0.0f;
    for (int l = 0; l < LANES; ++l) total += sum[l];
    return total;
}

#undef TILE_CASE
#undef TILE_CALL
#undef TILE_ROWS_FOR
#undef INLINE
#undef VF
#undef VI
#undef NV
#undef VPP
