/* A tiny persistent thread pool for row-parallel kernels.
 *
 * Decode calls a kernel ~200 times per token, so a call must cost microseconds: workers are created
 * once, spin briefly on a generation counter after each job (the next call usually follows within
 * tens of microseconds), then sleep on a condition variable. Every worker acknowledges every job,
 * so the job descriptor is never rewritten while a late worker could still be reading it.
 *
 * Each thread owns one contiguous part of a job. In a balanced job it takes its part a few grains at a
 * time and, done early, takes grains from the end of the others' parts, so that a thread slowed by a
 * neighbour on its core (or woken late) does not hold up the rest; a static job runs each part as one
 * call, for kernels with a set-up cost per call.
 *
 * Between jobs the last worker reads ahead the start of its part of the next weight matrix (named by the
 * kernel wrapper, tl_set_read_ahead) into its cache: while the caller runs the small ops between two
 * matmuls, memory would otherwise sit idle. The next job then gives that worker as many more rows as
 * balance what it no longer has to read from memory. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <time.h>

#include "ternary.h"

#define SPIN_NS 200000 /* how long an idle worker spins before sleeping */
#define READ_AHEAD_BYTES (1 << 20) /* of the next weights, read ahead between jobs: half a 2 MB L2 */
#define READ_STEP 1024     /* a step is short: a job that stops the reader need not wait for it */
#define READ_PREFETCH 8192 /* how far ahead of its step the reader requests lines */
#define OWN_GRAINS 16  /* grains an owner takes at a time in a balanced job: ~256 KB of weights */
#define STEAL_GRAINS 1 /* and a thief from the end of another part */

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static struct {
    pthread_mutex_t call_lock; /* one job (or reconfiguration) at a time */
    pthread_mutex_t lock;      /* guards sleeping workers' wake-up */
    pthread_cond_t wake;
    pthread_t tids[TL_MAX_THREADS];
    _Atomic int want; /* threads per job, caller included */
    _Atomic int nworkers; /* running workers (want - 1 once started, fewer if the OS refused some) */
    int started;  /* the want the running workers were started for; 0 = none */
    unsigned long start_gen; /* gen when the workers were created: jobs after it are theirs */
    _Atomic unsigned long gen;
    _Atomic int pending;
    _Atomic int stop;
    /* current job, written by the caller before gen is bumped */
    tl_range_fn fn;
    void *ctx;
    int64_t n_items, grain;
    int nparts, balanced;
    int64_t bounds[TL_MAX_THREADS + 1]; /* part p is grains [bounds[p], bounds[p + 1]) */
    _Atomic uint64_t left[TL_MAX_THREADS]; /* part p's grains not yet taken: first (low 32 bits), end (high) */
    /* read-ahead target: the last worker reads ra_len bytes from ra_start, in steps */
    _Atomic(const uint8_t *) ra_start;
    _Atomic int64_t ra_len, ra_done;
    const uint8_t *ra_base;       /* the target matrix: ra_total bytes from ra_base (call_lock) */
    int64_t ra_total;
    _Atomic unsigned long ra_gen; /* bumped at every change of the target */
    _Atomic int ra_busy;          /* the reader is inside a step */
} pool = {
    .call_lock = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .want = 1,
};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Takes up to n grains of part p, from its start (the owner) or its end (a thief); 0 when none are left.
 * A guided take is a quarter of what is left, at most n: the last takes of a part are single grains, so a
 * thread that runs out of work waits at most about one grain for the others. */
