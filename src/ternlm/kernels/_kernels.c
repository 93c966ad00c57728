/* ternlm.kernels._kernels: the C API (validation, ISA dispatch, row split across threads) and its
 * CPython binding (buffer protocol, size checks, GIL release). No numpy C API. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP /* glibc < 2.27 */
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#include "ternary.h"

#if TL_HAVE_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ==== 1. C API ================================================================================== */

static const tl_isa ISAS[] = {
    /* TQ1 (ternary_tq1): AVX-512 has its own kernel; AVX2 and NEON use the scalar reference for now. */
    {"scalar", tl_ref_quantize, tl_ref_ternary, tl_ref_ternary_tq1, tl_ref_float, tl_ref_q8_quantize, tl_ref_q8, tl_ref_q4},
#if defined(__x86_64__)
    {"avx2", tl_avx2_quantize, tl_avx2_ternary, tl_ref_ternary_tq1, tl_avx2_float, tl_avx2_q8_quantize, tl_avx2_q8, tl_avx2_q4},
    {"avx512vnni", tl_avx512_quantize, tl_avx512_ternary, tl_avx512_ternary_tq1, tl_avx512_float, tl_avx512_q8_quantize, tl_avx512_q8,
     tl_avx512_q4},
#if TL_HAVE_AMX
    /* AMX: the ternary and Q8_0 matmuls of several tokens on tiles; everything else as avx512vnni. */
    {"amx", tl_avx512_quantize, tl_amx_ternary, tl_avx512_ternary_tq1, tl_avx512_float, tl_avx512_q8_quantize, tl_amx_q8,
     tl_avx512_q4},
#endif
#endif
#if defined(__aarch64__)
    {"neon", tl_neon_quantize, tl_neon_ternary, tl_ref_ternary_tq1, tl_neon_float, tl_neon_q8_quantize, tl_neon_q8, tl_neon_q4},
#endif
};
#define N_ISAS ((int)(sizeof(ISAS) / sizeof(ISAS[0])))

static const tl_isa *supported[N_ISAS]; /* (n_supported) best last */
static int n_supported;
static _Atomic(const tl_isa *) active;
static pthread_once_t isa_once = PTHREAD_ONCE_INIT;

#if TL_HAVE_AMX
/* CPUID says AMX-TILE and AMX-INT8; Linux must also let this process use the 8 KB of tile state. */
static int has_amx(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}
#endif

#if defined(__aarch64__)
/* neon.c needs the dot-product extension (sdot); NEON itself is baseline on aarch64. */
static int has_dotprod(void) {
#if defined(__linux__)
    return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__ARM_FEATURE_DOTPROD)
    return 1; /* the compiler's baseline already includes it (e.g. Apple arm64) */
#else
    return 0;
#endif
}
#endif

static void detect_isas(void) {
    for (int i = 0; i < N_ISAS; i++) {
        int ok = 1;
#if defined(__x86_64__)
        __builtin_cpu_init();
        if (strcmp(ISAS[i].name, "avx2") == 0)
            ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        else if (strcmp(ISAS[i].name, "avx512vnni") == 0)
            ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                 __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#if TL_HAVE_AMX
        else if (strcmp(ISAS[i].name, "amx") == 0)
            ok = n_supported > 0 && strcmp(supported[n_supported - 1]->name, "avx512vnni") == 0 && has_amx();
#endif
#elif defined(__aarch64__)
        if (strcmp(ISAS[i].name, "neon") == 0) ok = has_dotprod();
#endif
        if (ok) supported[n_supported++] = &ISAS[i];
    }
    atomic_store(&active, supported[n_supported - 1]);
}

static const tl_isa *isa(void) {
    pthread_once(&isa_once, detect_isas);
    return atomic_load_explicit(&active, memory_order_relaxed);
}

int tl_isa_count(void) {
    isa();
    return n_supported;
}

const char *tl_isa_name(int i) {
    isa();
    return i >= 0 && i < n_supported ? supported[i]->name : NULL;
}

int tl_set_isa(const char *name) {
    isa();
    if (!name) return TL_ENULL;
    for (int i = 0; i < n_supported; i++)
        if (strcmp(supported[i]->name, name) == 0) {
            atomic_store(&active, supported[i]);
            return TL_OK;
        }
    return TL_EISA;
}

const char *tl_active_isa(void) { return isa()->name; }

const char *tl_strerror(int status) {
    switch (status) {
    case TL_OK: return "ok";
    case TL_ESIZE: return "a size is zero or negative";
    case TL_EPAD: return "k_pad is not a multiple of the block (256; 320 for TQ1; 64 to quantize), or k > k_pad";
    case TL_ERANGE: return "a size is too large (k_pad > 2^22, or the buffer size overflows)";
    case TL_ENULL: return "a required pointer is NULL";
    case TL_EDTYPE: return "unknown float weight dtype";
    case TL_ETHREADS: return "thread count out of range";
    case TL_EISA: return "unknown ISA, or not supported by this CPU";
    case TL_EQBLOCK: return "k is not a multiple of the Q8_0 / Q4_0 block (32)";
    default: return "unknown error";
    }
}

/* a * b <= INT64_MAX / 4 (room for the largest itemsize), both already > 0 */
static int product_ok(int64_t a, int64_t b) { return a <= (INT64_MAX / 4) / b; }

int tl_quantize_rows(const float *x, int64_t m, int64_t k, int64_t k_pad, int8_t *xq, float *a_scale,
                     int32_t *sums) {
    if (!x || !xq || !a_scale || !sums) return TL_ENULL;
    if (m <= 0 || k <= 0 || k_pad <= 0) return TL_ESIZE;
    if (k_pad % 64 != 0 || k > k_pad) return TL_EPAD;
    if (k_pad > TL_MAX_K || !product_ok(m, k_pad)) return TL_ERANGE;
    isa()->quantize(x, m, k, k_pad, xq, a_scale, sums);
    return TL_OK;
}

int tl_norm_quantize_rows(const float *x, const float *w, float eps, int64_t m, int64_t k, int64_t k_pad, int8_t *xq,
                          float *a_scale, int32_t *sums) {
    int st = tl_quantize_rows(x, m, k, k_pad, xq, a_scale, sums); /* the checks; its result is overwritten */
    if (st != TL_OK) return st;
    float *y = tl_scratch(TL_SCRATCH_NORM, (size_t)k * sizeof(float));
    if (!y) return TL_ERANGE;
    for (int64_t i = 0; i < m && st == TL_OK; i++) {
        st = tl_rmsnorm(x + i * k, w, eps, 1, k, y);
        if (st == TL_OK) isa()->quantize(y, 1, k, k_pad, xq + i * k_pad, a_scale + i, sums + i);
    }
    return st;
}

