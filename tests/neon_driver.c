/* NEON kernels (neon.c) against the scalar reference (ref.c), with no Python: built by tests/test_neon.py
 * with an aarch64 cross compiler and run under qemu-aarch64 -cpu max.
 *
 *   aarch64-linux-gnu-gcc -O2 -static -std=c11 -ffp-contract=off -pthread -I src/ternlm/kernels \
 *       tests/neon_driver.c src/ternlm/kernels/{ref,neon,threads}.c -lm -o neon_driver
 *   qemu-aarch64 -cpu max ./neon_driver [seed]
 *
 * Bit-identical: activation quantization (xq, a_scale, sums), the ternary int32 accumulators and the
 * scaled ternary output, Q8_0 quantization and the Q8_0 and Q4_0 matmuls (fixed 16-lane float order). Float
 * matmul sums in another order: |y - ref| <= 1e-5 * sum |x| |w| + 1e-30, as in test_kernels.py.
 * Exit status 0 if all agree, 1 on any mismatch, 77 if the CPU lacks the dot-product extension. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

#include "ternary.h"

#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif

static uint64_t rng_state;

static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int64_t rand_int(int64_t lo, int64_t hi) { return lo + (int64_t)(next_u64() % (uint64_t)(hi - lo + 1)); }

static float rand_normal(void) { /* Box-Muller */
    double u1 = ((double)(next_u64() >> 11) + 1.0) / 9007199254740993.0;
    double u2 = (double)(next_u64() >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

static int n_checks, n_fail;

static void check(int ok, const char *what, int64_t m, int64_t n, int64_t k) {
    n_checks++;
    if (!ok) {
        n_fail++;
        if (n_fail <= 20) fprintf(stderr, "MISMATCH %s: m=%lld n=%lld k=%lld\n", what, (long long)m, (long long)n, (long long)k);
    }
}

/* float32 -> float16 bits, round to nearest even (normal and subnormal range; no overflow here) */
static uint16_t f32_to_f16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint16_t sign = (uint16_t)((b >> 16) & 0x8000u);
    const float a = fabsf(f);
    if (a < 6.103515625e-05f) { /* subnormal half: a multiple of 2^-24 */
        return (uint16_t)(sign | (uint16_t)nearbyintf(a * 16777216.0f));
    }
    uint32_t e = ((b >> 23) & 0xffu) - 112u, man = b & 0x7fffffu;
    uint32_t h = (e << 10) | (man >> 13), rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++;
    return (uint16_t)(sign | h);
}

/* ---- activation quantization ----------------------------------------------------------------- */

static void fill_activations(float *x, int64_t n, int kind) {
    for (int64_t j = 0; j < n; j++) {
        switch (kind) {
        case 0: x[j] = rand_normal(); break;
        case 1: x[j] = rand_normal() * 1e4f; break;
        case 2: x[j] = (float)rand_int(-254, 254) * 0.5f; break; /* amax 127: scale 1, exact .5 ties */
        case 3: x[j] = rand_normal() * 1e-7f; break;             /* below the 1e-5 amax floor */
        default: x[j] = 0.0f; break;
        }
    }
    if (kind == 2 && n > 0) x[0] = 127.0f;
}

static void test_quantize(void) {
    static const int64_t ks[] = {1, 3, 15, 16, 17, 100, 255, 256, 257, 300, 1000, 2560};
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
        for (int kind = 0; kind < 5; kind++) {
            const int64_t k = ks[ki], m = rand_int(1, 4), k_pad = (k + TL_BLOCK - 1) / TL_BLOCK * TL_BLOCK;
            float *x = xmalloc((size_t)(m * k) * 4), s0[4], s1[4];
            int8_t *q0 = xmalloc((size_t)(m * k_pad)), *q1 = xmalloc((size_t)(m * k_pad));
            int32_t u0[4], u1[4];
            fill_activations(x, m * k, kind);
            memset(q1, 0x55, (size_t)(m * k_pad)); /* the padding must be written */
            tl_ref_quantize(x, m, k, k_pad, q0, s0, u0);
            tl_neon_quantize(x, m, k, k_pad, q1, s1, u1);
            check(!memcmp(q0, q1, (size_t)(m * k_pad)) && !memcmp(s0, s1, (size_t)m * 4) &&
                      !memcmp(u0, u1, (size_t)m * 4),
                  "quantize", m, 0, k);
            free(x), free(q0), free(q1);
        }
}

/* ---- ternary matmul -------------------------------------------------------------------------- */

