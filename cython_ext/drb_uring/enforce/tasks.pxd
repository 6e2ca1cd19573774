# The I/O task table entry and its constants, declared from the contract
# header bpf/drb_task.h (their only definition). The user side writes an
# entry before it publishes the request that uses the slot and clears it
# when it reaps the response; the sequence field is odd while it writes, so
# the monitor's program never acts on a half-written entry.
from libc.stdint cimport uint32_t, uint64_t
from drb_uring.includes.atomic cimport (drb_store_relaxed, drb_store_release, drb_fence_release,
                                        drb_fence, drb_load_relaxed)

cdef extern from "drb_task.h" nogil:
    enum:
        DRB_TASK_VERSION
        DRB_MAX_SLOTS
        DRB_TASK_EXTRA
        DRB_HIST_BUCKETS
        DRB_TASK_ACTIVE
        DRB_OP_FSYNC
        DRB_OP_READ_FIXED
        DRB_OP_WRITE_FIXED
        DRB_STATUS_ENTRY

    enum drb_reason:
        DRB_R_NONE
        DRB_R_OPCODE
        DRB_R_SLOT
        DRB_R_TASK_INACTIVE
        DRB_R_TORN
        DRB_R_OP_MISMATCH
        DRB_R_BUF_RANGE
        DRB_R_LEN_MISMATCH
        DRB_R_EXTENT
        DRB_R_OFFSET_MISMATCH
        DRB_R_REGISTER
        DRB_R_REFUSED
        DRB_R_OVERFLOW
        DRB_R_FLAGS
        DRB_R_CLOSED
        DRB_R_COUNT

    struct drb_task:
        uint32_t seq
        uint32_t state
        uint32_t op
        uint32_t len
        uint64_t offset
        uint64_t post_ns
        uint64_t submit_ns
        uint32_t inflight
        uint32_t moved

    uint32_t drb_log2_bucket(uint64_t v)


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


cdef inline void task_reaped(drb_task *t, uint64_t *hist, uint64_t now) noexcept nogil:
    """Count the post->reap latency (microseconds) in the user side's own
    histogram; the caller then clears or re-posts the entry."""
    cdef uint64_t b
    # Only an active task was posted (a flush has none): nothing else to count.
    if hist != NULL and t.state == DRB_TASK_ACTIVE and now > t.post_ns:
        b = drb_log2_bucket((now - t.post_ns) // 1000)
        if b < DRB_HIST_BUCKETS:
            hist[b] += 1


cdef inline uint32_t task_release(drb_task *t) noexcept nogil:
    """Revoke the slot's task and return how many requests on the slot the
    kernel still has: the monitor's program counts them at submission and
    completion. The fence orders the clear before the read, against the
    program's count-then-read (a Dekker pair): either the program sees the
    task cleared, or we see its count. Non-zero means the worker answered
    before the kernel finished with the slot, and the slot must not be
    reused."""
    task_clear(t)
    drb_fence()
    return drb_load_relaxed(&t.inflight)


cdef inline uint32_t task_moved(drb_task *t) noexcept nogil:
    """Bytes the kernel's successful completions on the slot moved, ever
    (wraps), as the program counted them."""
    drb_fence()
    return drb_load_relaxed(&t.moved)


cdef inline uint32_t task_table_failed(drb_task *table) noexcept nogil:
    """The drb_reason of the channel's first violation, or 0. The fence
    orders the caller's earlier reads of slot data before this read."""
    drb_fence()
    return drb_load_relaxed(&table[DRB_STATUS_ENTRY].state)
