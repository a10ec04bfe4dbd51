/* Weight-only int4 and int8 products for x86-64 CPUs with AVX2 and FMA (F16C for float16 scales and KV pages):
   y[M, N] = x[M, K] @ W^T; decode attention over the paged KV cache; a decode step's small ops.

   Built by tokenmill/kernels/__init__.py with the machine's C compiler on first use and loaded with ctypes;
   OpenMP threads come from the libgomp torch has already loaded (same soname), so they are torch's own.

   Weights are stored in tiles of 8 output rows (N rounded up to a multiple of 8, the extra rows zero), laid
   out so that one 32-byte vector holds the same few columns of all 8 rows: a product step multiplies it by
   one activation row's columns broadcast, and its lanes are the 8 rows' partial sums. No horizontal sums.
     int4: q in [0, 15], w = q * scale + offset, a (scale, offset) per row and group of `group` columns.
           q [N8, K / 32, 4, 32] bytes: in tile t, block b (32 columns), chunk c, byte j: the low nibble is
           row 8t + j / 4, column 32b + 8c + j % 4; the high nibble the same row, column 32b + 8c + 4 + j % 4.
           scale_offset [N8, K / group, 2, 8]: the 8 rows' scales, then their offsets.
     int8: q in [-128, 127], w = q * scale. q [N8, K / 4, 8, 4]: row 8t + r, columns 4s .. 4s + 3 at [t, s, r, :].
           scale [N8, K / group, 8].
   Scales (and offsets) are float32, or float16 where every one of a weight's is a float16 value (GGUF's Q4_0,
   Q4_1 and Q8_0 store them so; `half`): a sixth fewer bytes a decode step reads for int4, the same products.

   Activations: each row's 32-column blocks are rounded with their own scale (absmax / 127) to int8, llama.cpp's
   rounding of activations (its Q8 blocks of 32), and multiplied as integers:
     - against int4 weights: vpmaddubsw multiplies 32 unsigned weights by 32 signed activations; a block's 8
       steps add up in int16 without overflow (8 x 2 x 15 x 127 < 32767), then vpmaddwd widens once per block;
     - against int8 weights (llama.cpp's Q8_0 x Q8_0): 4 columns of 8 rows a step, see tile_int8_body.
   A block's integer sum is converted to float once and scaled by weight scale x activation scale; sums over
   blocks, and int4's offsets (offset x the sum of the group's rounded activations), are float32. Rows of x
   go MR at a time, so each weight vector serves up to MR rows; every row is computed the same way whatever
   the others are, so a row's result does not depend on the batch.

   Built twice where the CPU has AVX-512 VNNI (kernels/__init__.py's BUILDS): that build sums the integer
   products with vpdpbusd (the same integers, so the same results bit for bit) and, having 32 vector
   registers, runs two weight tiles per pass (NT; one where few rows meet weights read from DRAM, see tiled_mm). */
#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define M_CHUNK 64                  /* activation rows a thread's work item covers (they stay in L2) */
#define PARALLEL_WORK (1 << 17)     /* weights x rows below which one thread beats waking the others */
#define PARALLEL_ELEMENTS (1 << 13) /* elements of a per-row op (norm, rope, activation, rounding) below which
                                       one thread beats a parallel region; above it, rows split over threads */
#define INLINE static inline __attribute__((always_inline))
/* Built a second time with AVX-512 VNNI (VL, on 256-bit vectors, the same layouts) where the CPU has it: the
   integer products then accumulate into int32 in one instruction (vpdpbusd), with the same sums. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define VNNI 1
#else
#define VNNI 0
#endif
#define MR 4                        /* activation rows per weight tile pass */
#if VNNI
#define NT 2                        /* weight tiles per pass at most: two where AVX-512 gives 32 vector registers */
#else
#define NT 1
#endif

/* which build this is, by running an instruction of it: the loader's check that the CPU runs it */
int tm_isa(void) {
#if VNNI
    volatile int seven = 7;
    const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(1), _mm256_set1_epi8(seven));
    return _mm256_extract_epi32(p, 0) == 28 ? 2 : 0;
#else
    return 1;
#endif
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* eight sums: element p of the result is the sum of v[p]'s lanes */
INLINE __m256 hsum8(const __m256 v[8]) {
    __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    __m256 c = _mm256_hadd_ps(v[4], v[5]), d = _mm256_hadd_ps(v[6], v[7]);
    __m256 ab = _mm256_hadd_ps(a, b), cd = _mm256_hadd_ps(c, d);     /* [v0 v1 v2 v3 | v0 v1 v2 v3] halves, likewise */
    __m256 lo = _mm256_permute2f128_ps(ab, cd, 0x20), hi = _mm256_permute2f128_ps(ab, cd, 0x31);
    return _mm256_add_ps(lo, hi);
}

INLINE __m256i broadcast32(const void *p) {     /* 4 bytes, repeated 8 times */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* x [M, K] -> per 32-column block, int8 integers xq in [-127, 127] with xq * dx ~= x (rounded to nearest even),
   dx [M, K / 32], and where isum is given each block's integer sum [M, K / 32]; when xsum is given, the sum of
   each row's rounded columns in each group [M, K / group] (sum over its blocks of dx x the block's integer sum): int4's offsets multiply the same
   rounded activations as its scales do, so the product is exactly that of w = q * scale + offset, whose
   values are centred, rather than of q * scale alone, whose rounding error is several times larger. A NaN
   or inf in a block makes its dx NaN, so its products are NaN. */
static void quantize_blocks(const float *x, int8_t *xq, float *dx, float *xsum, int32_t *isum, int64_t M, int64_t K,
                            int64_t group, int threads) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    const float range = 127.f;
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1 && M * K >= PARALLEL_ELEMENTS)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < K; b += 32) {
            const float *xb = x + m * K + b;
            __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(xb + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
                sum = _mm256_add_ps(sum, v[i]);
            }
            const float a = hmax(amax), total = hsum(sum);
            const int finite = a <= 3.4e38f && total == total && total - total == 0.f;
            /* a block below ~3.7e-37 (range / a not finite) rounds to zeros, as an all-zero block does */
            const int scaled = finite && a > 0.f && range / a <= 3.4e38f;
            const __m256 inv = _mm256_set1_ps(scaled ? range / a : 0.f);
            __m256i n[4];
            for (int i = 0; i < 4; i++) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            const float d = finite ? (scaled ? a / range : 0.f) : NAN;
            const __m256i w01 = _mm256_packs_epi32(n[0], n[1]), w23 = _mm256_packs_epi32(n[2], n[3]);
            const __m256i bytes = _mm256_packs_epi16(w01, w23);     /* dwords: n0 n1 n2 n3 (lo) | n0 n1 n2 n3 (hi) */
            _mm256_storeu_si256((__m256i *)(xq + m * K + b),
                                _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            dx[m * (K / 32) + b / 32] = d;
            const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(n[0], n[1]), _mm256_add_epi32(n[2], n[3]));
            const float total_int = hsum(_mm256_cvtepi32_ps(s4));             /* |integer sum| < 2^24: exact */
            if (isum) isum[m * (K / 32) + b / 32] = (int32_t)total_int;
            if (xsum) {
                const float rounded = d * total_int;
                if (b % group == 0) xsum[m * (K / group) + b / group] = 0.f;
                xsum[m * (K / group) + b / group] += rounded;
            }
        }
    }
}

