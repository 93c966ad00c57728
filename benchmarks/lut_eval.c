/* Alternative ternary matmul kernels for ternlm, for measurement only (see lut_eval.py).
 *
 * Formats (codes c = w + 1 in {0,1,2}; every layout pads K with c = 1 and the activations with 0):
 *   I2   2 bits/weight, ternlm's layout (ternary.h): 64-byte chunk of a row = 256 columns, byte j holds
 *        columns j, 64+j, 128+j, 192+j at bits 0-1, 2-3, 4-5, 6-7. K padded to a multiple of 256.
 *   TQ1  1.6 bits/weight, 5 trits per byte (like llama.cpp TQ1_0's qs): 64-byte chunk = 320 columns,
 *        byte j holds columns j + 64i (i = 0..4) as v = sum c_i 3^(4-i), stored as q = ceil(256 v / 243),
 *        so trit i = floor(3 t_i / 256) with t_0 = q, t_{i+1} = 3 t_i mod 256. K padded to 320.
 *   LUT  5-bit direct pattern index per 3 weights, p = c0 + 3 c1 + 9 c2 (27 patterns), three per
 *        uint16 (bits 0-4, 5-9, 10-14; bit 15 unused: 1.78 bits/weight), K padded to 9. Rows in tiles of
 *        64: [tile][word u][64 lanes], so a tile is one linear stream of 128 bytes per word.
 *        Per token a table T[g][p] = sum_j (digit_j(p) - 1) x[3g + j] (32 int16, p >= 27 zero) is built
 *        and looked up with vpermw (which reads only index bits 0-4, so no masking is needed).
 *
 * Kernels (int32 results y = sum_j w x_j, exact):
 *   V_I2    GEMV and GEMM copied from ternlm's src/ternlm/kernels/avx512.c (same prefetch scheme).
 *   V_I2P   GEMM only: decode a 4-row panel to int8 codes in L1/L2 once per 64 tokens, then 4x4 vpdpbusd.
 *   V_TQ1   GEMV: no explicit trits. Since 3 t_i = 256 d_i + t_{i+1}, sum_i a_i d_i =
 *           (3 sum_i a_i t_i - sum_i a_i t_{i+1}) / 256: two vpdpbusd per trit vector against the same
 *           activations, and t_{i+1} = t_i + t_i + t_i in byte adds (wrap = mod 256). GEMM: decode panel
 *           (d = [t >= 86] + [t >= 171]) then the same 4x4 vpdpbusd microkernel as V_I2P.
 *   V_LUT   GEMV/GEMM by table lookup (vpermw), int16 accumulation widened every 16 words.
 * Threads: lt_run starts nthreads pthreads; each takes a contiguous row range of every matrix in turn,
 * with a spin barrier after each matrix (as an engine would between dependent layers).
 */
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define INLINE static inline __attribute__((always_inline))

enum { V_I2 = 0, V_I2P = 1, V_TQ1 = 2, V_LUT = 3 };

typedef struct {
    const uint8_t *w;     /* packed weights */
    int64_t n, kp;        /* rows, padded K */
    const int8_t *x;      /* (m, kp) int8 activations */
    const int32_t *sums;  /* (m) row sums of x */
    int32_t *y;           /* (m, n) output */
    int16_t *lut;         /* V_LUT scratch: (m, kp / 3, 32) int16 */
} lt_mat;

INLINE __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "vm"(b));
    return acc;
}

#define PF_EXTRA 8192
#define PF_HINT _MM_HINT_T1
#define PF_L1 2048
#define PF_AGAIN 4096

/* ---- I2: copy of ternlm's GEMV tile (NR = 4) and GEMM tile -------------------------------------- */

