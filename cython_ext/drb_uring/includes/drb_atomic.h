/*
 * Atomics and small primitives for the shared rings.
 *
 * The rings are single-producer/single-consumer with free-running 32-bit
 * indexes. Each index has exactly one writer (its owner) and one reader
 * (the peer), so plain loads and stores with the right ordering suffice:
 *
 *   producer: write entries, then store-release tail
 *   consumer: load-acquire tail, then read entries
 *   consumer: read entries, then store-release head
 *   producer: load-acquire head, then overwrite entries
 *
 * The sleep/wake protocol is a Dekker pattern and needs store->load
 * ordering, which acquire/release do not give; see drb_fence().
 */
#ifndef DRB_ATOMIC_H
#define DRB_ATOMIC_H

#include <stdint.h>
#include <time.h>

/* Acquire: everything the peer wrote before publishing this index is
 * visible once we have seen the index. */
static inline uint32_t drb_load_acquire(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

/* Release: our entry writes (producer) or entry reads (consumer) are
 * complete before the peer can observe the new index. */
static inline void drb_store_release(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Flags words carry no data dependency of their own; the fence below
 * orders them. */
static inline uint32_t drb_load_relaxed(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void drb_store_relaxed(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t drb_load_relaxed64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void drb_store_relaxed64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* Full barrier for the wake-up handshake.  The sleeper does
 *     store NEED_WAKEUP; fence; load peer index
 * and the waker does
 *     store index;       fence; load NEED_WAKEUP
 * so at least one side sees the other's store: either the sleeper sees the
 * new index and does not sleep, or the waker sees the flag and signals.
 * Without the fence both loads could be satisfied before the stores leave
 * the store buffer (x86 allows store->load reordering) and a wake-up is lost. */
static inline void drb_fence(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Store->store ordering for the task table's sequence field: the odd
 * sequence must be visible before the fields change, the fields before the
 * even sequence. A compiler barrier on x86 (TSO), a real fence elsewhere. */
static inline void drb_fence_release(void)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

/* Spin-loop hint: lets the sibling hyperthread run and avoids the memory
 * order mis-speculation penalty when the line finally changes. */
static inline void drb_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* CLOCK_MONOTONIC is what bpf_ktime_get_ns() reads, so timestamps taken
 * here compare directly with those taken by the eBPF monitor. It is a vDSO
 * call: no system call. */
static inline uint64_t drb_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#endif /* DRB_ATOMIC_H */
