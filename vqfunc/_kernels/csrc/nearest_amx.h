/* The AMX path of the nearest-code search (VQ_ISA_AMX, see nearest.c): the scores of a row
 * block by the CPU's bf16 tile multiply, with an exact answer.
 *
 * A float splits into two bf16 parts, v = hi + lo + e with |e| <= 2^-16 |v|, so three bf16
 * products, hi(x) hi(c) + hi(x) lo(c) + lo(x) hi(c), give x . c to about 2^-14 of
 * sum |x_j c_j|, accumulated in float32 by the tiles. Those scores s~ only choose candidates:
 * with a bound E on |s~ - s| for every code of the row (s the score the AVX-512 path computes,
 * h - x . c by d fused multiply-subtracts in order), a code whose s~ exceeds the row's least s~
 * by more than 2 E cannot be the minimum (nor tie with it). Where one code is left it is the
 * answer; where several are, their exact scores s are computed by the very same sequence of
 * fused steps and the first code with the least one is taken, as on the other paths. A row the
 * bound does not cover (a non-finite entry, magnitudes past 2^100) or with too many candidates
 * goes to the AVX-512 tiles. So the path returns the same codes as the AVX-512 one, bit for
 * bit, and runs only where the CPU has AMX-TILE and AMX-BF16 and the OS lets the process use
 * the tile registers.
 *
 * Layout: the centred codes of vq_pack_f32's panels, in bf16 tiles of 32 dimensions (the code
 * dimension padded with zeros to whole tiles): for panel p and tile t, 16 rows of dimension
 * pairs, each 16 codes x 2 dimensions (the tile multiply's pair layout). A block of 32 rows is
 * two 16-row tiles per part; the scores of 32 rows x 2 panels are four accumulator tiles, which
 * take 4 of the 8 tile registers, the two row tiles and two code tiles the other 4.
 */

/* Dimensions of one bf16 tile (64 bytes a row) and rows of one row tile. */
#define AMX_DIMS 32
#define AMX_ROWS 16
/* Rows of one sweep of the tiles: two row tiles. */
#define AMX_BLOCK 32
/* Rows of a row block the AMX path takes at once (the callers' blocks are at most this). */
#define AMX_MAX_ROWS 256
/* Panels of one chunk of scores: 32 rows x 128 codes, 16 KiB (row stride 512 bytes), which
 * stay in L1 between the tile stores and the rows' minima. Minima folded chunk by chunk (no
 * branch) were 10x cheaper than candidates sought chunk by chunk (d = 32, K = 512). */
#define AMX_CHUNK_PANELS 8
#define AMX_CHUNK_CODES (AMX_CHUNK_PANELS * PANEL)
/* Chunks of one piece, whose scores are kept (one after another, 128 KiB) until the rows'
 * least scores over the piece are known and its candidates are sought. */
#define AMX_PIECE_CHUNKS 8
/* Candidates kept per row; a row with more goes to the AVX-512 tiles ... */
#define AMX_CANDIDATES 16
/* ... alone against the codebook where a block leaves at most this many rows open (each costs
 * about three rows of the AMX path, d = 32, K = 512), the whole block and the rest of its
 * slice where it leaves more (data the bound does not suit). */
#define AMX_OPEN_ROWS 16
/* The AMX path scores rows of at least this code dimension (below it, most of a 32-dimension
 * tile would be padding) ... */
#define AMX_MIN_D 32
/* ... in calls of at least this many rows (the codebook is split into bf16 once per call),
 * and of four times as many for a codebook of more than AMX_LARGE_BOOK floats (each row block
 * then streams its bf16 tiles from memory: 256 rows against 16384 x 256 codes took 1.39 times
 * the AVX-512 path's time, 512 rows 1.03, 1024 rows 0.80; 256 rows against 16384 x 128, 0.70,
 * two threads of the Xeon of docs/benchmark.md) ... */
#define AMX_MIN_ROWS 256
#define AMX_LARGE_BOOK (1 << 21)
/* ... up to this code dimension (the norm bounds assume d <= 2^16). */
#define AMX_MAX_D 65536

/* The codebook in bf16 tiles (see above), and the bounds the candidates' test needs. */
typedef struct {
    const uint16_t *hi, *lo; /* [panels][tiles][16 pairs][16 codes][2] */
    int64_t tiles;           /* code dimension over 32, rounded up */
    double code_norm;        /* at least ||c|| for every code with a finite half norm */
    double half_norm;        /* the largest finite half norm */
} vq_amx_codes;

