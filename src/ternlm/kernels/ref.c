/* Scalar reference of every kernel: the C specification the SIMD files are tested against.
 * Plain loops, no intrinsics; it is also the path used on CPUs without AVX2 (and on non-x86). */
#include <math.h>
#include <string.h>

#include "ternary.h"

float tl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 is exact in float32 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

float tl_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* x (m, k) -> xq (m, k_pad), a_scale (m), sums (m) */
void tl_ref_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                     int32_t *sums) {
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        int8_t *qr = xq + i * k_pad;
        float amax = 0.0f;
        for (int64_t j = 0; j < k; j++) {
            float a = fabsf(xr[j]);
            if (a > amax) amax = a;
        }
        /* float32 throughout, same operations as numpy: the int8 values must be bit-identical */
        float s = 127.0f / (amax > 1e-5f ? amax : 1e-5f);
        int32_t sum = 0;
        for (int64_t j = 0; j < k; j++) {
            float v = nearbyintf(xr[j] * s); /* default rounding mode: half to even */
            v = v > 127.0f ? 127.0f : (v >= -128.0f ? v : -128.0f);
            qr[j] = (int8_t)v;
            sum += (int32_t)v;
        }
        memset(qr + k, 0, (size_t)(k_pad - k));
        a_scale[i] = s;
        sums[i] = sum;
    }
}

/* w (n, k_pad/4) packed; writes columns [r0, r1) of y or acc_out (m, ldy) */
void tl_ref_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                    const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                    int64_t m, int64_t ldy, float *y, int32_t *acc_out) {
    const int64_t row_bytes = k_pad / 4;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * row_bytes;
        for (int64_t i = 0; i < m; i++) {
            const int8_t *xi = xq + i * k_pad;
            int32_t acc = 0;
            for (int64_t b = 0; b < k_pad / TL_BLOCK; b++) {
                for (int j = 0; j < 64; j++) {
                    unsigned byte = wr[b * 64 + j];
                    for (int q = 0; q < 4; q++)
                        acc += (int32_t)((byte >> (2 * q)) & 3u) * xi[b * TL_BLOCK + 64 * q + j];
                }
            }
            acc -= sums[i]; /* codes are w + 1 */
            if (y)
                y[i * ldy + r] = (float)acc * (w_scale[r * ws_stride] / a_scale[i]);
            else
                acc_out[i * ldy + r] = acc;
        }
    }
}

/* TQ1: w (n, k_pad/5); writes columns [r0, r1) of y or acc_out (m, ldy) */
void tl_ref_ternary_tq1(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                        const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                        int64_t m, int64_t ldy, float *y, int32_t *acc_out) {
    const int64_t row_bytes = k_pad / 5;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * row_bytes;
        for (int64_t i = 0; i < m; i++) {
            const int8_t *xi = xq + i * k_pad;
            int32_t acc = 0;
            for (int64_t b = 0; b < k_pad / TL_TQ1_BLOCK; b++) {
                for (int j = 0; j < 64; j++) {
                    unsigned t = wr[b * 64 + j];
                    for (int q = 0; q < 5; q++) {
                        const unsigned t3 = 3u * t;
                        acc += (int32_t)(t3 >> 8) * xi[b * TL_TQ1_BLOCK + 64 * q + j];
                        t = t3 & 255u;
                    }
                }
            }
            acc -= sums[i]; /* codes are w + 1 */
            if (y)
                y[i * ldy + r] = (float)acc * (w_scale[r * ws_stride] / a_scale[i]);
            else
                acc_out[i * ldy + r] = acc;
        }
    }
}

static float weight_at(const void *w, int dtype, int64_t idx) {
    switch (dtype) {
    case TL_F16:
        return tl_f16_to_f32(((const uint16_t *)w)[idx]);
    case TL_BF16:
        return tl_bf16_to_f32(((const uint16_t *)w)[idx]);
    default:
        return ((const float *)w)[idx];
    }
}

/* w (n, k) -> columns [r0, r1) of y (m, ldy) = x (m, k) . w^T */
void tl_ref_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                  int64_t ldy, float *y) {
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < k; j++) acc += x[i * k + j] * weight_at(w, dtype, r * k + j);
            y[i * ldy + r] = acc;
        }
    }
}

/* ---- Q8_0 ---------------------------------------------------------------------------------------- */

/* x (m, k) -> xq (m, k), xd (m, k/32); float32 operations in numpy's order (quantize_act_q8_0) */
void tl_ref_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd) {
    for (int64_t blk = 0; blk < m * (k / TL_QBLOCK); blk++) {
        const float *xb = x + blk * TL_QBLOCK;
        float amax = 0.0f;
        for (int j = 0; j < TL_QBLOCK; j++) {
            float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        const int tiny = !(amax >= 1e-30f);
        const float id = tiny ? 0.0f : 127.0f / amax;
        xd[blk] = tiny ? 0.0f : amax / 127.0f;
        for (int j = 0; j < TL_QBLOCK; j++) {
            float v = nearbyintf(xb[j] * id);
            xq[blk * TL_QBLOCK + j] = (int8_t)(v > 127.0f ? 127.0f : (v >= -127.0f ? v : -127.0f));
        }
    }
}

/* The fixed float order of ternary.h: 16 lane sums by block index mod 16, then a halving tree. */
float tl_ref_q8_dot(const int8_t *w, const uint16_t *wd, const int8_t *x, const float *xd, int64_t nb) {
    float lane[16] = {0};
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum = 0;
        for (int j = 0; j < TL_QBLOCK; j++) isum += (int32_t)w[b * TL_QBLOCK + j] * x[b * TL_QBLOCK + j];
        lane[b % 16] += (float)isum * (tl_f16_to_f32(wd[b]) * xd[b]);
    }
    for (int half = 8; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) lane[l] += lane[l + half];
    return lane[0];
}

/* w (n, k), wd (n, k/32); writes columns [r0, r1) of y (m, ldy) */
void tl_ref_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
               const float *xd, int64_t m, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < m; i++)
            y[i * ldy + r] = tl_ref_q8_dot(w + r * k, wd + r * nb, xq + i * k, xd + i * nb, nb);
}

/* ---- Q4_0 ---------------------------------------------------------------------------------------- */

/* One row (k/2 packed bytes) x one token, in the float order of tl_ref_q8_dot. */
float tl_ref_q4_dot(const uint8_t *w, const uint16_t *wd, const int8_t *x, const float *xd, int64_t nb) {
    float lane[16] = {0};
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * (TL_QBLOCK / 2);
        const int8_t *xb = x + b * TL_QBLOCK;
        int32_t isum = 0;
        for (int j = 0; j < TL_QBLOCK / 2; j++)
            isum += ((int32_t)(wb[j] & 15u) - 8) * xb[j] + ((int32_t)(wb[j] >> 4) - 8) * xb[j + 16];
        lane[b % 16] += (float)isum * (tl_f16_to_f32(wd[b]) * xd[b]);
    }
    for (int half = 8; half >= 1; half /= 2)
        for (int l = 0; l < half; l++) lane[l] += lane[l + half];
    return lane[0];
}

/* w (n, k/2), wd (n, k/32); writes columns [r0, r1) of y (m, ldy) */
void tl_ref_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
               const float *xd, int64_t m, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t i = 0; i < m; i++)
            y[i * ldy + r] = tl_ref_q4_dot(w + r * (k / 2), wd + r * nb, xq + i * k, xd + i * nb, nb);
}
