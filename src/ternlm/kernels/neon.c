/* ARM NEON kernels with the dot-product extension (sdot, ARMv8.2-A+dotprod). A 16-byte chunk of packed
 * weights unpacks (shift, & 3) into four 16-column code vectors, each one vdotq_s32: codes 0..2 fit
 * signed int8, so signed x signed sdot needs no correction beyond sums[i].
 * Compiled with a target pragma so the rest of the extension stays baseline armv8-a; picked at
 * runtime (getauxval(AT_HWCAP) & HWCAP_ASIMDDP, see _kernels.c). */
#if defined(__aarch64__)
/* arm_neon.h defines vdotq_s32 for arch=armv8.2-a+dotprod; a plain "+dotprod" on armv8-a fails to
 * inline it. Safe: dotprod only exists from ARMv8.2 on, so any CPU that has it implements v8.2. */
#pragma GCC target("arch=armv8.2-a+dotprod")
#include <arm_neon.h>
#include <math.h>
#include <string.h>

#include "ternary.h"

#define INLINE static inline __attribute__((always_inline))

/* ---- activations ------------------------------------------------------------------------------ */

/* vcvtnq rounds half to even regardless of FPCR, as nearbyintf does in the default mode; it saturates
 * to int32, and the clamp to [lo, hi] then matches ref.c's clamp in float for every finite input. */
INLINE int32x4_t round_clamp(float32x4_t v, int32x4_t lo, int32x4_t hi) {
    return vminq_s32(vmaxq_s32(vcvtnq_s32_f32(v), lo), hi);
}

INLINE int8x16_t narrow16(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
    return vcombine_s8(vqmovn_s16(vcombine_s16(vqmovn_s32(a), vqmovn_s32(b))),
                       vqmovn_s16(vcombine_s16(vqmovn_s32(c), vqmovn_s32(d))));
}

void tl_neon_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                      int32_t *sums) {
    const int32x4_t lo = vdupq_n_s32(-128), hi = vdupq_n_s32(127);
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        int8_t *qr = xq + i * k_pad;
        float32x4_t vmax = vdupq_n_f32(0.0f);
        int64_t j = 0;
        for (; j + 4 <= k; j += 4) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(xr + j)));
        float amax = vmaxvq_f32(vmax);
        for (; j < k; j++) {
            const float a = fabsf(xr[j]);
            if (a > amax) amax = a;
        }
        const float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
        const float32x4_t vs = vdupq_n_f32(s);
        int32x4_t vsum = vdupq_n_s32(0);
        for (j = 0; j + 16 <= k; j += 16) {
            int32x4_t q[4];
            for (int u = 0; u < 4; u++) {
                q[u] = round_clamp(vmulq_f32(vld1q_f32(xr + j + 4 * u), vs), lo, hi);
                vsum = vaddq_s32(vsum, q[u]);
            }
            vst1q_s8(qr + j, narrow16(q[0], q[1], q[2], q[3]));
        }
        int32_t sum = vaddvq_s32(vsum);
        for (; j < k; j++) {
            const int32_t q = vgetq_lane_s32(round_clamp(vdupq_n_f32(xr[j] * s), lo, hi), 0);
            qr[j] = (int8_t)q;
            sum += q;
        }
        memset(qr + k, 0, (size_t)(k_pad - k));
        a_scale[i] = s;
        sums[i] = sum;
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

/* GEMV tile: NR rows x 1 token. As in avx512.c, the codes are taken as (raw & 3), (raw & 12),
 * (raw >> 4 & 3), (raw >> 4 & 12): the fields at bits 2-3 and 6-7 count 4x, go to acc1 and are
 * divided by 4 per lane at the end (exact: every product is a multiple of 4). */