#ifdef VQ_HAVE_AMX

/* The 16 floats of v (finite) as bf16 hi and lo parts, v = hi + lo + e (|e| <= 2^-16 |v|),
 * each in the low 16 bits of a lane: rounded to nearest, ties to even, by integer steps (no
 * AVX512-BF16 needed); v - hi is exact in float. */
VQ_TARGET_AVX512 static inline __m512i amx_round(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i half = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
    return _mm512_srli_epi32(_mm512_add_epi32(bits, half), 16);
}
VQ_TARGET_AVX512 static inline void amx_split(__m512 v, __m512i *hi, __m512i *lo) {
    *hi = amx_round(v);
    *lo = amx_round(_mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(*hi, 16))));
}

/* The bf16 tiles of panel p of a packed codebook of dimension d (see vq_amx_codes): each tile
 * row holds dimensions j, j + 1 of the panel's 16 codes, interleaved. */
VQ_TARGET_AVX512 static void amx_pack_panel(const float *packed, int64_t d, int64_t tiles,
                                            int64_t p, uint16_t *hi, uint16_t *lo) {
    const float *col = packed + p * d * PANEL;
    for (int64_t j = 0; j < tiles * AMX_DIMS; j += 2) {
        const __m512 zero = _mm512_setzero_ps();
        const __m512 v0 = j < d ? _mm512_loadu_ps(col + j * PANEL) : zero;
        const __m512 v1 = j + 1 < d ? _mm512_loadu_ps(col + (j + 1) * PANEL) : zero;
        __m512i h0, l0, h1, l1;
        amx_split(v0, &h0, &l0);
        amx_split(v1, &h1, &l1);
        const size_t at = (size_t)((p * tiles * AMX_DIMS + j) * PANEL);
        _mm512_storeu_si512(hi + at, _mm512_or_si512(h0, _mm512_slli_epi32(h1, 16)));
        _mm512_storeu_si512(lo + at, _mm512_or_si512(l0, _mm512_slli_epi32(l1, 16)));
    }
}

/* The tile palette: 8 tiles of 16 rows x 64 bytes. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} amx_tile_config;

/* Rows' candidates, kept while a row block's pieces are swept: codes whose scores s~ were
 * within the row's limit (least s~ so far + 2 E) when they were seen. */
typedef struct {
    float least[AMX_MAX_ROWS], limit[AMX_MAX_ROWS], twice_bound[AMX_MAX_ROWS];
    float squares[AMX_MAX_ROWS];
    int32_t code[AMX_MAX_ROWS][AMX_CANDIDATES];
    float score[AMX_MAX_ROWS][AMX_CANDIDATES];
    int count[AMX_MAX_ROWS], live[AMX_MAX_ROWS];
} amx_candidates;

/* Bytes of amx_rows' scratch for `tiles` tiles of dimensions (a multiple of 64, and so is
 * every part of it). */
static inline size_t amx_scratch_bytes(int64_t tiles) {
    const size_t candidates = (sizeof(amx_candidates) + 63) / 64 * 64;
    return (size_t)(2 * AMX_MAX_ROWS * tiles * AMX_DIMS) * sizeof(uint16_t) +
           (size_t)(AMX_PIECE_CHUNKS * AMX_BLOCK * AMX_CHUNK_CODES) * sizeof(float) + candidates;
}

/* The `rows` rows at xt (row stride d, at most AMX_MAX_ROWS), negated (the tiles add), as hi
 * and lo parts at ah, al (row stride width, zeros past d and past the real rows, up to whole
 * AMX_BLOCKs); whether each row is finite, and its sum of squares (in float). */