/* 8 scales from s + i: float16 (half, a compile-time constant where it is called) or float32 */
INLINE __m256 load_scales(const void *s, int64_t i, const int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + i)))
                : _mm256_loadu_ps((const float *)s + i);
}

/* y[r * ldy + j] = acc[r] lane j for the rows of one tile pass, j < cols (8 but in a weight's last tile) */
INLINE void store_tile(const __m256 acc[MR], int rows, float *y, int64_t ldy, int64_t cols) {
    if (cols == 8) {
        for (int r = 0; r < rows; r++) _mm256_storeu_ps(y + r * ldy, acc[r]);
        return;
    }
    float out[8];
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(out, acc[r]);
        memcpy(y + r * ldy, out, sizeof(float) * cols);
    }
}

/* `nt` (<= NT) neighbouring tiles of 8 int4 weight rows against `rows` (<= MR) rows of int8 activations:
   y[r * ldy + 8u + j] = row r's product with weight row j of tile u, j < 8 (j < cols in the last tile). Tile u's
   weights and scales lie tile_bytes and scale_stride after tile u - 1's. Each activation broadcast serves the
   NT tiles (where there are registers for two: a broadcast from memory costs about what a product does). The
   rows are a run-time count tested in the loops: gcc then keeps each row's chain apart (with the count fixed
   at compile time it interleaves the rows and spills, ~10 % slower); nt is a compile-time constant (tile_int4),
   as gcc spills the AVX2 build's registers where it is tested at run time (2.5x slower). */
INLINE void tile_int4_body(const int nt, const int half, const uint8_t *qt, int64_t tile_bytes, const void *st,
                           int64_t scale_stride,
                           const int8_t *xq, const float *dx, const float *xsum, int64_t K, int64_t group, int rows,
                           float *y, int64_t ldy, int64_t cols) {
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t B = K / 32, G = K / group, per = group / 32;
    __m256 acc[NT][MR];
    for (int u = 0; u < nt; u++)
        for (int r = 0; r < MR; r++) acc[u][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; b++) {
        __m256i sums[NT][MR];
        for (int u = 0; u < nt; u++)
            for (int r = 0; r < MR; r++) sums[u][r] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i w0[NT], w1[NT];
            for (int u = 0; u < nt; u++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(qt + u * tile_bytes + (4 * b + c) * 32));
                w0[u] = _mm256_and_si256(v, mask);
                w1[u] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            }
            for (int r = 0; r < MR; r++)
                if (r < rows) {
                    const int8_t *xb = xq + r * K + 32 * b + 8 * c;
                    const __m256i x0 = broadcast32(xb), x1 = broadcast32(xb + 4);
                    for (int u = 0; u < nt; u++) {
#if VNNI     /* the same integers: 4 products and their sum into int32 lanes in one instruction */
                        sums[u][r] = _mm256_dpbusd_epi32(sums[u][r], w0[u], x0);
                        sums[u][r] = _mm256_dpbusd_epi32(sums[u][r], w1[u], x1);
#else
                        sums[u][r] = _mm256_add_epi16(sums[u][r], _mm256_maddubs_epi16(w0[u], x0));
                        sums[u][r] = _mm256_add_epi16(sums[u][r], _mm256_maddubs_epi16(w1[u], x1));
#endif
                    }
                }
        }
        for (int u = 0; u < nt; u++) {
            const __m256 s = load_scales(st, u * scale_stride + (b / per) * 16, half);
            for (int r = 0; r < MR; r++)
                if (r < rows)
                    acc[u][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(VNNI ? sums[u][r] : _mm256_madd_epi16(sums[u][r], ones)),
                                                _mm256_mul_ps(s, _mm256_set1_ps(dx[r * B + b])), acc[u][r]);
        }
    }
    /* the offsets' share, after the products (in their loop: ~15 % slower), on two chains per row: one chain
       of G dependent FMAs is latency-bound with nothing left to overlap it */
    for (int u = 0; u < nt; u++) {
        const int64_t so = u * scale_stride;
        __m256 odd[MR];
        for (int r = 0; r < MR; r++) odd[r] = _mm256_setzero_ps();
        int64_t g = 0;
        for (; g + 2 <= G; g += 2) {
            const __m256 o0 = load_scales(st, so + g * 16 + 8, half), o1 = load_scales(st, so + g * 16 + 24, half);
            for (int r = 0; r < MR; r++)
                if (r < rows) {
                    acc[u][r] = _mm256_fmadd_ps(o0, _mm256_set1_ps(xsum[r * G + g]), acc[u][r]);
                    odd[r] = _mm256_fmadd_ps(o1, _mm256_set1_ps(xsum[r * G + g + 1]), odd[r]);
                }
        }
        if (g < G) {
            const __m256 o = load_scales(st, so + g * 16 + 8, half);
            for (int r = 0; r < MR; r++)
                if (r < rows) acc[u][r] = _mm256_fmadd_ps(o, _mm256_set1_ps(xsum[r * G + g]), acc[u][r]);
        }
        for (int r = 0; r < MR; r++) acc[u][r] = _mm256_add_ps(acc[u][r], odd[r]);
        store_tile(acc[u], rows, y + 8 * u, ldy, u == nt - 1 ? cols : 8);
    }
}

/* tiles t .. t + nt - 1 (nt 1, or 2 in the VNNI build): tile_int4_body with nt and half fixed, and in the VNNI
   build with a full pass's rows fixed too (with 32 registers gcc then schedules the rows without spilling:
   +10-18 %) */
INLINE void tile_int4_nt(const int half, const uint8_t *qt, int64_t tile_bytes, const void *st, int64_t scale_stride,
                         int nt, const int8_t *xq, const float *dx, const float *xsum, int64_t K, int64_t group,
                         int rows, float *y, int64_t ldy, int64_t cols) {
#if NT > 1
    if (nt == 2 && rows == MR) {
        tile_int4_body(2, half, qt, tile_bytes, st, scale_stride, xq, dx, xsum, K, group, MR, y, ldy, cols);
        return;
    }
    if (nt == 2) {
        tile_int4_body(2, half, qt, tile_bytes, st, scale_stride, xq, dx, xsum, K, group, rows, y, ldy, cols);
        return;
    }
#endif
    tile_int4_body(1, half, qt, tile_bytes, st, scale_stride, xq, dx, xsum, K, group, rows, y, ldy, cols);
}

static void tile_int4(const int half, const uint8_t *qt, int64_t tile_bytes, const void *st, int64_t scale_stride,
                      int nt, const int8_t *xq, const float *dx, const float *xsum, int64_t K, int64_t group, int rows,
                      float *y, int64_t ldy, int64_t cols) {
    if (half) tile_int4_nt(1, qt, tile_bytes, st, scale_stride, nt, xq, dx, xsum, K, group, rows, y, ldy, cols);
    else tile_int4_nt(0, qt, tile_bytes, st, scale_stride, nt, xq, dx, xsum, K, group, rows, y, ldy, cols);
}

