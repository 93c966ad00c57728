/* AVX2 (+FMA, F16C) kernels: the same layout as avx512.c, one 32-byte half of each 64-byte block at a
 * time. No VNNI here, so codes x activations go through vpmaddubsw (int16 pairs) then vpmaddwd. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>
#include <string.h>

#include "ternary.h"

#define INLINE static inline __attribute__((always_inline))
/* Prefetch the next tile of rows as one linear stream, PF_EXTRA bytes beyond it, into L2 (see avx512.c). */
#define PF_EXTRA 8192
#define PF_HINT _MM_HINT_T1

INLINE int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- activations ------------------------------------------------------------------------------ */

void tl_avx2_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                      int32_t *sums) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        int8_t *qr = xq + i * k_pad;
        __m256 vmax = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(xr + j), absmask));
        float amax = hmax_ps(vmax);
        for (; j < k; j++) {
            float a = xr[j] < 0 ? -xr[j] : xr[j];
            if (a > amax) amax = a;
        }
        float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
        const __m256 vs = _mm256_set1_ps(s);
        const __m256i lo = _mm256_set1_epi32(-128), hi = _mm256_set1_epi32(127);
        __m256i vsum = _mm256_setzero_si256();
        int32_t tail_sum = 0;
        for (j = 0; j + 8 <= k; j += 8) {
            __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + j), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(v), lo), hi);
            vsum = _mm256_add_epi32(vsum, q);
            int32_t tmp[8];
            _mm256_storeu_si256((__m256i *)tmp, q);
            for (int t = 0; t < 8; t++) qr[j + t] = (int8_t)tmp[t];
        }
        for (; j < k; j++) {
            __m128 v = _mm_round_ss(_mm_setzero_ps(), _mm_set_ss(xr[j] * s),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            float f = _mm_cvtss_f32(v);
            f = f > 127.0f ? 127.0f : (f >= -128.0f ? f : -128.0f);
            qr[j] = (int8_t)f;
            tail_sum += (int32_t)f;
        }
        memset(qr + k, 0, (size_t)(k_pad - k));
        a_scale[i] = s;
        sums[i] = hsum_epi32(vsum) + tail_sum;
    }
}

/* ---- ternary matmul ---------------------------------------------------------------------------- */

INLINE void store_out(int64_t i, int64_t r, int32_t acc, const int32_t *sums, const float *a_scale,
                      const float *w_scale, int64_t ws_stride, int64_t ldy, float *y, int32_t *acc_out) {
    acc -= sums[i];
    if (y)
        y[i * ldy + r] = (float)acc * (w_scale[r * ws_stride] / a_scale[i]);
    else
        acc_out[i * ldy + r] = acc;
}

/* NR rows x MT tokens. Per 256-column block the int16 partial sums of 8 vpmaddubsw (each |.| <= 512,
 * codes <= 2) stay below 4096, then widen once with vpmaddwd. */
INLINE void tile(const int NR, const int MT, const uint8_t *w, int64_t row_bytes, int64_t nblk,
                 const int8_t *xq, int64_t k_pad, int64_t r, int64_t i, const int32_t *sums,
                 const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t ldy, float *y,
                 int32_t *acc_out) {
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc[4][2];
    const uint8_t *wr[4];
    const int8_t *xr[2];
    for (int rr = 0; rr < NR; rr++) {
        wr[rr] = w + (r + rr) * row_bytes;
        for (int t = 0; t < MT; t++) acc[rr][t] = _mm256_setzero_si256();
    }
    for (int t = 0; t < MT; t++) xr[t] = xq + (i + t) * k_pad;
    const char *pf = (const char *)(w + (r + NR) * row_bytes) + PF_EXTRA;
    for (int64_t b = 0; b < nblk; b++) {
        __m256i s16[4][2];
        for (int rr = 0; rr < NR; rr++)
            for (int t = 0; t < MT; t++) s16[rr][t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i raw[4];
            for (int rr = 0; rr < NR; rr++) {
                if (h == 0) _mm_prefetch(pf + (b * NR + rr) * 64, PF_HINT);
                raw[rr] = _mm256_loadu_si256((const __m256i *)(wr[rr] + b * 64 + 32 * h));
            }
            for (int q = 0; q < 4; q++) {
                __m256i c[4];
                for (int rr = 0; rr < NR; rr++) c[rr] = _mm256_and_si256(_mm256_srli_epi16(raw[rr], 2 * q), m3);
                for (int t = 0; t < MT; t++) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(xr[t] + b * 256 + 64 * q + 32 * h));
                    for (int rr = 0; rr < NR; rr++)
                        s16[rr][t] = _mm256_add_epi16(s16[rr][t], _mm256_maddubs_epi16(c[rr], a));
                }
            }
        }
        for (int rr = 0; rr < NR; rr++)
            for (int t = 0; t < MT; t++)
                acc[rr][t] = _mm256_add_epi32(acc[rr][t], _mm256_madd_epi16(s16[rr][t], ones));
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++)
            store_out(i + t, r + rr, hsum_epi32(acc[rr][t]), sums, a_scale, w_scale, ws_stride, ldy, y, acc_out);
}