static int take(int p, int from_end, int guided, int64_t n, int64_t *b, int64_t *e) {
    uint64_t c = atomic_load_explicit(&pool.left[p], memory_order_relaxed);
    for (;;) {
        const int64_t first = (int64_t)(c & 0xffffffffu), end = (int64_t)(c >> 32);
        if (first >= end) return 0;
        const int64_t rest = end - first, quarter = (rest + 3) / 4, want = guided && quarter < n ? quarter : n;
        const int64_t t = rest < want ? rest : want, u0 = from_end ? end - t : first;
        const uint64_t next = from_end ? (uint64_t)u0 << 32 | (uint64_t)first : (uint64_t)end << 32 | (uint64_t)(u0 + t);
        if (atomic_compare_exchange_weak_explicit(&pool.left[p], &c, next, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *b = u0 * pool.grain;
            *e = (u0 + t) * pool.grain < pool.n_items ? (u0 + t) * pool.grain : pool.n_items;
            return 1;
        }
    }
}

static void run_part(int p) {
    int64_t b, e;
    while (take(p, 0, pool.balanced, pool.balanced ? OWN_GRAINS : INT32_MAX, &b, &e)) pool.fn(pool.ctx, b, e);
    for (int q = 1; pool.balanced && q < pool.nparts; q++)
        while (take((p + q) % pool.nparts, 1, 0, STEAL_GRAINS, &b, &e)) pool.fn(pool.ctx, b, e);
}

/* Even parts of the units, except that the last thread, having `ahead` units of them in its cache already,
 * gets half of those on top of an even share: it computes on cached rows at about twice the speed it reads
 * them from memory (the 2-bit decode kernel: 31 against 15 GB/s on one core of the Xeon). */
static void plan_parts(int64_t units, int nparts, int64_t ahead) {
    ahead /= 2;
    int64_t last = units - (units - ahead) / nparts - ahead; /* where the last part starts */
    if (last < 0) last = 0;
    for (int p = 0; p < nparts; p++)
        pool.bounds[p] = ahead == 0 || nparts == 1 ? units * p / nparts : last * p / (nparts - 1);
    pool.bounds[nparts] = units;
    for (int p = 0; p < nparts; p++)
        atomic_store_explicit(&pool.left[p], (uint64_t)pool.bounds[p + 1] << 32 | (uint64_t)pool.bounds[p],
                              memory_order_relaxed);
}

/* One step of reading ahead; 0 when there is nothing (more) to read. */
static int read_ahead_step(void) {
    const unsigned long g = atomic_load(&pool.ra_gen);
    const uint8_t *start = atomic_load_explicit(&pool.ra_start, memory_order_relaxed);
    const int64_t len = atomic_load_explicit(&pool.ra_len, memory_order_relaxed);
    const int64_t done = atomic_load_explicit(&pool.ra_done, memory_order_relaxed);
    if (!start || done >= len) return 0;
    atomic_store(&pool.ra_busy, 1);
    if (atomic_load(&pool.ra_gen) == g) { /* still the target (set_read_target waits for this step) */
        const int64_t n = len - done < READ_STEP ? len - done : READ_STEP;
        const volatile uint8_t *p = start + done;
        /* the next steps' lines are requested now, so the loads of a step rarely wait on memory (as the
         * kernels' prefetch does: one core's loads alone have too few misses in flight for its bandwidth) */
        for (int64_t i = 0; i < n; i += 64) __builtin_prefetch((const uint8_t *)p + READ_PREFETCH + i, 0, 2);
        for (int64_t i = 0; i < n; i += 64) (void)p[i];
        atomic_store_explicit(&pool.ra_done, done + n, memory_order_relaxed);
    }
    atomic_store_explicit(&pool.ra_busy, 0, memory_order_release);
    return 1;
}

/* Stops the reader at its next step, without waiting for the step it may be in: the target stays mapped
 * (its view is held) until the job about to be posted is done, and the reader finishes any step before it
 * takes its part of that job. call_lock held. */
static void stop_reading(void) {
    atomic_store(&pool.ra_start, NULL);
    pool.ra_base = NULL;
    atomic_fetch_add(&pool.ra_gen, 1);
}

/* Changes the read-ahead target; once it returns, no worker reads the old one any more. call_lock held. */
static void set_read_target(const void *base, int64_t total) {
    stop_reading();
    while (atomic_load(&pool.ra_busy)) CPU_RELAX();
    pool.ra_base = base;
    pool.ra_total = total;
    if (!base) return;
    /* the start of the last part of an even split, which plan_parts hands that worker */
    const int nthreads = pool.nworkers + 1;
    const int64_t from = total * (nthreads - 1) / nthreads / 64 * 64, len = total - from;
    atomic_store_explicit(&pool.ra_len, len < READ_AHEAD_BYTES ? len : READ_AHEAD_BYTES, memory_order_relaxed);
    atomic_store_explicit(&pool.ra_done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.ra_start, (const uint8_t *)base + from, memory_order_relaxed);
    atomic_fetch_add(&pool.ra_gen, 1);
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg; /* 1..nworkers; the caller is thread 0 */
    unsigned long seen = pool.start_gen; /* not the current gen: a job may already be posted */
    for (;;) {
        unsigned long g;
        int64_t t0 = now_ns();
        for (unsigned spins = 1;; spins++) {
            g = atomic_load_explicit(&pool.gen, memory_order_acquire);
            if (g != seen) break;
            if (id == atomic_load_explicit(&pool.nworkers, memory_order_relaxed) && read_ahead_step()) continue;
            CPU_RELAX();
            if ((spins & 255) == 0 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&pool.lock);
                while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen)
                    pthread_cond_wait(&pool.wake, &pool.lock);
                pthread_mutex_unlock(&pool.lock);
                break;
            }
        }
        seen = g;
        if (atomic_load_explicit(&pool.stop, memory_order_acquire)) break;
        if (id < pool.nparts) run_part(id);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* Post a job (or a stop) to all workers; call_lock held. */
static void post(void) {
    atomic_store_explicit(&pool.pending, pool.nworkers, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
}

static void wait_done(void) {
    for (unsigned spins = 1; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spins++) {
        CPU_RELAX();
        if ((spins & 4095) == 0) sched_yield(); /* a descheduled worker needs this core */
    }
}

static void stop_workers(void) {
    if (pool.nworkers == 0) {
        pool.started = 0;
        return;
    }
    atomic_store_explicit(&pool.stop, 1, memory_order_release);
    post();
    for (int w = 1; w <= pool.nworkers; w++) pthread_join(pool.tids[w], NULL);
    atomic_store_explicit(&pool.stop, 0, memory_order_relaxed);
    pool.nworkers = 0;
    pool.started = 0;
    set_read_target(NULL, 0);
}

/* In a forked child the workers no longer exist: forget them; the next job starts new ones. */
static void atfork_prepare(void) { pthread_mutex_lock(&pool.call_lock); }
static void atfork_parent(void) { pthread_mutex_unlock(&pool.call_lock); }
static void atfork_child(void) {
    pthread_mutex_init(&pool.call_lock, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.nworkers = 0;
    pool.started = 0;
    atomic_store(&pool.pending, 0);
    atomic_store(&pool.stop, 0);
    atomic_store(&pool.ra_start, NULL);
    atomic_store(&pool.ra_busy, 0);
    pool.ra_base = NULL;
}
static void register_atfork(void) { pthread_atfork(atfork_prepare, atfork_parent, atfork_child); }

/* Starts want - 1 workers; call_lock held. If the OS refuses some, run with those that started. */
static void start_workers(void) {
    pthread_once(&atfork_once, register_atfork);
    int started = 0;
    pool.start_gen = atomic_load(&pool.gen);
    for (int w = 1; w < pool.want; w++) {
        if (pthread_create(&pool.tids[w], NULL, worker, (void *)(intptr_t)w) != 0) break;
        started++;
    }
    pool.nworkers = started;
    pool.started = pool.want;
}

int tl_set_threads(int n) {
    if (n < 1 || n > TL_MAX_THREADS) return TL_ETHREADS;
    pthread_mutex_lock(&pool.call_lock);
    if (n != pool.want) {
        stop_workers();
        pool.want = n;
    }
    pthread_mutex_unlock(&pool.call_lock);
    return TL_OK;
}

int tl_get_threads(void) { return atomic_load(&pool.want); }

/* The calling thread's read-ahead hint for its next job: the weights it reads and those read after it. */
static _Thread_local struct {
    const void *cur, *next;
    int64_t next_bytes;
} hint;

void tl_set_read_ahead(const void *cur, const void *next, int64_t next_bytes) {
    hint.cur = cur;
    hint.next = next;
    hint.next_bytes = next ? next_bytes : 0;
}

int tl_reads_ahead(const void *next) {
    pthread_mutex_lock(&pool.call_lock);
    const int yes = next && pool.ra_base == (const uint8_t *)next;
    pthread_mutex_unlock(&pool.call_lock);
    return yes;
}

int tl_parallel_for(int64_t n_items, int64_t grain, int balanced, tl_range_fn fn, void *ctx) {
    if (n_items <= 0) return TL_OK;
    if (grain < 1) grain = 1;
    if ((n_items + grain - 1) / grain > INT32_MAX) grain = (n_items + INT32_MAX - 1) / INT32_MAX; /* 32-bit halves */
    const int64_t units = (n_items + grain - 1) / grain;
    if (atomic_load_explicit(&pool.want, memory_order_relaxed) == 1 || units == 1) {
        fn(ctx, 0, n_items);
        return TL_OK;
    }
    pthread_mutex_lock(&pool.call_lock);
    if (pool.started != pool.want) {
        stop_workers();
        start_workers();
    }
    pool.fn = fn;
    pool.ctx = ctx;
    pool.n_items = n_items;
    pool.grain = grain;
    pool.balanced = balanced;
    pool.nparts = (int)(units < pool.nworkers + 1 ? units : pool.nworkers + 1);
    /* A job reading the target uses what was read ahead; it, or a job naming a new target, stops the reader. */
    int64_t ahead = 0;
    if (pool.ra_base && (const uint8_t *)hint.cur == pool.ra_base && pool.nparts == pool.nworkers + 1)
        ahead = atomic_load_explicit(&pool.ra_done, memory_order_relaxed) * n_items / pool.ra_total / grain;
    if (pool.ra_base && (hint.next || (const uint8_t *)hint.cur == pool.ra_base)) stop_reading();
    plan_parts(units, pool.nparts, ahead);
    if (pool.nworkers > 0) post();
    run_part(0);
    wait_done();
    if (hint.next && pool.nworkers > 0)
        set_read_target(hint.next, hint.next_bytes);
    pthread_mutex_unlock(&pool.call_lock);
    return TL_OK;
}

/* ---- per-thread scratch buffers, grown as needed and freed when the thread exits ---- */

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
typedef struct {
    size_t size[TL_SCRATCH_KINDS];
    void *p[TL_SCRATCH_KINDS];
} scratch;

static void scratch_free(void *arg) {
    scratch *s = arg;
    for (int i = 0; i < TL_SCRATCH_KINDS; i++) free(s->p[i]);
    free(s);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

void *tl_scratch(int kind, size_t size) {
    pthread_once(&scratch_once, scratch_init);
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            return NULL;
        }
    }
    if (s->size[kind] < size) {
        free(s->p[kind]);
        s->size[kind] = 0;
        s->p[kind] = aligned_alloc(64, (size + 63) / 64 * 64);
        if (!s->p[kind]) return NULL;
        s->size[kind] = size;
    }
    return s->p[kind];
}
