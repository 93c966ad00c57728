/* AVX-512 (F, BW, VL, VNNI) kernels. One 64-byte load of packed weights unpacks (shift, & 3) into
 * four 64-column code vectors, each one vpdpbusd (unsigned codes x signed int8 activations).
 * Compiled with a target pragma so the rest of the wheel stays baseline x86-64; picked at runtime. */
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "ternary.h"

#define INLINE static inline __attribute__((always_inline))

/* acc += unsigned bytes a . signed bytes b, per int32 lane. Inline asm because GCC 12 wraps the
 * intrinsic in two register copies per use, which lengthens the accumulator chains (GEMV measured
 * ~1.5x slower from L2). */
INLINE __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}

/* GEMV prefetch: while a tile of rows is processed, the next tile is prefetched, plus PF_EXTRA bytes
 * more, so enough requests are in flight to approach DRAM bandwidth from one core. Into L2, not L1:
 * on Zen 5 that measured +40 % (54 -> 77 % of read bandwidth, one thread), as the L1 has too few miss
 * buffers to cover DRAM latency; the hardware L1 prefetcher then streams L2 -> L1. Distance 4-16 KB
 * is flat; NTA and T0 are equally slow. Each line is prefetched twice, at PF_EXTRA and PF_EXTRA + PF_AGAIN
 * (Zen 4, one thread: +6 % ternary, +15 % Q8_0 vs once; halving the prefetches costs 25-35 %): the
 * repeat seems to re-issue requests dropped while the miss queues are full, as its offset barely
 * matters (-4 to +8 KB measured alike) and a single prefetch at either distance is no faster. */
#ifndef PF_EXTRA
#define PF_EXTRA 8192
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1
#endif
#define PF_L1 2048
#define PF_AGAIN 4096

/* ---- activations ------------------------------------------------------------------------------ */

void tl_avx512_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                        int32_t *sums) {
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        int8_t *qr = xq + i * k_pad;
        __m512 vmax = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 16 <= k; j += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + j)));
        if (j < k) {
            __mmask16 mk = (__mmask16)((1u << (k - j)) - 1);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xr + j)));
        }
        float amax = _mm512_reduce_max_ps(vmax);
        float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
        const __m512 vs = _mm512_set1_ps(s);
        const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
        __m512i vsum = _mm512_setzero_si512();
        for (j = 0; j < k; j += 16) {
            __mmask16 mk = k - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - j)) - 1);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + j), vs);
            /* explicit round-half-to-even, independent of MXCSR */
            __m512i q = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
            vsum = _mm512_add_epi32(vsum, q);
            _mm_mask_storeu_epi8(qr + j, mk, _mm512_cvtepi32_epi8(q));
        }
        memset(qr + k, 0, (size_t)(k_pad - k));
        a_scale[i] = s;
        sums[i] = _mm512_reduce_add_epi32(vsum);
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

/* GEMV tile: NR rows x 1 token, activations loaded once per block for all NR rows.
 * The NR rows are adjacent in memory, so the prefetch walks the next tile as one linear stream:
 * per-row prefetch (NR short interleaved streams) measured 2x slower from DRAM.
 * Codes are taken as (raw & 3), (raw & 12), (raw >> 4 & 3), (raw >> 4 & 12): one shift instead of
 * three; the fields at bits 2-3 and 6-7 count 4x and go to acc1, divided by 4 at the end (exact;
 * |acc1| <= 8 * 128 * k_pad / 2 < 2^31 for k_pad <= TL_MAX_K). */
INLINE void gemv_tile(const int NR, const uint8_t *w, int64_t row_bytes, int64_t nblk, const int8_t *x,
                      int64_t r, const int32_t *sums, const float *a_scale, const float *w_scale,
                      int64_t ws_stride, int64_t ldy,
                      float *y, int32_t *acc_out) {
    const __m512i m3 = _mm512_set1_epi8(3), m12 = _mm512_set1_epi8(12);
    __m512i acc0[4], acc1[4];
    const uint8_t *wr[4];
    const char *pf = (const char *)(w + (r + NR) * row_bytes) + PF_EXTRA;
    const char *pf1 = (const char *)(w + r * row_bytes) + PF_L1; /* L2 -> L1, measured +5 % */
    for (int rr = 0; rr < NR; rr++) {
        acc0[rr] = _mm512_setzero_si512();
        acc1[rr] = _mm512_setzero_si512();
        wr[rr] = w + (r + rr) * row_bytes;
    }
    for (int64_t b = 0; b < nblk; b++) {
        const __m512i a0 = _mm512_loadu_si512(x + b * 256);
        const __m512i a1 = _mm512_loadu_si512(x + b * 256 + 64);
        const __m512i a2 = _mm512_loadu_si512(x + b * 256 + 128);
        const __m512i a3 = _mm512_loadu_si512(x + b * 256 + 192);
        for (int rr = 0; rr < NR; rr++) {
            _mm_prefetch(pf + (b * NR + rr) * 64, PF_HINT);
            _mm_prefetch(pf + PF_AGAIN + (b * NR + rr) * 64, PF_HINT);
            _mm_prefetch(pf1 + (b * NR + rr) * 64, _MM_HINT_T0);
            __m512i raw = _mm512_loadu_si512(wr[rr] + b * 64);
            __asm__("" : "+v"(raw)); /* keep it in a register: one load, not one per use */
            const __m512i hi = _mm512_srli_epi16(raw, 4);
            acc0[rr] = dpbusd(acc0[rr], _mm512_and_si512(raw, m3), a0);
            acc1[rr] = dpbusd(acc1[rr], _mm512_and_si512(raw, m12), a1);
            acc0[rr] = dpbusd(acc0[rr], _mm512_and_si512(hi, m3), a2);
            acc1[rr] = dpbusd(acc1[rr], _mm512_and_si512(hi, m12), a3);
        }
    }
    for (int rr = 0; rr < NR; rr++) {
        const __m512i acc = _mm512_add_epi32(acc0[rr], _mm512_srai_epi32(acc1[rr], 2));
        store_out(0, r + rr, _mm512_reduce_add_epi32(acc), sums, a_scale, w_scale, ws_stride, ldy, y, acc_out);
    }
}