VQ_TARGET_AVX512 static void amx_split_rows(const float *xt, int rows, int64_t d,
                                            int64_t width, uint16_t *ah, uint16_t *al,
                                            int *finite, float *squares) {
    const __m512i exponent = _mm512_set1_epi32(0x7f800000);
    const int padded = (rows + AMX_BLOCK - 1) / AMX_BLOCK * AMX_BLOCK;
    for (int i = 0; i < padded; ++i) {
        const float *x = xt + (int64_t)(i < rows ? i : 0) * d;
        __m512 sq = _mm512_setzero_ps();
        __mmask16 special = 0;
        for (int64_t j = 0; j < width; j += PANEL) {
            const int64_t left = i < rows ? d - j : 0;
            const __mmask16 in = left >= PANEL ? 0xffff
                                 : left > 0    ? (__mmask16)((1u << left) - 1)
                                               : 0;
            const __m512 v = _mm512_maskz_loadu_ps(in, x + j);
            const __m512i bits = _mm512_and_si512(_mm512_castps_si512(v), exponent);
            special |= _mm512_cmpeq_epi32_mask(bits, exponent);
            sq = _mm512_fmadd_ps(v, v, sq);
            __m512i hi, lo;
            amx_split(_mm512_sub_ps(_mm512_setzero_ps(), v), &hi, &lo);
            _mm256_storeu_si256((__m256i *)(ah + i * width + j), _mm512_cvtepi32_epi16(hi));
            _mm256_storeu_si256((__m256i *)(al + i * width + j), _mm512_cvtepi32_epi16(lo));
        }
        finite[i] = special == 0;
        squares[i] = _mm512_reduce_add_ps(sq);
    }
}

/* Adds code k (score s) to row i's candidates, first dropping those past the limit when the
 * list is full; a row whose list stays full goes to the AVX-512 tiles. */
static void amx_add_candidate(amx_candidates *c, int i, int32_t k, float s) {
    if (c->count[i] == AMX_CANDIDATES) {
        int kept = 0;
        for (int j = 0; j < AMX_CANDIDATES; ++j)
            if (c->score[i][j] <= c->limit[i]) {
                c->code[i][kept] = c->code[i][j];
                c->score[i][kept++] = c->score[i][j];
            }
        c->count[i] = kept;
        if (kept == AMX_CANDIDATES) {
            c->live[i] = 0;
            return;
        }
    }
    c->code[i][c->count[i]] = k;
    c->score[i][c->count[i]++] = s;
}

/* The permutes of amx_minima16: round r takes two vectors that each hold 2^r rows of 16 / 2^r
 * partial minima, and gives 2^(r + 1) rows of half as many (lanes 16 on: the second vector). */
