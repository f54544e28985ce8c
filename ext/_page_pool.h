/* Blocks in transparent huge pages for a call's packed weights and large buffers, kept for
 * the next call when freed (Linux; elsewhere plain malloc and free).
 *
 * ss_huge_alloc(nbytes, from): from `from` bytes up, a 2 MiB-aligned block of whole huge
 * pages with the huge-page advice (a hint, failure ignored); below, malloc.  A packed weight
 * matrix is then physically contiguous and fills the cache sets evenly: in 4 KiB pages of
 * random colours a 1 MB R beside a 1 MB W (H = 256) overfilled some sets of a 2 MiB L2 in
 * some processes and not in others (B = 1 lstm, 1 thread: 10.5 or 14.5 us/step, by process).
 *
 * The price of fresh huge pages is that the kernel zeroes them at first touch, in every call:
 * 2 MiB per page, ~8% of a B = 1 H = 256 call's samples on two threads.  So ss_huge_free
 * keeps freed huge blocks (up to SS_POOL_IDLE_BYTES in all) and ss_huge_alloc hands one out
 * again when it fits (at most twice the size asked for, so a small request does not hold a
 * large block another call needs): its pages are already mapped.  Every block of
 * ss_huge_alloc must be freed with ss_huge_free (it also frees malloc's blocks).  A block
 * comes back with whatever the previous call left in it, like any malloc block.
 *
 * The table of blocks (SS_POOL_SLOTS: idle ones, and the ones in use, whose size ss_huge_free
 * must know) has a spin lock: calls from several Python threads release the GIL.  A block
 * allocated while the table is full of blocks in use is not tracked and is freed as usual.
 * Idle blocks go back to the system at exit, or, oldest first, when the idle bytes would
 * exceed the bound. */
#ifndef STATESCAN_PAGE_POOL_H
#define STATESCAN_PAGE_POOL_H

#include <stdlib.h>
#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#endif

#define SS_HUGE_BYTES ((size_t)2 << 20)

#if defined(__linux__) && defined(MADV_HUGEPAGE) && (defined(__GNUC__) || defined(__clang__))
#define SS_POOL_SLOTS 64
#define SS_POOL_IDLE_BYTES ((size_t)64 << 20)

typedef struct {
    void* p;                /* NULL: a free slot */
    size_t bytes;
    int idle;               /* 1: in the pool, 0: in use by a call */
    unsigned long long freed;   /* when it became idle (a count of frees): the oldest goes */
} ss_pool_entry;

static ss_pool_entry ss_pool[SS_POOL_SLOTS];
static size_t ss_pool_idle_bytes = 0;
static unsigned long long ss_pool_frees = 0;
static int ss_pool_lock_word = 0;
static int ss_pool_at_exit = 0;

static inline void ss_pool_lock(void) {
    while (__atomic_exchange_n(&ss_pool_lock_word, 1, __ATOMIC_ACQUIRE))
        while (__atomic_load_n(&ss_pool_lock_word, __ATOMIC_RELAXED))
            sched_yield();      /* the holder only scans 64 slots, or frees a block */
}

static inline void ss_pool_unlock(void) { __atomic_store_n(&ss_pool_lock_word, 0, __ATOMIC_RELEASE); }

/* the oldest idle block's slot, or -1 (lock held) */
static int ss_pool_oldest(void) {
    int i, old = -1;
    for (i = 0; i < SS_POOL_SLOTS; i++)
        if (ss_pool[i].p && ss_pool[i].idle && (old < 0 || ss_pool[i].freed < ss_pool[old].freed))
            old = i;
    return old;
}

/* give slot i's idle block back to the system (lock held) */
static void ss_pool_drop(int i) {
    ss_pool_idle_bytes -= ss_pool[i].bytes;
    free(ss_pool[i].p);
    ss_pool[i].p = NULL;
}

static void ss_pool_release(void) {
    int i;
    ss_pool_lock();
    for (i = 0; i < SS_POOL_SLOTS; i++)
        if (ss_pool[i].p && ss_pool[i].idle)
            ss_pool_drop(i);
    ss_pool_unlock();
}

