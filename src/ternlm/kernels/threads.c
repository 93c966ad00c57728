/* A tiny persistent thread pool for row-parallel kernels.
 *
 * Decode calls a kernel ~200 times per token, so a call must cost microseconds: workers are created
 * once, spin briefly on a generation counter after each job (the next call usually follows within
 * tens of microseconds), then sleep on a condition variable. Every worker acknowledges every job,
 * so the job descriptor is never rewritten while a late worker could still be reading it. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#include "ternary.h"

#define SPIN_NS 200000 /* how long an idle worker spins before sleeping */

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
    int nworkers; /* running workers (want - 1 once started, fewer if the OS refused some) */
    int started;  /* the want the running workers were started for; 0 = none */
    unsigned long start_gen; /* gen when the workers were created: jobs after it are theirs */
    _Atomic unsigned long gen;
    _Atomic int pending;
    _Atomic int stop;
    /* current job, written by the caller before gen is bumped */
    tl_range_fn fn;
    void *ctx;
    int64_t n_items, grain;
    int nparts;
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

/* Part p of nparts: a contiguous range of items with boundaries on multiples of grain. */
static void run_part(int p) {
    const int64_t units = (pool.n_items + pool.grain - 1) / pool.grain;
    const int64_t u0 = units * p / pool.nparts, u1 = units * (p + 1) / pool.nparts;
    int64_t b = u0 * pool.grain, e = u1 * pool.grain;
    if (e > pool.n_items) e = pool.n_items;
    if (b < e) pool.fn(pool.ctx, b, e);
}

static void *worker(void *arg) {
    const int id = (int)(intptr_t)arg; /* 1..nworkers; the caller is part 0 */
    unsigned long seen = pool.start_gen; /* not the current gen: a job may already be posted */
    for (;;) {
        unsigned long g;
        int64_t t0 = now_ns();
        for (unsigned spins = 1;; spins++) {
            g = atomic_load_explicit(&pool.gen, memory_order_acquire);
            if (g != seen) break;
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

int tl_parallel_for(int64_t n_items, int64_t grain, tl_range_fn fn, void *ctx) {
    if (n_items <= 0) return TL_OK;
    if (grain < 1) grain = 1;
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
    pool.nparts = (int)(units < pool.nworkers + 1 ? units : pool.nworkers + 1);
    if (pool.nworkers > 0) post();
    run_part(0);
    wait_done();
    pthread_mutex_unlock(&pool.call_lock);
    return TL_OK;
}