static void i2_gemv(const lt_mat *M, int64_t r0, int64_t r1) {
    const int NR = 4;
    const int64_t row_bytes = M->kp / 4, nblk = M->kp / 256;
    const __m512i m3 = _mm512_set1_epi8(3), m12 = _mm512_set1_epi8(12);
    const int8_t *x = M->x;
    for (int64_t r = r0; r < r1; r += NR) {
        __m512i acc0[4], acc1[4];
        const uint8_t *wr[4];
        const char *pf = (const char *)(M->w + (r + NR) * row_bytes) + PF_EXTRA;
        const char *pf1 = (const char *)(M->w + r * row_bytes) + PF_L1;
        for (int rr = 0; rr < NR; rr++) {
            acc0[rr] = _mm512_setzero_si512();
            acc1[rr] = _mm512_setzero_si512();
            wr[rr] = M->w + (r + rr) * row_bytes;
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
                __asm__("" : "+v"(raw));
                const __m512i hi = _mm512_srli_epi16(raw, 4);
                acc0[rr] = dpbusd(acc0[rr], _mm512_and_si512(raw, m3), a0);
                acc1[rr] = dpbusd(acc1[rr], _mm512_and_si512(raw, m12), a1);
                acc0[rr] = dpbusd(acc0[rr], _mm512_and_si512(hi, m3), a2);
                acc1[rr] = dpbusd(acc1[rr], _mm512_and_si512(hi, m12), a3);
            }
        }
        for (int rr = 0; rr < NR; rr++) {
            const __m512i acc = _mm512_add_epi32(acc0[rr], _mm512_srai_epi32(acc1[rr], 2));
            M->y[r + rr] = _mm512_reduce_add_epi32(acc) - M->sums[0];
        }
    }
}

#define TOKEN_CHUNK 64

static void i2_gemm(const lt_mat *M, int64_t m, int64_t r0, int64_t r1) {
    const int NR = 4, MT = 4;
    const int64_t kp = M->kp, row_bytes = kp / 4, nblk = kp / 256;
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int64_t i0 = 0; i0 < m; i0 += TOKEN_CHUNK) {
        const int64_t i1 = i0 + TOKEN_CHUNK < m ? i0 + TOKEN_CHUNK : m;
        for (int64_t r = r0; r < r1; r += NR)
            for (int64_t i = i0; i < i1; i += MT) {
                __m512i acc[4][4];
                const uint8_t *wr[4];
                const int8_t *xr[4];
                for (int rr = 0; rr < NR; rr++) {
                    wr[rr] = M->w + (r + rr) * row_bytes;
                    for (int t = 0; t < MT; t++) acc[rr][t] = _mm512_setzero_si512();
                }
                for (int t = 0; t < MT; t++) xr[t] = M->x + (i + t) * kp;
                for (int64_t b = 0; b < nblk; b++) {
                    __m512i raw[4];
                    for (int rr = 0; rr < NR; rr++) raw[rr] = _mm512_loadu_si512(wr[rr] + b * 64);
                    for (int q = 0; q < 4; q++) {
                        __m512i c[4];
                        for (int rr = 0; rr < NR; rr++)
                            c[rr] = _mm512_and_si512(_mm512_srli_epi16(raw[rr], 2 * q), m3);
                        for (int t = 0; t < MT; t++) {
                            const __m512i a = _mm512_loadu_si512(xr[t] + b * 256 + 64 * q);
                            for (int rr = 0; rr < NR; rr++) acc[rr][t] = dpbusd(acc[rr][t], c[rr], a);
                        }
                    }
                }
                for (int t = 0; t < MT; t++)
                    for (int rr = 0; rr < NR; rr++)
                        M->y[(i + t) * M->n + r + rr] = _mm512_reduce_add_epi32(acc[rr][t]) - M->sums[i + t];
            }
    }
}

/* ---- decode-panel GEMM (format-independent microkernel) ----------------------------------------- */