INLINE void gemv_tile(const int NR, const uint8_t *w, int64_t row_bytes, int64_t nblk, const int8_t *x,
                      int64_t r, const int32_t *sums, const float *a_scale, const float *w_scale,
                      int64_t ws_stride, int64_t ldy, float *y, int32_t *acc_out) {
    const uint8x16_t m3 = vdupq_n_u8(3), m12 = vdupq_n_u8(12);
    int32x4_t acc0[4], acc1[4];
    const uint8_t *wr[4];
    for (int rr = 0; rr < NR; rr++) {
        acc0[rr] = vdupq_n_s32(0);
        acc1[rr] = vdupq_n_s32(0);
        wr[rr] = w + (r + rr) * row_bytes;
    }
    for (int64_t b = 0; b < nblk; b++) {
        const int8_t *xb = x + b * TL_BLOCK;
        for (int rr = 0; rr < NR; rr++) __builtin_prefetch(wr[rr] + b * 64 + 1024);
        for (int s = 0; s < 4; s++) { /* 16 bytes of each row: columns 16s.. of the four 64-col fields */
            const int8x16_t a0 = vld1q_s8(xb + 16 * s), a1 = vld1q_s8(xb + 64 + 16 * s);
            const int8x16_t a2 = vld1q_s8(xb + 128 + 16 * s), a3 = vld1q_s8(xb + 192 + 16 * s);
            for (int rr = 0; rr < NR; rr++) {
                const uint8x16_t raw = vld1q_u8(wr[rr] + b * 64 + 16 * s), hi = vshrq_n_u8(raw, 4);
                acc0[rr] = vdotq_s32(acc0[rr], vreinterpretq_s8_u8(vandq_u8(raw, m3)), a0);
                acc1[rr] = vdotq_s32(acc1[rr], vreinterpretq_s8_u8(vandq_u8(raw, m12)), a1);
                acc0[rr] = vdotq_s32(acc0[rr], vreinterpretq_s8_u8(vandq_u8(hi, m3)), a2);
                acc1[rr] = vdotq_s32(acc1[rr], vreinterpretq_s8_u8(vandq_u8(hi, m12)), a3);
            }
        }
    }
    for (int rr = 0; rr < NR; rr++) {
        const int32x4_t acc = vaddq_s32(acc0[rr], vshrq_n_s32(acc1[rr], 2));
        store_out(0, r + rr, vaddvq_s32(acc), sums, a_scale, w_scale, ws_stride, ldy, y, acc_out);
    }
}

/* Code field q (bits 2q, 2q + 1) of each byte; q is a constant after unrolling. */
INLINE uint8x16_t field(uint8x16_t raw, const int q, uint8x16_t m3) {
    switch (q) {
    case 0: return vandq_u8(raw, m3);
    case 1: return vandq_u8(vshrq_n_u8(raw, 2), m3);
    case 2: return vandq_u8(vshrq_n_u8(raw, 4), m3);
    default: return vshrq_n_u8(raw, 6);
    }
}

/* GEMM tile: NR rows x MT tokens (<= 4 x 4, 16 accumulators of the 32 registers). Each unpacked code
 * vector is reused across MT tokens and each activation load across NR rows. */
INLINE void gemm_tile(const int NR, const int MT, const uint8_t *w, int64_t row_bytes, int64_t nblk,
                      const int8_t *xq, int64_t k_pad, int64_t r, int64_t i, const int32_t *sums,
                      const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t ldy, float *y,
                      int32_t *acc_out) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    int32x4_t acc[4][4];
    const uint8_t *wr[4];
    const int8_t *xr[4];
    for (int rr = 0; rr < NR; rr++) {
        wr[rr] = w + (r + rr) * row_bytes;
        for (int t = 0; t < MT; t++) acc[rr][t] = vdupq_n_s32(0);
    }
    for (int t = 0; t < MT; t++) xr[t] = xq + (i + t) * k_pad;
    for (int64_t b = 0; b < nblk; b++) {
        for (int s = 0; s < 4; s++) {
            uint8x16_t raw[4];
            for (int rr = 0; rr < NR; rr++) raw[rr] = vld1q_u8(wr[rr] + b * 64 + 16 * s);
            for (int q = 0; q < 4; q++) {
                int8x16_t c[4];
                for (int rr = 0; rr < NR; rr++)
                    c[rr] = vreinterpretq_s8_u8(field(raw[rr], q, m3));
                for (int t = 0; t < MT; t++) {
                    const int8x16_t a = vld1q_s8(xr[t] + b * TL_BLOCK + 64 * q + 16 * s);
                    for (int rr = 0; rr < NR; rr++) acc[rr][t] = vdotq_s32(acc[rr][t], c[rr], a);
                }
            }
        }
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++)
            store_out(i + t, r + rr, vaddvq_s32(acc[rr][t]), sums, a_scale, w_scale, ws_stride, ldy, y, acc_out);
}