/* GEMM tile: NR rows x MT tokens (<= 4 x 4, 16 accumulators). Each unpacked code vector is reused
 * across MT tokens and each activation load across NR rows. */
INLINE void gemm_tile(const int NR, const int MT, const uint8_t *w, int64_t row_bytes, int64_t nblk,
                      const int8_t *xq, int64_t k_pad, int64_t r, int64_t i, const int32_t *sums,
                      const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t ldy, float *y,
                      int32_t *acc_out, int prefetch) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[4][4];
    const uint8_t *wr[4];
    const int8_t *xr[4];
    for (int rr = 0; rr < NR; rr++) {
        wr[rr] = w + (r + rr) * row_bytes;
        for (int t = 0; t < MT; t++) acc[rr][t] = _mm512_setzero_si512();
    }
    for (int t = 0; t < MT; t++) xr[t] = xq + (i + t) * k_pad;
    /* The first token tile of a row tile streams the next row tile in, as gemv_tile does: with few
     * tokens (batched decode) the GEMM is as memory-bound as the GEMV. */
    const char *pf = (const char *)(w + (r + NR) * row_bytes) + PF_EXTRA;
    for (int64_t b = 0; b < nblk; b++) {
        if (prefetch)
            for (int rr = 0; rr < NR; rr++) {
                _mm_prefetch(pf + (b * NR + rr) * 64, PF_HINT);
                _mm_prefetch(pf + PF_AGAIN + (b * NR + rr) * 64, PF_HINT);
            }
        __m512i raw[4];
        for (int rr = 0; rr < NR; rr++) raw[rr] = _mm512_loadu_si512(wr[rr] + b * 64);
        for (int q = 0; q < 4; q++) {
            __m512i c[4];
            for (int rr = 0; rr < NR; rr++) c[rr] = _mm512_and_si512(_mm512_srli_epi16(raw[rr], 2 * q), m3);
            for (int t = 0; t < MT; t++) {
                const __m512i a = _mm512_loadu_si512(xr[t] + b * 256 + 64 * q);
                for (int rr = 0; rr < NR; rr++) acc[rr][t] = dpbusd(acc[rr][t], c[rr], a);
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++)
            store_out(i + t, r + rr, _mm512_reduce_add_epi32(acc[rr][t]), sums, a_scale, w_scale, ws_stride, ldy, y,
                      acc_out);
}

/* Unpacks NR rows of 2-bit weights to byte codes, panel (NR, k_pad), once per token chunk;
 * streams the next row tile in (linear prefetch, twice per line, as the GEMV). */
INLINE void unpack_panel(const int NR, const uint8_t *w, int64_t row_bytes, int64_t nblk, int64_t k_pad,
                         int64_t r, uint8_t *panel) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const char *pf = (const char *)(w + (r + NR) * row_bytes) + PF_EXTRA;
    for (int rr = 0; rr < NR; rr++) {
        const uint8_t *wr = w + (r + rr) * row_bytes;
        uint8_t *pr = panel + rr * k_pad;
        for (int64_t b = 0; b < nblk; b++) {
            _mm_prefetch(pf + (rr * nblk + b) * 64, PF_HINT);
            _mm_prefetch(pf + PF_AGAIN + (rr * nblk + b) * 64, PF_HINT);
            const __m512i raw = _mm512_loadu_si512(wr + b * 64);
            _mm512_store_si512(pr + b * 256, _mm512_and_si512(raw, m3));
            _mm512_store_si512(pr + b * 256 + 64, _mm512_and_si512(_mm512_srli_epi16(raw, 2), m3));
            _mm512_store_si512(pr + b * 256 + 128, _mm512_and_si512(_mm512_srli_epi16(raw, 4), m3));
            _mm512_store_si512(pr + b * 256 + 192, _mm512_and_si512(_mm512_srli_epi16(raw, 6), m3));
        }
    }
}

/* Panel GEMM tile size, rows x tokens. Zen 5, 1 and 2 threads, m = 128 / 512: 4 x 4 measured best
 * (~410 GOPS per core, ~88 % of vpdpbusd peak); 4 x 6, 5 x 4, 6 x 4 -2 to -4 %, 8 x 3 -20 %;
 * a software prefetch of the activations, a 2x unrolled k loop or 128-token chunks gained nothing. */
#ifndef GEMM_NR
#define GEMM_NR 4
#endif
#ifndef GEMM_MT
#define GEMM_MT 4
#endif

/* GEMM tile on an unpacked panel: NR rows x MT tokens (<= GEMM_NR x GEMM_MT), one vpdpbusd per 64
 * codes and no unpacking in the loop; the NR code vectors of a 64-column chunk stay in registers
 * across the MT tokens. The epilogue reduces 4 rows at a time with one transpose-add tree and stores
 * 4 adjacent outputs (same int32 sums and the same float formula as store_out; vs one horizontal
 * reduction + scalar divide per output, it measured +6 %). */