static const int32_t amx_minima_lanes[4][2][16] = {
    {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
     {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
    {{0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
     {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31}},
    {{0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
     {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31}},
    {{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
     {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}},
};

/* The minimum of each of 16 vectors, lane b of the result that of v[b]: four rounds of
 * two-vector permutes and minima, 45 operations instead of a shuffle tree for each vector. */
VQ_TARGET_AVX512 static inline __m512 amx_minima16(const __m512 *v) {
    __m512 a[8];
    const __m512 *in = v;
    for (int r = 0, n = 16; r < 4; ++r, n /= 2, in = a) {
        const __m512i lo = _mm512_loadu_si512(amx_minima_lanes[r][0]);
        const __m512i hi = _mm512_loadu_si512(amx_minima_lanes[r][1]);
        for (int k = 0; k < n / 2; ++k)
            a[k] = _mm512_min_ps(_mm512_permutex2var_ps(in[2 * k], lo, in[2 * k + 1]),
                                 _mm512_permutex2var_ps(in[2 * k], hi, in[2 * k + 1]));
    }
    return a[0];
}

/* Folds a piece of `chunks` chunks of scores (chunk-major, see amx_rows) of rows [r0, r0 +
 * AMX_BLOCK), whose first code is k0, into the rows' candidates, given each row's lane minima
 * over the piece and over each chunk: the rows' least scores and limits 16 at a time with
 * vectors, then for each row reaching its limit in the piece the common case, one code within
 * the limit, without a data-dependent branch (mispredicted branches cost more than the rest of
 * the fold at d = 32, K = 512): the one lane of one chunk whose minimum reaches the limit, then
 * the one code of that lane. */
VQ_TARGET_AVX512 static void amx_fold_piece(const float *scores, int chunks, int last_vectors,
                                            int32_t k0, int r0, const __m512 *piece_min,
                                            const __m512 (*chunk_min)[AMX_BLOCK],
                                            amx_candidates *c) {
    for (int b0 = 0; b0 < AMX_BLOCK; b0 += 16) {
        const __m512 least = _mm512_min_ps(amx_minima16(piece_min + b0),
                                           _mm512_loadu_ps(c->least + r0 + b0));
        _mm512_storeu_ps(c->least + r0 + b0, least);
        /* least + 2 E rounded up to a float, 8 rows at a time, summed in double: that sum
         * rounds by far less than a float's spacing, so the limit is never below the largest
         * float <= least + 2 E, which is all the float scores' comparison with it needs. */
        for (int e = b0; e < b0 + 16; e += 8) {
            const __m512d sum =
                _mm512_add_pd(_mm512_cvtps_pd(_mm256_loadu_ps(c->least + r0 + e)),
                              _mm512_cvtps_pd(_mm256_loadu_ps(c->twice_bound + r0 + e)));
            _mm256_storeu_ps(c->limit + r0 + e,
                             _mm512_cvt_roundpd_ps(sum, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
        }
    }
    for (int b = 0; b < AMX_BLOCK; ++b) {
        const int i = r0 + b;
        const float limit = c->limit[i];
        const __m512 limits = _mm512_set1_ps(limit);
        if (!c->live[i] || !_mm512_cmp_ps_mask(piece_min[b], limits, _CMP_LE_OQ)) continue;
        int lanes = 0, chunk = 0, lane = 0;
        for (int h = 0; h < chunks; ++h) {
            const unsigned near = _mm512_cmp_ps_mask(chunk_min[h][b], limits, _CMP_LE_OQ);
            lanes += __builtin_popcount(near);
            chunk = near ? h : chunk;
            lane = near ? __builtin_ctz(near) : lane;
        }
        if (lanes == 1) {
            const float *s = scores + (chunk * AMX_BLOCK + b) * AMX_CHUNK_CODES + lane;
            const int vectors = chunk == chunks - 1 ? last_vectors : AMX_CHUNK_PANELS;
            int hits = 0, which = 0;
            for (int v = 0; v < vectors; ++v) {
                const int hit = s[v * PANEL] <= limit;
                hits += hit;
                which = hit ? v : which;
            }
            if (hits == 1) {
                amx_add_candidate(c, i, k0 + (chunk * AMX_CHUNK_PANELS + which) * PANEL + lane,
                                  s[which * PANEL]);
                continue;
            }
        }
        for (int h = 0; h < chunks; ++h) {
            if (!_mm512_cmp_ps_mask(chunk_min[h][b], limits, _CMP_LE_OQ)) continue;
            const float *s = scores + (h * AMX_BLOCK + b) * AMX_CHUNK_CODES;
            const int vectors = h == chunks - 1 ? last_vectors : AMX_CHUNK_PANELS;
            for (int v = 0; v < vectors; ++v) {
                __mmask16 near = _mm512_cmp_ps_mask(_mm512_load_ps(s + v * PANEL), limits,
                                                    _CMP_LE_OQ);
                while (near && c->live[i]) {
                    const int l = __builtin_ctz(near);
                    near &= near - 1;
                    amx_add_candidate(c, i, k0 + (h * AMX_CHUNK_PANELS + v) * PANEL + l,
                                      s[v * PANEL + l]);
                }
            }
        }
    }
}

/* A 2 x 2 block of the tile multiply (tile numbers are immediates, hence macros): the row
 * tiles 0 and 1 (rows 0-15 and 16-31 at x, row stride row_bytes), the code tiles 2 and 3 (two
 * panels at c, `panel` elements apart) and the four products into accumulators 4 to 7. */
#define AMX_ROW_TILES(x)                                                                  \
    do {                                                                                  \
        _tile_loadd(0, (x), row_bytes);                                                   \
        _tile_loadd(1, (x) + AMX_ROWS * width, row_bytes);                                \
    } while (0)
#define AMX_CODE_TILES(c)                                                                 \
    do {                                                                                  \
        _tile_loadd(2, (c), 64);                                                          \
        _tile_loadd(3, (c) + panel, 64);                                                  \
    } while (0)
#define AMX_PRODUCTS()                                                                    \
    do {                                                                                  \
        _tile_dpbf16ps(4, 0, 2);                                                          \
        _tile_dpbf16ps(5, 0, 3);                                                          \
        _tile_dpbf16ps(6, 1, 2);                                                          \
        _tile_dpbf16ps(7, 1, 3);                                                          \
    } while (0)

/* The scores of panels [p0, p1) for the AMX_BLOCK rows whose parts are at ah, al (row stride
 * width), into `chunk` (row stride AMX_CHUNK_CODES floats), and each row's lane minima over
 * them into *chunk_min, folded into *piece_min (no branch). Tiles configured by the caller. */
VQ_TARGET_AMX static void amx_chunk(const uint16_t *ah, const uint16_t *al, int64_t width,
                                    const vq_amx_codes *amx, const float *half_norms,
                                    int64_t p0, int64_t p1, float *chunk, __m512 *chunk_min,
                                    __m512 *piece_min) {
    const size_t row_bytes = (size_t)width * sizeof(uint16_t), panel = (size_t)width * PANEL;
    const size_t ld = AMX_CHUNK_CODES * sizeof(float);
    for (int64_t p = p0; p < p1; p += 2) {
        /* Every accumulator row starts at the panels' half norms (row stride 0). */
        _tile_loadd(4, half_norms + p * PANEL, 0);
        _tile_loadd(5, half_norms + (p + 1) * PANEL, 0);
        _tile_loadd(6, half_norms + p * PANEL, 0);
        _tile_loadd(7, half_norms + (p + 1) * PANEL, 0);
        for (int64_t t = 0; t < amx->tiles; ++t) {
            /* The three parts, hi x hi, hi x lo and lo x hi: the rows' hi tiles serve the
             * first two, the codes' hi tiles the first and the last (10 tile loads, not 12). */
            const uint16_t *xh = ah + t * AMX_DIMS, *xl = al + t * AMX_DIMS;
            const uint16_t *ch = amx->hi + t * AMX_DIMS * PANEL + p * panel;
            const uint16_t *cl = amx->lo + t * AMX_DIMS * PANEL + p * panel;
            AMX_ROW_TILES(xh);
            AMX_CODE_TILES(ch);
            AMX_PRODUCTS();
            AMX_CODE_TILES(cl);
            AMX_PRODUCTS();
            AMX_ROW_TILES(xl);
            AMX_CODE_TILES(ch);
            AMX_PRODUCTS();
        }
        float *s = chunk + (p - p0) * PANEL;
        _tile_stored(4, s, ld);
        _tile_stored(5, s + PANEL, ld);
        _tile_stored(6, s + AMX_ROWS * AMX_CHUNK_CODES, ld);
        _tile_stored(7, s + AMX_ROWS * AMX_CHUNK_CODES + PANEL, ld);
    }
    for (int b = 0; b < AMX_BLOCK; ++b) {
        const float *s = chunk + b * AMX_CHUNK_CODES;
        __m512 m = _mm512_load_ps(s);
        for (int v = 1; v < (int)(p1 - p0); ++v)
            m = _mm512_min_ps(_mm512_load_ps(s + v * PANEL), m);
        chunk_min[b] = m;
        piece_min[b] = _mm512_min_ps(m, piece_min[b]);
    }
}
#undef AMX_ROW_TILES
#undef AMX_CODE_TILES
#undef AMX_PRODUCTS

/* Codes of the `rows` rows at xt (row stride d, at most AMX_MAX_ROWS): code[i] the first code
 * reaching row i's least exact score, or -1 where the row goes to the AVX-512 tiles (see the
 * top of the file). Each piece of the codebook is swept by every AMX_BLOCK of the rows in turn
 * while it is in L2. Scratch: amx_scratch_bytes(amx->tiles), 64-byte aligned. */
VQ_TARGET_AMX static void amx_rows(const float *xt, int rows, int64_t d, const vq_amx_codes *amx,
                                   const float *packed, const float *half_norms, int64_t panels,
                                   void *scratch, int64_t *code) {
    const int64_t width = amx->tiles * AMX_DIMS;
    uint16_t *ah = scratch, *al = ah + AMX_MAX_ROWS * width;
    float *scores = (float *)(al + AMX_MAX_ROWS * width);
    amx_candidates *c = (amx_candidates *)(scores + AMX_PIECE_CHUNKS * AMX_BLOCK * AMX_CHUNK_CODES);
    amx_split_rows(xt, rows, d, width, ah, al, c->live, c->squares);
    /* Each row's bound E on |s~ - s| (see the top of the file), in double so that its tiny
     * terms do not underflow, 8 rows at a time: with n >= ||x|| and sum = n ||c|| >=
     * sum |x_j c_j| (Cauchy-Schwarz), the split's 3 2^-16 sum, a rounding of 2^-24 per float
     * addition of the tiles (at most 6 d + 2) and of the fused steps (d + 1), each on partial
     * sums below h + 2 sum, and for bf16 values and products the tiles flush to zero, 2^-126
     * each: E = a n + b. A float sum of d squares is within d 2^-24 of the true one, so a
     * factor 1 + 2^-8 on it covers d <= 2^16. Twice E is kept, rounded up to a float. */
    const double h = amx->half_norm, dd = (double)d, cn = amx->code_norm;
    const double a = cn * (0x1p-14 + (7.0 * dd + 3.0) * 0x1p-23) + (6.0 * dd + 8.0) * 0x1p-126;
    const double b = (7.0 * dd + 3.0) * 0x1p-24 * h + (6.0 * dd + 8.0) * 0x1p-126 * (1.0 + cn);
    const int live_h = h <= 0x1p100;
    const int padded = (rows + AMX_BLOCK - 1) / AMX_BLOCK * AMX_BLOCK;
    for (int i = 0; i < padded; i += 8) {
        const __m512d n = _mm512_sqrt_pd(_mm512_mul_pd(
            _mm512_cvtps_pd(_mm256_loadu_ps(c->squares + i)), _mm512_set1_pd(1.0 + 0x1p-8)));
        const __m512d twice = _mm512_mul_pd(
            _mm512_fmadd_pd(n, _mm512_set1_pd(a), _mm512_set1_pd(b)), _mm512_set1_pd(2.0));
        _mm256_storeu_ps(c->twice_bound + i,
                         _mm512_cvt_roundpd_ps(twice, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
        /* Rows past 2^100 (and NaN sums) go to the AVX-512 tiles. */
        const __mmask8 small =
            _mm512_cmp_pd_mask(_mm512_mul_pd(n, _mm512_set1_pd(cn)), _mm512_set1_pd(0x1p100),
                               _CMP_LE_OQ);
        for (int e = 0; e < 8; ++e)
            c->live[i + e] = i + e < rows && c->live[i + e] && live_h && ((small >> e) & 1);
        _mm256_storeu_ps(c->least + i, _mm256_set1_ps(INFINITY));
        _mm256_storeu_ps(c->limit + i, _mm256_set1_ps(INFINITY));
        _mm256_storeu_si256((__m256i *)(c->count + i), _mm256_setzero_si256());
    }
    amx_tile_config config = {.palette = 1};
    for (int t = 0; t < 8; ++t) {
        config.rows[t] = AMX_ROWS;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
    const int64_t piece = AMX_PIECE_CHUNKS * AMX_CHUNK_PANELS;
    for (int64_t q0 = 0; q0 < panels; q0 += piece) {
        const int64_t q1 = q0 + piece < panels ? q0 + piece : panels;
        const int chunks = (int)((q1 - q0 + AMX_CHUNK_PANELS - 1) / AMX_CHUNK_PANELS);
        const int last = (int)(q1 - q0 - (chunks - 1) * AMX_CHUNK_PANELS);
        for (int r0 = 0; r0 < rows; r0 += AMX_BLOCK) {
            __m512 piece_min[AMX_BLOCK], chunk_min[AMX_PIECE_CHUNKS][AMX_BLOCK];
            for (int b = 0; b < AMX_BLOCK; ++b) piece_min[b] = _mm512_set1_ps(INFINITY);
            for (int h = 0; h < chunks; ++h) {
                const int64_t p0 = q0 + h * AMX_CHUNK_PANELS;
                const int64_t p1 = p0 + AMX_CHUNK_PANELS < q1 ? p0 + AMX_CHUNK_PANELS : q1;
                amx_chunk(ah + r0 * width, al + r0 * width, width, amx, half_norms, p0, p1,
                          scores + h * AMX_BLOCK * AMX_CHUNK_CODES, chunk_min[h], piece_min);
            }
            amx_fold_piece(scores, chunks, last, (int32_t)(q0 * PANEL), r0, piece_min,
                           (const __m512 (*)[AMX_BLOCK])chunk_min, c);
        }
    }
    _tile_release();
    /* The answer: the one candidate left, or the first code of the least exact score. */
    for (int i = 0; i < rows; ++i) {
        code[i] = -1;
        if (!c->live[i]) continue;
        const float *x = xt + (int64_t)i * d;
        int left = 0;
        for (int j = 0; j < c->count[i]; ++j) left += c->score[i][j] <= c->limit[i];
        int64_t best = -1;
        float best_score = INFINITY;
        for (int j = 0; j < c->count[i]; ++j) {
            if (c->score[i][j] > c->limit[i]) continue;
            const int64_t k = c->code[i][j];
            if (left == 1) {
                best = k;
                break;
            }
            const float *col = packed + (k / PANEL) * d * PANEL + k % PANEL;
            float a = half_norms[k];
            for (int64_t jj = 0; jj < d; ++jj) a = fmaf(-x[jj], col[jj * PANEL], a);
            if (a < best_score || (a == best_score && k < best)) {
                best = k;
                best_score = a;
            }
        }
        code[i] = best;
    }
}

#endif