typedef struct {
    tl_ternary_fn fn;
    const uint8_t *w;
    int64_t n, k_pad, m;
    const int8_t *xq;
    const int32_t *sums;
    const float *a_scale, *w_scale;
    int64_t ws_stride;
    float *y;
    int32_t *acc;
} ternary_job;

static void ternary_range(void *p, int64_t r0, int64_t r1) {
    const ternary_job *j = p;
    j->fn(j->w, j->k_pad, r0, r1, j->xq, j->sums, j->a_scale, j->w_scale, j->ws_stride, j->m, j->n, j->y, j->acc);
}

/* Rows per grain of a job: a multiple of the row tile, and enough work that the wake-up of a worker does
 * not cost more than it saves (~64 KB of weights). A one-token job, which the threads share a grain at a
 * time (tl_parallel_for's balanced jobs), takes 16 KB grains: the thread that finishes first then waits for
 * at most a quarter as much (2T, the 120 ternary calls of a 2B4T token back to back in
 * benchmarks/bench_kernels.py: 20.6 / 20.0 -> 18.6 / 18.3 ms). */
static int64_t row_grain(int64_t row_bytes, int64_t m) {
    const int64_t grain = m == 1 ? 16384 : 65536;
    const int64_t per_row = row_bytes < grain / m ? row_bytes * m : grain;
    int64_t rows = (grain / per_row + TL_ROW_TILE - 1) / TL_ROW_TILE * TL_ROW_TILE;
    return rows < TL_ROW_TILE ? TL_ROW_TILE : rows;
}

/* Both packed layouts: block = TL_BLOCK (2-bit, k_pad / 4 bytes a row) or TL_TQ1_BLOCK (k_pad / 5). */
static int ternary_matmul(int tq1, const uint8_t *w, int64_t n, int64_t k_pad, const int8_t *xq,
                          const int32_t *sums, const float *a_scale, const float *w_scale, int64_t ws_stride,
                          int64_t m, float *y, int32_t *acc_out) {
    static const float unit = 1.0f;
    if (!y) w_scale = &unit, ws_stride = 0; /* unused for the raw accumulator */
    if (!w || !xq || !sums || !a_scale || !w_scale || (!y && !acc_out)) return TL_ENULL;
    if (n <= 0 || m <= 0 || k_pad <= 0) return TL_ESIZE;
    if (ws_stride != 0 && ws_stride != 1) return TL_ERANGE;
    if (k_pad % (tq1 ? TL_TQ1_BLOCK : TL_BLOCK) != 0) return TL_EPAD;
    if (k_pad > TL_MAX_K || !product_ok(n, k_pad) || !product_ok(m, k_pad) || !product_ok(m, n))
        return TL_ERANGE;
    const tl_isa *cur = isa();
    ternary_job job = {tq1 ? cur->ternary_tq1 : cur->ternary, w, n, k_pad, m, xq, sums, a_scale, w_scale,
                       ws_stride, y, y ? NULL : acc_out};
    return tl_parallel_for(n, row_grain(k_pad / (tq1 ? 5 : 4), m), m == 1, ternary_range, &job);
}

int tl_ternary_matmul(const uint8_t *w, int64_t n, int64_t k_pad, const int8_t *xq, const int32_t *sums,
                      const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t m, float *y,
                      int32_t *acc_out) {
    return ternary_matmul(0, w, n, k_pad, xq, sums, a_scale, w_scale, ws_stride, m, y, acc_out);
}

int tl_ternary_matmul_tq1(const uint8_t *w, int64_t n, int64_t k_pad, const int8_t *xq, const int32_t *sums,
                          const float *a_scale, const float *w_scale, int64_t ws_stride, int64_t m, float *y,
                          int32_t *acc_out) {
    return ternary_matmul(1, w, n, k_pad, xq, sums, a_scale, w_scale, ws_stride, m, y, acc_out);
}

typedef struct {
    tl_float_fn fn;
    const void *w;
    int dtype;
    int64_t n, k, m;
    const float *x;
    float *y;
} float_job;

static void float_range(void *p, int64_t r0, int64_t r1) {
    const float_job *j = p;
    j->fn(j->w, j->dtype, j->k, r0, r1, j->x, j->m, j->n, j->y);
}

int tl_float_matmul(const void *w, int dtype, int64_t n, int64_t k, const float *x, int64_t m, float *y) {
    if (!w || !x || !y) return TL_ENULL;
    if (dtype != TL_F32 && dtype != TL_F16 && dtype != TL_BF16) return TL_EDTYPE;
    if (n <= 0 || k <= 0 || m <= 0) return TL_ESIZE;
    if (!product_ok(n, k) || !product_ok(m, k) || !product_ok(m, n)) return TL_ERANGE;
    float_job job = {isa()->floatmm, w, dtype, n, k, m, x, y};
    const int64_t esize = dtype == TL_F32 ? 4 : 2;
    return tl_parallel_for(n, row_grain(k * esize, m), m == 1, float_range, &job);
}

int tl_quantize_q8_0(const float *x, int64_t m, int64_t k, int8_t *xq, float *xd) {
    if (!x || !xq || !xd) return TL_ENULL;
    if (m <= 0 || k <= 0) return TL_ESIZE;
    if (k % TL_QBLOCK != 0) return TL_EQBLOCK;
    if (!product_ok(m, k)) return TL_ERANGE;
    isa()->q8_quantize(x, m, k, xq, xd);
    return TL_OK;
}

typedef struct {
    tl_q8_fn fn;
    const int8_t *w;
    const uint16_t *wd;
    int64_t n, k, m;
    const int8_t *xq;
    const float *xd;
    float *y;
} q8_job;

static void q8_range(void *p, int64_t r0, int64_t r1) {
    const q8_job *j = p;
    j->fn(j->w, j->wd, j->k, r0, r1, j->xq, j->xd, j->m, j->n, j->y);
}