/* panel: 4 rows x kp int8 codes (kp a multiple of 64). */
static void panel_gemm(const lt_mat *M, const uint8_t *panel, int64_t i0, int64_t i1, int64_t r) {
    const int64_t kp = M->kp, nc = kp / 64;
    for (int64_t i = i0; i < i1; i += 4) {
        __m512i acc[4][4];
        for (int rr = 0; rr < 4; rr++)
            for (int t = 0; t < 4; t++) acc[rr][t] = _mm512_setzero_si512();
        const int8_t *xr = M->x + i * kp;
        for (int64_t c = 0; c < nc; c++) {
            __m512i w[4];
            for (int rr = 0; rr < 4; rr++) w[rr] = _mm512_load_si512(panel + rr * kp + c * 64);
            for (int t = 0; t < 4; t++) {
                const __m512i a = _mm512_loadu_si512(xr + t * kp + c * 64);
                for (int rr = 0; rr < 4; rr++) acc[rr][t] = dpbusd(acc[rr][t], w[rr], a);
            }
        }
        for (int t = 0; t < 4; t++)
            for (int rr = 0; rr < 4; rr++)
                M->y[(i + t) * M->n + r + rr] = _mm512_reduce_add_epi32(acc[rr][t]) - M->sums[i + t];
    }
}

static void i2_decode(const lt_mat *M, int64_t r, uint8_t *panel) {
    const int64_t kp = M->kp, row_bytes = kp / 4;
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int rr = 0; rr < 4; rr++)
        for (int64_t b = 0; b < kp / 256; b++) {
            const __m512i raw = _mm512_loadu_si512(M->w + (r + rr) * row_bytes + b * 64);
            for (int q = 0; q < 4; q++)
                _mm512_store_si512(panel + rr * kp + b * 256 + 64 * q,
                                   _mm512_and_si512(_mm512_srli_epi16(raw, 2 * q), m3));
        }
}

INLINE __m512i times3(__m512i t) { return _mm512_add_epi8(_mm512_add_epi8(t, t), t); }

static void tq1_decode(const lt_mat *M, int64_t r, uint8_t *panel) {
    const int64_t kp = M->kp, row_bytes = kp / 5;
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2);
    const __m512i c86 = _mm512_set1_epi8((char)86), c171 = _mm512_set1_epi8((char)171);
    for (int rr = 0; rr < 4; rr++)
        for (int64_t b = 0; b < kp / 320; b++) {
            __m512i t = _mm512_loadu_si512(M->w + (r + rr) * row_bytes + b * 64);
            for (int q = 0; q < 5; q++) {
                __m512i d = _mm512_maskz_mov_epi8(_mm512_cmpge_epu8_mask(t, c86), one);
                d = _mm512_mask_mov_epi8(d, _mm512_cmpge_epu8_mask(t, c171), two);
                _mm512_store_si512(panel + rr * kp + b * 320 + 64 * q, d);
                t = times3(t);
            }
        }
}

typedef void (*decode_fn)(const lt_mat *, int64_t, uint8_t *);

static void decoded_gemm(const lt_mat *M, int64_t m, int64_t r0, int64_t r1, decode_fn decode) {
    uint8_t *panel = aligned_alloc(64, (size_t)(4 * M->kp));
    for (int64_t i0 = 0; i0 < m; i0 += TOKEN_CHUNK) {
        const int64_t i1 = i0 + TOKEN_CHUNK < m ? i0 + TOKEN_CHUNK : m;
        for (int64_t r = r0; r < r1; r += 4) {
            decode(M, r, panel);
            panel_gemm(M, panel, i0, i1, r);
        }
    }
    free(panel);
}

/* ---- TQ1 GEMV (carry identity) --------------------------------------------------------------------- */