void tl_avx2_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                     const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                     int64_t m, int64_t ldy, float *y, int32_t *acc_out) {
    const int64_t row_bytes = k_pad / 4, nblk = k_pad / TL_BLOCK;
#define TILE(NR, MT)                                                                                     \
    tile(NR, MT, w, row_bytes, nblk, xq, k_pad, r, i, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out)
#define TOKENS(NR)                                                                                       \
    do {                                                                                                 \
        for (i = 0; i + 2 <= m; i += 2) TILE(NR, 2);                                                     \
        if (i < m) TILE(NR, 1);                                                                          \
    } while (0)
    int64_t r = r0, i;
    for (; r + 4 <= r1; r += 4) TOKENS(4);
    for (; r < r1; r++) TOKENS(1);
#undef TOKENS
#undef TILE
}

/* ---- float matmul (LM head) -------------------------------------------------------------------- */

INLINE __m256 load_w8(const void *w, const int dtype, int64_t idx) {
    if (dtype == TL_F32) return _mm256_loadu_ps((const float *)w + idx);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + idx));
    if (dtype == TL_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float load_w1(const void *w, const int dtype, int64_t idx) {
    if (dtype == TL_F32) return ((const float *)w)[idx];
    if (dtype == TL_F16) return tl_f16_to_f32(((const uint16_t *)w)[idx]);
    return tl_bf16_to_f32(((const uint16_t *)w)[idx]);
}

INLINE void float_tile(const int dtype, const int NR, const int MT, const void *w, int64_t k, int64_t r,
                       const float *x, int64_t i, int64_t ldy, float *y) {
    const int64_t esize = dtype == TL_F32 ? 4 : 2;
    __m256 acc[4][2];
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) acc[rr][t] = _mm256_setzero_ps();
    const char *pf = (const char *)w + (r + NR) * k * esize + PF_EXTRA;
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        if ((j & 31) == 0) /* NR * 32 * esize bytes every 4 steps */
            for (int64_t p = 0; p < NR * 32 * esize; p += 64) _mm_prefetch(pf + j * NR * esize + p, PF_HINT);
        __m256 wv[4];
        for (int rr = 0; rr < NR; rr++) wv[rr] = load_w8(w, dtype, (r + rr) * k + j);
        for (int t = 0; t < MT; t++) {
            const __m256 xv = _mm256_loadu_ps(x + (i + t) * k + j);
            for (int rr = 0; rr < NR; rr++) acc[rr][t] = _mm256_fmadd_ps(wv[rr], xv, acc[rr][t]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++) {
            float s = hsum_ps(acc[rr][t]);
            for (int64_t jj = j; jj < k; jj++) s += x[(i + t) * k + jj] * load_w1(w, dtype, (r + rr) * k + jj);
            y[(i + t) * ldy + r + rr] = s;
        }
}

INLINE void float_rows(const int dtype, const void *w, int64_t k, int64_t r0, int64_t r1, const float *x,
                       int64_t m, int64_t ldy, float *y) {
#define FTILE(NR, MT) float_tile(dtype, NR, MT, w, k, r, x, i, ldy, y)
#define FTOKENS(NR)                                                                                      \
    do {                                                                                                 \
        for (i = 0; i + 2 <= m; i += 2) FTILE(NR, 2);                                                    \
        if (i < m) FTILE(NR, 1);                                                                         \
    } while (0)
    int64_t r = r0, i;
    for (; r + 4 <= r1; r += 4) FTOKENS(4);
    for (; r < r1; r++) FTOKENS(1);
#undef FTOKENS
#undef FTILE
}

void tl_avx2_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                   int64_t ldy, float *y) {
    switch (dtype) {
    case TL_F16: float_rows(TL_F16, w, k, r0, r1, x, m, ldy, y); break;
    case TL_BF16: float_rows(TL_BF16, w, k, r0, r1, x, m, ldy, y); break;
    default: float_rows(TL_F32, w, k, r0, r1, x, m, ldy, y); break;
    }
}