INLINE void panel_tile(const int NR, const int MT, const uint8_t *panel, int64_t k_pad, const int8_t *xq,
                       int64_t r, int64_t i, const int32_t *sums, const float *a_scale, const float *w_scale,
                       int64_t ws_stride, int64_t ldy, float *y, int32_t *acc_out) {
    __m512i acc[GEMM_NR][GEMM_MT];
    const int8_t *xr[GEMM_MT];
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) acc[rr][t] = _mm512_setzero_si512();
    for (int t = 0; t < MT; t++) xr[t] = xq + (i + t) * k_pad;
    for (int64_t c = 0; c < k_pad / 64; c++) {
        __m512i wv[GEMM_NR];
        for (int rr = 0; rr < NR; rr++) wv[rr] = _mm512_load_si512(panel + rr * k_pad + c * 64);
        for (int t = 0; t < MT; t++) {
            const __m512i a = _mm512_loadu_si512(xr[t] + c * 64);
            for (int rr = 0; rr < NR; rr++) acc[rr][t] = dpbusd(acc[rr][t], wv[rr], a);
        }
    }
    /* per token and group of 4 rows, the 4 sums by one transpose-add tree, stored as 4 adjacent outputs */
    int g = 0;
    for (; g + 4 <= NR; g += 4)
        for (int t = 0; t < MT; t++) {
            const int64_t rg = r + g;
            const __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[g][t], acc[g + 1][t]),
                                                 _mm512_unpackhi_epi32(acc[g][t], acc[g + 1][t]));
            const __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[g + 2][t], acc[g + 3][t]),
                                                 _mm512_unpackhi_epi32(acc[g + 2][t], acc[g + 3][t]));
            const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
            const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
            __m128i v = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            v = _mm_sub_epi32(v, _mm_set1_epi32(sums[i + t])); /* rows rg .. rg + 3, in order */
            if (y) {
                const __m128 ws = _mm_setr_ps(w_scale[rg * ws_stride], w_scale[(rg + 1) * ws_stride],
                                              w_scale[(rg + 2) * ws_stride], w_scale[(rg + 3) * ws_stride]);
                const __m128 sc = _mm_div_ps(ws, _mm_set1_ps(a_scale[i + t]));
                _mm_storeu_ps(y + (i + t) * ldy + rg, _mm_mul_ps(_mm_cvtepi32_ps(v), sc));
            } else {
                _mm_storeu_si128((__m128i *)(acc_out + (i + t) * ldy + rg), v);
            }
        }
    for (int t = 0; t < MT; t++)
        for (int rr = g; rr < NR; rr++)
            store_out(i + t, r + rr, _mm512_reduce_add_epi32(acc[rr][t]), sums, a_scale, w_scale, ws_stride, ldy, y,
                      acc_out);
}

/* Tokens per pass over the weights: 64 activation rows of k_pad <= 7168 stay in L2 (<= 448 KB). */
#define TOKEN_CHUNK 64

void tl_avx512_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                       const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                       int64_t m, int64_t ldy, float *y, int32_t *acc_out) {
    const int64_t row_bytes = k_pad / 4, nblk = k_pad / TL_BLOCK;
    if (m == 1) {
        int64_t r = r0;
#define VTILE(NR) gemv_tile(NR, w, row_bytes, nblk, xq, r, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out)
        for (; r + 4 <= r1; r += 4) VTILE(4);
        for (; r < r1; r++) VTILE(1);
#undef VTILE
        return;
    }
#define TILE(NR, MT)                                                                                     \
    gemm_tile(NR, MT, w, row_bytes, nblk, xq, k_pad, r, i, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out, \
              i == i0)
#define TOKENS(NR)                                                                                       \
    do {                                                                                                 \
        for (i = i0; i + 4 <= i1; i += 4) TILE(NR, 4);                                                   \
        switch (i1 - i) {                                                                                \
        case 3: TILE(NR, 3); break;                                                                      \
        case 2: TILE(NR, 2); break;                                                                      \
        case 1: TILE(NR, 1); break;                                                                      \
        default: break;                                                                                  \
        }                                                                                                \
    } while (0)
    /* Up to 16 tokens (batched decode) unpack in registers: measured at 8 tokens, 2 threads, 2B4T shapes,
     * 45 ms of ternary matmuls per step against 57 ms through the panel; at 16 the two are level. */
    uint8_t *panel = m > 16 ? aligned_alloc(64, (size_t)(GEMM_NR * k_pad)) : NULL; /* k_pad: multiple of 256 */
    if (!panel) {
        for (int64_t i0 = 0; i0 < m; i0 += TOKEN_CHUNK) {
            const int64_t i1 = i0 + TOKEN_CHUNK < m ? i0 + TOKEN_CHUNK : m;
            int64_t r = r0, i;
            for (; r + 4 <= r1; r += 4) TOKENS(4);
            switch (r1 - r) {
            case 3: TOKENS(3); break;
            case 2: TOKENS(2); break;
            case 1: TOKENS(1); break;
            default: break;
            }
        }
        return;
    }
#undef TOKENS
#undef TILE
    /* Prefill: unpack a row tile to byte codes once per TOKEN_CHUNK tokens (4 * k_pad bytes, L1/L2),
     * then NR x GEMM_MT tiles of pure loads + vpdpbusd. */
#define PTILE(NR, MT) panel_tile(NR, MT, panel, k_pad, xq, r, i, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out)
#define PTOKENS(NR)                                                                                      \
    do {                                                                                                 \
        unpack_panel(NR, w, row_bytes, nblk, k_pad, r, panel);                                           \
        for (i = i0; i + GEMM_MT <= i1; i += GEMM_MT) PTILE(NR, GEMM_MT);                                \
        switch (i1 - i) {                                                                                \
        case 7: if (GEMM_MT > 7) PTILE(NR, 7); break;                                                    \
        case 6: if (GEMM_MT > 6) PTILE(NR, 6); break;                                                    \
        case 5: if (GEMM_MT > 5) PTILE(NR, 5); break;                                                    \
        case 4: PTILE(NR, 4); break;                                                                     \
        case 3: PTILE(NR, 3); break;                                                                     \
        case 2: PTILE(NR, 2); break;                                                                     \
        case 1: PTILE(NR, 1); break;                                                                     \
        default: break;                                                                                  \
        }                                                                                                \
    } while (0)
    for (int64_t i0 = 0; i0 < m; i0 += TOKEN_CHUNK) {
        const int64_t i1 = i0 + TOKEN_CHUNK < m ? i0 + TOKEN_CHUNK : m;
        int64_t r = r0, i;
        for (; r + GEMM_NR <= r1; r += GEMM_NR) PTOKENS(GEMM_NR);
        switch (r1 - r) {
        case 7: if (GEMM_NR > 7) PTOKENS(7); break;
        case 6: if (GEMM_NR > 6) PTOKENS(6); break;
        case 5: if (GEMM_NR > 5) PTOKENS(5); break;
        case 4: if (GEMM_NR > 4) PTOKENS(4); break;
        case 3: PTOKENS(3); break;
        case 2: PTOKENS(2); break;
        case 1: PTOKENS(1); break;
        default: break;
        }
    }
    free(panel);
#undef PTOKENS
#undef PTILE
}