/* The same for 8 int8 weight rows against rows of int8 activations, 4 columns of the 8 rows a step (32 bytes).
   The VNNI build offsets the weights to unsigned bytes (w ^ 0x80 = w + 128) for vpdpbusd, 4 products and their
   sum into each row's int32 lane, and takes the block's 128 x sum(x) (isum) off at its end. The AVX2 build, for
   activations in [-127, 127] (quantize_blocks'), multiplies |w| (unsigned) by x with w's sign (vpsignb) in
   vpmaddubsw, llama.cpp's trick: each int16 pair at most 2 x 128 x 127 < 32767, so exact, then vpmaddwd into the
   rows' int32 lanes; for any int8 activations (`exact`: W8A8's, -128 included, where that pair or the sign
   would overflow) it widens the weights to int16 (rows 0-3 in one vector, 4-7 in another) against the 4
   activations widened and repeated, vpmaddwd into int32 column pairs per row, added at the block's end (~25 %
   slower). Each gives sum(w x) exactly, so every build and route the same results. */
INLINE void tile_int8_body(const int nt, const int half, const int exact, const int8_t *qt, int64_t tile_bytes,
                           const void *st, int64_t scale_stride, const int8_t *xq, const float *dx,
                           const int32_t *isum, int64_t K, int64_t group, int rows, float *y, int64_t ldy,
                           int64_t cols) {
    const int64_t B = K / 32, per = group / 32;
    __m256 acc[NT][MR];
    for (int u = 0; u < nt; u++)
        for (int r = 0; r < MR; r++) acc[u][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; b++) {
        __m256i sums[NT][MR];
#if VNNI
        const __m256i offset = _mm256_set1_epi8((char)0x80);
        for (int u = 0; u < nt; u++)
            for (int r = 0; r < MR; r++) sums[u][r] = _mm256_setzero_si256();
        for (int step = 0; step < 8; step++) {
            __m256i w[NT];
            for (int u = 0; u < nt; u++)
                w[u] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(qt + u * tile_bytes + (8 * b + step) * 32)),
                                        offset);
            for (int r = 0; r < MR; r++)
                if (r < rows) {
                    const __m256i x = broadcast32(xq + r * K + 32 * b + 4 * step);
                    for (int u = 0; u < nt; u++) sums[u][r] = _mm256_dpbusd_epi32(sums[u][r], w[u], x);
                }
        }
        for (int r = 0; r < MR; r++)
            if (r < rows) {
                const __m256i shift = _mm256_set1_epi32(128 * isum[r * B + b]);
                for (int u = 0; u < nt; u++) sums[u][r] = _mm256_sub_epi32(sums[u][r], shift);
            }
#else
        for (int u = 0; u < nt; u++)
            for (int r = 0; r < MR; r++) sums[u][r] = _mm256_setzero_si256();
        if (!exact) {
            const __m256i ones = _mm256_set1_epi16(1);
            for (int step = 0; step < 8; step++) {
                __m256i w[NT], magnitude[NT];
                for (int u = 0; u < nt; u++) {
                    w[u] = _mm256_loadu_si256((const __m256i *)(qt + u * tile_bytes + (8 * b + step) * 32));
                    magnitude[u] = _mm256_abs_epi8(w[u]);
                }
                for (int r = 0; r < MR; r++)
                    if (r < rows) {
                        const __m256i x = broadcast32(xq + r * K + 32 * b + 4 * step);
                        for (int u = 0; u < nt; u++)
                            sums[u][r] = _mm256_add_epi32(sums[u][r], _mm256_madd_epi16(
                                _mm256_maddubs_epi16(magnitude[u], _mm256_sign_epi8(x, w[u])), ones));
                    }
            }
        } else {
            __m256i high[NT][MR];
            for (int u = 0; u < nt; u++)
                for (int r = 0; r < MR; r++) high[u][r] = _mm256_setzero_si256();
            for (int step = 0; step < 8; step++) {
                __m256i w0[NT], w1[NT];
                for (int u = 0; u < nt; u++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qt + u * tile_bytes + (8 * b + step) * 32));
                    w0[u] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v));
                    w1[u] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1));
                }
                for (int r = 0; r < MR; r++)
                    if (r < rows) {
                        int32_t four;
                        memcpy(&four, xq + r * K + 32 * b + 4 * step, 4);
                        const __m256i x = _mm256_cvtepi8_epi16(_mm_set1_epi32(four));
                        for (int u = 0; u < nt; u++) {
                            sums[u][r] = _mm256_add_epi32(sums[u][r], _mm256_madd_epi16(w0[u], x));
                            high[u][r] = _mm256_add_epi32(high[u][r], _mm256_madd_epi16(w1[u], x));
                        }
                    }
            }
            /* lanes: rows 0-3 (resp. 4-7), two column pairs each -> [r0 r1 r4 r5 | r2 r3 r6 r7] -> rows in order */
            for (int u = 0; u < nt; u++)
                for (int r = 0; r < MR; r++)
                    if (r < rows)
                        sums[u][r] = _mm256_permute4x64_epi64(_mm256_hadd_epi32(sums[u][r], high[u][r]), 0xD8);
        }
#endif
        for (int u = 0; u < nt; u++) {
            const __m256 s = load_scales(st, u * scale_stride + (b / per) * 8, half);
            for (int r = 0; r < MR; r++)
                if (r < rows)
                    acc[u][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[u][r]),
                                                _mm256_mul_ps(s, _mm256_set1_ps(dx[r * B + b])), acc[u][r]);
        }
    }
    for (int u = 0; u < nt; u++) store_tile(acc[u], rows, y + 8 * u, ldy, u == nt - 1 ? cols : 8);
}

/* tile_int4's dispatch, for tile_int8_body */
INLINE void tile_int8_nt(const int half, const int exact, const int8_t *qt, int64_t tile_bytes, const void *st,
                         int64_t scale_stride, int nt, const int8_t *xq, const float *dx, const int32_t *isum,
                         int64_t K, int64_t group, int rows, float *y, int64_t ldy, int64_t cols) {
#if NT > 1
    if (nt == 2 && rows == MR) {
        tile_int8_body(2, half, exact, qt, tile_bytes, st, scale_stride, xq, dx, isum, K, group, MR, y, ldy, cols);
        return;
    }
    if (nt == 2) {
        tile_int8_body(2, half, exact, qt, tile_bytes, st, scale_stride, xq, dx, isum, K, group, rows, y, ldy, cols);
        return;
    }
#endif
    tile_int8_body(1, half, exact, qt, tile_bytes, st, scale_stride, xq, dx, isum, K, group, rows, y, ldy, cols);
}

/* exact: the activations may hold -128 (see tile_int8_body; the VNNI build has one route for all) */
static void tile_int8(const int half, int exact, const int8_t *qt, int64_t tile_bytes, const void *st,
                      int64_t scale_stride, int nt, const int8_t *xq, const float *dx, const int32_t *isum, int64_t K,
                      int64_t group, int rows, float *y, int64_t ldy, int64_t cols) {
#define TILE_INT8(h, e) \
    tile_int8_nt(h, e, qt, tile_bytes, st, scale_stride, nt, xq, dx, isum, K, group, rows, y, ldy, cols)
#if VNNI
    exact = 0;
#endif
    if (half && exact) TILE_INT8(1, 1);
    else if (half) TILE_INT8(1, 0);
    else if (exact) TILE_INT8(0, 1);
    else TILE_INT8(0, 0);
#undef TILE_INT8
}

