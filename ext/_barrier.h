/* A team barrier for threads that work on one job step by step (rnn.pyx's column split: the
 * threads of a team each own some hidden units and meet once per time step).
 *
 * Generation counting: each arriving thread reads the generation, then counts itself in; the
 * last one resets the count and starts the next generation, which releases the others.  The
 * waiters spin (a step takes microseconds, a sleep far longer), then yield the core, so a
 * machine with more threads than cores still makes progress.  The team size is an argument
 * of every wait, so every member passes the same number and no state has to be set up per
 * team: a zeroed ss_barrier is ready.  `failed` lets one member tell the others (after the
 * next wait) that it could not get its scratch memory, so no one waits for it forever. */
#ifndef STATESCAN_BARRIER_H
#define STATESCAN_BARRIER_H

#if defined(_OPENMP)
#include <omp.h>
#endif

#if defined(_WIN32)
#include <windows.h>
#define ss_yield() SwitchToThread()
#else
#include <sched.h>
#define ss_yield() sched_yield()
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SS_FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)
#define SS_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define SS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#if defined(__x86_64__) || defined(__i386__)
#define ss_pause() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define ss_pause() __asm__ __volatile__("yield")
#else
#define ss_pause() ((void)0)
#endif
#elif defined(_MSC_VER)
#define SS_FETCH_ADD(p, v) InterlockedExchangeAdd((p), (v))
#define SS_LOAD(p) InterlockedCompareExchange((p), 0, 0)
#define SS_STORE(p, v) ((void)InterlockedExchange((p), (v)))
#define ss_pause() YieldProcessor()
#else
#error "statescan needs GCC/Clang atomics or MSVC Interlocked functions for its barrier"
#endif

/* spins before yielding: some microseconds, a few time steps of a small recurrence */
#define SS_BARRIER_SPINS 2000

typedef struct {
    volatile long count;       /* threads arrived in this generation */
    volatile long generation;
    volatile long failed;
    char pad[64 - 3 * sizeof(long)];   /* one cache line per barrier: teams do not share one */
} ss_barrier;

static inline void ss_barrier_wait(ss_barrier* b, long team) {
    long gen, spins = 0;
    if (team <= 1)
        return;
    gen = SS_LOAD(&b->generation);
    if (SS_FETCH_ADD(&b->count, 1) == team - 1) {
        SS_STORE(&b->count, 0);                 /* before the release: no one re-enters early */
        SS_STORE(&b->generation, gen + 1);
        return;
    }
    while (SS_LOAD(&b->generation) == gen) {
        if (spins < SS_BARRIER_SPINS) {
            spins++;
            ss_pause();
        } else {        /* a member is not running (more threads than free cores): let it */
            ss_yield();
        }
    }
}

static inline void ss_barrier_fail(ss_barrier* b) { SS_STORE(&b->failed, 1); }
/* meaningful after a wait that follows every member's ss_barrier_fail */
static inline int ss_barrier_failed(ss_barrier* b) { return SS_LOAD(&b->failed) != 0; }

/* the actual team of the enclosing parallel region (OpenMP may give fewer than requested) */
static inline int ss_region_threads(void) {
#if defined(_OPENMP)
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static inline int ss_region_thread(void) {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#endif
