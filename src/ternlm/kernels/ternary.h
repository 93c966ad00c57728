/* The narrow C API of ternlm's kernels: plain pointers + sizes in, int status out.
 *
 * Packed ternary weight layout (see ternlm/ternary.py for the numpy reference):
 *   codes c = w + 1 in {0,1,2}, 2 bits each; K padded to k_pad (multiple of 256) with code 1 (w = 0);
 *   w is uint8 (n, k_pad / 4), row-major. Byte j (0..63) of 256-column block b of a row holds
 *   columns 256b + j (bits 0-1), 256b + 64 + j (bits 2-3), 256b + 128 + j (bits 4-5) and
 *   256b + 192 + j (bits 6-7), so one 64-byte load unpacks to four 64-column code vectors.
 *
 * TQ1 layout (optional, 1.6 bits/weight, llama.cpp TQ1_0-like): K padded to k_pad (multiple of 320)
 *   with code 1; w is uint8 (n, k_pad / 5). Byte j (0..63) of 320-column block b holds columns
 *   320b + 64i + j (i = 0..4) as v = sum_i c_i 3^(4-i), stored as q = ceil(256 v / 243): with t_0 = q,
 *   t_{i+1} = 3 t_i mod 256, the code of column 320b + 64i + j is floor(3 t_i / 256).
 *
 * Activations: per row i of x (m, k) float32, a_scale[i] = 127 / max(max_j |x[i,j]|, 1e-5),
 *   xq = clamp(rint(x * a_scale), -128, 127) (round half to even), zero-padded to k_pad, and
 *   sums[i] = sum_j xq[i, j]. Since codes are w + 1, acc = sum_j c * xq - sums[i].
 *
 * Q8_0 (the LM head): weights q (n, k) int8 with one float16 scale d per 32-column block, wd (n, k/32);
 *   activations xq (m, k) int8 with one float32 scale per block, xd (m, k/32); k % 32 == 0.
 *   Block dot isum[i, r, b] = sum_{j in b} q[r, j] * xq[i, j] (exact int32), and in float32
 *   p_b = float(isum) * (float(wd[r, b]) * xd[i, b]). The sum over b is fixed so every ISA is
 *   bit-identical: 16 lanes, lane l += p_b for b = l, l + 16, ... in order (from +0), then
 *   l + 8 -> l, l + 4 -> l, l + 2 -> l, lane 0 + lane 1 (see q8_matmul in ternlm/ternary.py).
 *
 * Q4_0 (the smaller LM head): symmetric 4-bit weights q in [-7, 7], d = f16(max|w| / 7) per 32-column
 *   block, stored as nibbles u = q + 8: w (n, k/2) uint8, byte j (0..15) of block b holds column
 *   32b + j (bits 0-3) and column 32b + 16 + j (bits 4-7); wd (n, k/32) float16. Activations as for
 *   Q8_0; isum = sum u * xq - 8 * sum xq (exact), then the same p_b and the same float order.
 *
 * Every function validates its sizes and returns TL_OK or a negative TL_E* code; none aborts.
 * Inputs must be finite (a NaN or inf activation row gives unspecified, but in-range, int8 values).
 */
#ifndef TERNLM_TERNARY_H
#define TERNLM_TERNARY_H

#include <stddef.h>
#include <stdint.h>

#define TL_BLOCK 256
#define TL_TQ1_BLOCK 320 /* columns per 64-byte block of the TQ1 layout */
/* Bound on k_pad: |sum c * xq| <= 2 * 128 * k_pad must stay below 2^31. */
#define TL_MAX_K (1 << 22)
#define TL_MAX_THREADS 256

enum tl_status {
    TL_OK = 0,
    TL_ESIZE = -1,    /* a size is <= 0 */
    TL_EPAD = -2,     /* k_pad is not a multiple of the block (256; 320 for TQ1; 64 to quantize), or k > k_pad */
    TL_ERANGE = -3,   /* a size is too large (k_pad > TL_MAX_K, or a product overflows) */
    TL_ENULL = -4,    /* a required pointer is NULL */
    TL_EDTYPE = -5,   /* unknown float weight dtype */
    TL_ETHREADS = -6, /* bad thread count, or the pool could not start its threads */
    TL_EISA = -7,     /* unknown ISA name, or not supported by this CPU */
    TL_EQBLOCK = -8,  /* Q8_0 / Q4_0: k is not a multiple of 32 */
};