typedef struct {
    const uint8_t *w;
    int64_t k_pad, m, n;
    const int8_t *xq;
    const int32_t *sums;
    const float *a_scale, *w_scale;
    int64_t ws_stride;
    float *y;
    int32_t *acc;
} ternary_job;

static void ternary_range(void *ctx, int64_t r0, int64_t r1) {
    const ternary_job *j = ctx;
    tl_neon_ternary(j->w, j->k_pad, r0, r1, j->xq, j->sums, j->a_scale, j->w_scale, j->ws_stride, j->m, j->n,
                    j->y, j->acc);
}

static void test_ternary(int cases) {
    for (int c = 0; c < cases; c++) {
        /* m = 1 (GEMV) and m > 1 (GEMM, incl. > 64 tokens per weight pass); n not a multiple of 4 */
        static const int64_t ms[] = {1, 1, 1, 2, 3, 4, 5, 7, 9, 66};
        const int64_t m = ms[c % 10], n = rand_int(1, 23);
        const int64_t k = c % 3 == 0 ? rand_int(1, 256) * 4 : rand_int(1, 1300), k_pad = (k + 255) / 256 * 256;
        const int64_t row_bytes = k_pad / 4, ws_stride = c % 2;
        float *x = xmalloc((size_t)(m * k) * 4), *a_scale = xmalloc((size_t)m * 4), *w_scale = xmalloc((size_t)n * 4);
        int8_t *xq = xmalloc((size_t)(m * k_pad));
        int32_t *sums = xmalloc((size_t)m * 4);
        uint8_t *w = xmalloc((size_t)(n * row_bytes));
        fill_activations(x, m * k, c % 4 == 3 ? 1 : 0);
        if (c % 7 == 0) /* extremes: every code 2 (w = +1) or 0 (w = -1) against -128 / 127 */
            for (int64_t j = 0; j < m * k; j++) x[j] = j % 2 ? -1.0f : 0.99f;
        tl_ref_quantize(x, m, k, k_pad, xq, a_scale, sums);
        for (int64_t r = 0; r < n; r++)
            for (int64_t b = 0; b < row_bytes; b++) {
                unsigned byte = 0;
                for (int q = 0; q < 4; q++) {
                    const int64_t col = (b / 64) * 256 + 64 * q + b % 64;
                    unsigned code = col >= k ? 1u : c % 7 == 0 ? (r % 2 ? 0u : 2u) : (unsigned)rand_int(0, 2);
                    byte |= code << (2 * q);
                }
                w[r * row_bytes + b] = (uint8_t)byte;
            }
        for (int64_t r = 0; r < n; r++) w_scale[r] = 0.01f + (float)rand_int(0, 1000) * 1e-3f;
        int32_t *acc0 = xmalloc((size_t)(m * n) * 4), *acc1 = xmalloc((size_t)(m * n) * 4);
        float *y0 = xmalloc((size_t)(m * n) * 4), *y1 = xmalloc((size_t)(m * n) * 4);
        tl_ref_ternary(w, k_pad, 0, n, xq, sums, a_scale, NULL, 0, m, n, NULL, acc0);
        tl_ref_ternary(w, k_pad, 0, n, xq, sums, a_scale, w_scale, ws_stride, m, n, y0, NULL);
        /* whole range; then split at a row-tile boundary, as the threaded caller does */
        tl_neon_ternary(w, k_pad, 0, n, xq, sums, a_scale, NULL, 0, m, n, NULL, acc1);
        check(!memcmp(acc0, acc1, (size_t)(m * n) * 4), "ternary acc", m, n, k);
        const int64_t split = n > TL_ROW_TILE ? TL_ROW_TILE * rand_int(1, (n - 1) / TL_ROW_TILE) : n;
        memset(y1, 0xff, (size_t)(m * n) * 4);
        tl_neon_ternary(w, k_pad, 0, split, xq, sums, a_scale, w_scale, ws_stride, m, n, y1, NULL);
        tl_neon_ternary(w, k_pad, split, n, xq, sums, a_scale, w_scale, ws_stride, m, n, y1, NULL);
        check(!memcmp(y0, y1, (size_t)(m * n) * 4), "ternary y", m, n, k);
        /* through the thread pool (threads.c), 3 threads */
        memset(y1, 0xff, (size_t)(m * n) * 4);
        ternary_job job = {w, k_pad, m, n, xq, sums, a_scale, w_scale, ws_stride, y1, NULL};
        check(tl_parallel_for(n, TL_ROW_TILE, m == 1, ternary_range, &job) == TL_OK &&
                  !memcmp(y0, y1, (size_t)(m * n) * 4),
              "ternary y (threads)", m, n, k);
        free(x), free(a_scale), free(w_scale), free(xq), free(sums), free(w);
        free(acc0), free(acc1), free(y0), free(y1);
    }
}

