/* The small float operations of a transformer block, fused so that a decode step is a handful of C
 * calls per layer instead of dozens of numpy calls: RMSNorm, the gated FFN activation, and attention
 * of one new token over the KV cache (with RoPE and the cache write).
 *
 * Portable C with gcc's generic 16-float vectors; on x86 each entry point is cloned for AVX-512 and
 * AVX2 (helpers are inlined into every clone) and the loader picks the clone at run time. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ternary.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#pragma GCC diagnostic ignored "-Wpsabi" /* 64-byte vectors only cross always-inlined helpers */
#define INLINE static inline __attribute__((always_inline))

/* 16 floats as one value: one zmm register in the AVX-512 clone, two ymm in the AVX2 one. */
typedef float v16 __attribute__((vector_size(64)));
typedef int v16i __attribute__((vector_size(64)));

INLINE v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Horizontal sum as a tree of shuffles (depth 4) rather than 15 dependent adds. */
INLINE float hsum16(v16 v) {
    v += __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v += __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v += __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v += __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

INLINE float dot(const float *a, const float *b, int64_t n) {
    v16 acc = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) acc += load16(a + j) * load16(b + j);
    float s = hsum16(acc);
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* scores[h * ld] = (q[h] . key) * scale for nh (<= 4) query heads sharing one key row: the key is
 * loaded once and the heads' sums run as independent chains. */
INLINE void score_heads(const float *q, int nh, const float *key, int hd, float scale, float *scores, int64_t ld) {
    v16 acc[4] = {{0}};
    int j = 0;
    for (; j + 16 <= hd; j += 16) {
        const v16 k = load16(key + j);
        for (int h = 0; h < nh; h++) acc[h] += load16(q + h * hd + j) * k;
    }
    for (int h = 0; h < nh; h++) {
        float sum = hsum16(acc[h]);
        for (int t = j; t < hd; t++) sum += q[h * hd + t] * key[t];
        scores[h * ld] = sum * scale;
    }
}

/* Lane i of the result is the sum of the lanes of p[BITREV4[i]], for 16 vectors at once: each level adds
 * the halves of pairs of vectors, 15 shuffle-adds for 16 sums where hsum16 takes 4 per sum. Every sum is
 * added in hsum16's tree order (lanes l and l^8, then l^4, l^2, l^1), so it has hsum16's bits. */
static const int BITREV4[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

INLINE v16 hsum16x16(v16 *p) {
    const v16i lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
               hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
               lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
               hi4 = {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
               lo2 = {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
               hi2 = {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
               lo1 = {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
               hi1 = {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31};
    for (int i = 0; i < 8; i++) p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], lo8) + __builtin_shuffle(p[2 * i], p[2 * i + 1], hi8);
    for (int i = 0; i < 4; i++) p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], lo4) + __builtin_shuffle(p[2 * i], p[2 * i + 1], hi4);
    for (int i = 0; i < 2; i++) p[i] = __builtin_shuffle(p[2 * i], p[2 * i + 1], lo2) + __builtin_shuffle(p[2 * i], p[2 * i + 1], hi2);
    return __builtin_shuffle(p[0], p[1], lo1) + __builtin_shuffle(p[0], p[1], hi1);
}

/* score_heads for 16 consecutive key rows (hd a multiple of 16): the heads' 16 partial-sum vectors are
 * reduced together by hsum16x16, the same bits as 16 calls of score_heads in a quarter of the shuffles. */
INLINE void score_heads16(const float *q, int nh, const float *keys, int hd, float scale, float *scores,
                          int64_t ld) {
    v16 part[4][16];
    for (int s = 0; s < 16; s += 2) { /* two rows at a time: 2 nh independent chains of adds */
        v16 acc[2][4] = {{{0}}};
        for (int j = 0; j < hd; j += 16) {
            const v16 k0 = load16(keys + s * hd + j), k1 = load16(keys + (s + 1) * hd + j);
            for (int h = 0; h < nh; h++) {
                const v16 qh = load16(q + h * hd + j);
                acc[0][h] += qh * k0;
                acc[1][h] += qh * k1;
            }
        }
        for (int h = 0; h < nh; h++) part[h][BITREV4[s]] = acc[0][h], part[h][BITREV4[s + 1]] = acc[1][h];
    }
    for (int h = 0; h < nh; h++) {
        const v16 r = hsum16x16(part[h]) * scale;
        memcpy(scores + h * ld, &r, sizeof r);
    }
}

/* All scores of nh (<= 4) query heads over len key rows, into scores[h * ld + s]. */
INLINE void score_all(const float *q, int nh, const float *keys, int64_t len, int hd, float scale, float *scores,
                      int64_t ld) {
    int64_t s = 0;
    if (hd % 16 == 0)
        for (; s + 16 <= len; s += 16) score_heads16(q, nh, keys + s * hd, hd, scale, scores + s, ld);
    for (; s < len; s++) score_heads(q, nh, keys + s * hd, hd, scale, scores + s, ld);
}

INLINE float sum_squares(const float *x, int64_t n) { return dot(x, x, n); }

/* e^x for x <= 0 (softmax after subtracting the max), within 2 ulp: Cody-Waite reduction x = n ln2 + r
 * and a degree-6 polynomial. Branch-free so the loop over positions vectorizes; a libm expf call per
 * score cost more than the dot products. */
INLINE float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* The unnormalized softmax of x (n) in place, x <- exp(x - max): returns the max, and the sum in *total.
 * Max and sum run as 16-lane vectors (a fixed order, so every ISA clone gets the same bits), which a plain
 * loop would run as one serial chain of n dependent adds. */
INLINE float exp_shifted(float *x, int64_t n, float *total) {
    v16 vtop = (v16){0} - INFINITY;
    int64_t s = 0;
    for (; s + 16 <= n; s += 16) {
        const v16 v = load16(x + s);
        const v16i gt = v > vtop;
        vtop = (v16)(((v16i)v & gt) | ((v16i)vtop & ~gt));
    }
    float top = -INFINITY;
    for (int i = 0; i < 16; i++) top = vtop[i] > top ? vtop[i] : top;
    for (int64_t t = s; t < n; t++) top = x[t] > top ? x[t] : top;
    for (int64_t t = 0; t < n; t++) x[t] = exp_nonpositive(x[t] - top);
    v16 vsum = {0};
    for (s = 0; s + 16 <= n; s += 16) vsum += load16(x + s);
    float sum = hsum16(vsum);
    for (int64_t t = s; t < n; t++) sum += x[t];
    *total = sum;
    return top;
}

/* out[h] (hd) = sum_s p[h][s] * values[s] for the query heads h < nh (<= 4) of one KV head; p rows are
 * ld apart. 64 output columns of every head are held in 16 vector registers across all positions, so
 * each value row is read once for all heads instead of once per head. */
INLINE void weigh_values(const float *p, int64_t ld, int nh, const float *values, int64_t len, int hd,
                         float *out) {
    int d0 = 0;
    for (; d0 + 64 <= hd; d0 += 64) {
        v16 acc[4][4] = {{{0}}};
        for (int64_t s = 0; s < len; s++) {
            const float *v = values + s * hd + d0;
            const v16 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
            for (int h = 0; h < nh; h++) {
                const v16 ps = (v16){0} + p[h * ld + s];
                acc[h][0] += ps * v0;
                acc[h][1] += ps * v1;
                acc[h][2] += ps * v2;
                acc[h][3] += ps * v3;
            }
        }
        for (int h = 0; h < nh; h++) memcpy(out + h * hd + d0, acc[h], sizeof acc[h]);
    }
    for (; d0 < hd; d0++)
        for (int h = 0; h < nh; h++) {
            float a = 0.0f;
            for (int64_t s = 0; s < len; s++) a += p[h * ld + s] * values[s * hd + d0];
            out[h * hd + d0] = a;
        }
}

/* Prefill attention's causal softmax in place: row r of x (rows, s) sees its first n = first + r % period
 * keys (at most s), as query first - 1 + r % period of a block does; those become softmax(scale * x), the rest 0.
 * The decode kernel's exp and order of operations (exp_shifted, then one divide per score). */
CLONES int tl_causal_softmax(float *x, int64_t rows, int64_t s, int64_t period, int64_t first, float scale) {
    if (!x) return TL_ENULL;
    if (rows <= 0 || s <= 0 || period <= 0 || first <= 0) return TL_ESIZE;
    for (int64_t r = 0; r < rows; r++) {
        float *row = x + r * s, total;
        const int64_t n = first + r % period < s ? first + r % period : s;
        for (int64_t t = 0; t < n; t++) row[t] *= scale;
        exp_shifted(row, n, &total);
        for (int64_t t = 0; t < n; t++) row[t] /= total;
        memset(row + n, 0, (size_t)(s - n) * sizeof *row);
    }
    return TL_OK;
}

CLONES int tl_rmsnorm(const float *x, const float *w, float eps, int64_t m, int64_t k, float *y) {
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

CLONES int tl_glu(const float *gu, int64_t m, int64_t f, int act, float *z) {
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
INLINE void rope(const float *x, const float *cos, const float *sin, int hd, float *y) {
    const int half = hd / 2;
    for (int i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        y[i] = x1 * cos[i] - x2 * sin[i];
        y[i + half] = x2 * cos[i] + x1 * sin[i];
    }
}

/* Decode attention is split into items of (sequence, KV head, chunk of ATTN_CHUNK positions), so that the
 * threads share it evenly however few KV heads there are and however long the context. An item reads each
 * cached key and value row once for all query heads of its KV head, and leaves per query head the max
 * score, the sum of exp(score - max) and the values weighted by the chunk's own softmax; a second pass
 * merges a head's chunks in order (a context of one chunk needs no merge). The chunks are fixed, so the
 * result does not depend on the number of threads. */
#define ATTN_CHUNK 64
#define MERGE_INLINE (1 << 16) /* merges of fewer weighted values run on the caller: a pool job costs ~2 us */

INLINE int64_t chunks_of(int64_t len) { return (len + ATTN_CHUNK - 1) / ATTN_CHUNK; }

typedef struct {
    const float *k_cache, *v_cache;
    float *q;      /* (n_heads, hd): the token's roped queries */
    float *scores; /* (n_heads, max_len) scratch */
    float *part;   /* per (KV head, chunk): group maxima, group sums, group x hd weighted values */
    float *out;    /* (n_heads, hd) */
    int64_t max_len, len, chunks;
} attn_seq;

typedef struct {
    const attn_seq *seqs;
    const int64_t *first; /* first item of each sequence; first[b] = all items */
    int64_t b;
    int n_heads, n_kv, hd;
    float scale;
} attn_job;

INLINE int64_t part_floats(const attn_job *j) { return (int64_t)(j->n_heads / j->n_kv) * (j->hd + 2); }

/* The sequence an item belongs to (first is sorted; batches are small). */
INLINE int64_t seq_of(const attn_job *j, int64_t item) {
    int64_t lo = 0, hi = j->b - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (j->first[mid] <= item) lo = mid; else hi = mid - 1;
    }
    return lo;
}

INLINE void attend_chunk(const attn_job *j, const attn_seq *sq, int64_t g, int64_t c) {
    const int group = j->n_heads / j->n_kv, hd = j->hd;
    const int64_t s0 = c * ATTN_CHUNK, n = sq->len - s0 < ATTN_CHUNK ? sq->len - s0 : ATTN_CHUNK;
    const float *keys = sq->k_cache + (g * sq->max_len + s0) * hd;
    const float *values = sq->v_cache + (g * sq->max_len + s0) * hd;
    const float *q = sq->q + g * group * hd;
    float *scores = sq->scores + g * group * sq->max_len + s0; /* row h at h * max_len */
    float *part = sq->part + (g * sq->chunks + c) * part_floats(j), *sums = part + group;
    float *acc = sq->chunks == 1 ? sq->out + g * group * hd : part + 2 * group; /* one chunk: the result */
    for (int h = 0; h < group; h += 4) {
        if (group - h >= 4) /* constant head count: the heads' loops unroll */
            score_all(q + h * hd, 4, keys, n, hd, j->scale, scores + h * sq->max_len, sq->max_len);
        else
            score_all(q + h * hd, group - h, keys, n, hd, j->scale, scores + h * sq->max_len, sq->max_len);
    }
    for (int h = 0; h < group; h++) {
        float *sc = scores + h * sq->max_len;
        part[h] = exp_shifted(sc, n, &sums[h]);
        for (int64_t t = 0; t < n; t++) sc[t] /= sums[h];
    }
    for (int h = 0; h < group; h += 4) {
        if (group - h >= 4)
            weigh_values(scores + h * sq->max_len, sq->max_len, 4, values, n, hd, acc + h * hd);
        else
            weigh_values(scores + h * sq->max_len, sq->max_len, group - h, values, n, hd, acc + h * hd);
    }
}

CLONES static void attend_items(void *arg, int64_t i0, int64_t i1) {
    const attn_job *j = arg;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t sq = seq_of(j, i), r = i - j->first[sq], chunks = j->seqs[sq].chunks;
        attend_chunk(j, &j->seqs[sq], r / chunks, r % chunks);
    }
}

/* out[h] = sum_c (w_c sum_c[h] / total) acc_c[h], with w_c = exp(max_c[h] - the max over c) and
 * total = sum_c w_c sum_c[h]. */
CLONES static void merge_heads(void *arg, int64_t i0, int64_t i1) {
    const attn_job *j = arg;
    const int group = j->n_heads / j->n_kv, hd = j->hd;
    for (int64_t i = i0; i < i1; i++) {
        const attn_seq *sq = &j->seqs[i / j->n_kv];
        const int64_t g = i % j->n_kv;
        if (sq->chunks == 1) continue; /* attend_chunk wrote the result */
        const int64_t pf = part_floats(j);
        const float *parts = sq->part + g * sq->chunks * pf;
        for (int h = 0; h < group; h++) {
            float top = -INFINITY, total = 0.0f, *o = sq->out + (g * group + h) * hd;
            for (int64_t c = 0; c < sq->chunks; c++) top = parts[c * pf + h] > top ? parts[c * pf + h] : top;
            for (int64_t c = 0; c < sq->chunks; c++)
                total += exp_nonpositive(parts[c * pf + h] - top) * parts[c * pf + group + h];
            memset(o, 0, (size_t)hd * sizeof *o);
            for (int64_t c = 0; c < sq->chunks; c++) {
                const float *p = parts + c * pf, *acc = p + 2 * group + h * hd;
                const float coef = exp_nonpositive(p[h] - top) * p[group + h] / total;
                for (int d = 0; d < hd; d++) o[d] += coef * acc[d];
            }
        }
    }
}

/* Attention of b sequences, sequence i at pos[i] (see tl_attention_decode_batch): keys and values stored,
 * queries roped, then the two passes over the thread pool. */
static int attention_decode(int64_t b, const float *qkv, float *const *k_caches, float *const *v_caches,
                            const int64_t *max_lens, const int64_t *pos, const float *cos, const float *sin,
                            int64_t trig_stride, int n_heads, int n_kv, int hd, float scale, float *const *scores,
                            float *out) {
    if (!qkv || !k_caches || !v_caches || !max_lens || !pos || !cos || !sin || !scores || !out) return TL_ENULL;
    if (b <= 0 || n_heads <= 0 || n_kv <= 0 || hd <= 0) return TL_ESIZE;
    if (n_heads % n_kv || n_heads / n_kv > TL_MAX_GROUP || hd % 2 || hd > TL_MAX_HEAD_DIM) return TL_ERANGE;
    if (b > ((int64_t)1 << 30) / n_heads) return TL_ERANGE;
    int64_t items = 0, merged = 0; /* items: one per (sequence, KV head, chunk), each with its partials */
    for (int64_t i = 0; i < b; i++) {
        if (!scores[i]) return TL_ENULL;
        if (pos[i] < 0 || pos[i] >= max_lens[i] || max_lens[i] > ((int64_t)1 << 40) / hd) return TL_ERANGE;
        const int64_t chunks = chunks_of(pos[i] + 1);
        items += n_kv * chunks;
        merged += chunks > 1 ? chunks * n_heads * hd : 0;
    }
    const int group = n_heads / n_kv;
    const int64_t row = (int64_t)(n_heads + 2 * n_kv) * hd, pf = (int64_t)group * (hd + 2);
    /* scratch: the per-sequence records, the item offsets, the roped queries, the chunk partials */
    const size_t bytes = (size_t)b * sizeof(attn_seq) + (size_t)(b + 1) * sizeof(int64_t) +
                         (size_t)(b * n_heads * hd + items * pf) * sizeof(float);
    uint8_t *mem = tl_scratch(TL_SCRATCH_ATTENTION, bytes);
    if (!mem) return TL_ERANGE;
    attn_seq *seqs = (attn_seq *)mem;
    int64_t *first = (int64_t *)(seqs + b);
    float *q = (float *)(first + b + 1), *part = q + b * n_heads * hd;
    first[0] = 0;
    for (int64_t i = 0; i < b; i++) {
        const float *x = qkv + i * row, *c = cos + pos[i] * trig_stride, *s = sin + pos[i] * trig_stride;
        const float *k = x + (int64_t)n_heads * hd, *v = k + (int64_t)n_kv * hd;
        for (int g = 0; g < n_kv; g++) {
            rope(k + (int64_t)g * hd, c, s, hd, k_caches[i] + ((int64_t)g * max_lens[i] + pos[i]) * hd);
            memcpy(v_caches[i] + ((int64_t)g * max_lens[i] + pos[i]) * hd, v + (int64_t)g * hd,
                   (size_t)hd * sizeof(float));
        }
        for (int h = 0; h < n_heads; h++) rope(x + (int64_t)h * hd, c, s, hd, q + (i * n_heads + h) * hd);
        const int64_t chunks = chunks_of(pos[i] + 1);
        seqs[i] = (attn_seq){k_caches[i], v_caches[i], q + i * n_heads * hd, scores[i], part, out + i * n_heads * hd,
                             max_lens[i], pos[i] + 1, chunks};
        part += n_kv * chunks * pf;
        first[i + 1] = first[i] + n_kv * chunks;
    }
    attn_job job = {seqs, first, b, n_heads, n_kv, hd, scale};
    int st = tl_parallel_for(items, 1, 1, attend_items, &job);
    if (st == TL_OK && merged >= MERGE_INLINE) st = tl_parallel_for(b * n_kv, 1, 1, merge_heads, &job);
    else if (st == TL_OK && merged > 0) merge_heads(&job, 0, b * n_kv);
    return st;
}

int tl_attention_decode(const float *qkv, float *k_cache, float *v_cache, int64_t max_len, int64_t pos,
                        const float *cos, const float *sin, int n_heads, int n_kv, int hd, float scale,
                        float *scores, float *out) {
    return attention_decode(1, qkv, &k_cache, &v_cache, &max_len, &pos, cos, sin, 0, n_heads, n_kv, hd, scale,
                            &scores, out);
}

int tl_attention_decode_batch(int64_t b, const float *qkv, float *const *k_caches, float *const *v_caches,
                              const int64_t *max_lens, const int64_t *pos, const float *cos, const float *sin,
                              int n_heads, int n_kv, int hd, float scale, float *const *scores, float *out) {
    return attention_decode(b, qkv, k_caches, v_caches, max_lens, pos, cos, sin, hd / 2, n_heads, n_kv, hd, scale,
                            scores, out);
}
