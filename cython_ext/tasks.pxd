# The I/O task table entry, as bpf/monitor.c reads it (struct drb_task).
# The user side writes an entry before it publishes the request that uses
# the slot and clears it when it reaps the response; the sequence field is
# odd while it writes, so the monitor never acts on a half-written entry.
from libc.stdint cimport uint32_t, uint64_t
from includes.atomic cimport drb_store_relaxed, drb_store_release, drb_fence_release

cdef enum:
    DRB_TASK_ACTIVE = 1


cdef struct drb_task:
    uint32_t seq
    uint32_t state
    uint32_t op
    uint32_t len
    uint64_t offset
    uint64_t post_ns


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