/* ---- float matmul ---------------------------------------------------------------------------- */

static float w_as_f32(const void *w, int dtype, int64_t idx) {
    if (dtype == TL_F16) return tl_f16_to_f32(((const uint16_t *)w)[idx]);
    if (dtype == TL_BF16) return tl_bf16_to_f32(((const uint16_t *)w)[idx]);
    return ((const float *)w)[idx];
}

static void test_float(int cases) {
    for (int c = 0; c < cases; c++) {
        const int dtype = c % 3;
        const int64_t m = c % 4 == 0 ? 1 : rand_int(2, 9), n = rand_int(1, 13), k = rand_int(1, 700);
        float *x = xmalloc((size_t)(m * k) * 4), *y0 = xmalloc((size_t)(m * n) * 4), *y1 = xmalloc((size_t)(m * n) * 4);
        void *w = xmalloc((size_t)(n * k) * 4);
        fill_activations(x, m * k, 0);
        for (int64_t j = 0; j < n * k; j++) {
            float v = rand_normal();
            if (dtype == TL_F32) ((float *)w)[j] = v;
            else if (dtype == TL_F16) ((uint16_t *)w)[j] = j % 11 == 5 ? (uint16_t)rand_int(0, 0x3ff) : f32_to_f16(v);
            else {
                uint32_t b;
                memcpy(&b, &v, 4);
                ((uint16_t *)w)[j] = (uint16_t)(b >> 16);
            }
        }
        tl_ref_float(w, dtype, k, 0, n, x, m, n, y0);
        tl_neon_float(w, dtype, k, 0, n, x, m, n, y1);
        int ok = 1;
        for (int64_t i = 0; i < m; i++)
            for (int64_t r = 0; r < n; r++) {
                double bound = 1e-30;
                for (int64_t j = 0; j < k; j++) bound += 1e-5 * fabs((double)x[i * k + j] * w_as_f32(w, dtype, r * k + j));
                ok &= fabs((double)y0[i * n + r] - (double)y1[i * n + r]) <= bound;
            }
        check(ok, dtype == TL_F32 ? "float f32" : dtype == TL_F16 ? "float f16" : "float bf16", m, n, k);
        free(x), free(y0), free(y1), free(w);
    }
}

/* ---- Q8_0 ------------------------------------------------------------------------------------ */

static void test_q8(int cases) {
    /* k / 32 blocks: 1, 2, 3 (< one quad), 5, 17 (> 16 lanes, not a multiple of 4), 33, 80 */
    static const int64_t ks[] = {32, 64, 96, 160, 544, 1056, 2560};
    for (int c = 0; c < cases; c++) {
        const int64_t k = ks[c % 7], nb = k / TL_QBLOCK, m = c % 3 == 0 ? 1 : rand_int(2, 5), n = rand_int(1, 11);
        float *x = xmalloc((size_t)(m * k) * 4), *xd0 = xmalloc((size_t)(m * nb) * 4), *xd1 = xmalloc((size_t)(m * nb) * 4);
        int8_t *xq0 = xmalloc((size_t)(m * k)), *xq1 = xmalloc((size_t)(m * k)), *w = xmalloc((size_t)(n * k));
        uint16_t *wd = xmalloc((size_t)(n * nb) * 2);
        const float mag = powf(10.0f, (float)rand_int(-3, 3));
        for (int64_t j = 0; j < m * k; j++) x[j] = rand_normal() * mag;
        x[rand_int(0, m * k - 1)] *= 100.0f;                       /* an outlier dimension */
        for (int j = 0; j < TL_QBLOCK; j++) x[j] = 0.0f;           /* an all-zero block: d = 0, q = 0 */
        if (nb > 1) for (int j = 0; j < TL_QBLOCK; j++) x[TL_QBLOCK + j] = (float)(j - 16) * 0.5f; /* ties */
        tl_ref_q8_quantize(x, m, k, xq0, xd0);
        tl_neon_q8_quantize(x, m, k, xq1, xd1);
        check(!memcmp(xq0, xq1, (size_t)(m * k)) && !memcmp(xd0, xd1, (size_t)(m * nb) * 4), "q8 quantize", m, 0, k);
        for (int64_t j = 0; j < n * k; j++) w[j] = (int8_t)(c % 5 == 4 ? 127 : rand_int(-127, 127));
        for (int64_t j = 0; j < n * nb; j++)
            wd[j] = j % 13 == 7 ? (uint16_t)rand_int(1, 0x3ff) : f32_to_f16(rand_normal() * 1e-3f);
        float *y0 = xmalloc((size_t)(m * n) * 4), *y1 = xmalloc((size_t)(m * n) * 4);
        tl_ref_q8(w, wd, k, 0, n, xq0, xd0, m, n, y0);
        const int64_t split = n > TL_ROW_TILE ? TL_ROW_TILE : n;
        tl_neon_q8(w, wd, k, 0, split, xq0, xd0, m, n, y1);
        tl_neon_q8(w, wd, k, split, n, xq0, xd0, m, n, y1);
        check(!memcmp(y0, y1, (size_t)(m * n) * 4), "q8 matmul", m, n, k);
        free(x), free(xd0), free(xd1), free(xq0), free(xq1), free(w), free(wd), free(y0), free(y1);
    }
}