static void tq1_gemv(const lt_mat *M, int64_t r0, int64_t r1) {
    const int NR = 4;
    const int64_t row_bytes = M->kp / 5, nblk = M->kp / 320;
    const int8_t *x = M->x;
    for (int64_t r = r0; r < r1; r += NR) {
        __m512i accA[4], accB[4];
        const uint8_t *wr[4];
        const char *pf = (const char *)(M->w + (r + NR) * row_bytes) + PF_EXTRA;
        const char *pf1 = (const char *)(M->w + r * row_bytes) + PF_L1;
        for (int rr = 0; rr < NR; rr++) {
            accA[rr] = _mm512_setzero_si512();
            accB[rr] = _mm512_setzero_si512();
            wr[rr] = M->w + (r + rr) * row_bytes;
        }
        for (int64_t b = 0; b < nblk; b++) {
            __m512i a[5];
            for (int q = 0; q < 5; q++) a[q] = _mm512_loadu_si512(x + b * 320 + 64 * q);
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
            M->y[r + rr] = (_mm512_reduce_add_epi32(d) >> 8) - M->sums[0];
        }
    }
}

/* ---- LUT (vpermw) -------------------------------------------------------------------------------- */

/* Tables of groups [g0, g1) for tokens [0, m). */
static void lut_build(const lt_mat *M, int64_t m, int64_t g0, int64_t g1) {
    int16_t dg[3][32];
    for (int p = 0; p < 32; p++) {
        dg[0][p] = p < 27 ? (int16_t)(p % 3 - 1) : 0;
        dg[1][p] = p < 27 ? (int16_t)(p / 3 % 3 - 1) : 0;
        dg[2][p] = p < 27 ? (int16_t)(p / 9 - 1) : 0;
    }
    const __m512i d0 = _mm512_loadu_si512(dg[0]), d1 = _mm512_loadu_si512(dg[1]), d2 = _mm512_loadu_si512(dg[2]);
    const int64_t G = M->kp / 3;
    for (int64_t i = 0; i < m; i++) {
        const int8_t *x = M->x + i * M->kp;
        int16_t *T = M->lut + i * G * 32;
        for (int64_t g = g0; g < g1; g++) {
            __m512i v = _mm512_mullo_epi16(_mm512_set1_epi16(x[3 * g]), d0);
            v = _mm512_add_epi16(v, _mm512_mullo_epi16(_mm512_set1_epi16(x[3 * g + 1]), d1));
            v = _mm512_add_epi16(v, _mm512_mullo_epi16(_mm512_set1_epi16(x[3 * g + 2]), d2));
            _mm512_store_si512(T + g * 32, v);
        }
    }
}

#define LUT_WIDEN 16 /* words (3 groups each, |entry| <= 384) per int16 accumulation: 16*3*384 < 32768 */

INLINE void widen_add(__m512i acc32[2], __m512i a16) {
    acc32[0] = _mm512_add_epi32(acc32[0], _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a16)));
    acc32[1] = _mm512_add_epi32(acc32[1], _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a16, 1)));
}

static void lut_gemv(const lt_mat *M, int64_t r0, int64_t r1) {
    const int64_t U = M->kp / 9, tile_bytes = U * 128;
    const int16_t *T = M->lut;
    for (int64_t r = r0; r < r1; r += 64) {
        const uint8_t *wt = M->w + (r / 64) * tile_bytes;
        const char *pf = (const char *)wt + PF_EXTRA;
        __m512i acc32[2][2] = {{_mm512_setzero_si512(), _mm512_setzero_si512()},
                               {_mm512_setzero_si512(), _mm512_setzero_si512()}};
        for (int64_t u0 = 0; u0 < U; u0 += LUT_WIDEN) {
            const int64_t u1 = u0 + LUT_WIDEN < U ? u0 + LUT_WIDEN : U;
            __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
            for (int64_t u = u0; u < u1; u++) {
                _mm_prefetch(pf + u * 128, PF_HINT);
                _mm_prefetch(pf + u * 128 + 64, PF_HINT);
                _mm_prefetch(pf + PF_AGAIN + u * 128, PF_HINT);
                _mm_prefetch(pf + PF_AGAIN + u * 128 + 64, PF_HINT);
                const __m512i i0 = _mm512_loadu_si512(wt + u * 128), i1 = _mm512_loadu_si512(wt + u * 128 + 64);
                const __m512i t0 = _mm512_load_si512(T + 96 * u), t1 = _mm512_load_si512(T + 96 * u + 32),
                              t2 = _mm512_load_si512(T + 96 * u + 64);
                s0 = _mm512_add_epi16(s0, _mm512_permutexvar_epi16(i0, t0));
                s1 = _mm512_add_epi16(s1, _mm512_permutexvar_epi16(i1, t0));
                s0 = _mm512_add_epi16(s0, _mm512_permutexvar_epi16(_mm512_srli_epi16(i0, 5), t1));
                s1 = _mm512_add_epi16(s1, _mm512_permutexvar_epi16(_mm512_srli_epi16(i1, 5), t1));
                s0 = _mm512_add_epi16(s0, _mm512_permutexvar_epi16(_mm512_srli_epi16(i0, 10), t2));
                s1 = _mm512_add_epi16(s1, _mm512_permutexvar_epi16(_mm512_srli_epi16(i1, 10), t2));
            }
            widen_add(acc32[0], s0);
            widen_add(acc32[1], s1);
        }
        for (int h = 0; h < 2; h++)
            for (int q = 0; q < 2; q++) _mm512_storeu_si512(M->y + r + 32 * h + 16 * q, acc32[h][q]);
    }
}