/* ---- ternary matmul, TQ1 layout (5 trits per byte, see ternary.h) ------------------------------ */

INLINE __m512i times3(__m512i t) { return _mm512_add_epi8(_mm512_add_epi8(t, t), t); } /* 3 t mod 256 */

/* Blocks per exact flush of the GEMV accumulators: per int32 lane, 3 accA - accB = 256 D (mod 2^32)
 * with |D| <= 5 * 4 * 2 * 128 = 5120 per block, exact after >> 8 while 256 |D| < 2^31 (< 1638 blocks). */
#define TQ1_FLUSH 1024

/* GEMV tile, no explicit trits: with t_0 = q, t_{i+1} = 3 t_i mod 256 (byte adds) and
 * 3 t_i = 256 d_i + t_{i+1}, sum_i a_i d_i = (3 sum_i a_i t_i - sum_i a_i t_{i+1}) / 256: two vpdpbusd
 * per 64 weights against the same activations. Prefetch as in gemv_tile (next tile linear, twice). */
INLINE void tq1_gemv_tile(const int NR, const uint8_t *w, int64_t row_bytes, int64_t nblk, const int8_t *x,
                          int64_t r, const int32_t *sums, const float *a_scale, const float *w_scale,
                          int64_t ws_stride, int64_t ldy, float *y, int32_t *acc_out) {
    __m512i tot[4];
    const uint8_t *wr[4];
    const char *pf = (const char *)(w + (r + NR) * row_bytes) + PF_EXTRA;
    const char *pf1 = (const char *)(w + r * row_bytes) + PF_L1;
    for (int rr = 0; rr < NR; rr++) {
        tot[rr] = _mm512_setzero_si512();
        wr[rr] = w + (r + rr) * row_bytes;
    }
    for (int64_t b0 = 0; b0 < nblk; b0 += TQ1_FLUSH) {
        const int64_t b1 = b0 + TQ1_FLUSH < nblk ? b0 + TQ1_FLUSH : nblk;
        __m512i accA[4], accB[4];
        for (int rr = 0; rr < NR; rr++) accA[rr] = accB[rr] = _mm512_setzero_si512();
        for (int64_t b = b0; b < b1; b++) {
            __m512i a[5];
            for (int q = 0; q < 5; q++) a[q] = _mm512_loadu_si512(x + b * TL_TQ1_BLOCK + 64 * q);
            for (int rr = 0; rr < NR; rr++) {
                _mm_prefetch(pf + (b * NR + rr) * 64, PF_HINT);
                _mm_prefetch(pf + PF_AGAIN + (b * NR + rr) * 64, PF_HINT);
                _mm_prefetch(pf1 + (b * NR + rr) * 64, _MM_HINT_T0);
                __m512i t = _mm512_loadu_si512(wr[rr] + b * 64);
                __asm__("" : "+v"(t));
                for (int q = 0; q < 5; q++) {
                    accA[rr] = dpbusd(accA[rr], t, a[q]);
                    t = times3(t);
                    accB[rr] = dpbusd(accB[rr], t, a[q]);
                }
            }
        }
        for (int rr = 0; rr < NR; rr++) {
            const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(accA[rr], _mm512_add_epi32(accA[rr], accA[rr])),
                                               accB[rr]);
            tot[rr] = _mm512_add_epi32(tot[rr], _mm512_srai_epi32(d, 8));
        }
    }
    for (int rr = 0; rr < NR; rr++)
        store_out(0, r + rr, _mm512_reduce_add_epi32(tot[rr]), sums, a_scale, w_scale, ws_stride, ldy, y, acc_out);
}

/* Decodes NR rows of TQ1 weights into int8 codes, panel (NR, k_pad), d = [t >= 86] + [t >= 171];
 * streams the next row tile in (linear prefetch, twice per line, as the GEMV). */
