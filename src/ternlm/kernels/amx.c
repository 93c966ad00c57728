/* Ternary and Q8_0 matmuls for several tokens on Intel AMX (tdpbssd: 16 x 16 x 64 int8 multiply-adds per instruction).
 *
 * Weights are the A operand: 16 rows x 64 consecutive columns of codes, which is what the 2-bit layout
 * unpacks to with one shift and one mask per 64 bytes, so the weights need no transpose. Activations are
 * the B operand, rearranged once per call into AMX's VNNI order (per 16 tokens: k/4 rows of 16 tokens x 4
 * bytes). The int32 tile sums are exact, so the result equals the scalar reference bit for bit.
 * Up to 32 tokens, weights are unpacked 256 columns at a time into an 8 KB buffer that stays in L1; for
 * more, a 32-row panel of the whole k is unpacked once and reused by every pair of 16-token groups.
 * Fewer than MIN_TOKENS tokens go to the AVX-512 kernels (unpacking weights into tiles costs more than the
 * tiles save there), as do rows left over below 16. The Q8_0 head kernel is further down. */
#include "ternary.h"

#if TL_HAVE_AMX
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define UNIT_ROWS 32       /* two A tiles */
#define SLOT_BYTES 8192    /* 4 k-blocks of 64 columns x 32 rows */
#define PANEL_TOKENS 32    /* above this many tokens, unpack a whole panel */
#define AHEAD 1            /* blocks unpacked ahead of their use (up to 32 tokens; 2 measured slower) */
#define MIN_TOKENS 5       /* below this the AVX-512 kernels are faster (measured at 2B4T shapes, 4 and 6 tokens) */
#define PREFETCH_BYTES 192 /* per row, ahead of the 64-byte block being unpacked (128-1024 measured) */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* xq (m, k_pad) -> xt: per group g of 16 tokens, (k_pad/4) rows of 16 tokens x 4 bytes; missing tokens 0. */
static void to_vnni(const int8_t *xq, int64_t m, int64_t k_pad, uint8_t *xt) {
    const int64_t groups = (m + 15) / 16, k4 = k_pad / 4;
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)k4));
    for (int64_t g = 0; g < groups; g++) {
        const int64_t left = m - g * 16;
        const __mmask16 live = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        const int8_t *base = xq + g * 16 * k_pad;
        uint8_t *out = xt + g * 16 * k_pad;
        for (int64_t c = 0; c < k4; c++) {
            __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, idx, base + 4 * c, 4);
            _mm512_store_si512(out + 64 * c, v);
        }
    }
}

/* Codes of rows [r, r + nr) (nr <= 32), 256-column block b -> slot[s][row][64] for the 4 sub-blocks s. */
static inline void unpack_block(const uint8_t *w, int64_t row_bytes, int64_t r, int nr, int64_t b, uint8_t *slot) {
    const __m512i three = _mm512_set1_epi8(3);
    for (int i = 0; i < nr; i++) {
        const uint8_t *p = w + (r + i) * row_bytes + b * 64;
        /* 32 rows are 32 streams, more than the hardware prefetcher follows: fetch each row ahead. */
        _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        for (int s = 0; s < 4; s++)
            _mm512_store_si512(slot + s * 2048 + i * 64, _mm512_and_si512(_mm512_srli_epi16(v, 2 * s), three));
    }
}

static void epilogue(const int32_t *c, int64_t r, int64_t i0, int64_t m, const int32_t *sums, const float *a_scale,
                     const float *w_scale, int64_t ws_stride, int64_t ldy, float *y, int32_t *acc_out) {
    for (int t = 0; t < 16 && i0 + t < m; t++) {
        const int64_t i = i0 + t;
        for (int ii = 0; ii < 16; ii++) {
            const int32_t acc = c[ii * 16 + t] - sums[i];
            if (y)
                y[i * ldy + r + ii] = (float)acc * (w_scale[(r + ii) * ws_stride] / a_scale[i]);
            else
                acc_out[i * ldy + r + ii] = acc;
        }
    }
}