int tl_q8_matmul(const int8_t *w, const uint16_t *wd, int64_t n, int64_t k, const int8_t *xq, const float *xd,
                 int64_t m, float *y) {
    if (!w || !wd || !xq || !xd || !y) return TL_ENULL;
    if (n <= 0 || k <= 0 || m <= 0) return TL_ESIZE;
    if (k % TL_QBLOCK != 0) return TL_EQBLOCK;
    if (!product_ok(n, k) || !product_ok(m, k) || !product_ok(m, n)) return TL_ERANGE;
    q8_job job = {isa()->q8, w, wd, n, k, m, xq, xd, y};
    return tl_parallel_for(n, row_grain(k + k / TL_QBLOCK * 2, m), m == 1, q8_range, &job);
}

typedef struct {
    tl_q4_fn fn;
    const uint8_t *w;
    const uint16_t *wd;
    int64_t n, k, m;
    const int8_t *xq;
    const float *xd;
    float *y;
} q4_job;

static void q4_range(void *p, int64_t r0, int64_t r1) {
    const q4_job *j = p;
    j->fn(j->w, j->wd, j->k, r0, r1, j->xq, j->xd, j->m, j->n, j->y);
}

int tl_q4_matmul(const uint8_t *w, const uint16_t *wd, int64_t n, int64_t k, const int8_t *xq, const float *xd,
                 int64_t m, float *y) {
    if (!w || !wd || !xq || !xd || !y) return TL_ENULL;
    if (n <= 0 || k <= 0 || m <= 0) return TL_ESIZE;
    if (k % TL_QBLOCK != 0) return TL_EQBLOCK;
    if (!product_ok(n, k) || !product_ok(m, k) || !product_ok(m, n)) return TL_ERANGE;
    q4_job job = {isa()->q4, w, wd, n, k, m, xq, xd, y};
    return tl_parallel_for(n, row_grain(k / 2 + k / TL_QBLOCK * 2, m), m == 1, q4_range, &job);
}

/* ---- a read-bandwidth probe (benchmarks): one pass over a buffer, split like a matmul's rows ---- */

typedef struct {
    const uint8_t *buf;
    _Atomic uint64_t sum;
} read_job;

#define READ_RANGE(NAME, BYTES)                                                                          \
    static void NAME(void *p, int64_t b, int64_t e) { /* items are 4 KiB pages */                        \
        read_job *j = p;                                                                                 \
        typedef uint64_t vec __attribute__((vector_size(BYTES), aligned(1)));                            \
        vec acc[4] = {{0}, {0}, {0}, {0}};                                                               \
        const vec *q = (const vec *)(j->buf + b * 4096), *end = (const vec *)(j->buf + e * 4096);        \
        for (; q < end; q += 4)                                                                          \
            for (int u = 0; u < 4; u++) acc[u] ^= q[u];                                                  \
        vec a = acc[0] ^ acc[1] ^ acc[2] ^ acc[3];                                                       \
        uint64_t x = 0;                                                                                  \
        for (int u = 0; u < (BYTES) / 8; u++) x ^= a[u];                                                 \
        atomic_fetch_xor(&j->sum, x);                                                                    \
    }
READ_RANGE(read_range, 16)
#if defined(__x86_64__)
__attribute__((target("avx512f"))) READ_RANGE(read_range512, 64)
#endif

/* The xor of all 8-byte words of buf (n_pages * 4096 bytes), read by the kernel threads. */
static uint64_t tl_read_probe(const uint8_t *buf, int64_t n_pages) {
    read_job job = {buf, 0};
    tl_range_fn fn = read_range;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx512f")) fn = read_range512;
#endif
    tl_parallel_for(n_pages, 64, 1, fn, &job);
    return atomic_load(&job.sum);
}

/* ==== 2. Python binding ========================================================================= */

/* Exception classes; ternlm.kernels installs ShapeError and KernelError via set_exceptions(). */
static PyObject *shape_error, *kernel_error;

static int raise_status(int status) {
    PyErr_Format(kernel_error, "kernel error %d: %s", status, tl_strerror(status));
    return -1;
}

/* Accepts the format chars a native little-endian array of the wanted type can have. */
static int format_is(const char *fmt, char want) {
    if (!fmt) return want == 'B';
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') fmt++;
    if (fmt[0] == '\0' || fmt[1] != '\0') return 0;
    if (want == 'i' && sizeof(long) == 4 && fmt[0] == 'l') return 1;
    return fmt[0] == want;
}

static const char *type_name(char fmt) {
    switch (fmt) {
    case 'f': return "float32";
    case 'e': return "float16";
    case 'H': return "uint16";
    case 'b': return "int8";
    case 'B': return "uint8";
    case 'i': return "int32";
    default: return "?";
    }
}

/* a * b, or -1 when it exceeds 2^60 (sizes are positive) */
static int64_t cnt(int64_t a, int64_t b) {
    int64_t p;
    return __builtin_mul_overflow(a, b, &p) || p > ((int64_t)1 << 60) ? -1 : p;
}

/* Gets a C-contiguous buffer of exactly `count` items of type fmt; on failure raises ShapeError. */
static int get_buf(PyObject *obj, const char *name, char fmt, Py_ssize_t itemsize, int64_t count,
                   int writable, Py_buffer *view) {
    if (count < 0) {
        PyErr_Format(shape_error, "%s: size overflows", name);
        return -1;
    }
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(shape_error, "%s: expected a C-contiguous%s %s array", name, writable ? " writable" : "",
                     type_name(fmt));
        return -1;
    }
    if (view->itemsize != itemsize || !format_is(view->format, fmt)) {
        PyErr_Format(shape_error, "%s: expected dtype %s, got buffer format '%s'", name, type_name(fmt),
                     view->format ? view->format : "B");
    } else if ((int64_t)view->len != count * itemsize) {
        PyErr_Format(shape_error, "%s: expected %lld elements, got %lld", name, (long long)count,
                     (long long)(view->len / itemsize));
    } else {
        return 0;
    }
    PyBuffer_Release(view);
    return -1;
}

static void release_all(Py_buffer *views, int n) {
    for (int i = 0; i < n; i++) PyBuffer_Release(&views[i]);
}

static int get_i64(PyObject *o, const char *name, int64_t *out) {
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(shape_error, "%s: expected an int", name);
        return -1;
    }
    *out = v;
    return 0;
}

static int get_f32(PyObject *o, const char *name, float *out) {
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(shape_error, "%s: expected a float", name);
        return -1;
    }
    *out = (float)v;
    return 0;
}

/* Sizes must be positive and their products small enough to compare buffer lengths safely. */
static int check_sizes(int n_sizes, const int64_t *sizes, const char *what) {
    for (int i = 0; i < n_sizes; i++)
        if (sizes[i] <= 0) {
            PyErr_Format(shape_error, "%s: sizes must be positive, got %lld", what, (long long)sizes[i]);
            return -1;
        }
    return 0;
}