/* GEMM: per chunk of 4 tokens (their tables stay in L2), all row tiles. */
static void lut_gemm(const lt_mat *M, int64_t m, int64_t r0, int64_t r1) {
    const int64_t U = M->kp / 9, G = M->kp / 3, tile_bytes = U * 128;
    for (int64_t i = 0; i < m; i += 4) {
        const int16_t *T[4];
        for (int t = 0; t < 4; t++) T[t] = M->lut + (i + t) * G * 32;
        for (int64_t r = r0; r < r1; r += 64) {
            const uint8_t *wt = M->w + (r / 64) * tile_bytes;
            __m512i acc32[4][2][2];
            memset(acc32, 0, sizeof acc32);
            for (int64_t u0 = 0; u0 < U; u0 += LUT_WIDEN) {
                const int64_t u1 = u0 + LUT_WIDEN < U ? u0 + LUT_WIDEN : U;
                __m512i s[4][2];
                for (int t = 0; t < 4; t++) s[t][0] = s[t][1] = _mm512_setzero_si512();
                for (int64_t u = u0; u < u1; u++) {
                    __m512i idx[3][2];
                    idx[0][0] = _mm512_loadu_si512(wt + u * 128);
                    idx[0][1] = _mm512_loadu_si512(wt + u * 128 + 64);
                    for (int h = 0; h < 2; h++) {
                        idx[1][h] = _mm512_srli_epi16(idx[0][h], 5);
                        idx[2][h] = _mm512_srli_epi16(idx[0][h], 10);
                    }
                    for (int t = 0; t < 4; t++)
                        for (int g = 0; g < 3; g++) {
                            const __m512i tab = _mm512_load_si512(T[t] + 96 * u + 32 * g);
                            s[t][0] = _mm512_add_epi16(s[t][0], _mm512_permutexvar_epi16(idx[g][0], tab));
                            s[t][1] = _mm512_add_epi16(s[t][1], _mm512_permutexvar_epi16(idx[g][1], tab));
                        }
                }
                for (int t = 0; t < 4; t++) {
                    widen_add(acc32[t][0], s[t][0]);
                    widen_add(acc32[t][1], s[t][1]);
                }
            }
            for (int t = 0; t < 4; t++)
                for (int h = 0; h < 2; h++)
                    for (int q = 0; q < 2; q++)
                        _mm512_storeu_si512(M->y + (i + t) * M->n + r + 32 * h + 16 * q, acc32[t][h][q]);
        }
    }
}

/* ---- threads -------------------------------------------------------------------------------------- */

typedef struct {
    atomic_int count, gen;
    int n;
} barrier_t;