/* Tokens per pass over the weights, so the activation rows stay in L2 (64 rows of k_pad <= 7168). */
#define TOKEN_CHUNK 64

void tl_neon_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
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
    gemm_tile(NR, MT, w, row_bytes, nblk, xq, k_pad, r, i, sums, a_scale, w_scale, ws_stride, ldy, y, acc_out)
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
}

/* ---- float matmul (LM head) -------------------------------------------------------------------- */

/* 4 weights at w[idx..idx+4) as float32; dtype is a constant after inlining. vcvt_f32_f16 is exact
 * (subnormals included: Linux starts threads with FPCR.FZ = 0). */
INLINE float32x4_t load_w(const void *w, const int dtype, int64_t idx) {
    if (dtype == TL_F32) return vld1q_f32((const float *)w + idx);
    const uint16x4_t h = vld1_u16((const uint16_t *)w + idx);
    if (dtype == TL_F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

INLINE float load_w1(const void *w, const int dtype, int64_t idx) {
    if (dtype == TL_F32) return ((const float *)w)[idx];
    const uint16_t h = ((const uint16_t *)w)[idx];
    return dtype == TL_F16 ? tl_f16_to_f32(h) : tl_bf16_to_f32(h);
}

INLINE void float_tile(const int dtype, const int NR, const int MT, const void *w, int64_t k, int64_t r,
                       const float *x, int64_t i, int64_t ldy, float *y) {
    float32x4_t acc[4][4];
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) acc[rr][t] = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        float32x4_t wv[4];
        for (int rr = 0; rr < NR; rr++) wv[rr] = load_w(w, dtype, (r + rr) * k + j);
        for (int t = 0; t < MT; t++) {
            const float32x4_t xv = vld1q_f32(x + (i + t) * k + j);
            for (int rr = 0; rr < NR; rr++) acc[rr][t] = vfmaq_f32(acc[rr][t], wv[rr], xv);
        }
    }
    for (int t = 0; t < MT; t++)
        for (int rr = 0; rr < NR; rr++) {
            float s = vaddvq_f32(acc[rr][t]);
            for (int64_t jj = j; jj < k; jj++) s += x[(i + t) * k + jj] * load_w1(w, dtype, (r + rr) * k + jj);
            y[(i + t) * ldy + r + rr] = s;
        }
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

void tl_neon_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                   int64_t ldy, float *y) {
    switch (dtype) {
    case TL_F16: float_rows(TL_F16, w, k, r0, r1, x, m, ldy, y); break;
    case TL_BF16: float_rows(TL_BF16, w, k, r0, r1, x, m, ldy, y); break;
    default: float_rows(TL_F32, w, k, r0, r1, x, m, ldy, y); break;
    }
}

/* ---- Q8_0 (LM head) ---------------------------------------------------------------------------- */

void tl_neon_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd) {
    const int32x4_t lo = vdupq_n_s32(-127), hi = vdupq_n_s32(127);
    for (int64_t blk = 0; blk < m * (k / TL_QBLOCK); blk++) {
        const float *xb = x + blk * TL_QBLOCK;
        float32x4_t v[8], vmax = vdupq_n_f32(0.0f);
        for (int u = 0; u < 8; u++) {
            v[u] = vld1q_f32(xb + 4 * u);
            vmax = vmaxq_f32(vmax, vabsq_f32(v[u]));
        }
        const float amax = vmaxvq_f32(vmax);
        const int tiny = !(amax >= 1e-30f);
        const float32x4_t id = vdupq_n_f32(tiny ? 0.0f : 127.0f / amax);
        xd[blk] = tiny ? 0.0f : amax / 127.0f;
        int32x4_t q[8];
        for (int u = 0; u < 8; u++) q[u] = round_clamp(vmulq_f32(v[u], id), lo, hi);
        vst1q_s8(xq + blk * TL_QBLOCK, narrow16(q[0], q[1], q[2], q[3]));
        vst1q_s8(xq + blk * TL_QBLOCK + 16, narrow16(q[4], q[5], q[6], q[7]));
    }
}

/* The 16 lanes of ternary.h live in 4 vectors, lane l in facc[l / 4] element l % 4. A quad of 4 blocks
 * (128 columns) starting at block b (b % 4 == 0) adds to facc[(b % 16) / 4]: 2 sdot per block, then a
 * pairwise-add tree (exact in integers) to one int32 per block. Then, in float32 as in ref.c,
 * p = float(isum) * (float(wd) * xd): one rounding per multiply, no fused multiply-add. */