/* ---- Q8_0 (LM head) ---------------------------------------------------------------------------- */

void tl_avx2_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    for (int64_t blk = 0; blk < m * (k / TL_QBLOCK); blk++) {
        const float *xb = x + blk * TL_QBLOCK;
        __m256 v[4], vmax = _mm256_setzero_ps();
        for (int c = 0; c < 4; c++) {
            v[c] = _mm256_loadu_ps(xb + 8 * c);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v[c], absmask));
        }
        const float amax = hmax_ps(vmax);
        const int tiny = !(amax >= 1e-30f);
        const __m256 id = _mm256_set1_ps(tiny ? 0.0f : 127.0f / amax);
        xd[blk] = tiny ? 0.0f : amax / 127.0f;
        for (int c = 0; c < 4; c++) {
            __m256 f = _mm256_round_ps(_mm256_mul_ps(v[c], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i q = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lo), hi);
            int32_t tmp[8];
            _mm256_storeu_si256((__m256i *)tmp, q);
            for (int t = 0; t < 8; t++) xq[blk * TL_QBLOCK + 8 * c + t] = (int8_t)tmp[t];
        }
    }
}

/* Block sums of 8 blocks b0..b7 (8 int32 lanes each) -> one vector [sum b0, ..., sum b7]. */
INLINE __m256i block_sums8(const __m256i b[8]) {
    const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(b[0], b[1]), _mm256_hadd_epi32(b[2], b[3]));
    const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(b[4], b[5]), _mm256_hadd_epi32(b[6], b[7]));
    /* h0 = [b0..b3 over lanes 0-3 | b0..b3 over lanes 4-7], likewise h1 for b4..b7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
}

/* One row x one token. No VNNI: vpmaddubsw needs an unsigned operand, so the sign of w moves onto x
 * (|w| by sign(w) x; pairs <= 2 * 127 * 127 fit int16 without saturation), then vpmaddwd widens.
 * Blocks b with b % 16 < 8 go to lanes 0-7 (acc[0]), the others to lanes 8-15 (acc[1]). */
INLINE float q8_dot(const int8_t *wr, const uint16_t *dr, const int8_t *x, const float *xd, int64_t nb,
                    const char *pf) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int cnt = nb - b0 >= 8 ? 8 : (int)(nb - b0);
        __m256i bs[8];
        for (int b = 0; b < 8; b++) {
            if (b >= cnt) {
                bs[b] = _mm256_setzero_si256();
                continue;
            }
            _mm_prefetch(pf + (b0 + b) * 32, PF_HINT);
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + (b0 + b) * 32));
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + (b0 + b) * 32));
            const __m256i p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
            bs[b] = _mm256_madd_epi16(p16, ones);
        }
        __m256 dw, dx;
        if (cnt == 8) {
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dr + b0)));
            dx = _mm256_loadu_ps(xd + b0);
        } else {
            uint16_t tw[8] = {0};
            float tx[8] = {0};
            memcpy(tw, dr + b0, (size_t)cnt * 2);
            memcpy(tx, xd + b0, (size_t)cnt * 4);
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tw));
            dx = _mm256_loadu_ps(tx);
        }
        const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(block_sums8(bs)), _mm256_mul_ps(dw, dx));
        const int half = (int)((b0 / 8) & 1);
        acc[half] = _mm256_add_ps(acc[half], p);
    }
    return hsum_ps(_mm256_add_ps(acc[0], acc[1])); /* lanes l + 8 -> l, then the tree of hsum_ps */
}