INLINE void tq1_decode_panel(const int NR, const uint8_t *w, int64_t row_bytes, int64_t nblk, int64_t k_pad,
                             int64_t r, uint8_t *panel) {
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2);
    const __m512i c86 = _mm512_set1_epi8((char)86), c171 = _mm512_set1_epi8((char)171);
    const char *pf = (const char *)(w + (r + NR) * row_bytes) + PF_EXTRA;
    for (int rr = 0; rr < NR; rr++) {
        const uint8_t *wr = w + (r + rr) * row_bytes;
        for (int64_t b = 0; b < nblk; b++) {
            _mm_prefetch(pf + (rr * nblk + b) * 64, PF_HINT);
            _mm_prefetch(pf + PF_AGAIN + (rr * nblk + b) * 64, PF_HINT);
            __m512i t = _mm512_loadu_si512(wr + b * 64);
            for (int q = 0; q < 5; q++) {
                __m512i d = _mm512_maskz_mov_epi8(_mm512_cmpge_epu8_mask(t, c86), one);
                d = _mm512_mask_mov_epi8(d, _mm512_cmpge_epu8_mask(t, c171), two);
                _mm512_store_si512(panel + rr * k_pad + b * TL_TQ1_BLOCK + 64 * q, d);
                t = times3(t);
            }
        }
    }
}

/* GEMM tile on a decoded panel: NR rows x MT tokens (<= 4 x 4), one vpdpbusd per 64 codes. */
INLINE void tq1_panel_tile(const int NR, const int MT, const uint8_t *panel, int64_t k_pad, const int8_t *xq,
                           int64_t r, int64_t i, const int32_t *sums, const float *a_scale, const float *w_scale,
                           int64_t ws_stride, int64_t ldy, float *y, int32_t *acc_out) {
    __m512i acc[4][4];
    const int8_t *xr[4];
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) acc[rr][t] = _mm512_setzero_si512();
    for (int t = 0; t < MT; t++) xr[t] = xq + (i + t) * k_pad;
    for (int64_t c = 0; c < k_pad / 64; c++) {
        __m512i wv[4];
        for (int rr = 0; rr < NR; rr++) wv[rr] = _mm512_load_si512(panel + rr * k_pad + c * 64);
        for (int t = 0; t < MT; t++) {
            const __m512i a = _mm512_loadu_si512(xr[t] + c * 64);
            for (int rr = 0; rr < NR; rr++) acc[rr][t] = dpbusd(acc[rr][t], wv[rr], a);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++)
            store_out(i + t, r + rr, _mm512_reduce_add_epi32(acc[rr][t]), sums, a_scale, w_scale, ws_stride, ldy, y,
                      acc_out);
}

void tl_avx512_ternary_tq1(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                           const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                           int64_t m, int64_t ldy, float *y, int32_t *acc_out) {
    const int64_t row_bytes = k_pad / 5, nblk = k_pad / TL_TQ1_BLOCK;
    if (m == 1) {
        int64_t r = r0;
#define VTILE(NR) tq1_gemv_tile(NR, w, row_bytes, nblk, xq, r, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out)
        for (; r + 4 <= r1; r += 4) VTILE(4);
        for (; r < r1; r++) VTILE(1);
#undef VTILE
        return;
    }
    /* GEMM: decode a row tile to int8 codes once per TOKEN_CHUNK tokens (panel: 4 * k_pad bytes, L2) */
    uint8_t *panel = aligned_alloc(64, (size_t)(4 * k_pad)); /* 4 * k_pad is a multiple of 1280 */
    if (!panel) {
        tl_ref_ternary_tq1(w, k_pad, r0, r1, xq, sums, a_scale, w_scale, ws_stride, m, ldy, y, acc_out);
        return;
    }
#define TILE(NR, MT) tq1_panel_tile(NR, MT, panel, k_pad, xq, r, i, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out)
#define TOKENS(NR)                                                                                       \
    do {                                                                                                 \
        tq1_decode_panel(NR, w, row_bytes, nblk, k_pad, r, panel);                                       \
        for (i = i0; i + 4 <= i1; i += 4) TILE(NR, 4);                                                   \
        switch (i1 - i) {                                                                                \
        case 3: TILE(NR, 3); break;                                                                      \
        case 2: TILE(NR, 2); break;                                                                      \
        case 1: TILE(NR, 1); break;                                                                      \
        default: break;                                                                                  \
        }                                                                                                \
    } while (0)
    for (int64_t i0 = 0; i0 < m; i0 += TOKEN_CHUNK) {
        const int64_t i1 = i0 + TOKEN_CHUNK < m ? i0 + TOKEN_CHUNK : m;
        int64_t r = r0, i;
        for (; r + 4 <= r1; r += 4) TOKENS(4);
        switch (r1 - r) {
        case 3: TOKENS(3); break;
        case 2: TOKENS(2); break;
        case 1: TOKENS(1); break;
        default: break;
        }
    }
#undef TOKENS
#undef TILE
    free(panel);
}

/* ---- float matmul (LM head) -------------------------------------------------------------------- */