/* y [M, N] (row stride ldy) = x @ W^T for the tiled weights (bits 4 or 8; scales float16 where half, else
   float32). x float32 [M, K], or with bits 8 x_int int8 [M, K] (x unused): those integers as they are, every
   product and every block's sum exact (W8A8's int8 x int8 math). Returns 0, or -1 when scratch memory could not
   be had. */
static int tiled_mm(const int bits, const float *x, const int8_t *x_int, const void *q, const void *scales,
                    const int half, float *y, int64_t M, int64_t N, int64_t K, int64_t group, int64_t ldy,
                    int threads) {
    const int64_t B = K / 32, G = K / group, tiles = (N + 7) / 8, chunks = (M + M_CHUNK - 1) / M_CHUNK;
    const int64_t tile_bytes = (int64_t)bits * K;      /* 8 rows of K weights of `bits` bits */
    const int64_t scale_stride = (bits == 4 ? 16 : 8) * G;
    float *dx = malloc(sizeof(float) * M * (2 * B + G) + (size_t)M * K);
    if (!dx) return -1;
    float *xsum = dx + M * B;
    int32_t *isum = (int32_t *)(xsum + M * G);
    int8_t *xq = (int8_t *)(isum + M * B);
    if (x_int) {
        xq = (int8_t *)x_int;
        for (int64_t i = 0; i < M * B; i++) {
            int32_t total = 0;
            for (int j = 0; j < 32; j++) total += x_int[32 * i + j];
            dx[i] = 1.f;
            isum[i] = total;
        }
    } else {
        quantize_blocks(x, xq, dx, bits == 4 ? xsum : 0, bits == 8 ? isum : 0, M, K, group, threads);
    }
    /* tiles per work item: NT, but one where fewer than 16 rows meet weights of more than 8 MB, read from DRAM
       (two tiles a pass measured up to 2x slower there: 49152 x 576 at 1-4 rows, int4 and int8) */
    const int64_t step = M < 16 && tiles * tile_bytes > (8 << 20) ? 1 : NT, passes = (tiles + step - 1) / step;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads) if (N * K * M >= PARALLEL_WORK)
    for (int64_t chunk = 0; chunk < chunks; chunk++)
        for (int64_t pass = 0; pass < passes; pass++) {
            const int64_t t = pass * step;
            const int nt = tiles - t < step ? (int)(tiles - t) : (int)step;
            const void *qt = (const uint8_t *)q + t * tile_bytes;
            const void *st = (const char *)scales + t * scale_stride * (half ? 2 : 4);
            const int64_t end = (chunk + 1) * M_CHUNK < M ? (chunk + 1) * M_CHUNK : M;
            for (int64_t m = chunk * M_CHUNK; m < end; m += MR) {
                const int rows = end - m < MR ? (int)(end - m) : MR;
                const int8_t *xr = xq + m * K;
                const float *dr = dx + m * B, *sr = xsum + m * G;
                const int32_t *ir = isum + m * B;
                const int64_t last = t + nt - 1, cols = N - 8 * last < 8 ? N - 8 * last : 8;
                if (bits == 4)
                    tile_int4(half, (const uint8_t *)qt, tile_bytes, st, scale_stride, nt, xr, dr, sr, K, group, rows,
                              y + m * ldy + 8 * t, ldy, cols);
                else
                    tile_int8(half, x_int != 0, (const int8_t *)qt, tile_bytes, st, scale_stride, nt, xr, dr, ir, K,
                              group, rows, y + m * ldy + 8 * t, ldy, cols);
            }
        }
    free(dx);
    return 0;
}

/* x [M, K] float32, int4 weights as tiled above (scale_offset float16 where half) -> y [M, N] (row stride ldy). */
int tm_int4_mm(const float *x, const uint8_t *q, const void *scale_offset, int half, float *y,
               int64_t M, int64_t N, int64_t K, int64_t group, int64_t ldy, int threads) {
    return tiled_mm(4, x, 0, q, scale_offset, half, y, M, N, K, group, ldy, threads);
}

/* x [M, K] float32 (or x_int int8, see tiled_mm), int8 weights as tiled above -> y [M, N] (row stride ldy). */
int tm_int8_mm(const float *x, const int8_t *x_int, const int8_t *q, const void *scale, int half, float *y,
               int64_t M, int64_t N, int64_t K, int64_t group, int64_t ldy, int threads) {
    return tiled_mm(8, x, x_int, q, scale, half, y, M, N, K, group, ldy, threads);
}

/* ---- attention of decode rows over the paged KV cache ------------------------------------------------

   exp(x) for x <= 0 (Cephes' polynomial, relative error ~1e-7); below -87 it returns ~0. */
INLINE __m256 exp_neg(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

#define TILE 64          /* keys scored before a softmax update: online softmax over tiles, as FlashAttention */
#define MAX_GROUP 16     /* query heads per KV head */
#define MAX_DIM 256

#define CHUNK 512        /* keys per work item, at least: a long context is split at fixed positions */
#define MAX_CHUNKS 8     /* per row */

/* Eight cached values from element d of a cached row: float32, or float16 widened (F16C). `half` is a
   compile-time constant wherever these are inlined (attend_f32 / attend_f16), so the test folds away. */
INLINE __m256 load_cached(const int half, const void *row, int64_t d) {
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + d)));
    return _mm256_loadu_ps((const float *)row + d);
}

/* acc[j][d0 .. d0 + 8 * width) = keep[j] * that + sum over the tile's n keys t of p[j][t] * v_t there, for `heads`
   (1 to 3) query heads j of one KV head: each slice of a value row is loaded once for all of them. heads and
   width are compile-time constants after inlining, so the 4 x 3 accumulators stay in registers. */
INLINE void weigh_slice(const int half, const int heads, const int width, const void **rows_v, int64_t off, int64_t n,
                        const float (*p)[TILE], const float *keep, float *acc, int64_t D) {
    __m256 a[3][4];
    for (int j = 0; j < heads; j++)
        for (int c = 0; c < width; c++) a[j][c] = _mm256_mul_ps(_mm256_set1_ps(keep[j]), _mm256_loadu_ps(acc + j * D + 8 * c));
    for (int64_t t = 0; t < n; t++) {
        __m256 pt[3];
        for (int j = 0; j < heads; j++) pt[j] = _mm256_set1_ps(p[j][t]);
        for (int c = 0; c < width; c++) {
            const __m256 vc = load_cached(half, rows_v[t], off + 8 * c);
            for (int j = 0; j < heads; j++) a[j][c] = _mm256_fmadd_ps(pt[j], vc, a[j][c]);
        }
    }
    for (int j = 0; j < heads; j++)
        for (int c = 0; c < width; c++) _mm256_storeu_ps(acc + j * D + 8 * c, a[j][c]);
}