#define TL_QBLOCK 32 /* columns per Q8_0 / Q4_0 scale */

enum tl_dtype { TL_F32 = 0, TL_F16 = 1, TL_BF16 = 2 };

const char *tl_strerror(int status);

/* x (m, k) -> xq (m, k_pad), a_scale (m), sums (m); k_pad a multiple of 64 (256 for the 2-bit layout,
 * 320 for TQ1). */
int tl_quantize_rows(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                     int32_t *sums);
/* The same of tl_rmsnorm(x, w, eps) without writing it out: the bits of the two calls, in one. */
int tl_norm_quantize_rows(const float *x, const float *w, float eps, int64_t m, int64_t k, int64_t k_pad, int8_t *xq,
                          float *a_scale, int32_t *sums);

/* w (n, k_pad/4) packed, xq (m, k_pad), sums (m), a_scale (m), w_scale (n) read with stride
 * ws_stride (1: one scale per output row; 0: one per tensor, w_scale pointing at a single float).
 * y (m, n) = float(acc) * (w_scale[r * ws_stride] / a_scale[i]); or, when y == NULL,
 * acc_out (m, n) = acc (w_scale may then be NULL). */
int tl_ternary_matmul(const uint8_t *w, int64_t n, int64_t k_pad, const int8_t *xq, const int32_t *sums,
                      const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t m, float *y,
                      int32_t *acc_out);

/* tl_ternary_matmul for TQ1 weights: w (n, k_pad/5), k_pad a multiple of 320, xq (m, k_pad). */
int tl_ternary_matmul_tq1(const uint8_t *w, int64_t n, int64_t k_pad, const int8_t *xq, const int32_t *sums,
                          const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t m, float *y,
                          int32_t *acc_out);

/* Q8_0 activations: x (m, k) -> xq (m, k), xd (m, k/32). Per block amax = max |x|;
 * d = amax / 127 and q = clamp(rint(x * (127 / amax)), -127, 127), or d = 0, q = 0 when amax < 1e-30. */
int tl_quantize_q8_0(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd);

/* Q8_0 matmul: w (n, k) int8, wd (n, k/32) float16 bits, xq (m, k), xd (m, k/32) -> y (m, n). */
int tl_q8_matmul(const int8_t *w, const uint16_t *wd, int64_t n, int64_t k, const int8_t *xq, const float *xd,
                 int64_t m, float *y);

/* Q4_0 matmul: w (n, k/2) packed nibbles, wd (n, k/32) float16 bits, xq (m, k), xd (m, k/32) -> y (m, n). */
int tl_q4_matmul(const uint8_t *w, const uint16_t *wd, int64_t n, int64_t k, const int8_t *xq, const float *xd,
                 int64_t m, float *y);

/* w (n, k) of dtype (f32, f16, or bf16 as uint16), x (m, k) -> y (m, n) = x . w^T, f32 accumulation. */
int tl_float_matmul(const void *w, int dtype, int64_t n, int64_t k, const float *x, int64_t m, float *y);

/* ---- fused float ops of a transformer block (ops.c); single-threaded, no ISA dispatch needed --- */
enum tl_act { TL_ACT_RELU2 = 0, TL_ACT_SILU = 1 };
#define TL_MAX_HEAD_DIM 512
#define TL_MAX_GROUP 16 /* query heads per KV head */