/* 16 weights at w[idx..idx+16) as float32, lanes outside mk zero. dtype is a constant after inlining. */
INLINE __m512 load_w(const void *w, const int dtype, int64_t idx, __mmask16 mk) {
    if (dtype == TL_F32) return _mm512_maskz_loadu_ps(mk, (const float *)w + idx);
    __m256i h = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)w + idx);
    if (dtype == TL_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

INLINE void float_tile(const int dtype, const int NR, const int MT, const void *w, int64_t k, int64_t r,
                       const float *x, int64_t i, int64_t ldy, float *y) {
    const int64_t esize = dtype == TL_F32 ? 4 : 2;
    __m512 acc[4][4];
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) acc[rr][t] = _mm512_setzero_ps();
    /* prefetch the next tile linearly, as in gemv_tile: NR * 16 * esize bytes per step */
    const char *pf = (const char *)w + (r + NR) * k * esize + PF_EXTRA;
    for (int64_t j = 0; j < k; j += 16) {
        const __mmask16 mk = k - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - j)) - 1);
        for (int64_t p = 0; p < NR * 16 * esize; p += 64) {
            _mm_prefetch(pf + j * NR * esize + p, PF_HINT);
            _mm_prefetch(pf + PF_AGAIN + j * NR * esize + p, PF_HINT);
        }
        __m512 wv[4];
        for (int rr = 0; rr < NR; rr++) wv[rr] = load_w(w, dtype, (r + rr) * k + j, mk);
        for (int t = 0; t < MT; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(mk, x + (i + t) * k + j);
            for (int rr = 0; rr < NR; rr++) acc[rr][t] = _mm512_fmadd_ps(wv[rr], xv, acc[rr][t]);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++) y[(i + t) * ldy + r + rr] = _mm512_reduce_add_ps(acc[rr][t]);
}

INLINE void float_rows(const int dtype, const void *w, int64_t k, int64_t r0, int64_t r1, const float *x,
                       int64_t m, int64_t ldy, float *y) {
#define FTILE(NR, MT) float_tile(dtype, NR, MT, w, k, r, x, i, ldy, y)
#define FTOKENS(NR)                                                                                      \
    do {                                                                                                 \
        for (i = 0; i + 4 <= m; i += 4) FTILE(NR, 4);                                                    \
        switch (m - i) {                                                                                 \
        case 3: FTILE(NR, 3); break;                                                                     \
        case 2: FTILE(NR, 2); break;                                                                     \
        case 1: FTILE(NR, 1); break;                                                                     \
        default: break;                                                                                  \
        }                                                                                                \
    } while (0)
    int64_t r = r0, i;
    for (; r + 4 <= r1; r += 4) FTOKENS(4);
    for (; r < r1; r++) FTOKENS(1);
#undef FTOKENS
#undef FTILE
}

void tl_avx512_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                     int64_t ldy, float *y) {
    switch (dtype) {
    case TL_F16: float_rows(TL_F16, w, k, r0, r1, x, m, ldy, y); break;
    case TL_BF16: float_rows(TL_BF16, w, k, r0, r1, x, m, ldy, y); break;
    default: float_rows(TL_F32, w, k, r0, r1, x, m, ldy, y); break;
    }
}

/* ---- Q8_0 (LM head) ---------------------------------------------------------------------------- */

void tl_avx512_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd) {
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t blk = 0; blk < m * (k / TL_QBLOCK); blk++) {
        const __m512 a = _mm512_loadu_ps(x + blk * TL_QBLOCK), b = _mm512_loadu_ps(x + blk * TL_QBLOCK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        const int tiny = !(amax >= 1e-30f);
        const __m512 id = _mm512_set1_ps(tiny ? 0.0f : 127.0f / amax);
        xd[blk] = tiny ? 0.0f : amax / 127.0f;
        const int r = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m512i qa = _mm512_cvt_roundps_epi32(_mm512_mul_ps(a, id), r);
        __m512i qb = _mm512_cvt_roundps_epi32(_mm512_mul_ps(b, id), r);
        qa = _mm512_min_epi32(_mm512_max_epi32(qa, lo), hi);
        qb = _mm512_min_epi32(_mm512_max_epi32(qb, lo), hi);
        _mm_storeu_si128((__m128i *)(xq + blk * TL_QBLOCK), _mm512_cvtepi32_epi8(qa));
        _mm_storeu_si128((__m128i *)(xq + blk * TL_QBLOCK + 16), _mm512_cvtepi32_epi8(qb));
    }
}

/* The float sum of ternary.h: lanes l + 8 -> l, l + 4 -> l, l + 2 -> l, then lane 0 + lane 1. */
INLINE float sum16_ps(__m512 v) {
    const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}

/* One 512-column group (16 blocks) of an NR rows x MT tokens tile, added to facc[rr][t].
 *
 * vpdpbusd multiplies unsigned by signed bytes. Weights w in [-127, 127] become unsigned by flipping
 * the sign bit, u = w ^ 0x80 = w + 128, so dpbusd(u, x) = sum w * x + 128 * sum x. The correction
 * depends only on the activations: per 64-byte chunk and token it is one vpdpbusd of 0x80 bytes by
 * x, negated and used as the accumulator's start, so a weight chunk costs one xor and one vpdpbusd
 * per token (no product overflows: 4 * 255 * 127 and 4 * 128 * 127 fit an int32 lane easily).
 * A chunk covers two blocks (bytes 0-31, 32-63); the 8 chunks' int32 lanes are summed per block by
 * a shuffle tree (exact in integers, so its order is free) into one vector of 16 block sums. */