/* The values of a tile, weighted, for `heads` query heads: 32 columns at a time, then the rest 8 at a time. */
INLINE void weigh_values(const int half, const int heads, const void **rows_v, int64_t hd, int64_t n,
                         const float (*p)[TILE], const float *keep, float *acc, int64_t D) {
    int64_t d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) weigh_slice(half, heads, 4, rows_v, hd + d0, n, p, keep, acc + d0, D);
    for (; d0 < D; d0 += 8) weigh_slice(half, heads, 1, rows_v, hd + d0, n, p, keep, acc + d0, D);
}

/* Every page of the keys begin .. end - 1 (`row` bytes a position), fetched towards L2 ahead of use */
INLINE void prefetch_context(const void *k_cache, const void *v_cache, const int32_t *table, int64_t begin, int64_t end,
                             int64_t row, int64_t block_size) {
    for (int64_t t = begin; t < end;) {
        const int64_t offset = t % block_size, run = block_size - offset < end - t ? block_size - offset : end - t;
        const int64_t at = ((int64_t)table[t / block_size] * block_size + offset) * row;
        for (int64_t b = 0; b < run * row; b += 64) {
            _mm_prefetch((const char *)k_cache + at + b, _MM_HINT_T1);
            _mm_prefetch((const char *)v_cache + at + b, _MM_HINT_T1);
        }
        t += run;
    }
}

/* The keys begin .. end - 1 of one row, for each of its Hkv KV heads and that head's `group` query heads
   (q [Hkv * group, D]): an online softmax over tiles of TILE keys, left unnormalized. Head h's state lies at
   state + h * stride: acc [group, D], then the running max m [group] and sum l [group]. A tile's keys are read
   for all heads together, so its cached rows (all heads of a position are adjacent) stream in order. The
   caches hold float32 (half 0) or float16 (half 1) values; all arithmetic is float32. */
INLINE void attend(const int half, const float *q, const void *k_cache, const void *v_cache, const int32_t *table,
                   int64_t begin, int64_t end, int64_t Hkv, int64_t group, int64_t D, int64_t block_size, float scale,
                   float *state, int64_t stride) {
    const int64_t row = Hkv * D * (half ? 2 : 4);         /* bytes per cached position */
    float scores[MAX_GROUP][TILE], keep[MAX_GROUP];
    for (int64_t h = 0; h < Hkv; h++)
        for (int64_t j = 0; j < group; j++) {
            float *acc = state + h * stride;
            acc[group * D + j] = -INFINITY;
            acc[group * (D + 1) + j] = 0.f;
            for (int64_t d = 0; d < D; d++) acc[j * D + d] = 0.f;
        }
    const void *rows_k[TILE], *rows_v[TILE];
    prefetch_context(k_cache, v_cache, table, begin, end, row, block_size);
    for (int64_t t0 = begin; t0 < end; t0 += TILE) {
        const int64_t n = end - t0 < TILE ? end - t0 : TILE;
        for (int64_t i = 0; i < n;) {          /* one division per page, not per key */
            const int64_t t = t0 + i, offset = t % block_size;
            const int64_t run = block_size - offset < n - i ? block_size - offset : n - i;
            int64_t at = ((int64_t)table[t / block_size] * block_size + offset) * row;
            for (int64_t r = 0; r < run; r++, i++, at += row) {
                rows_k[i] = (const char *)k_cache + at;
                rows_v[i] = (const char *)v_cache + at;
            }
        }
        for (int64_t h = 0; h < Hkv; h++) {
            const int64_t hd = h * D;
            float *acc = state + h * stride, *m = acc + group * D, *l = m + group;
            /* this head's value slices of the tile into L1 while its scores are computed (they are read next) */
            for (int64_t i = 0; i < n; i++)
                for (int64_t b = 0; b < D * (half ? 2 : 4); b += 64)
                    _mm_prefetch((const char *)rows_v[i] + hd * (half ? 2 : 4) + b, _MM_HINT_T0);
            for (int64_t j = 0; j < group; j++) {      /* scores of the tile, eight keys at a time */
                const float *qj = q + (h * group + j) * D;
                int64_t i = 0;
                for (; i + 8 <= n; i += 8) {
                    __m256 s[8];
                    for (int p = 0; p < 8; p++) s[p] = _mm256_setzero_ps();
                    for (int64_t d = 0; d < D; d += 8) {
                        const __m256 qv = _mm256_loadu_ps(qj + d);
                        for (int p = 0; p < 8; p++) s[p] = _mm256_fmadd_ps(qv, load_cached(half, rows_k[i + p], hd + d), s[p]);
                    }
                    _mm256_storeu_ps(scores[j] + i, _mm256_mul_ps(hsum8(s), _mm256_set1_ps(scale)));
                }
                for (; i < n; i++) {
                    __m256 s = _mm256_setzero_ps();
                    for (int64_t d = 0; d < D; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d), load_cached(half, rows_k[i], hd + d), s);
                    scores[j][i] = hsum(s) * scale;
                }
            }
            for (int64_t j = 0; j < group; j++) {      /* online softmax: rescale what came before */
                float mx = m[j];
                int64_t i = 0;
                __m256 top = _mm256_set1_ps(mx);
                for (; i + 8 <= n; i += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(scores[j] + i));
                mx = hmax(top);
                for (; i < n; i++) mx = scores[j][i] > mx ? scores[j][i] : mx;
                keep[j] = expf(m[j] - mx);       /* 0 on the first tile (m = -inf) */
                m[j] = mx;
                __m256 sum = _mm256_setzero_ps();
                for (i = 0; i + 8 <= n; i += 8) {
                    const __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(scores[j] + i), _mm256_set1_ps(mx)));
                    _mm256_storeu_ps(scores[j] + i, e);
                    sum = _mm256_add_ps(sum, e);
                }
                float tile_sum = hsum(sum);
                for (; i < n; i++) tile_sum += scores[j][i] = expf(scores[j][i] - mx);
                l[j] = l[j] * keep[j] + tile_sum;
            }
            /* values of the tile, weighted: each value row loaded once for up to 3 query heads of the group */
            for (int64_t j = 0; j < group; j += 3) {
                const int64_t heads = group - j < 3 ? group - j : 3;
                if (heads == 3) weigh_values(half, 3, rows_v, hd, n, scores + j, keep + j, acc + j * D, D);
                else if (heads == 2) weigh_values(half, 2, rows_v, hd, n, scores + j, keep + j, acc + j * D, D);
                else weigh_values(half, 1, rows_v, hd, n, scores + j, keep + j, acc + j * D, D);
            }
        }
    }
}

static void attend_f32(const float *q, const void *k_cache, const void *v_cache, const int32_t *table, int64_t begin,
                       int64_t end, int64_t Hkv, int64_t group, int64_t D, int64_t block_size, float scale,
                       float *state, int64_t stride) {
    attend(0, q, k_cache, v_cache, table, begin, end, Hkv, group, D, block_size, scale, state, stride);
}

static void attend_f16(const float *q, const void *k_cache, const void *v_cache, const int32_t *table, int64_t begin,
                       int64_t end, int64_t Hkv, int64_t group, int64_t D, int64_t block_size, float scale,
                       float *state, int64_t stride) {
    attend(1, q, k_cache, v_cache, table, begin, end, Hkv, group, D, block_size, scale, state, stride);
}

