# The I/O task table entry, as bpf/monitor.c reads it (struct drb_task).
# The user side writes an entry before it publishes the request that uses
# the slot and clears it when it reaps the response; the sequence field is
# odd while it writes, so the monitor never acts on a half-written entry.
from libc.stdint cimport uint32_t, uint64_t
from includes.atomic cimport drb_store_relaxed, drb_store_release, drb_fence_release

cdef enum:
    DRB_TASK_ACTIVE = 1
    DRB_HIST_BUCKETS = 64


cdef struct drb_task:
    uint32_t seq
    uint32_t state
    uint32_t op
    uint32_t len
    uint64_t offset
    uint64_t post_ns
    uint64_t submit_ns        # written by the monitor's program


cdef inline void task_post(drb_task *t, uint32_t op, uint32_t length, uint64_t offset,
                           uint64_t now) noexcept nogil:
    cdef uint32_t s = t.seq
    drb_store_relaxed(&t.seq, s + 1)
    drb_fence_release()
    t.state = DRB_TASK_ACTIVE
    t.op = op
    t.len = length
    t.offset = offset
    t.post_ns = now
    drb_store_release(&t.seq, s + 2)


cdef inline void task_clear(drb_task *t) noexcept nogil:
    cdef uint32_t s = t.seq
    drb_store_relaxed(&t.seq, s + 1)
    drb_fence_release()
    t.state = 0
    drb_store_release(&t.seq, s + 2)


cdef inline uint32_t log2_bucket(uint64_t v) noexcept nogil:
    """bpftrace's hist() numbering: 1 for 0, k+2 for [2^k, 2^(k+1))."""
    if v == 0:
        return 1
    return <uint32_t>(64 - __builtin_clzll(v)) + 1


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef inline void task_reaped(drb_task *t, uint64_t *hist, uint64_t now) noexcept nogil:
    """Count the post->reap latency (microseconds) in the user side's own
    histogram; the caller then clears or re-posts the entry."""
    cdef uint64_t b
    # Only an active task was posted (a flush has no task): nothing else to count.
    if hist != NULL and t.state == DRB_TASK_ACTIVE and now > t.post_ns:
        b = log2_bucket((now - t.post_ns) // 1000)
        if b < DRB_HIST_BUCKETS:
            hist[b] += 1