void tl_amx_ternary(const uint8_t *w, int64_t k_pad, int64_t r0, int64_t r1, const int8_t *xq, const int32_t *sums,
                    const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t m, int64_t ldy, float *y,
                    int32_t *acc_out) {
    const int64_t row_bytes = k_pad / 4, nblk = k_pad / TL_BLOCK, groups = (m + 15) / 16;
    const int panel = m > PANEL_TOKENS;
    const size_t xt_bytes = (size_t)(groups * 16 * k_pad);
    uint8_t *xt = m >= MIN_TOKENS && r1 - r0 >= 16 ? tl_scratch(TL_SCRATCH_AMX, xt_bytes + (size_t)(panel ? nblk : AHEAD + 1) * SLOT_BYTES) : NULL;
    if (!xt) { /* few tokens, fewer than 16 rows, or no memory for the scratch */
        tl_avx512_ternary(w, k_pad, r0, r1, xq, sums, a_scale, w_scale, ws_stride, m, ldy, y, acc_out);
        return;
    }
    uint8_t *slots = xt + xt_bytes;
    to_vnni(xq, m, k_pad, xt);
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
    int32_t c[4][256] __attribute__((aligned(64)));
    int64_t r = r0;
    for (; r + 16 <= r1;) {
        const int nr = r1 - r >= UNIT_ROWS ? 2 : 1;
        if (panel)
            for (int64_t b = 0; b < nblk; b++) unpack_block(w, row_bytes, r, 16 * nr, b, slots + b * SLOT_BYTES);
        else
            for (int64_t b = 0; b < AHEAD && b < nblk; b++)
                unpack_block(w, row_bytes, r, 16 * nr, b, slots + b * SLOT_BYTES);
        for (int64_t g = 0; g < groups; g += 2) {
            const int ng = groups - g >= 2 ? 2 : 1;
            const uint8_t *b0 = xt + g * 16 * k_pad, *b1 = b0 + 16 * k_pad;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t b = 0; b < nblk; b++) {
                /* Tile loads do not take data from pending stores: unpack blocks ahead of their use. */
                if (!panel && b + AHEAD < nblk)
                    unpack_block(w, row_bytes, r, 16 * nr, b + AHEAD, slots + ((b + AHEAD) % (AHEAD + 1)) * SLOT_BYTES);
                const uint8_t *slot = slots + (panel ? b : b % (AHEAD + 1)) * SLOT_BYTES;
                if (ng == 1) { /* one token group: even and odd k-blocks in separate tiles, two dependency chains */
                    for (int s = 0; s < 4; s += 2) {
                        const int64_t kb = 4 * b + s;
                        _tile_loadd(6, b0 + kb * 1024, 64);
                        _tile_loadd(4, slot + s * 2048, 64);
                        _tile_dpbssd(0, 4, 6);
                        _tile_loadd(7, b0 + kb * 1024 + 1024, 64);
                        _tile_loadd(5, slot + s * 2048 + 2048, 64);
                        _tile_dpbssd(1, 5, 7);
                        if (nr == 2) {
                            _tile_loadd(4, slot + s * 2048 + 1024, 64);
                            _tile_dpbssd(2, 4, 6);
                            _tile_loadd(5, slot + s * 2048 + 3072, 64);
                            _tile_dpbssd(3, 5, 7);
                        }
                    }
                    continue;
                }
                for (int s = 0; s < 4; s++) {
                    const int64_t kb = 4 * b + s;
                    _tile_loadd(4, slot + s * 2048, 64);
                    _tile_loadd(6, b0 + kb * 1024, 64);
                    _tile_dpbssd(0, 4, 6);
                    if (ng == 2) {
                        _tile_loadd(7, b1 + kb * 1024, 64);
                        _tile_dpbssd(1, 4, 7);
                    }
                    if (nr == 2) {
                        _tile_loadd(5, slot + s * 2048 + 1024, 64);
                        _tile_dpbssd(2, 5, 6);
                        if (ng == 2) _tile_dpbssd(3, 5, 7);
                    }
                }
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(1, c[1], 64);
            _tile_stored(2, c[2], 64);
            _tile_stored(3, c[3], 64);
            if (ng == 1) /* tiles 1 and 3 held the odd k-blocks of rows 0-15 and 16-31 */
                for (int e = 0; e < 256; e++) c[0][e] += c[1][e], c[1][e] = c[2][e] + c[3][e];
            for (int a = 0; a < nr; a++)
                for (int gg = 0; gg < ng; gg++)
                    epilogue(c[ng == 1 ? a : 2 * a + gg], r + 16 * a, (g + gg) * 16, m, sums, a_scale, w_scale, ws_stride, ldy, y,
                             acc_out);
        }
        r += 16 * nr;
    }
    _tile_release();
    if (r < r1) tl_avx512_ternary(w, k_pad, r, r1, xq, sums, a_scale, w_scale, ws_stride, m, ldy, y, acc_out);
}
/* ---- Q8_0 (the LM head) -------------------------------------------------------------------------
 * One tdpbssd per 32-column block (A: 16 weight rows x 32 bytes straight from the matrix, B: 8 rows of
 * 16 tokens x 4 bytes), so each block's int32 dot stays separate, as the Q8_0 scales need. ternary.h's
 * float order sums block b into lane b mod 16: per row and token 16 lane sums, held in L1 as
 * lanes[row][lane][token], then the halving tree. Tile results reach the vector units through memory;
 * the tiles run three blocks ahead of that float epilogue. */