/* row[0 .. n) of a cache of float32 (half 0) or float16 (half 1) = x[0 .. n), n a multiple of 8; float16 rounds
   to nearest even, as PyTorch's .to(torch.float16) does */
static void store_cached(const int half, void *row, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i += 8) {
        if (half) _mm_storeu_si128((__m128i *)((uint16_t *)row + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
        else _mm256_storeu_ps((float *)row + i, _mm256_loadu_ps(x + i));
    }
}

/* How row b's context start .. seq_len - 1 is cut: chunks of a multiple of TILE keys, at least CHUNK, at most
   MAX_CHUNKS of them. It depends on the row alone, so a row's result never depends on the other rows of the
   batch or on the threads; a context of up to CHUNK keys is one chunk, attended exactly as one pass. */
static int64_t chunk_keys(int64_t length) {
    int64_t chunks = (length + CHUNK - 1) / CHUNK;
    chunks = chunks > MAX_CHUNKS ? MAX_CHUNKS : (chunks < 1 ? 1 : chunks);
    const int64_t keys = (length + chunks - 1) / chunks;
    return (keys + TILE - 1) / TILE * TILE;
}

static int64_t chunk_count(int64_t length) {
    return (length + chunk_keys(length) - 1) / chunk_keys(length);
}

/* Writes row b's new key and value k_new, v_new [B, Hkv, D] (rows ldk and ldv floats apart) at cache slot slots[b]
   (skipped when -1; a slot is block id * block_size + offset), then: q [B, Hq, D] (rows ldq floats apart)
   -> out [B, Hq, D]: row b's query attends to context positions start[b] .. seq_len[b] - 1,
   read from k_cache/v_cache [num_blocks, block_size, Hkv, D] (float32, or float16 when `half`) through
   block_tables [B, width] (int32).
   The Hq / Hkv query heads of a KV head share each key and value row read. Scores never leave a tile
   of TILE keys; the softmax is online (running max and sum), so no L-long row is ever stored.
   D a multiple of 8, at most MAX_DIM; Hq / Hkv at most MAX_GROUP. Threads split (row, KV head, chunk) items;
   the chunks of a long context (chunk_keys) are merged by their maxima and sums (FlashDecoding's split). */
static void paged_decode(const float *q, const float *k_new, const float *v_new, int64_t ldq, int64_t ldk, int64_t ldv,
                         const int64_t *slots, void *k_cache, void *v_cache, int half, const int32_t *block_tables,
                         const int32_t *seq_lens, const int32_t *starts, float *out, int64_t B, int64_t Hq,
                         int64_t Hkv, int64_t D, int64_t block_size, int64_t width, float scale, int threads) {
    const int64_t group = Hq / Hkv, row = Hkv * D, bytes = row * (half ? 2 : 4);     /* per cached token */
    void (*const attend_rows)(const float *, const void *, const void *, const int32_t *, int64_t, int64_t, int64_t,
                              int64_t, int64_t, int64_t, float, float *, int64_t) = half ? attend_f16 : attend_f32;
    /* the new keys and values first, so every chunk sees its row's own (each row writes only its own slot,
       which no other row reads: the engine copies a shared page before a sequence writes to it) */
    int64_t work = 0;
    int64_t *first = malloc(sizeof(int64_t) * (B + 1));     /* row b's chunks are items first[b] .. first[b + 1] - 1 */
    if (first) first[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        if (slots[b] >= 0) {
            store_cached(half, (char *)k_cache + slots[b] * bytes, k_new + b * ldk, row);
            store_cached(half, (char *)v_cache + slots[b] * bytes, v_new + b * ldv, row);
        }
        work += seq_lens[b] - starts[b];
        if (first) first[b + 1] = first[b] + chunk_count(seq_lens[b] - starts[b]);
    }
    const int64_t items = first ? first[B] : B, part = group * (D + 2);      /* a chunk's acc, m and l */
    float *parts = items > B ? malloc(sizeof(float) * items * Hkv * part) : 0;
    if (!parts) {           /* no context longer than CHUNK (or no memory for the split): one item per pair */
        free(first);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (work * Hq * D >= PARALLEL_WORK)
        for (int64_t b = 0; b < B; b++) {
            float state[Hkv * part];
            const int64_t next = b + omp_get_num_threads();   /* likely this thread's next row: the rows' work is
                                                                  alike, so the dynamic schedule deals them round */
            if (next < B)
                prefetch_context(k_cache, v_cache, block_tables + next * width, starts[next], seq_lens[next], bytes,
                                 block_size);
            attend_rows(q + b * ldq, k_cache, v_cache, block_tables + b * width, starts[b], seq_lens[b], Hkv, group, D,
                        block_size, scale, state, part);
            for (int64_t h = 0; h < Hkv; h++)
                for (int64_t j = 0; j < group; j++) {
                    const float *acc = state + h * part, l = acc[group * (D + 1) + j];
                    float *o = out + (b * Hq + h * group + j) * D;
                    const float inv = l > 0.f ? 1.f / l : 0.f;
                    for (int64_t d = 0; d < D; d++) o[d] = acc[j * D + d] * inv;
                }
        }
        return;
    }
#pragma omp parallel num_threads(threads) if (work * Hq * D >= PARALLEL_WORK)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            int64_t b = 0;
            while (first[b + 1] <= item) b++;
            const int64_t keys = chunk_keys(seq_lens[b] - starts[b]), begin = starts[b] + (item - first[b]) * keys;
            const int64_t end = begin + keys < seq_lens[b] ? begin + keys : seq_lens[b];
            attend_rows(q + b * ldq, k_cache, v_cache, block_tables + b * width, begin, end, Hkv, group, D, block_size,
                        scale, parts + item * Hkv * part, part);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * Hkv; bh++) {   /* merge a pair's chunks, in order */
            const int64_t b = bh / Hkv, h = bh % Hkv;
            for (int64_t j = 0; j < group; j++) {
                float mx = -INFINITY, sum = 0.f;
                for (int64_t c = first[b]; c < first[b + 1]; c++) {
                    const float mc = parts[(c * Hkv + h) * part + group * D + j];
                    mx = mc > mx ? mc : mx;
                }
                float *o = out + (b * Hq + h * group + j) * D;
                for (int64_t d = 0; d < D; d++) o[d] = 0.f;
                for (int64_t c = first[b]; c < first[b + 1]; c++) {
                    const float *p = parts + (c * Hkv + h) * part;
                    if (p[group * D + j] == -INFINITY) continue;       /* a chunk of no keys */
                    const float w = expf(p[group * D + j] - mx);
                    sum += p[group * (D + 1) + j] * w;
                    for (int64_t d = 0; d < D; d++) o[d] += p[j * D + d] * w;
                }
                const float inv = sum > 0.f ? 1.f / sum : 0.f;
                for (int64_t d = 0; d < D; d++) o[d] *= inv;
            }
        }
    }
    free(first);
    free(parts);
}