void tl_avx2_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK;
    for (int64_t r = r0; r < r1; r++) {
        const char *pf = (const char *)(w + (r + 1) * k) + PF_EXTRA;
        for (int64_t i = 0; i < m; i++)
            y[i * ldy + r] = q8_dot(w + r * k, wd + r * nb, xq + i * k, xd + i * nb, nb, pf);
    }
}

/* ---- Q4_0 (LM head) ---------------------------------------------------------------------------- */

/* One row x one token, in the float order of q8_dot. 32 weight bytes = 2 blocks: & 0xF gives both
 * blocks' first 16 columns (one 128-bit lane each), >> 4 & 0xF their last 16; the activations are
 * regrouped to match by two vperm2i128. q = u - 8 is signed, so as in q8_dot its sign moves onto x;
 * 4 products per int16 stay within 4 * 8 * 127. After vpmaddwd lanes 0-3 hold block 2c, 4-7 block 2c + 1. */
INLINE float q4_dot(const uint8_t *wr, const uint16_t *dr, const int8_t *x, const float *xd, int64_t nb,
                    const char *pf) {
    const __m256i ones = _mm256_set1_epi16(1), low4 = _mm256_set1_epi8(15), eight = _mm256_set1_epi8(8);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int cnt = nb - b0 >= 8 ? 8 : (int)(nb - b0);
        __m256i bs[4];
        for (int c = 0; c < 4; c++) {
            const int64_t b = b0 + 2 * c;
            if (2 * c >= cnt) {
                bs[c] = _mm256_setzero_si256();
                continue;
            }
            _mm_prefetch(pf + b * 16, PF_HINT);
            __m256i raw, x0, x1;
            x0 = _mm256_loadu_si256((const __m256i *)(x + b * 32));
            if (2 * c + 1 < cnt) {
                raw = _mm256_loadu_si256((const __m256i *)(wr + b * 16));
                x1 = _mm256_loadu_si256((const __m256i *)(x + b * 32 + 32));
            } else { /* the last block alone */
                raw = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(wr + b * 16)));
                x1 = _mm256_setzero_si256();
            }
            const __m256i ql = _mm256_sub_epi8(_mm256_and_si256(raw, low4), eight);
            const __m256i qh = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low4), eight);
            const __m256i xl = _mm256_permute2x128_si256(x0, x1, 0x20), xh = _mm256_permute2x128_si256(x0, x1, 0x31);
            const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(ql), _mm256_sign_epi8(xl, ql)),
                                                 _mm256_maddubs_epi16(_mm256_abs_epi8(qh), _mm256_sign_epi8(xh, qh)));
            bs[c] = _mm256_madd_epi16(p16, ones);
        }
        /* hadd tree: [b0 b2 b4 b6 | b1 b3 b5 b7], then back to block order */
        const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(bs[0], bs[1]), _mm256_hadd_epi32(bs[2], bs[3]));
        const __m256i isum = _mm256_permutevar8x32_epi32(h, order);
        __m256 dw, dx;
        if (cnt == 8) {
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dr + b0)));
            dx = _mm256_loadu_ps(xd + b0);
        } else {
            uint16_t tw[8] = {0};
            float tx[8] = {0};
            memcpy(tw, dr + b0, (size_t)cnt * 2);
            memcpy(tx, xd + b0, (size_t)cnt * 4);
            dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tw));
            dx = _mm256_loadu_ps(tx);
        }
        const __m256 p = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx));
        const int half = (int)((b0 / 8) & 1);
        acc[half] = _mm256_add_ps(acc[half], p);
    }
    return hsum_ps(_mm256_add_ps(acc[0], acc[1]));
}

void tl_avx2_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK;
    for (int64_t r = r0; r < r1; r++) {
        const char *pf = (const char *)(w + (r + 1) * (k / 2)) + PF_EXTRA;
        for (int64_t i = 0; i < m; i++)
            y[i * ldy + r] = q4_dot(w + r * (k / 2), wd + r * nb, xq + i * k, xd + i * nb, nb, pf);
    }
}

#else
typedef int tl_avx2_unused; /* keep the translation unit non-empty on non-x86 builds */
#endif