INLINE void q8_group(const int NR, const int MT, const int tail, const int8_t *w, const uint16_t *wd, int64_t k,
                     int64_t nb, int64_t r, const int8_t *xq, const float *xd, int64_t i, int64_t g,
                     const char *pf, __m512 facc[4][4]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    const int64_t c0 = g * 512, cols = tail ? k - c0 : 512;
    __m512i tp[4][4][4]; /* [row][token][pair] after the first tree level */
    for (int p = 0; p < 4; p++) {
        __m512i a[4][4][2];
        for (int h = 0; h < 2; h++) {
            const int v = 2 * p + h;
            const int64_t rem = cols - 64 * v;
            const __mmask64 mk = !tail || rem >= 64 ? ~(__mmask64)0 : rem <= 0 ? 0 : ((__mmask64)1 << rem) - 1;
            __m512i xa[4], nc[4];
            for (int t = 0; t < MT; t++) {
                xa[t] = _mm512_maskz_loadu_epi8(mk, xq + (i + t) * k + c0 + 64 * v);
                nc[t] = _mm512_sub_epi32(zero, dpbusd(zero, flip, xa[t]));
            }
            for (int rr = 0; rr < NR; rr++) {
                _mm_prefetch(pf + ((g * 8 + v) * NR + rr) * 64, PF_HINT);
                _mm_prefetch(pf + PF_AGAIN + ((g * 8 + v) * NR + rr) * 64, PF_HINT);
                __m512i u = _mm512_maskz_loadu_epi8(mk, w + (r + rr) * k + c0 + 64 * v);
                u = _mm512_xor_si512(u, flip);
                for (int t = 0; t < MT; t++) a[rr][t][h] = dpbusd(nc[t], u, xa[t]);
            }
        }
        for (int rr = 0; rr < NR; rr++)
            for (int t = 0; t < MT; t++)
                tp[rr][t][p] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[rr][t][0], a[rr][t][1]),
                                                _mm512_unpackhi_epi32(a[rr][t][0], a[rr][t][1]));
    }
    /* after the tree, element e holds block {0,2,4,6,1,3,5,7,8,10,12,14,9,11,13,15}[e]: put it back */
    const __m512i order = _mm512_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    const int64_t nbg = tail ? nb - g * 16 : 16;
    const __mmask16 bm = nbg >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nbg) - 1);
    for (int rr = 0; rr < NR; rr++) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bm, wd + (r + rr) * nb + g * 16));
        for (int t = 0; t < MT; t++) {
            const __m512i *q = tp[rr][t];
            const __m512i u0 = _mm512_add_epi32(_mm512_unpacklo_epi64(q[0], q[1]), _mm512_unpackhi_epi64(q[0], q[1]));
            const __m512i u1 = _mm512_add_epi32(_mm512_unpacklo_epi64(q[2], q[3]), _mm512_unpackhi_epi64(q[2], q[3]));
            __m512i isum = _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, 0x88), _mm512_shuffle_i32x4(u0, u1, 0xdd));
            isum = _mm512_permutexvar_epi32(order, isum);
            const __m512 sc = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(bm, xd + (i + t) * nb + g * 16));
            facc[rr][t] = _mm512_add_ps(facc[rr][t], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), sc));
        }
    }
}


/* ---- Q4_0 (LM head) ---------------------------------------------------------------------------- */

/* One 512-column group (16 blocks, 256 weight bytes per row) of an NR rows x MT tokens tile, added to
 * facc[rr][t], in the float order of q8_group.
 *
 * A 64-byte weight chunk holds 4 blocks: & 0xF gives their first 16 columns (one 128-bit lane per
 * block), >> 4 & 0xF their last 16. The token's 128 columns are two 64-byte loads x0 = blocks 0-1,
 * x1 = blocks 2-3; lanes 0 and 2 of each (first halves) and 1 and 3 (second halves) are gathered by
 * one vshufi32x4 each, once per token and shared by the NR rows. Nibbles u = q + 8 are the unsigned
 * operand of vpdpbusd; the accumulator starts at -8 * sum x (two vpdpbusd of 8s by x per token).
 * After the chunk, 128-bit lane L of a vector holds 4 partial sums of block 4v + L; a shuffle tree
 * (exact) makes one vector of 16 block sums, put back in block order by one permute. */