/* y (m, k) = w * (x * (1 / sqrt(mean(x^2) + eps))), per row. */
int tl_rmsnorm(const float *x, const float *w, float eps, int64_t m, int64_t k, float *y);
/* gu (m, 2f) = [gate | up] -> z (m, f) = act(gate) * up; act relu^2 or silu. */
int tl_glu(const float *gu, int64_t m, int64_t f, int act, float *z);
/* Causal softmax of prefill attention scores in place (see ops.c). */
int tl_causal_softmax(float *x, int64_t rows, int64_t s, int64_t period, int64_t first, float scale);
/* One new token at position pos of one layer: RoPE (cos, sin: (hd/2) of pos) on q and k, k and v
 * written to the caches (n_kv, max_len, hd) at pos, then per query head h softmax(q.K^T * scale) V
 * over positions 0..pos with KV head h / (n_heads / n_kv). qkv (n_heads*hd + 2*n_kv*hd),
 * scores (n_heads, max_len) scratch, out (n_heads*hd). Threaded over KV heads. */
int tl_attention_decode(const float *qkv, float *k_cache, float *v_cache, int64_t max_len, int64_t pos,
                        const float *cos, const float *sin, int n_heads, int n_kv, int hd, float scale,
                        float *scores, float *out);
/* tl_attention_decode for b sequences at once, each with its own caches: qkv (b, n_heads*hd + 2*n_kv*hd),
 * sequence i's caches k_caches[i], v_caches[i] (n_kv, max_lens[i], hd) written at pos[i] < max_lens[i],
 * RoPE rows cos, sin + pos[i] * hd/2 (tables the caller sized past every pos), scores[i] (n_heads,
 * max_lens[i]) scratch (distinct per sequence), out (b, n_heads*hd). Threaded over (sequence, KV head). */
int tl_attention_decode_batch(int64_t b, const float *qkv, float *const *k_caches, float *const *v_caches,
                              const int64_t *max_lens, const int64_t *pos, const float *cos, const float *sin,
                              int n_heads, int n_kv, int hd, float scale, float *const *scores, float *out);

/* Threads: total count including the caller; the pool starts lazily on the first parallel call. */
int tl_set_threads(int n);
int tl_get_threads(void);

/* ISAs: "scalar", "avx2", "avx512vnni" (x86-64), "neon" (aarch64); the best supported one is active by default. */
int tl_isa_count(void);            /* number supported by this CPU */
const char *tl_isa_name(int i);    /* i-th supported, best last; NULL if out of range */
int tl_set_isa(const char *name);  /* TL_EISA if unknown or unsupported */
const char *tl_active_isa(void);

/* ---- internal: per-ISA kernels with one signature each (ref.c, avx2.c, avx512.c, neon.c) ----------------
 * Sizes are already validated. Ternary/float kernels compute output columns [r0, r1) of y (ldy = n)
 * for all m rows; the caller splits [0, n) across threads in multiples of TL_ROW_TILE. */
#define TL_ROW_TILE 4

typedef void (*tl_quantize_fn)(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq,
                               float *a_scale, int32_t *sums);
typedef void (*tl_ternary_fn)(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                              const int32_t *sums, const float *a_scale, const float *w_scale,
                              int64_t ws_stride, int64_t m, int64_t ldy, float *y, int32_t *acc_out);
typedef void (*tl_float_fn)(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x,
                            int64_t m, int64_t ldy, float *y);
typedef void (*tl_q8_quantize_fn)(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd);
typedef void (*tl_q8_fn)(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1,
                         const int8_t *xq, const float *xd, int64_t m, int64_t ldy, float *y);
typedef void (*tl_q4_fn)(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1,
                         const int8_t *xq, const float *xd, int64_t m, int64_t ldy, float *y);

typedef struct {
    const char *name;
    tl_quantize_fn quantize;
    tl_ternary_fn ternary;
    tl_ternary_fn ternary_tq1; /* same signature; w is TQ1 (n, k_pad/5), k_pad % 320 == 0 */
    tl_float_fn floatmm;
    tl_q8_quantize_fn q8_quantize;
    tl_q8_fn q8;
    tl_q4_fn q4;
} tl_isa;

void tl_ref_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                     int32_t *sums);
void tl_ref_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                    const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                    int64_t m, int64_t ldy, float *y, int32_t *acc_out);
void tl_ref_ternary_tq1(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                        const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                        int64_t m, int64_t ldy, float *y, int32_t *acc_out);
void tl_ref_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd);
void tl_ref_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
               const float *xd, int64_t m, int64_t ldy, float *y);