static void* ss_huge_alloc(size_t nbytes, size_t from) {
    void* p = NULL;
    size_t whole;
    int i, fit = -1, slot = -1;
    if (nbytes < from)
        return malloc(nbytes > 0 ? nbytes : 1);
    whole = (nbytes + SS_HUGE_BYTES - 1) & ~(SS_HUGE_BYTES - 1);
    ss_pool_lock();
    for (i = 0; i < SS_POOL_SLOTS; i++)     /* the smallest idle block that fits */
        if (ss_pool[i].p && ss_pool[i].idle && ss_pool[i].bytes >= whole
                && ss_pool[i].bytes <= 2 * whole
                && (fit < 0 || ss_pool[i].bytes < ss_pool[fit].bytes))
            fit = i;
    if (fit >= 0) {
        ss_pool[fit].idle = 0;
        ss_pool_idle_bytes -= ss_pool[fit].bytes;
        p = ss_pool[fit].p;
    }
    ss_pool_unlock();
    if (p)
        return p;
    if (posix_memalign(&p, SS_HUGE_BYTES, whole) != 0)
        return NULL;
    madvise(p, whole, MADV_HUGEPAGE);
    ss_pool_lock();
    for (i = 0; i < SS_POOL_SLOTS && slot < 0; i++)
        if (!ss_pool[i].p)
            slot = i;
    if (slot < 0 && (slot = ss_pool_oldest()) >= 0)     /* full: an idle block makes room */
        ss_pool_drop(slot);
    if (slot >= 0) {
        ss_pool[slot].p = p;
        ss_pool[slot].bytes = whole;
        ss_pool[slot].idle = 0;
        if (!ss_pool_at_exit)
            ss_pool_at_exit = atexit(ss_pool_release) == 0;
    }
    ss_pool_unlock();
    return p;
}

static void ss_huge_free(void* p) {
    int i, slot = -1, old;
    if (!p)
        return;
    ss_pool_lock();
    for (i = 0; i < SS_POOL_SLOTS && slot < 0; i++)
        if (ss_pool[i].p == p)
            slot = i;
    if (slot >= 0 && ss_pool[slot].bytes > SS_POOL_IDLE_BYTES) {
        ss_pool[slot].p = NULL;         /* too large to keep: freed below */
        slot = -1;
    }
    if (slot < 0) {
        ss_pool_unlock();
        free(p);
        return;
    }
    while (ss_pool_idle_bytes + ss_pool[slot].bytes > SS_POOL_IDLE_BYTES
           && (old = ss_pool_oldest()) >= 0)
        ss_pool_drop(old);
    ss_pool[slot].idle = 1;
    ss_pool[slot].freed = ++ss_pool_frees;
    ss_pool_idle_bytes += ss_pool[slot].bytes;
    ss_pool_unlock();
}

/* idle blocks and their bytes, blocks in use, the bound on idle bytes (tests) */
static void ss_pool_state(long long* idle, long long* idle_bytes, long long* used,
                          long long* bound) {
    int i;
    *idle = *idle_bytes = *used = 0;
    *bound = (long long)SS_POOL_IDLE_BYTES;
    ss_pool_lock();
    for (i = 0; i < SS_POOL_SLOTS; i++)
        if (ss_pool[i].p) {
            if (ss_pool[i].idle) {
                (*idle)++;
                *idle_bytes += (long long)ss_pool[i].bytes;
            } else {
                (*used)++;
            }
        }
    ss_pool_unlock();
}
#else
static void* ss_huge_alloc(size_t nbytes, size_t from) {
    (void)from;
    return malloc(nbytes > 0 ? nbytes : 1);
}
static void ss_huge_free(void* p) { free(p); }
static void ss_pool_release(void) {}
static void ss_pool_state(long long* idle, long long* idle_bytes, long long* used,
                          long long* bound) {
    *idle = *idle_bytes = *used = *bound = 0;
}
#endif

#endif