#define Q8_MIN_TOKENS 6 /* below this the AVX-512 kernel is faster (2B4T head: 1 thread 5 vs 6 tokens, 2 threads 4 vs 5) */
#define Q8_PREFETCH 256 /* bytes ahead in each of the 16 weight rows (256-2048, T0-T2, whole tiles ahead measured) */

/* Block t of the 16 rows at wr (stride k) x 16 tokens at xg into C tile ct, stored to out. */
#define Q8_ISSUE(t, ct, ta, tb, out)                                    \
    if ((t) < nb) {                                                     \
        _tile_zero(ct);                                                 \
        _tile_loadd(ta, wr + (t) * TL_QBLOCK, k);                       \
        _tile_loadd(tb, xg + (t) * TL_QBLOCK * 16, 64);                 \
        _tile_dpbssd(ct, ta, tb);                                       \
        _tile_stored(ct, out, 64);                                      \
    }

/* wdf[b][row] = float(wd) of 16 rows: two blocks per 32-bit gather. */
static void q8_row_scales(const uint16_t *wd, int64_t nb, float *wdf) {
    const __m512i off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32((int)(2 * nb)));
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const __m512i v = _mm512_i32gather_epi32(off, (const void *)(wd + b), 1);
        _mm512_store_ps(wdf + b * 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)));
        _mm512_store_ps(wdf + b * 16 + 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16))));
    }
    for (; b < nb; b++)
        for (int ii = 0; ii < 16; ii++) wdf[b * 16 + ii] = _cvtsh_ss(wd[ii * nb + b]);
}

static inline void q8_epilogue(const int32_t *c, const float *wdf, int64_t b, const float *xdt, float *lanes) {
    const __m512 xdv = _mm512_load_ps(xdt + b * 16);
    const float *wb = wdf + b * 16;
    float *lb = lanes + b % 16 * 16;
    for (int ii = 0; ii < 16; ii++) {
        const __m512 s = _mm512_mul_ps(_mm512_set1_ps(wb[ii]), xdv);
        float *a = lb + ii * 256;
        _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + ii * 16)), s)));
    }
}