/* The fixed float order of the Q8_0/Q4_0 sums: lane l + 8 -> l, l + 4 -> l, l + 2 -> l, lane 0 + lane 1. */
INLINE float lane_tree(const float lane[16]) {
    float32x4_t v0 = vaddq_f32(vld1q_f32(lane), vld1q_f32(lane + 8));
    v0 = vaddq_f32(v0, vaddq_f32(vld1q_f32(lane + 4), vld1q_f32(lane + 12)));
    const float32x2_t h = vadd_f32(vget_low_f32(v0), vget_high_f32(v0));
    return vget_lane_f32(h, 0) + vget_lane_f32(h, 1);
}

INLINE void q8_tile(const int NR, const int MT, const int8_t *w, const uint16_t *wd, int64_t k, int64_t r,
                    const int8_t *xq, const float *xd, int64_t i, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK, nq = nb / 4;
    float32x4_t facc[4][4][4]; /* [row][token][lane quad] */
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++)
            for (int l = 0; l < 4; l++) facc[rr][t][l] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < nq; g++) {
        const int64_t c0 = g * 128;
        float32x4_t dw[4];
        for (int rr = 0; rr < NR; rr++) {
            __builtin_prefetch(w + (r + rr) * k + c0 + 1024);
            dw[rr] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wd + (r + rr) * nb + g * 4)));
        }
        for (int t = 0; t < MT; t++) {
            const int8_t *xt = xq + (i + t) * k + c0;
            int8x16_t a[8];
            for (int u = 0; u < 8; u++) a[u] = vld1q_s8(xt + 16 * u);
            const float32x4_t dx = vld1q_f32(xd + (i + t) * nb + g * 4);
            for (int rr = 0; rr < NR; rr++) {
                const int8_t *wr = w + (r + rr) * k + c0;
                int32x4_t d[4];
                for (int bb = 0; bb < 4; bb++) {
                    d[bb] = vdotq_s32(vdupq_n_s32(0), vld1q_s8(wr + 32 * bb), a[2 * bb]);
                    d[bb] = vdotq_s32(d[bb], vld1q_s8(wr + 32 * bb + 16), a[2 * bb + 1]);
                }
                const int32x4_t isum = vpaddq_s32(vpaddq_s32(d[0], d[1]), vpaddq_s32(d[2], d[3]));
                const float32x4_t p = vmulq_f32(vcvtq_f32_s32(isum), vmulq_f32(dw[rr], dx));
                facc[rr][t][g & 3] = vaddq_f32(facc[rr][t][g & 3], p);
            }
        }
    }
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) {
            float lane[16];
            for (int l = 0; l < 4; l++) vst1q_f32(lane + 4 * l, facc[rr][t][l]);
            /* leftover blocks (nb % 4), scalar and in the same float order */
            for (int64_t b = nq * 4; b < nb; b++) {
                const int8_t *wb = w + (r + rr) * k + b * TL_QBLOCK, *xb = xq + (i + t) * k + b * TL_QBLOCK;
                const int32x4_t d = vdotq_s32(vdotq_s32(vdupq_n_s32(0), vld1q_s8(wb), vld1q_s8(xb)),
                                              vld1q_s8(wb + 16), vld1q_s8(xb + 16));
                const float sc = tl_f16_to_f32(wd[(r + rr) * nb + b]) * xd[(i + t) * nb + b];
                lane[b % 16] += (float)vaddvq_s32(d) * sc;
            }
            y[(i + t) * ldy + r + rr] = lane_tree(lane);
        }
}


/* ---- Q4_0 (LM head) ---------------------------------------------------------------------------- */

/* Block b's 16 weight bytes -> its signed values q = u - 8: columns 0-15 (lo) and 16-31 (hi). */
INLINE int32x4_t q4_block_dot(const uint8_t *wb, int8x16_t x_lo, int8x16_t x_hi) {
    const uint8x16_t raw = vld1q_u8(wb);
    const int8x16_t eight = vdupq_n_s8(8);
    const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, vdupq_n_u8(15))), eight);
    const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, x_lo), hi, x_hi);
}

