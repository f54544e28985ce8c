/* A team barrier for threads that work on one job step by step (rnn.pyx's column split: the
 * threads of a team each own some hidden units and meet once per time step).
 *
 * Generation counting: each arriving thread reads the generation, then counts itself in; the
 * last one resets the count and starts the next generation, which releases the others.  The
 * waiters spin (a step takes microseconds, a sleep far longer), then yield the core, so a
 * machine with more threads than cores still makes progress.  The team size is an argument
 * of every wait, so every member passes the same number and no state has to be set up per
 * team: a zeroed ss_barrier is ready.  `failed` lets one member tell the others (after the
 * next wait) that it could not get its scratch memory, so no one waits for it forever.
 *
 * Step flags (ss_team_step): the column split's per-step meeting is point to point instead.
 * Each member publishes the number of its arrivals (a release store to its own cache line:
 * "my part of h for this step is written") and waits until every partner's count reaches its
 * own (acquire loads).  No shared counter is updated by every member each step, and a member
 * reads a partner's line once it changed instead of a generation the last arrival writes after
 * the count.  With h double-buffered this is also enough for the buffer a member writes next:
 * a partner whose count reached this arrival has finished the step that read that buffer.
 *
 * Hand-over: a member whose partner is not running (another process took its core) would wait
 * for it every step -- a time slice of the scheduler, milliseconds, for a step of
 * microseconds.  A member that loses time in the team (it waited SS_SLOW_NS at once, or longer
 * in all than it would take to do its partners' work: ss_team_loses) asks for a hand-over; a
 * member arriving at this or the next step -- running, unlike a waiter, which may have lost
 * its core -- takes the job: it records itself and the arrival in the barrier before it
 * publishes its count, so every member reads the same decision after waiting for the same
 * arrival (the grants of one arrival all precede every count of it; a later arrival's grant is
 * made only by members that decided to go on, i.e. saw none).  The owner then does every
 * member's work (the same arithmetic, so the same bits) and the others leave.  A call that
 * needed a hand-over makes the automatic rule run the next calls on one thread for a while
 * (ss_split_paused / ss_split_outcome): the first stall of a call is not avoidable. */
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
#include <time.h>
#define ss_yield() sched_yield()
#endif

#if defined(__GNUC__) || defined(__clang__)
#define SS_FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)
#define SS_LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define SS_STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define SS_LOAD64 SS_LOAD
#define SS_STORE64 SS_STORE
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
#define SS_LOAD64(p) InterlockedCompareExchange64((p), 0, 0)
#define SS_STORE64(p, v) ((void)InterlockedExchange64((p), (v)))
#define ss_pause() YieldProcessor()
#else
#error "statescan needs GCC/Clang atomics or MSVC Interlocked functions for its barrier"
#endif

/* spins before yielding: some microseconds, a few time steps of a small recurrence */
#define SS_BARRIER_SPINS 2000
/* a wait this long (ns) means a member is not running, not just slower: a scheduler's time
 * slice is milliseconds, a step's imbalance or an interrupt some microseconds; also the
 * slack of ss_team_loses.  Long steps (a large model: 300-800 us at H = 1024) raise it to
 * twice the member's mean step, or an ordinary imbalance looked like a lost core. */
#define SS_SLOW_NS 200000LL
/* the same before the first step, where a partner may be waking up: an OpenMP thread that
 * slept since the last parallel region took over 200 us to start in this VM now and then
 * (2-3 hand-overs in 20 calls of 40 steps at H = 1024 on an idle machine) */
#define SS_FIRST_SLOW_NS 2000000LL
/* how long (ns) the automatic rule keeps a sequence on one thread after a hand-over: doubled
 * after each call that needed one again, halved after each call that did not (one lucky call
 * on a busy machine does not restart the stalls; a quiet machine is back in a few calls) */
#define SS_PAUSE_MIN_NS 10000000LL
#define SS_PAUSE_MAX_NS 1000000000LL

typedef struct {
    volatile long count;       /* threads arrived in this generation */
    volatile long generation;
    volatile long failed;
    volatile long request;     /* 0: none; -1: a member loses time; m + 1: a test asks for m */
    volatile long solo;        /* member + 1 running the job alone from arrival solo_at on */
    volatile long solo_at;
    volatile long slow;        /* 1: a member lost time in the team (the machine is busy) */
    char pad[64 - 7 * sizeof(long)];   /* one cache line per barrier: teams do not share one */
} ss_barrier;

/* a member's arrivals at ss_team_step, alone on its cache line: its partners spin on it */
typedef struct {
    volatile long arrived;
    char pad[64 - sizeof(long)];
} ss_step_flag;

static inline long long ss_now_ns(void) {
#if defined(_WIN32)
    LARGE_INTEGER f, c;
    QueryPerformanceFrequency(&f);
    QueryPerformanceCounter(&c);
    return (long long)((double)c.QuadPart * 1e9 / (double)f.QuadPart);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
#endif
}

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

/* A member's clock for the hand-over rule: time (ns) spent working and waiting so far.  The
 * clock is read only in waits that last (a reading costs ~80 ns in a VM, a balanced step's wait
 * less): a short wait counts as work, which only makes the rule a little slower to ask. */