void tl_ref_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
               const float *xd, int64_t m, int64_t ldy, float *y);
void tl_ref_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                  int64_t ldy, float *y);
float tl_f16_to_f32(uint16_t h);
float tl_ref_q8_dot(const int8_t *w, const uint16_t *wd, const int8_t *x, const float *xd, int64_t nb);
float tl_ref_q4_dot(const uint8_t *w, const uint16_t *wd, const int8_t *x, const float *xd, int64_t nb);
float tl_bf16_to_f32(uint16_t h);

#if defined(__x86_64__)
void tl_avx2_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                      int32_t *sums);
void tl_avx2_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                     const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                     int64_t m, int64_t ldy, float *y, int32_t *acc_out);
void tl_avx2_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd);
void tl_avx2_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y);
void tl_avx2_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y);
void tl_avx2_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                   int64_t ldy, float *y);
/* AMX tiles (amx.c): Linux only, since the process must ask the kernel for the tile state. */
#if defined(__linux__) && (defined(__clang__) || __GNUC__ >= 11)
#define TL_HAVE_AMX 1
void tl_amx_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq, const int32_t *sums,
                    const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t m, int64_t ldy, float *y,
                    int32_t *acc_out);
void tl_amx_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
               const float *xd, int64_t m, int64_t ldy, float *y);
#endif
void tl_avx512_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                        int32_t *sums);
void tl_avx512_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                       const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                       int64_t m, int64_t ldy, float *y, int32_t *acc_out);
void tl_avx512_ternary_tq1(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                           const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                           int64_t m, int64_t ldy, float *y, int32_t *acc_out);
void tl_avx512_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd);
void tl_avx512_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                  const float *xd, int64_t m, int64_t ldy, float *y);
void tl_avx512_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                  const float *xd, int64_t m, int64_t ldy, float *y);
void tl_avx512_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                     int64_t ldy, float *y);
#endif

#if defined(__aarch64__)
/* neon.c: NEON + dot product (ARMv8.2-A dotprod), detected at run time */
void tl_neon_quantize(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                      int32_t *sums);
void tl_neon_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq,
                     const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                     int64_t m, int64_t ldy, float *y, int32_t *acc_out);
void tl_neon_q8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd);
void tl_neon_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y);
void tl_neon_q4(const uint8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
                const float *xd, int64_t m, int64_t ldy, float *y);
void tl_neon_float(const void *w, int dtype, int64_t k, int64_t r0, int64_t r1, const float *x, int64_t m,
                   int64_t ldy, float *y);
#endif

#ifndef TL_HAVE_AMX
#define TL_HAVE_AMX 0
#endif

/* ---- internal: thread pool (threads.c) ---------------------------------------------------------- */
/* Runs fn(ctx, begin, end) over [0, n_items) split into one part per thread, each boundary a multiple of
 * grain. balanced: fn is called on a few grains at a time, and threads done early take over the rest of
 * the others' parts (for fn without a set-up cost per call); else once per part. Serialized: concurrent
 * callers take turns. */
typedef void (*tl_range_fn)(void *ctx, int64_t begin, int64_t end);
int tl_parallel_for(int64_t n_items, int64_t grain, int balanced, tl_range_fn fn, void *ctx);
/* For the calling thread's next tl_parallel_for: the weights it reads (cur) and the next_bytes at next
 * that the job after it will read, which a worker then reads ahead while the caller does other work. The
 * caller keeps next alive until tl_reads_ahead(next) is false; a NULL next cancels the hint. */
void tl_set_read_ahead(const void *cur, const void *next, int64_t next_bytes);
int tl_reads_ahead(const void *next);
/* A buffer of at least size bytes (64-byte aligned) owned by the calling thread, one per kind, reused by
 * its next call of the same kind and freed when the thread exits; NULL when out of memory. */
enum { TL_SCRATCH_AMX, TL_SCRATCH_ATTENTION, TL_SCRATCH_NORM, TL_SCRATCH_KINDS };
void *tl_scratch(int kind, size_t size);

#endif /* TERNLM_TERNARY_H */