void tl_amx_q8(const int8_t *w, const uint16_t *wd, int64_t k, int64_t r0, int64_t r1, const int8_t *xq,
               const float *xd, int64_t m, int64_t ldy, float *y) {
    const int64_t nb = k / TL_QBLOCK, groups = (m + 15) / 16;
    const size_t xt_bytes = (size_t)(groups * 16 * k), xdt_bytes = (size_t)(groups * nb * 16) * 4,
                 wdf_bytes = (size_t)(16 * nb) * 4, lane_bytes = 16 * 16 * 16 * 4;
    uint8_t *xt = m >= Q8_MIN_TOKENS && r1 - r0 >= 16 ? tl_scratch(TL_SCRATCH_AMX, xt_bytes + xdt_bytes + wdf_bytes + lane_bytes) : NULL;
    if (!xt) {
        tl_avx512_q8(w, wd, k, r0, r1, xq, xd, m, ldy, y);
        return;
    }
    float *xdt = (float *)(xt + xt_bytes), *wdf = xdt + groups * nb * 16, *lanes = wdf + 16 * nb;
    to_vnni(xq, m, k, xt);
    for (int64_t g = 0; g < groups; g++) /* xdt[g][b][token]: the block scales of 16 tokens, 0 for missing ones */
        for (int64_t b = 0; b < nb; b++)
            for (int t = 0; t < 16; t++)
                xdt[(g * nb + b) * 16 + t] = g * 16 + t < m ? xd[(g * 16 + t) * nb + b] : 0.0f;
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 4; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16; /* C: 16 rows x 16 tokens */
    cfg.colsb[4] = cfg.colsb[5] = 32, cfg.rows[4] = cfg.rows[5] = 16; /* A: 16 rows x one block */
    cfg.colsb[6] = cfg.colsb[7] = 64, cfg.rows[6] = cfg.rows[7] = 8;  /* B: one block x 16 tokens */
    _tile_loadconfig(&cfg);
    int32_t c[4][256] __attribute__((aligned(64)));
    float out[256] __attribute__((aligned(64)));
    int64_t r = r0;
    for (; r + 16 <= r1; r += 16) {
        const int8_t *wr = w + r * k;
        q8_row_scales(wd + r * nb, nb, wdf);
        for (int64_t g = 0; g < groups; g++) {
            const uint8_t *xg = xt + g * 16 * k;
            const float *xdg = xdt + g * nb * 16;
            memset(lanes, 0, lane_bytes);
            Q8_ISSUE(0, 0, 4, 6, c[0])
            Q8_ISSUE(1, 1, 5, 7, c[1])
            Q8_ISSUE(2, 2, 4, 6, c[2])
            for (int64_t b = 0; b < nb; b += 4) {
                if (g == 0) /* 16 rows are more streams than the hardware prefetcher follows well */
                    for (int ii = 0; ii < 16; ii++)
                        _mm_prefetch((const char *)(wr + ii * k + b * TL_QBLOCK) + Q8_PREFETCH, _MM_HINT_T0),
                        _mm_prefetch((const char *)(wr + ii * k + b * TL_QBLOCK) + Q8_PREFETCH + 64, _MM_HINT_T0);
                Q8_ISSUE(b + 3, 3, 5, 7, c[3])
                q8_epilogue(c[0], wdf, b, xdg, lanes);
                if (b + 1 >= nb) break;
                Q8_ISSUE(b + 4, 0, 4, 6, c[0])
                q8_epilogue(c[1], wdf, b + 1, xdg, lanes);
                if (b + 2 >= nb) break;
                Q8_ISSUE(b + 5, 1, 5, 7, c[1])
                q8_epilogue(c[2], wdf, b + 2, xdg, lanes);
                if (b + 3 >= nb) break;
                Q8_ISSUE(b + 6, 2, 4, 6, c[2])
                q8_epilogue(c[3], wdf, b + 3, xdg, lanes);
            }
            for (int ii = 0; ii < 16; ii++) {
                __m512 *l = (__m512 *)(lanes + ii * 256);
                for (int half = 8; half >= 1; half /= 2)
                    for (int j = 0; j < half; j++) l[j] = _mm512_add_ps(l[j], l[j + half]);
                _mm512_store_ps(out + ii * 16, l[0]);
            }
            for (int t = 0; t < 16 && g * 16 + t < m; t++)
                for (int ii = 0; ii < 16; ii++) y[(g * 16 + t) * ldy + r + ii] = out[ii * 16 + t];
        }
    }
    _tile_release();
    if (r < r1) tl_avx512_q8(w, wd, k, r, r1, xq, xd, m, ldy, y);
}
#endif