typedef struct {
    long long last;     /* the clock's last reading, all time before it is counted */
    long long worked, waited;
    long long waits;    /* waits done (0: the next one precedes the first step) */
} ss_member_clock;

/* spins between two readings of the clock (a pause is some to ~50 ns); once yielding, every
 * time (a yield may give the core away for a time slice) */
#define SS_CLOCK_SPINS 64
/* spins before a wait first reads the clock: a wait shorter than this (about 0.2-5 us) does
 * not pay for two readings */
#define SS_CLOCK_FIRST 256

/* 1: this member had better run the job alone.  Alone it would do the whole step, about
 * `alone` times its own part (D / its units), so it loses time in the team when its waiting
 * exceeds (alone - 1) times its working, beyond a slack for a partner that starts late
 * (waking a thread) -- or when one wait alone is a scheduler's time slice. */
static inline int ss_team_loses(const ss_member_clock* c, long long now, long long since,
                                double alone) {
    long long wait = now - since, slow = SS_FIRST_SLOW_NS;
    if (c->waits > 0) {
        slow = 2 * c->worked / c->waits;        /* twice the mean step so far */
        slow = slow > SS_SLOW_NS ? slow : SS_SLOW_NS;
    }
    return wait > slow
        || (double)(c->waited + wait) > (alone - 1.0) * (double)c->worked + (double)slow;
}

/* Arrival number `arrival` (1, 2, ...) of member `member` of `team`, whose counts are
 * flags[0 .. team): publish it, wait for every partner's, and ask for a hand-over when this
 * member loses time in the team (ss_team_loses).  `ask` (a test's forced hand-over): 0, or a
 * request made on arrival: -1 as under load, m + 1 for member m to take the job.  Returns the
 * member that runs the job alone from now on, or -1 (the team goes on). */
static inline long ss_team_step(ss_barrier* b, ss_step_flag* flags, long team, long member,
                                long arrival, long ask, ss_member_clock* c, double alone) {
    long p, spins = 0, req, at;
    long long now, since = 0;
    int asked = 0;
    if (team <= 1)
        return -1;
    if (ask)
        SS_STORE(&b->request, ask);
    req = SS_LOAD(&b->request);
    if (req) {                  /* the job goes to this member, which is running, not to the */
        SS_STORE(&b->solo, req > 0 ? req : member + 1);   /* waiter that asked: it may not be */
        SS_STORE(&b->solo_at, arrival);
    }
    SS_STORE(&flags[member].arrived, arrival);
    for (p = 0; p < team; p++) {
        while (SS_LOAD(&flags[p].arrived) < arrival) {
            spins++;
            if (spins == SS_CLOCK_FIRST) {
                since = ss_now_ns();
                c->worked += since - c->last;
            } else if (spins > SS_CLOCK_FIRST && !asked
                       && (spins > SS_BARRIER_SPINS || spins % SS_CLOCK_SPINS == 0)
                       && ss_team_loses(c, ss_now_ns(), since, alone)) {
                SS_STORE(&b->slow, 1);
                SS_STORE(&b->request, -1L);      /* granted at this or the next arrival */
                asked = 1;
            }
            if (spins < SS_BARRIER_SPINS)
                ss_pause();
            else        /* a member is not running (more threads than free cores): let it */
                ss_yield();
        }
    }
    if (spins >= SS_CLOCK_FIRST) {
        now = ss_now_ns();
        if (c->waits > 0)       /* a partner waking up is not time the team loses */
            c->waited += now - since;
        c->last = now;
    }
    c->waits++;
    at = SS_LOAD(&b->solo_at);  /* solo is read only for a grant made at this arrival */
    return at > 0 && at <= arrival ? SS_LOAD(&b->solo) - 1 : -1;
}

/* The automatic rule's memory of hand-overs, shared by every call of the process (a race
 * between two calls only misjudges one pause: the bits never depend on it). */
static volatile long long ss_split_until = 0, ss_split_pause = 0;

/* 1: a recent call needed a hand-over, run this one on one thread */
static inline int ss_split_paused(void) {
    return SS_LOAD64(&ss_split_pause) > 0 && ss_now_ns() < SS_LOAD64(&ss_split_until);
}

/* after a call of the column split: `busy` = a member lost time in the team */
static inline void ss_split_outcome(int busy) {
    long long pause = SS_LOAD64(&ss_split_pause);
    if (!busy) {
        if (pause)
            SS_STORE64(&ss_split_pause, pause / 2 < SS_PAUSE_MIN_NS ? 0LL : pause / 2);
        return;
    }
    pause *= 2;
    pause = pause < SS_PAUSE_MIN_NS ? SS_PAUSE_MIN_NS
            : pause > SS_PAUSE_MAX_NS ? SS_PAUSE_MAX_NS : pause;
    SS_STORE64(&ss_split_pause, pause);
    SS_STORE64(&ss_split_until, ss_now_ns() + pause);
}

/* a test's reset of that memory */
static inline void ss_split_forget(void) { SS_STORE64(&ss_split_pause, 0LL); }

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