static int check_nargs(Py_ssize_t nargs, Py_ssize_t want, const char *fn) {
    if (nargs == want) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", fn, want, nargs);
    return -1;
}

/* ---- read-ahead hints: a weight kernel's optional last argument names the weights read after it ---- */

static Py_buffer read_ahead_view; /* the weights the pool is reading ahead, kept alive (GIL) */
static int have_read_ahead_view;

/* Weight kernels take nargs = want, or want + 1 with `next` last: None or the next kernel's weights. */
static int check_nargs_next(Py_ssize_t nargs, Py_ssize_t want, const char *fn) {
    if (nargs == want || nargs == want + 1) return 0;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd or %zd arguments (%zd given)", fn, want, want + 1, nargs);
    return -1;
}

/* Takes the hint for this thread's next job (the kernel reading cur); *next stays empty when there is none. */
static int hint_begin(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t at, const void *cur, Py_buffer *next) {
    next->obj = NULL;
    if (nargs <= at || args[at] == Py_None) {
        tl_set_read_ahead(cur, NULL, 0);
        return 0;
    }
    if (PyObject_GetBuffer(args[at], next, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        PyErr_SetString(shape_error, "next: expected a contiguous array (the weights read next) or None");
        return -1;
    }
    tl_set_read_ahead(cur, next->buf, (int64_t)next->len);
    return 0;
}

/* After the kernel: while the pool reads `next` ahead, its view is kept (and the one before it let go). */
static void hint_end(Py_buffer *next) {
    tl_set_read_ahead(NULL, NULL, 0);
    if (!next->obj) return;
    if (!tl_reads_ahead(next->buf)) {
        PyBuffer_Release(next);
        return;
    }
    if (have_read_ahead_view) PyBuffer_Release(&read_ahead_view);
    read_ahead_view = *next;
    have_read_ahead_view = 1;
}

/* quantize(x, xq, a_scale, sums, m, k, k_pad[, norm, eps]): with norm (k,), of RMSNorm(x) * norm */
static PyObject *py_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t s[3];
    float eps = 0.0f;
    if (nargs != 7 && nargs != 9) {
        PyErr_Format(PyExc_TypeError, "quantize() takes 7 or 9 arguments (%zd given)", nargs);
        return NULL;
    }
    if (get_i64(args[4], "m", &s[0]) || get_i64(args[5], "k", &s[1]) || get_i64(args[6], "k_pad", &s[2]) ||
        check_sizes(3, s, "quantize") || (nargs == 9 && get_f32(args[8], "eps", &eps)))
        return NULL;
    const int64_t m = s[0], k = s[1], k_pad = s[2];
    Py_buffer x, xq, as, sums, w = {0};
    if (nargs == 9 && get_buf(args[7], "norm", 'f', 4, k, 0, &w)) return NULL;
    if (get_buf(args[0], "x", 'f', 4, cnt(m, k), 0, &x)) goto fail_w;
    if (get_buf(args[1], "xq", 'b', 1, cnt(m, k_pad), 1, &xq)) goto fail_x;
    if (get_buf(args[2], "a_scale", 'f', 4, m, 1, &as)) goto fail_xq;
    if (get_buf(args[3], "sums", 'i', 4, m, 1, &sums)) goto fail_as;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = w.obj ? tl_norm_quantize_rows(x.buf, w.buf, eps, m, k, k_pad, xq.buf, as.buf, sums.buf)
               : tl_quantize_rows(x.buf, m, k, k_pad, xq.buf, as.buf, sums.buf);
    Py_END_ALLOW_THREADS
    if (w.obj) PyBuffer_Release(&w);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&as);
    PyBuffer_Release(&xq);
    PyBuffer_Release(&x);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
fail_as:
    PyBuffer_Release(&as);
fail_xq:
    PyBuffer_Release(&xq);
fail_x:
    PyBuffer_Release(&x);
fail_w:
    if (w.obj) PyBuffer_Release(&w);
    return NULL;
}

/* ternary_matmul[_tq1](w, n, k_pad, xq, sums, a_scale, w_scale, m, y, acc[, next]): exactly one of y / acc is
 * None */
static PyObject *ternary_matmul_impl(int tq1, PyObject *const *args, Py_ssize_t nargs) {
    const char *fn = tq1 ? "ternary_matmul_tq1" : "ternary_matmul";
    const int block = tq1 ? TL_TQ1_BLOCK : TL_BLOCK, per_byte = tq1 ? 5 : 4;
    int64_t s[3];
    if (check_nargs_next(nargs, 10, fn) || get_i64(args[1], "n", &s[0]) || get_i64(args[2], "k_pad", &s[1]) ||
        get_i64(args[7], "m", &s[2]) || check_sizes(3, s, fn))
        return NULL;
    const int64_t n = s[0], k_pad = s[1], m = s[2];
    if (k_pad % block != 0) {
        PyErr_Format(shape_error, "%s: k_pad %lld is not a multiple of %d", fn, (long long)k_pad, block);
        return NULL;
    }
    /* w_scale: a Python float (one scale, stride 0) or a float32 buffer of n (one per row, stride 1) */
    const int ws_array = !PyFloat_Check(args[6]);
    float ws_one = 1.0f;
    if (!ws_array) ws_one = (float)PyFloat_AS_DOUBLE(args[6]);
    const int want_y = args[8] != Py_None;
    if (want_y == (args[9] != Py_None)) {
        PyErr_Format(shape_error, "%s: pass exactly one of y and acc", fn);
        return NULL;
    }
    Py_buffer w, xq, sums, as, out, next, ws = {0};
    if (ws_array && get_buf(args[6], "w_scale", 'f', 4, n, 0, &ws)) return NULL;
    if (get_buf(args[0], "packed", 'B', 1, cnt(n, k_pad / per_byte), 0, &w)) goto fail_ws;
    if (get_buf(args[3], "xq", 'b', 1, cnt(m, k_pad), 0, &xq)) goto fail_w;
    if (get_buf(args[4], "sums", 'i', 4, m, 0, &sums)) goto fail_xq;
    if (get_buf(args[5], "a_scale", 'f', 4, m, 0, &as)) goto fail_sums;
    if (get_buf(want_y ? args[8] : args[9], want_y ? "out" : "out (acc)", want_y ? 'f' : 'i', 4, cnt(m, n), 1, &out))
        goto fail_as;
    if (hint_begin(args, nargs, 10, w.buf, &next)) goto fail_out;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = (tq1 ? tl_ternary_matmul_tq1 : tl_ternary_matmul)(w.buf, n, k_pad, xq.buf, sums.buf, as.buf,
                                                           ws_array ? ws.buf : &ws_one, ws_array, m,
                                                           want_y ? out.buf : NULL, want_y ? NULL : out.buf);
    Py_END_ALLOW_THREADS
    hint_end(&next);
    PyBuffer_Release(&out);
    PyBuffer_Release(&as);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&xq);
    PyBuffer_Release(&w);
    if (ws_array) PyBuffer_Release(&ws);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