static void bar_wait(barrier_t *b) {
    const int g = atomic_load_explicit(&b->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&b->gen, 1, memory_order_release);
    } else {
        /* spin, then yield: on a shared 2-vCPU host the other thread may be descheduled */
        for (int spins = 0; atomic_load_explicit(&b->gen, memory_order_acquire) == g; spins++) {
            if (spins < 20000) _mm_pause();
            else sched_yield();
        }
    }
}

typedef struct {
    int variant, nthreads, nmats, reps;
    int64_t m;
    const lt_mat *mats;
    double *times;
    barrier_t bar;
} run_ctx;

typedef struct {
    run_ctx *ctx;
    int tid;
} worker_arg;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void split(int64_t n, int64_t grain, int tid, int nt, int64_t *a, int64_t *b) {
    const int64_t units = n / grain;
    *a = units * tid / nt * grain;
    *b = units * (tid + 1) / nt * grain;
}

static void *worker(void *p) {
    worker_arg *wa = p;
    run_ctx *c = wa->ctx;
    const int tid = wa->tid, nt = c->nthreads;
    for (int rep = 0; rep < c->reps; rep++) {
        bar_wait(&c->bar);
        const double t0 = now();
        for (int j = 0; j < c->nmats; j++) {
            const lt_mat *M = &c->mats[j];
            int64_t a, b;
            if (c->variant == V_LUT) {
                split(M->kp / 3, 1, tid, nt, &a, &b);
                lut_build(M, c->m, a, b);
                bar_wait(&c->bar);
            }
            split(M->n, c->variant == V_LUT ? 64 : 4, tid, nt, &a, &b);
            if (c->m == 1) {
                if (c->variant == V_I2 || c->variant == V_I2P) i2_gemv(M, a, b);
                else if (c->variant == V_TQ1) tq1_gemv(M, a, b);
                else lut_gemv(M, a, b);
            } else {
                if (c->variant == V_I2) i2_gemm(M, c->m, a, b);
                else if (c->variant == V_I2P) decoded_gemm(M, c->m, a, b, i2_decode);
                else if (c->variant == V_TQ1) decoded_gemm(M, c->m, a, b, tq1_decode);
                else lut_gemm(M, c->m, a, b);
            }
            bar_wait(&c->bar);
        }
        if (tid == 0) c->times[rep] = now() - t0;
    }
    return NULL;
}

/* Runs `reps` passes over mats (in order) with nthreads threads; times[rep] = seconds per pass.
 * m == 1: GEMV kernels; m % 4 == 0: GEMM kernels. Returns 0, or -1 on bad arguments. */
int lt_run(int variant, int nthreads, const lt_mat *mats, int nmats, int64_t m, int reps, double *times) {
    if (nthreads < 1 || nthreads > 64 || variant < 0 || variant > 3 || (m != 1 && m % 4 != 0)) return -1;
    for (int j = 0; j < nmats; j++) {
        const lt_mat *M = &mats[j];
        const int64_t kq = variant == V_LUT ? 9 : variant == V_TQ1 ? 320 : 256;
        if (M->kp % kq || M->n % (variant == V_LUT ? 64 : 4)) return -1;
        if (variant == V_LUT && ((uintptr_t)M->lut % 64)) return -1;
    }
    run_ctx c = {.variant = variant, .nthreads = nthreads, .nmats = nmats, .reps = reps, .m = m, .mats = mats,
                 .times = times};
    atomic_init(&c.bar.count, 0);
    atomic_init(&c.bar.gen, 0);
    c.bar.n = nthreads;
    pthread_t th[64];
    worker_arg wa[64];
    for (int t = 0; t < nthreads; t++) {
        wa[t].ctx = &c;
        wa[t].tid = t;
        if (t > 0) pthread_create(&th[t], NULL, worker, &wa[t]);
    }
    worker(&wa[0]);
    for (int t = 1; t < nthreads; t++) pthread_join(th[t], NULL);
    return 0;
}
