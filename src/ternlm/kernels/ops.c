/* The small float operations of a transformer block, fused so that a decode step is a handful of C
 * calls per layer instead of dozens of numpy calls: RMSNorm, the gated FFN activation, and attention
 * of one new token over the KV cache (with RoPE and the cache write).
 *
 * Plain C written so gcc vectorizes it (16 independent lanes, no reassociation needed); on x86 each
 * hot function is also cloned for AVX-512 and AVX2 and picked by the loader at run time. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ternary.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define LANES 16

CLONES static float sum_squares(const float *x, int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[j + l] * x[j + l];
    float s = 0.0f;
    for (; j < n; j++) s += x[j] * x[j];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

CLONES static float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[j + l] * b[j + l];
    float s = 0.0f;
    for (; j < n; j++) s += a[j] * b[j];
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* y += p * v */
CLONES static void axpy(float *y, float p, const float *v, int64_t n) {
    for (int64_t j = 0; j < n; j++) y[j] += p * v[j];
}

int tl_rmsnorm(const float *x, const float *w, float eps, int64_t m, int64_t k, float *y) {
    if (!x || !w || !y) return TL_ENULL;
    if (m <= 0 || k <= 0) return TL_ESIZE;
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        float *yr = y + i * k;
        /* the reference's order: x * (1 / sqrt(mean(x^2) + eps)), then * w */
        const float inv = 1.0f / sqrtf(sum_squares(xr, k) / (float)k + eps);
        for (int64_t j = 0; j < k; j++) yr[j] = w[j] * (xr[j] * inv);
    }
    return TL_OK;
}

int tl_glu(const float *gu, int64_t m, int64_t f, int act, float *z) {
    if (!gu || !z) return TL_ENULL;
    if (m <= 0 || f <= 0) return TL_ESIZE;
    if (act != TL_ACT_RELU2 && act != TL_ACT_SILU) return TL_EDTYPE;
    for (int64_t i = 0; i < m; i++) {
        const float *g = gu + i * 2 * f, *u = g + f;
        float *zr = z + i * f;
        if (act == TL_ACT_RELU2) {
            for (int64_t j = 0; j < f; j++) {
                const float r = g[j] > 0.0f ? g[j] : 0.0f;
                zr[j] = (r * r) * u[j];
            }
        } else {
            for (int64_t j = 0; j < f; j++) zr[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
        }
    }
    return TL_OK;
}

/* Rotate-half RoPE of one head vector x (hd) into y. */
static void rope(const float *x, const float *cos, const float *sin, int hd, float *y) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        y[i] = x1 * cos[i] - x2 * sin[i];
        y[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

int tl_attention_decode(const float *qkv, float *k_cache, float *v_cache, int64_t max_len, int64_t pos,
                        const float *cos, const float *sin, int n_heads, int n_kv, int hd, float scale,
                        float *scores, float *out) {
    if (!qkv || !k_cache || !v_cache || !cos || !sin || !scores || !out) return TL_ENULL;
    if (n_heads <= 0 || n_kv <= 0 || hd <= 0 || max_len <= 0) return TL_ESIZE;
    if (n_heads % n_kv || hd % 2 || hd > TL_MAX_HEAD_DIM || pos < 0 || pos >= max_len) return TL_ERANGE;
    const int group = n_heads / n_kv;
    const float *q = qkv, *k = qkv + (int64_t)n_heads * hd, *v = k + (int64_t)n_kv * hd;
    const int64_t len = pos + 1;

    for (int g = 0; g < n_kv; g++) { /* store this token's roped key and its value */
        rope(k + (int64_t)g * hd, cos, sin, hd, k_cache + ((int64_t)g * max_len + pos) * hd);
        memcpy(v_cache + ((int64_t)g * max_len + pos) * hd, v + (int64_t)g * hd, (size_t)hd * sizeof(float));
    }
    float qr[TL_MAX_HEAD_DIM];
    for (int h = 0; h < n_heads; h++) {
        const float *keys = k_cache + (int64_t)(h / group) * max_len * hd;
        const float *values = v_cache + (int64_t)(h / group) * max_len * hd;
        rope(q + (int64_t)h * hd, cos, sin, hd, qr);
        float top = -INFINITY;
        for (int64_t s = 0; s < len; s++) {
            scores[s] = dot(qr, keys + s * hd, hd) * scale;
            if (scores[s] > top) top = scores[s];
        }
        float total = 0.0f;
        for (int64_t s = 0; s < len; s++) {
            scores[s] = expf(scores[s] - top);
            total += scores[s];
        }
        float *o = out + (int64_t)h * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int64_t s = 0; s < len; s++) axpy(o, scores[s] / total, values + s * hd, hd);
    }
    return TL_OK;
}