fail_out:
    PyBuffer_Release(&out);
fail_as:
    PyBuffer_Release(&as);
fail_sums:
    PyBuffer_Release(&sums);
fail_xq:
    PyBuffer_Release(&xq);
fail_w:
    PyBuffer_Release(&w);
fail_ws:
    if (ws_array) PyBuffer_Release(&ws);
    return NULL;
}

static PyObject *py_ternary_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return ternary_matmul_impl(0, args, nargs);
}

static PyObject *py_ternary_matmul_tq1(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return ternary_matmul_impl(1, args, nargs);
}

static int check_qblock(int64_t k, const char *fn) {
    if (k % TL_QBLOCK == 0) return 0;
    PyErr_Format(shape_error, "%s: k = %lld is not a multiple of %d", fn, (long long)k, TL_QBLOCK);
    return -1;
}

/* quantize_q8_0(x, xq, xd, m, k) */
static PyObject *py_quantize_q8_0(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t s[2];
    if (check_nargs(nargs, 5, "quantize_q8_0") || get_i64(args[3], "m", &s[0]) || get_i64(args[4], "k", &s[1]) ||
        check_sizes(2, s, "quantize_q8_0") || check_qblock(s[1], "quantize_q8_0"))
        return NULL;
    const int64_t m = s[0], k = s[1];
    Py_buffer x, xq, xd;
    if (get_buf(args[0], "x", 'f', 4, cnt(m, k), 0, &x)) return NULL;
    if (get_buf(args[1], "xq", 'b', 1, cnt(m, k), 1, &xq)) goto fail_x;
    if (get_buf(args[2], "xd", 'f', 4, cnt(m, k / TL_QBLOCK), 1, &xd)) goto fail_xq;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_quantize_q8_0(x.buf, m, k, xq.buf, xd.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&xd);
    PyBuffer_Release(&xq);
    PyBuffer_Release(&x);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
fail_xq:
    PyBuffer_Release(&xq);
fail_x:
    PyBuffer_Release(&x);
    return NULL;
}

/* q8_matmul / q4_matmul(w, wd, n, k, xq, xd, m, y): Q8_0 or Q4_0 weights (bits 8 or 4), Q8_0 activations */
static PyObject *qblock_matmul(PyObject *const *args, Py_ssize_t nargs, int bits, const char *fn) {
    int64_t s[3];
    if (check_nargs_next(nargs, 8, fn) || get_i64(args[2], "n", &s[0]) || get_i64(args[3], "k", &s[1]) ||
        get_i64(args[6], "m", &s[2]) || check_sizes(3, s, fn) || check_qblock(s[1], fn))
        return NULL;
    const int64_t n = s[0], k = s[1], m = s[2];
    Py_buffer b[5];
    int nb = 0;
    if (get_buf(args[0], bits == 8 ? "q" : "q4", bits == 8 ? 'b' : 'B', 1, cnt(n, k * bits / 8), 0, &b[nb]) ||
        (++nb, 0) || get_buf(args[1], "d", 'e', 2, cnt(n, k / TL_QBLOCK), 0, &b[nb]) || (++nb, 0) ||
        get_buf(args[4], "xq", 'b', 1, cnt(m, k), 0, &b[nb]) || (++nb, 0) ||
        get_buf(args[5], "xd", 'f', 4, cnt(m, k / TL_QBLOCK), 0, &b[nb]) || (++nb, 0) ||
        get_buf(args[7], "out", 'f', 4, cnt(m, n), 1, &b[nb]) || (++nb, 0))
        return release_all(b, nb), NULL;
    Py_buffer next;
    if (hint_begin(args, nargs, 8, b[0].buf, &next)) return release_all(b, nb), NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = bits == 8 ? tl_q8_matmul(b[0].buf, b[1].buf, n, k, b[2].buf, b[3].buf, m, b[4].buf)
                   : tl_q4_matmul(b[0].buf, b[1].buf, n, k, b[2].buf, b[3].buf, m, b[4].buf);
    Py_END_ALLOW_THREADS
    hint_end(&next);
    release_all(b, nb);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
}

static PyObject *py_q8_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return qblock_matmul(args, nargs, 8, "q8_matmul");
}

static PyObject *py_q4_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    return qblock_matmul(args, nargs, 4, "q4_matmul");
}

/* float_matmul(w, dtype, n, k, x, m, y[, next]) with dtype 0 = f32, 1 = f16, 2 = bf16 (uint16 storage) */
static PyObject *py_float_matmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t dtype, s[3];
    if (check_nargs_next(nargs, 7, "float_matmul") || get_i64(args[1], "dtype", &dtype) ||
        get_i64(args[2], "n", &s[0]) || get_i64(args[3], "k", &s[1]) || get_i64(args[5], "m", &s[2]) ||
        check_sizes(3, s, "float_matmul"))
        return NULL;
    const int64_t n = s[0], k = s[1], m = s[2];
    static const char wfmt[3] = {'f', 'e', 'H'};
    if (dtype < 0 || dtype > 2) return raise_status(TL_EDTYPE), NULL;
    Py_buffer w, x, y, next;
    if (get_buf(args[0], "w", wfmt[dtype], dtype == TL_F32 ? 4 : 2, cnt(n, k), 0, &w)) return NULL;
    if (get_buf(args[4], "x", 'f', 4, cnt(m, k), 0, &x)) goto fail_w;
    if (get_buf(args[6], "out", 'f', 4, cnt(m, n), 1, &y)) goto fail_x;
    if (hint_begin(args, nargs, 7, w.buf, &next)) goto fail_y;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_float_matmul(w.buf, (int)dtype, n, k, x.buf, m, y.buf);
    Py_END_ALLOW_THREADS
    hint_end(&next);
    PyBuffer_Release(&y);
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
fail_y:
    PyBuffer_Release(&y);