INLINE void q4_group(const int NR, const int MT, const int tail, const uint8_t *w, const uint16_t *wd, int64_t k,
                     int64_t nb, int64_t r, const int8_t *xq, const float *xd, int64_t i, int64_t g,
                     const char *pf, __m512 facc[4][4]) {
    const __m512i eight = _mm512_set1_epi8(8), low4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    const int64_t c0 = g * 512, cols = tail ? k - c0 : 512, row_bytes = k / 2;
    __m512i tp[4][4][2]; /* [row][token][pair] after the first tree level */
    for (int p = 0; p < 2; p++) {
        __m512i a[4][4][2];
        for (int h = 0; h < 2; h++) {
            const int v = 2 * p + h;
#define Q4_MASK(rem) (!tail || (rem) >= 64 ? ~(__mmask64)0 : (rem) <= 0 ? 0 : ((__mmask64)1 << (rem)) - 1)
            const __mmask64 m0 = Q4_MASK(cols - 128 * v), m1 = Q4_MASK(cols - 128 * v - 64);
            const __mmask64 mw = Q4_MASK((cols - 128 * v) / 2);
#undef Q4_MASK
            __m512i xl[4], xh[4], nc[4];
            for (int t = 0; t < MT; t++) {
                const int8_t *xt = xq + (i + t) * k + c0 + 128 * v;
                const __m512i x0 = _mm512_maskz_loadu_epi8(m0, xt), x1 = _mm512_maskz_loadu_epi8(m1, xt + 64);
                xl[t] = _mm512_shuffle_i32x4(x0, x1, 0x88);
                xh[t] = _mm512_shuffle_i32x4(x0, x1, 0xdd);
                nc[t] = _mm512_sub_epi32(zero, dpbusd(dpbusd(zero, eight, xl[t]), eight, xh[t]));
            }
            for (int rr = 0; rr < NR; rr++) {
                _mm_prefetch(pf + ((g * 4 + v) * NR + rr) * 64, PF_HINT);
                _mm_prefetch(pf + PF_AGAIN + ((g * 4 + v) * NR + rr) * 64, PF_HINT);
                __m512i raw = _mm512_maskz_loadu_epi8(mw, w + (r + rr) * row_bytes + c0 / 2 + 64 * v);
                __asm__("" : "+v"(raw)); /* one load, not one per use */
                const __m512i lo = _mm512_and_si512(raw, low4);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
                for (int t = 0; t < MT; t++) a[rr][t][h] = dpbusd(dpbusd(nc[t], lo, xl[t]), hi, xh[t]);
            }
        }
        for (int rr = 0; rr < NR; rr++)
            for (int t = 0; t < MT; t++)
                tp[rr][t][p] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[rr][t][0], a[rr][t][1]),
                                                _mm512_unpackhi_epi32(a[rr][t][0], a[rr][t][1]));
    }
    /* after the tree, element e = 4L + v holds block 4v + L: put it back */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const int64_t nbg = tail ? nb - g * 16 : 16;
    const __mmask16 bm = nbg >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nbg) - 1);
    for (int rr = 0; rr < NR; rr++) {
        const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(bm, wd + (r + rr) * nb + g * 16));
        for (int t = 0; t < MT; t++) {
            const __m512i *q = tp[rr][t];
            __m512i isum = _mm512_add_epi32(_mm512_unpacklo_epi64(q[0], q[1]), _mm512_unpackhi_epi64(q[0], q[1]));
            isum = _mm512_permutexvar_epi32(order, isum);
            const __m512 sc = _mm512_mul_ps(dw, _mm512_maskz_loadu_ps(bm, xd + (i + t) * nb + g * 16));
            facc[rr][t] = _mm512_add_ps(facc[rr][t], _mm512_mul_ps(_mm512_cvtepi32_ps(isum), sc));
        }
    }
}

/* One tile of a Q8_0 (BITS 8) or Q4_0 (BITS 4) matmul: the weight groups differ, the tiling, the scale
 * prefetch and the final sums do not. BITS is a compile-time constant at every call. */
INLINE void qblock_tile(const int BITS, const int NR, const int MT, const void *w, const uint16_t *wd, int64_t k,
                        int64_t r, const int8_t *xq, const float *xd, int64_t i, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK, nfull = nb / 16, row_bytes = k * BITS / 8;
    /* the next tile's weights (NR rows, linear) and scales, one prefetch per 64 weight bytes */
    const char *pf = (const char *)w + (r + NR) * row_bytes + PF_EXTRA;
    __m512 facc[4][4];
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) facc[rr][t] = _mm512_setzero_ps();
    for (int64_t g = 0; g <= nfull; g++) {
        const int tail = g == nfull;
        if (tail && nfull * 16 == nb) break;
        if (!tail && (g & 1) == 0)
            for (int rr = 0; rr < NR; rr++)
                _mm_prefetch((const char *)(wd + (r + NR + rr) * nb) + 512 + g * 32, PF_HINT);
        if (BITS == 8)
            q8_group(NR, MT, tail, w, wd, k, nb, r, xq, xd, i, g, pf, facc);
        else
            q4_group(NR, MT, tail, w, wd, k, nb, r, xq, xd, i, g, pf, facc);
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++) y[(i + t) * ldy + r + rr] = sum16_ps(facc[rr][t]);
}

INLINE void qblock_rows(const int BITS, const void *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1,
                        const int8_t *xq, const float *xd, int64_t m, int64_t ldy, float *y) {
#define QTILE(NR, MT) qblock_tile(BITS, NR, MT, w, wd, k, r, xq, xd, i, ldy, y)
#define QTOKENS(NR)                                                                                      \
    do {                                                                                                 \
        for (i = 0; i + 4 <= m; i += 4) QTILE(NR, 4);                                                    \
        for (; i + 2 <= m; i += 2) QTILE(NR, 2);                                                         \
        if (i < m) QTILE(NR, 1);                                                                         \
    } while (0)
    int64_t r = r0, i = 0;
    if (m == 1) { /* GEMV: 4 rows share each activation chunk */
        for (; r + 4 <= r1; r += 4) QTILE(4, 1);
        for (; r < r1; r++) QTILE(1, 1);
        return;
    }
    /* 2 rows x 4 tokens, then 2 x 2: measured at 8 tokens (Zen 5, 2 threads, 128256 x 2560 Q8_0), 24.7 ms
     * against 26.5 for 2 x 2 alone; 4 rows x 1 or 2 tokens were slower (30 ms). */
    for (; r + 2 <= r1; r += 2) QTOKENS(2);
    if (r < r1) QTOKENS(1);
#undef QTOKENS
#undef QTILE
}

void tl_avx512_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                  const float *xd, int64_t m, int64_t ldy, float *y) {
    qblock_rows(8, w, wd, k, r0, r1, xq, xd, m, ldy, y);
}

void tl_avx512_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                  const float *xd, int64_t m, int64_t ldy, float *y) {
    qblock_rows(4, w, wd, k, r0, r1, xq, xd, m, ldy, y);
}

#else
typedef int tl_avx512_unused; /* keep the translation unit non-empty on non-x86 builds */
#endif