/* As q8_tile, with 16 weight bytes per block. */
INLINE void q4_tile(const int NR, const int MT, const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r,
                    const int8_t *xq, const float *xd, int64_t i, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK, nq = nb / 4, row_bytes = k / 2;
    float32x4_t facc[4][4][4]; /* [row][token][lane quad] */
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++)
            for (int l = 0; l < 4; l++) facc[rr][t][l] = vdupq_n_f32(0.0f);
    for (int64_t g = 0; g < nq; g++) {
        const int64_t c0 = g * 128;
        float32x4_t dw[4];
        for (int rr = 0; rr < NR; rr++) {
            __builtin_prefetch(w + (r + rr) * row_bytes + c0 / 2 + 1024);
            dw[rr] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(wd + (r + rr) * nb + g * 4)));
        }
        for (int t = 0; t < MT; t++) {
            const int8_t *xt = xq + (i + t) * k + c0;
            int8x16_t a[8];
            for (int u = 0; u < 8; u++) a[u] = vld1q_s8(xt + 16 * u);
            const float32x4_t dx = vld1q_f32(xd + (i + t) * nb + g * 4);
            for (int rr = 0; rr < NR; rr++) {
                const uint8_t *wr = w + (r + rr) * row_bytes + c0 / 2;
                int32x4_t d[4];
                for (int bb = 0; bb < 4; bb++) d[bb] = q4_block_dot(wr + 16 * bb, a[2 * bb], a[2 * bb + 1]);
                const int32x4_t isum = vpaddq_s32(vpaddq_s32(d[0], d[1]), vpaddq_s32(d[2], d[3]));
                const float32x4_t p = vmulq_f32(vcvtq_f32_s32(isum), vmulq_f32(dw[rr], dx));
                facc[rr][t][g & 3] = vaddq_f32(facc[rr][t][g & 3], p);
            }
        }
    }
    for (int rr = 0; rr < NR; rr++)
        for (int t = 0; t < MT; t++) {
            float lane[16];
            for (int l = 0; l < 4; l++) vst1q_f32(lane + 4 * l, facc[rr][t][l]);
            for (int64_t b = nq * 4; b < nb; b++) { /* leftover blocks, same float order */
                const int8_t *xb = xq + (i + t) * k + b * TL_QBLOCK;
                const int32x4_t d = q4_block_dot(w + (r + rr) * row_bytes + b * 16, vld1q_s8(xb), vld1q_s8(xb + 16));
                const float sc = tl_f16_to_f32(wd[(r + rr) * nb + b]) * xd[(i + t) * nb + b];
                lane[b % 16] += (float)vaddvq_s32(d) * sc;
            }
            y[(i + t) * ldy + r + rr] = lane_tree(lane);
        }
}

/* Tiles of a Q8_0 (BITS 8) or Q4_0 (BITS 4) matmul over rows [r0, r1); BITS is a compile-time constant. */
INLINE void qblock_rows(const int BITS, const void *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1,
                        const int8_t *xq, const float *xd, int64_t m, int64_t ldy, float *y) {
#define QTILE(NR, MT)                                                                                    \
    (BITS == 8 ? q8_tile(NR, MT, w, wd, k, r, xq, xd, i, ldy, y) : q4_tile(NR, MT, w, wd, k, r, xq, xd, i, ldy, y))
#define QTOKENS(NR)                                                                                      \
    do {                                                                                                 \
        for (i = 0; i + 2 <= m; i += 2) QTILE(NR, 2);                                                    \
        if (i < m) QTILE(NR, 1);                                                                         \
    } while (0)
    int64_t r = r0, i = 0;
    if (m == 1) { /* GEMV: 4 rows share each activation quad */
        for (; r + 4 <= r1; r += 4) QTILE(4, 1);
        for (; r < r1; r++) QTILE(1, 1);
        return;
    }
    for (; r + 2 <= r1; r += 2) QTOKENS(2);
    if (r < r1) QTOKENS(1);
#undef QTOKENS
#undef QTILE
}

void tl_neon_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y) {
    qblock_rows(8, w, wd, k, r0, r1, xq, xd, m, ldy, y);
}

void tl_neon_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y) {
    qblock_rows(4, w, wd, k, r0, r1, xq, xd, m, ldy, y);
}

#else
typedef int tl_neon_unused; /* keep the translation unit non-empty on non-ARM builds */
#endif