fail_x:
    PyBuffer_Release(&x);
fail_w:
    PyBuffer_Release(&w);
    return NULL;
}

/* read_probe(buf): one pass over a uint8 buffer whose length is a multiple of 4096 (bandwidth probe) */
static PyObject *py_read_probe(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_C_CONTIGUOUS) < 0) return NULL;
    if (b.len % 4096 != 0) {
        PyBuffer_Release(&b);
        PyErr_SetString(shape_error, "read_probe: length must be a multiple of 4096");
        return NULL;
    }
    uint64_t x;
    Py_BEGIN_ALLOW_THREADS
    x = tl_read_probe(b.buf, (int64_t)(b.len / 4096));
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(x);
}

static PyObject *py_set_threads(PyObject *self, PyObject *arg) {
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS /* may wait for a running job */
    st = (n < 1 || n > TL_MAX_THREADS) ? TL_ETHREADS : tl_set_threads((int)n);
    Py_END_ALLOW_THREADS
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
}

static PyObject *py_get_threads(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyLong_FromLong(tl_get_threads());
}

static PyObject *py_available_isas(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    PyObject *t = PyTuple_New(tl_isa_count());
    if (!t) return NULL;
    for (int i = 0; i < tl_isa_count(); i++) {
        PyObject *s = PyUnicode_FromString(tl_isa_name(i));
        if (!s) return Py_DECREF(t), NULL;
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int st = tl_set_isa(name);
    if (st != TL_OK) {
        PyErr_Format(kernel_error, "unknown or unsupported ISA '%s'", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_active_isa(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(tl_active_isa());
}

static PyObject *py_set_exceptions(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *se, *ke;
    if (!PyArg_ParseTuple(args, "OO", &se, &ke)) return NULL;
    Py_INCREF(se);
    Py_INCREF(ke);
    Py_XSETREF(shape_error, se);
    Py_XSETREF(kernel_error, ke);
    Py_RETURN_NONE;
}

/* ---- fused float ops ----------------------------------------------------------------------------- */


/* rmsnorm(x, w, eps, m, k, out) */
static PyObject *py_rmsnorm(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t s[2];
    float eps;
    if (check_nargs(nargs, 6, "rmsnorm") || get_f32(args[2], "eps", &eps) || get_i64(args[3], "m", &s[0]) ||
        get_i64(args[4], "k", &s[1]) || check_sizes(2, s, "rmsnorm"))
        return NULL;
    Py_buffer b[3];
    int n = 0;
    if (get_buf(args[0], "x", 'f', 4, cnt(s[0], s[1]), 0, &b[n]) || (++n, 0) ||
        get_buf(args[1], "w", 'f', 4, s[1], 0, &b[n]) || (++n, 0) ||
        get_buf(args[5], "out", 'f', 4, cnt(s[0], s[1]), 1, &b[n]) || (++n, 0))
        return release_all(b, n), NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_rmsnorm(b[0].buf, b[1].buf, eps, s[0], s[1], b[2].buf);
    Py_END_ALLOW_THREADS
    release_all(b, n);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
}

/* glu(gu, m, f, act, out) */
static PyObject *py_glu(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t s[2], act;
    if (check_nargs(nargs, 5, "glu") || get_i64(args[1], "m", &s[0]) || get_i64(args[2], "f", &s[1]) ||
        get_i64(args[3], "act", &act) || check_sizes(2, s, "glu"))
        return NULL;
    Py_buffer b[2];
    int n = 0;
    if (get_buf(args[0], "gu", 'f', 4, cnt(s[0], 2 * s[1]), 0, &b[n]) || (++n, 0) ||
        get_buf(args[4], "out", 'f', 4, cnt(s[0], s[1]), 1, &b[n]) || (++n, 0))
        return release_all(b, n), NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_glu(b[0].buf, s[0], s[1], (int)act, b[1].buf);
    Py_END_ALLOW_THREADS
    release_all(b, n);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
}

/* causal_softmax(x, rows, s, period, first, scale): in place */
static PyObject *py_causal_softmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t s[4];
    float scale;
    if (check_nargs(nargs, 6, "causal_softmax") || get_i64(args[1], "rows", &s[0]) || get_i64(args[2], "s", &s[1]) ||
        get_i64(args[3], "period", &s[2]) || get_i64(args[4], "first", &s[3]) || check_sizes(4, s, "causal_softmax") ||
        get_f32(args[5], "scale", &scale))
        return NULL;
    Py_buffer x;
    if (get_buf(args[0], "x", 'f', 4, cnt(s[0], s[1]), 1, &x)) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_causal_softmax(x.buf, s[0], s[1], s[2], s[3], scale);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
}

/* attention_decode(qkv, k_cache, v_cache, max_len, pos, cos, sin, n_heads, n_kv, hd, scale, scores, out) */
static PyObject *py_attention_decode(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    int64_t s[5], pos;
    float scale;
    if (check_nargs(nargs, 13, "attention_decode") || get_i64(args[3], "max_len", &s[0]) ||
        get_i64(args[7], "n_heads", &s[1]) || get_i64(args[8], "n_kv", &s[2]) || get_i64(args[9], "hd", &s[3]) ||
        get_i64(args[4], "pos", &pos) || get_f32(args[10], "scale", &scale) || check_sizes(4, s, "attention_decode"))
        return NULL;
    const int64_t max_len = s[0], n_heads = s[1], n_kv = s[2], hd = s[3];
    if (n_heads % n_kv || n_heads / n_kv > TL_MAX_GROUP || hd > TL_MAX_HEAD_DIM || hd % 2 || pos < 0 ||
        pos >= max_len) {
        PyErr_SetString(shape_error, "attention_decode: head counts, head_dim or position out of range");
        return NULL;
    }
    Py_buffer b[7];
    int n = 0;
    const int64_t cache = cnt(cnt(n_kv, max_len), hd);
    if (get_buf(args[0], "qkv", 'f', 4, (n_heads + 2 * n_kv) * hd, 0, &b[n]) || (++n, 0) ||
        get_buf(args[1], "k_cache", 'f', 4, cache, 1, &b[n]) || (++n, 0) ||
        get_buf(args[2], "v_cache", 'f', 4, cache, 1, &b[n]) || (++n, 0) ||
        get_buf(args[5], "cos", 'f', 4, hd / 2, 0, &b[n]) || (++n, 0) ||
        get_buf(args[6], "sin", 'f', 4, hd / 2, 0, &b[n]) || (++n, 0) ||
        get_buf(args[11], "scores", 'f', 4, cnt(n_heads, max_len), 1, &b[n]) || (++n, 0) ||
        get_buf(args[12], "out", 'f', 4, n_heads * hd, 1, &b[n]) || (++n, 0))
        return release_all(b, n), NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_attention_decode(b[0].buf, b[1].buf, b[2].buf, max_len, pos, b[3].buf, b[4].buf, (int)n_heads,
                             (int)n_kv, (int)hd, scale, b[5].buf, b[6].buf);
    Py_END_ALLOW_THREADS
    release_all(b, n);
    if (st != TL_OK) return raise_status(st), NULL;
    Py_RETURN_NONE;
}

/* attention_decode_batch(qkv, k_caches, v_caches, positions, cos, sin, scores, n_heads, n_kv, hd, scale, out):
 * qkv (b, (n_heads + 2 n_kv) hd); k_caches, v_caches, scores: b arrays each, sequence i's (n_kv, max_len_i, hd)
 * and (n_heads, max_len_i); positions b ints; cos, sin (rows, hd/2) tables indexed by position; out (b, n_heads hd). */
static PyObject *py_attention_decode_batch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    const char *fn = "attention_decode_batch";
    int64_t s[3];
    float scale;
    if (check_nargs(nargs, 12, fn) || get_i64(args[7], "n_heads", &s[0]) || get_i64(args[8], "n_kv", &s[1]) ||
        get_i64(args[9], "hd", &s[2]) || get_f32(args[10], "scale", &scale) || check_sizes(3, s, fn))
        return NULL;
    const int64_t n_heads = s[0], n_kv = s[1], hd = s[2];
    if (n_heads % n_kv || n_heads / n_kv > TL_MAX_GROUP || hd > TL_MAX_HEAD_DIM || hd % 2) {
        PyErr_Format(shape_error, "%s: head counts or head_dim out of range", fn);
        return NULL;
    }
    PyObject *seqs[4] = {NULL, NULL, NULL, NULL}; /* k_caches, v_caches, positions, scores */
    const int seq_arg[4] = {1, 2, 3, 6};
    const char *seq_name[4] = {"k_caches", "v_caches", "positions", "scores"};
    PyObject *ret = NULL;
    Py_buffer *views = NULL;
    void **ptrs = NULL;
    int64_t *nums = NULL;
    int n = 0;
    for (int a = 0; a < 4; a++) {
        seqs[a] = PySequence_Tuple(args[seq_arg[a]]); /* a copy: item conversions cannot resize it */
        if (!seqs[a]) {
            PyErr_Clear();
            PyErr_Format(shape_error, "%s: %s must be a list", fn, seq_name[a]);
            goto done;
        }
    }
    const Py_ssize_t b = PyTuple_GET_SIZE(seqs[0]);
    for (int a = 1; a < 4; a++)
        if (PyTuple_GET_SIZE(seqs[a]) != b) {
            PyErr_Format(shape_error, "%s: k_caches, v_caches, positions and scores must be as many, got %zd, %zd, "
                         "%zd and %zd", fn, b, PyTuple_GET_SIZE(seqs[1]), PyTuple_GET_SIZE(seqs[2]),
                         PyTuple_GET_SIZE(seqs[3]));
            goto done;
        }
    if (b <= 0 || b > (1 << 20)) {
        PyErr_Format(shape_error, "%s: need 1 to %d sequences, got %zd", fn, 1 << 20, b);
        goto done;
    }
    views = PyMem_Malloc((size_t)(3 * b + 4) * sizeof *views);
    ptrs = PyMem_Malloc((size_t)(3 * b) * sizeof *ptrs);
    nums = PyMem_Malloc((size_t)(2 * b) * sizeof *nums); /* max_lens, positions */
    if (!views || !ptrs || !nums) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t row = (n_heads + 2 * n_kv) * hd;
    if (get_buf(args[0], "qkv", 'f', 4, cnt(b, row), 0, &views[n]) || (++n, 0) ||
        get_buf(args[11], "out", 'f', 4, cnt(b, n_heads * hd), 1, &views[n]) || (++n, 0))
        goto done;
    /* the RoPE tables: any number of whole rows of hd/2 */
    int64_t rows[2];
    for (int t = 0; t < 2; t++) {
        const char *name = t ? "sin" : "cos";
        if (PyObject_GetBuffer(args[4 + t], &views[n], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            PyErr_Format(shape_error, "%s: %s: expected a C-contiguous float32 array", fn, name);
            goto done;
        }
        n++;
        if (views[n - 1].itemsize != 4 || !format_is(views[n - 1].format, 'f') ||
            views[n - 1].len % (hd / 2 * 4)) {
            PyErr_Format(shape_error, "%s: %s: expected float32 rows of hd/2 = %lld", fn, name, (long long)(hd / 2));
            goto done;
        }
        rows[t] = (int64_t)views[n - 1].len / (hd / 2 * 4);
    }
    if (rows[0] != rows[1]) {
        PyErr_Format(shape_error, "%s: cos and sin tables differ in length", fn);
        goto done;
    }
    for (Py_ssize_t i = 0; i < b; i++) {
        PyObject *items[4];
        for (int a = 0; a < 4; a++) items[a] = PyTuple_GET_ITEM(seqs[a], i);
        int64_t pos;
        if (get_i64(items[2], "positions", &pos)) goto done;
        /* max_len from k_cache's length, then every other buffer checked against it */
        if (PyObject_GetBuffer(items[0], &views[n], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
            PyErr_Clear();
            PyErr_Format(shape_error, "%s: k_caches[%zd]: expected a C-contiguous writable float32 array", fn, i);
            goto done;
        }
        const Py_buffer *kv = &views[n++];
        const int64_t per_pos = n_kv * hd * 4;
        if (kv->itemsize != 4 || !format_is(kv->format, 'f') || kv->len <= 0 || kv->len % per_pos) {
            PyErr_Format(shape_error, "%s: k_caches[%zd]: expected float32 (n_kv=%lld, max_len, hd=%lld)", fn, i,
                         (long long)n_kv, (long long)hd);
            goto done;
        }
        const int64_t max_len = (int64_t)kv->len / per_pos;
        if (pos < 0 || pos >= max_len || pos >= rows[0]) {
            PyErr_Format(shape_error, "%s: positions[%zd] = %lld out of range (max_len %lld, %lld RoPE rows)", fn, i,
                         (long long)pos, (long long)max_len, (long long)rows[0]);
            goto done;
        }
        if (get_buf(items[1], "v_caches[i]", 'f', 4, cnt(cnt(n_kv, max_len), hd), 1, &views[n]) || (++n, 0) ||
            get_buf(items[3], "scores[i]", 'f', 4, cnt(n_heads, max_len), 1, &views[n]) || (++n, 0))
            goto done;
        ptrs[i] = kv->buf;
        ptrs[b + i] = views[n - 2].buf;
        ptrs[2 * b + i] = views[n - 1].buf;
        nums[i] = max_len;
        nums[b + i] = pos;
    }
    /* scores are written concurrently: they must not overlap */
    for (Py_ssize_t i = 0; i < b; i++)
        for (Py_ssize_t j = 0; j < i; j++) {
            const char *p = ptrs[2 * b + i], *q = ptrs[2 * b + j];
            if (p < q + nums[j] * n_heads * 4 && q < p + nums[i] * n_heads * 4) {
                PyErr_Format(shape_error, "%s: scores[%zd] and scores[%zd] overlap", fn, j, i);
                goto done;
            }
        }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = tl_attention_decode_batch(b, views[0].buf, (float *const *)ptrs, (float *const *)(ptrs + b), nums, nums + b,
                                   views[2].buf, views[3].buf, (int)n_heads, (int)n_kv, (int)hd, scale,
                                   (float *const *)(ptrs + 2 * b), views[1].buf);
    Py_END_ALLOW_THREADS
    if (st != TL_OK) {
        raise_status(st);
        goto done;
    }
    ret = Py_NewRef(Py_None);
done:
    if (views) release_all(views, n);
    PyMem_Free(views);
    PyMem_Free(ptrs);
    PyMem_Free(nums);
    for (int a = 0; a < 4; a++) Py_XDECREF(seqs[a]);
    return ret;
}

static PyMethodDef methods[] = {
    {"quantize", (PyCFunction)(void (*)(void))py_quantize, METH_FASTCALL,
     "quantize(x, xq, a_scale, sums, m, k, k_pad[, norm, eps]): per-row int8 quantization (of RMSNorm(x) * norm) into the given buffers"},
    {"ternary_matmul", (PyCFunction)(void (*)(void))py_ternary_matmul, METH_FASTCALL,
     "ternary_matmul(packed, n, k_pad, xq, sums, a_scale, w_scale, m, y, acc): y or acc (m, n); "
     "w_scale a float or float32 (n,)"},
    {"ternary_matmul_tq1", (PyCFunction)(void (*)(void))py_ternary_matmul_tq1, METH_FASTCALL,
     "ternary_matmul_tq1(packed, n, k_pad, xq, sums, a_scale, w_scale, m, y, acc): as ternary_matmul for TQ1 "
     "weights (n, k_pad/5), k_pad a multiple of 320"},
    {"quantize_q8_0", (PyCFunction)(void (*)(void))py_quantize_q8_0, METH_FASTCALL,
     "quantize_q8_0(x, xq, xd, m, k): Q8_0 activations, one float32 scale per 32 columns"},
    {"q8_matmul", (PyCFunction)(void (*)(void))py_q8_matmul, METH_FASTCALL,
     "q8_matmul(q, d, n, k, xq, xd, m, y): y (m, n) = Q8_0 weights (q int8, d float16) . Q8_0 activations"},
    {"q4_matmul", (PyCFunction)(void (*)(void))py_q4_matmul, METH_FASTCALL,
     "q4_matmul(q4, d, n, k, xq, xd, m, y): y (m, n) = Q4_0 weights (q4 uint8 (n, k/2), d float16) . Q8_0 activations"},
    {"rmsnorm", (PyCFunction)(void (*)(void))py_rmsnorm, METH_FASTCALL, "rmsnorm(x, w, eps, m, k, out)"},
    {"glu", (PyCFunction)(void (*)(void))py_glu, METH_FASTCALL, "glu(gu, m, f, act, out)"},
    {"causal_softmax", (PyCFunction)(void (*)(void))py_causal_softmax, METH_FASTCALL,
     "causal_softmax(x, rows, s, period, first, scale)"},
    {"attention_decode", (PyCFunction)(void (*)(void))py_attention_decode, METH_FASTCALL,
     "attention_decode(qkv, k_cache, v_cache, max_len, pos, cos, sin, n_heads, n_kv, hd, scale, scores, out)"},
    {"attention_decode_batch", (PyCFunction)(void (*)(void))py_attention_decode_batch, METH_FASTCALL,
     "attention_decode_batch(qkv, k_caches, v_caches, positions, cos, sin, scores, n_heads, n_kv, hd, scale, out)"},
    {"float_matmul", (PyCFunction)(void (*)(void))py_float_matmul, METH_FASTCALL,
     "float_matmul(w, dtype, n, k, x, m, y): y (m, n) = x (m, k) . w (n, k)^T; dtype 0 f32, 1 f16, 2 bf16"},
    {"read_probe", py_read_probe, METH_O, "read_probe(buf) -> int: one threaded pass over buf (bandwidth probe)"},
    {"set_threads", py_set_threads, METH_O, "set_threads(n): threads per kernel call, caller included"},
    {"get_threads", py_get_threads, METH_NOARGS, "get_threads() -> int"},
    {"available_isas", py_available_isas, METH_NOARGS, "available_isas() -> tuple of names, best last"},
    {"set_isa", py_set_isa, METH_O, "set_isa(name): use this ISA's kernels from now on"},
    {"active_isa", py_active_isa, METH_NOARGS, "active_isa() -> str"},
    {"set_exceptions", py_set_exceptions, METH_VARARGS, "set_exceptions(shape_error, kernel_error)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "ternlm's C kernels (see ternary.h)", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    shape_error = Py_NewRef(PyExc_ValueError);
    kernel_error = Py_NewRef(PyExc_RuntimeError);
    isa();
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    if (PyModule_AddIntConstant(mod, "BLOCK", TL_BLOCK) ||
        PyModule_AddIntConstant(mod, "TQ1_BLOCK", TL_TQ1_BLOCK) || PyModule_AddIntConstant(mod, "MAX_K", TL_MAX_K) ||
        PyModule_AddIntConstant(mod, "MAX_THREADS", TL_MAX_THREADS) ||
        PyModule_AddIntConstant(mod, "QBLOCK", TL_QBLOCK)) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