/* q [B, Hq, D], k_new and v_new [B, Hkv, D], all contiguous: see paged_decode. */
void tm_paged_decode(const float *q, const float *k_new, const float *v_new, const int64_t *slots,
                     void *k_cache, void *v_cache, int half, const int32_t *block_tables,
                     const int32_t *seq_lens, const int32_t *starts, float *out, int64_t B, int64_t Hq,
                     int64_t Hkv, int64_t D, int64_t block_size, int64_t width, float scale, int threads) {
    paged_decode(q, k_new, v_new, Hq * D, Hkv * D, Hkv * D, slots, k_cache, v_cache, half, block_tables, seq_lens, starts, out,
                 B, Hq, Hkv, D, block_size, width, scale, threads);
}

/* ---- small per-token ops of a decode step (each replaces several PyTorch ops) -------------------------- */

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * weight, for M rows of K floats (K a multiple of 8). */
void tm_rms_norm(const float *x, const float *weight, float *out, int64_t M, int64_t K, float eps, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1 && M * K >= PARALLEL_ELEMENTS)
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        __m256 ss = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
            const __m256 v = _mm256_loadu_ps(xm + k);
            ss = _mm256_fmadd_ps(v, v, ss);
        }
        const __m256 r = _mm256_set1_ps(1.f / sqrtf(hsum(ss) / (float)K + eps));
        for (int64_t k = 0; k < K; k += 8)
            _mm256_storeu_ps(out + m * K + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xm + k), r), _mm256_loadu_ps(weight + k)));
    }
}

/* Rotate-half (NeoX) rope: x [T, H, D] with a stride of `ld` floats between tokens (heads contiguous)
   -> out [T, H, D] contiguous; cos, sin [T, D / 2]. D / 2 a multiple of 8. */
void tm_rope(const float *x, int64_t ld, const float *cos_t, const float *sin_t, float *out,
             int64_t T, int64_t H, int64_t D, int threads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (T > 1 && T * H * D >= PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            const float *a = x + t * ld + h * D, *c = cos_t + t * half, *s = sin_t + t * half;
            float *o = out + (t * H + h) * D;
            for (int64_t i = 0; i < half; i += 8) {
                const __m256 x1 = _mm256_loadu_ps(a + i), x2 = _mm256_loadu_ps(a + half + i);
                const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
                _mm256_storeu_ps(o + i, _mm256_fmsub_ps(x1, cv, _mm256_mul_ps(x2, sv)));
                _mm256_storeu_ps(o + half + i, _mm256_fmadd_ps(x2, cv, _mm256_mul_ps(x1, sv)));
            }
        }
}

/* out [M, I] = silu(x[:, :I]) * x[:, I:] for x [M, 2I] (SwiGLU's gate and up halves), I a multiple of 8. */
void tm_silu_mul(const float *x, float *out, int64_t M, int64_t I, int threads) {
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1 && M * I >= PARALLEL_ELEMENTS)
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i += 8) {
            const __m256 g = _mm256_loadu_ps(x + m * 2 * I + i), u = _mm256_loadu_ps(x + m * 2 * I + I + i);
            /* silu(g) = g / (1 + exp(-g)); exp of -|g| keeps the argument <= 0, then e^g = 1 / e^-g if g < 0 */
            const __m256 e = exp_neg(_mm256_or_ps(g, sign));                         /* exp(-|g|) */
            const __m256 neg = _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ);
            const __m256 sig = _mm256_blendv_ps(_mm256_div_ps(one, _mm256_add_ps(one, e)),
                                                _mm256_div_ps(e, _mm256_add_ps(one, e)), neg);
            _mm256_storeu_ps(out + m * I + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), u));
        }
}

/* out [M, I] = gelu(x[:, :I]) * x[:, I:] (GeGLU, gelu's tanh approximation as PyTorch's
   approximate="tanh": 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))), I a multiple of 8. */
void tm_gelu_tanh_mul(const float *x, float *out, int64_t M, int64_t I, int threads) {
    const __m256 one = _mm256_set1_ps(1.f), half = _mm256_set1_ps(0.5f), sign = _mm256_set1_ps(-0.f);
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), c3 = _mm256_set1_ps(0.044715f);
#pragma omp parallel for schedule(static) num_threads(threads) if (M > 1 && M * I >= PARALLEL_ELEMENTS)
    for (int64_t m = 0; m < M; m++)
        for (int64_t i = 0; i < I; i += 8) {
            const __m256 g = _mm256_loadu_ps(x + m * 2 * I + i), u = _mm256_loadu_ps(x + m * 2 * I + I + i);
            const __m256 z = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(c3, g), _mm256_mul_ps(g, g), g));
            /* tanh |z| = (1 - e) / (1 + e) with e = exp(-2 |z|) <= 1, then z's sign */
            const __m256 e = exp_neg(_mm256_add_ps(_mm256_or_ps(z, sign), _mm256_or_ps(z, sign)));
            const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
            const __m256 th = _mm256_or_ps(t, _mm256_and_ps(z, sign));
            _mm256_storeu_ps(out + m * I + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, g), _mm256_add_ps(one, th)), u));
        }
}

/* ---- a stack of Llama decoder layers for the rows of a decode step, in one call ----------------------

   The same kernels, in the same order, on the same values as the model's Python forward (so the same
   results, bit for bit), without the ~10 us of Python around each of the ~10 kernels of a layer. */

typedef struct {            /* one linear layer's weights, as tm_int4_mm (bits 4) or tm_int8_mm (bits 8) take them */
    const void *q;
    const void *scale;      /* int4: scale_offset [N8, K / group, 2, 8]; int8: scale [N8, K / group, 8] */
    const float *bias;      /* [N] or NULL */
    const int64_t *perm;    /* [K] or NULL: the product takes x[:, perm] (GPTQ act-order) */
    int64_t n, k, group, bits, half;    /* half: the scales are float16 */
    float act_range;        /* > 0: W8A8 (bits 8), activations rounded per token to integers in
                               [-128, 127] with scale max|x| / act_range; 0: float activations */
} tm_linear;

typedef struct {
    tm_linear qkv, o, gate_up, down;
    const float *input_norm;    /* [H], before attention */
    const float *attn_out_norm; /* [H] or NULL: on attention's output before it joins the residual (Gemma 3) */
    const float *mlp_norm;      /* [H], before the MLP */
    const float *mlp_out_norm;  /* [H] or NULL: on the MLP's output (Gemma 3) */
    const float *q_norm, *k_norm;   /* [D] each, or NULL: per-head RMSNorm of q and k before rope */
    void *k_cache, *v_cache;    /* [num_blocks, block_size, Hkv, D], float32 or float16 (tm_decode_layers' half) */
    int64_t meta;               /* which of the step's tm_decode_meta this layer's KV group reads */
    int64_t rope;               /* which of the step's rope tables this layer rotates by */
} tm_layer;

typedef struct {            /* as tm_paged_decode takes them */
    const int64_t *slots;
    const int32_t *block_tables, *seq_lens, *starts;
    int64_t width;
} tm_decode_meta;

/* W8A8's dynamic activations, as quant/int8.py's W8A8Kernel computes them in float32: per row,
   sx = max(max|x| / act_range, 1e-12), x_int = clamp(round_half_even(x / sx), -128, 127). */