/* ---- Q4_0 ------------------------------------------------------------------------------------ */

static void test_q4(int cases) {
    /* k / 32 blocks: 1, 2, 3 (< one quad), 5, 7, 17 (> 16 lanes, not a multiple of 4), 33, 80 */
    static const int64_t ks[] = {32, 64, 96, 160, 224, 544, 1056, 2560};
    for (int c = 0; c < cases; c++) {
        const int64_t k = ks[c % 8], nb = k / TL_QBLOCK, m = c % 3 == 0 ? 1 : rand_int(2, 5), n = rand_int(1, 11);
        float *x = xmalloc((size_t)(m * k) * 4), *xd = xmalloc((size_t)(m * nb) * 4);
        int8_t *xq = xmalloc((size_t)(m * k));
        uint8_t *w = xmalloc((size_t)(n * k / 2));
        uint16_t *wd = xmalloc((size_t)(n * nb) * 2);
        for (int64_t j = 0; j < m * k; j++) x[j] = rand_normal();
        x[rand_int(0, m * k - 1)] *= 100.0f;
        tl_ref_q8_quantize(x, m, k, xq, xd);
        /* any nibble, 0 (q = -8) and 15 included; every 5th case all 0 (the most negative) */
        for (int64_t j = 0; j < n * k / 2; j++) w[j] = (uint8_t)(c % 5 == 4 ? 0 : rand_int(0, 255));
        for (int64_t j = 0; j < n * nb; j++)
            wd[j] = j % 13 == 7 ? (uint16_t)rand_int(1, 0x3ff) : f32_to_f16(rand_normal() * 1e-2f);
        float *y0 = xmalloc((size_t)(m * n) * 4), *y1 = xmalloc((size_t)(m * n) * 4);
        tl_ref_q4(w, wd, k, 0, n, xq, xd, m, n, y0);
        const int64_t split = n > TL_ROW_TILE ? TL_ROW_TILE : n;
        tl_neon_q4(w, wd, k, 0, split, xq, xd, m, n, y1);
        tl_neon_q4(w, wd, k, split, n, xq, xd, m, n, y1);
        check(!memcmp(y0, y1, (size_t)(m * n) * 4), "q4 matmul", m, n, k);
        free(x), free(xd), free(xq), free(w), free(wd), free(y0), free(y1);
    }
}

int main(int argc, char **argv) {
    if (!(getauxval(AT_HWCAP) & HWCAP_ASIMDDP)) {
        printf("neon_driver: CPU lacks the dot-product extension (run qemu-aarch64 -cpu max)\n");
        return 77;
    }
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 10) : 1234;
    if (tl_set_threads(3) != TL_OK) {
        fprintf(stderr, "tl_set_threads(3) failed\n");
        return 2;
    }
    test_quantize();
    const int q = n_checks;
    test_ternary(120);
    const int t = n_checks;
    test_float(60);
    const int f = n_checks;
    test_q8(70);
    const int q8 = n_checks;
    test_q4(80);
    printf("neon_driver: %d checks (quantize %d, ternary %d, float %d, q8_0 %d, q4_0 %d), %d mismatches\n",
           n_checks, q, t - q, f - t, q8 - f, n_checks - q8, n_fail);
    return n_fail ? 1 : 0;
}