static void quantize_tokens(const float *x, int8_t *x_int, float *sx, int64_t M, int64_t K, float act_range) {
    for (int64_t m = 0; m < M; m++) {
        float amax = 0.f;
        int nan = 0;
        for (int64_t k = 0; k < K; k++) {
            const float a = fabsf(x[m * K + k]);
            nan |= a != a;
            amax = a > amax ? a : amax;
        }
        float s = nan ? NAN : amax / act_range;
        s = s < 1e-12f ? 1e-12f : s;
        sx[m] = s;
        for (int64_t k = 0; k < K; k++) {
            float r = nearbyintf(x[m * K + k] / s);
            r = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
            x_int[m * K + k] = (int8_t)(r == r ? r : 0.f);
        }
    }
}

/* x [M, K] -> y [M, N]; `gathered` has room for M x K floats (for x[:, perm], or W8A8's integers) and
   `token_scales` for M floats. */
static int linear(const tm_linear *l, const float *x, float *y, float *gathered, float *token_scales, int64_t M,
                  int threads) {
    if (l->perm) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < l->k; j++) gathered[m * l->k + j] = x[m * l->k + l->perm[j]];
        x = gathered;
    }
    int status;
    if (l->bits == 4) {
        status = tm_int4_mm(x, (const uint8_t *)l->q, l->scale, (int)l->half, y, M, l->n, l->k, l->group, l->n,
                            threads);
    } else if (l->act_range > 0.f) {
        quantize_tokens(x, (int8_t *)gathered, token_scales, M, l->k, l->act_range);
        status = tm_int8_mm(0, (const int8_t *)gathered, (const int8_t *)l->q, l->scale, (int)l->half, y, M, l->n,
                            l->k, l->group, l->n, threads);
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < l->n; j++) y[m * l->n + j] *= token_scales[m];
    } else {
        status = tm_int8_mm(x, 0, (const int8_t *)l->q, l->scale, (int)l->half, y, M, l->n, l->k, l->group, l->n,
                            threads);
    }
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < l->n; j++) y[m * l->n + j] += l->bias[j];
    return status;
}

static void add_into(float *residual, const float *h, int64_t count) {
    for (int64_t i = 0; i < count; i += 8)
        _mm256_storeu_ps(residual + i, _mm256_add_ps(_mm256_loadu_ps(residual + i), _mm256_loadu_ps(h + i)));
}

/* residual [M, H] (M decode rows, one token each) through layers 0 .. L - 1, in place:
     residual += [attn_out_norm] o(attention(rope([q/k_norm] qkv(input_norm(residual)))))
     residual += [mlp_out_norm] down(act(gate) * up)(mlp_norm(residual))
   act: 0 silu, 1 gelu (tanh approximation). cos, sin [R, M, D / 2]: R rope tables (layer->rope picks one).
   H, I and D / 2 multiples of 8. Returns 0, or -1 without scratch memory. */
int tm_decode_layers(const tm_layer *layers, int64_t L, const tm_decode_meta *metas, float *residual,
                     const float *cos_t, const float *sin_t, int64_t M, int64_t H, int64_t Hq, int64_t Hkv,
                     int64_t D, int64_t I, int64_t block_size, int half, float eps, float scale, int act, int threads) {
    const int64_t width_qkv = (Hq + 2 * Hkv) * D, width_qk = (Hq + Hkv) * D;
    const int64_t widest = H > Hq * D ? (H > I ? H : I) : (Hq * D > I ? Hq * D : I);
    float *h = malloc(sizeof(float) * M * (2 * H + width_qkv + width_qk + Hq * D + 3 * I + widest + 1));
    if (!h) return -1;
    float *qkv = h + M * H, *qk = qkv + M * width_qkv, *attn = qk + M * width_qk, *o = attn + M * Hq * D;
    float *gate_up = o + M * H, *glu = gate_up + M * 2 * I, *gathered = glu + M * I, *token_scales = gathered + M * widest;
    int status = 0;
    for (int64_t i = 0; i < L && status == 0; i++) {
        const tm_layer *layer = layers + i;
        const tm_decode_meta *meta = metas + layer->meta;
        tm_rms_norm(residual, layer->input_norm, h, M, H, eps, threads);
        status |= linear(&layer->qkv, h, qkv, gathered, token_scales, M, threads);
        if (layer->q_norm)          /* in place, head by head */
            for (int64_t m = 0; m < M; m++) {
                tm_rms_norm(qkv + m * width_qkv, layer->q_norm, qkv + m * width_qkv, Hq, D, eps, 1);
                tm_rms_norm(qkv + m * width_qkv + Hq * D, layer->k_norm, qkv + m * width_qkv + Hq * D, Hkv, D, eps, 1);
            }
        const int64_t rope = layer->rope * M * (D / 2);
        tm_rope(qkv, width_qkv, cos_t + rope, sin_t + rope, qk, M, Hq + Hkv, D, threads);
        paged_decode(qk, qk + Hq * D, qkv + width_qk, width_qk, width_qk, width_qkv, meta->slots, layer->k_cache,
                     layer->v_cache, half, meta->block_tables, meta->seq_lens, meta->starts, attn, M, Hq, Hkv, D,
                     block_size, meta->width, scale, threads);
        status |= linear(&layer->o, attn, o, gathered, token_scales, M, threads);
        if (layer->attn_out_norm) tm_rms_norm(o, layer->attn_out_norm, o, M, H, eps, threads);
        add_into(residual, o, M * H);
        tm_rms_norm(residual, layer->mlp_norm, h, M, H, eps, threads);
        status |= linear(&layer->gate_up, h, gate_up, gathered, token_scales, M, threads);
        if (act == 1) tm_gelu_tanh_mul(gate_up, glu, M, I, threads);
        else tm_silu_mul(gate_up, glu, M, I, threads);
        status |= linear(&layer->down, glu, o, gathered, token_scales, M, threads);
        if (layer->mlp_out_norm) tm_rms_norm(o, layer->mlp_out_norm, o, M, H, eps, threads);
        add_into(residual, o, M * H);
    }
    free(h);
    return status;
}

/* ---- the sampler's greedy pick ----------------------------------------------------------------------- */

/* out[m] = the index of the first largest value of row m of x [M, N], NaN counting as the largest (as
   torch.argmax): a vectorized pass for the maximum, then one up to its first occurrence. */
void tm_argmax_rows(const float *x, int64_t *out, int64_t M, int64_t N, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M * N >= (1 << 20))
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * N;
        __m256 top = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= N; i += 8) {
            const __m256 v = _mm256_loadu_ps(r + i);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            top = _mm256_max_ps(top, v);
        }
        int has_nan = _mm256_movemask_ps(nan) != 0;
        float best = has_nan ? 0.f : hmax(top);
        for (; i < N; i++) {
            if (r[i] != r[i]) has_nan = 1;
            else if (r[i] > best) best = r[i];
        }
        int64_t found = 0;
        if (has_nan) {
            while (found < N && r[found] == r[found]) found++;
        } else {
            const __m256 b = _mm256_set1_ps(best);
            int64_t j = 0;
            for (; j + 8 <= N; j += 8) {
                const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(r + j), b, _CMP_EQ_OQ));
                if (mask) break;
            }
            while (j < N && r[j] != best) j++;
            found = j < N ? j : 0;
        }
        out[m] = found;
    }
}
