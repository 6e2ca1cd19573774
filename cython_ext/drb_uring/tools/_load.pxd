# The one workload loop's view of a transport (drb_uring.tools._load): the
# double ring and every baseline implement these four calls, so a benchmark
# ratio compares mechanisms and never two loops.
from libc.stdint cimport uint32_t, uint64_t, int64_t


cdef struct io_done:
    uint32_t slot
    int64_t res


cdef class Transport:
    cdef readonly uint32_t slot_count
    cdef readonly uint32_t slot_size
    cdef readonly uint32_t depth        # most requests in flight at once
    cdef char *pool                     # slot_count * slot_size bytes, the user's buffers

    # Stage request number k of this batch: `bs` bytes at device offset
    # `off` into (or from) buffer `slot`.
    cdef int post(self, uint32_t k, uint32_t slot, int opcode, uint32_t bs, uint64_t off,
                  uint64_t now) noexcept nogil
    # Hand the k staged requests to the driver side (k may be 0: a chance
    # to wake the peer after responses were consumed). 0 or -errno.
    cdef int64_t publish(self, uint32_t k) noexcept nogil
    # Wait for at least one response; copy up to `cap` of them to `out`.
    # Count, or -errno, or ERR_TIMEOUT.
    cdef int64_t wait(self, io_done *out, uint32_t cap, uint64_t timeout_ns) noexcept nogil
    # The response for `slot` was consumed: may the slot be used again? 0 or -errno.
    cdef int64_t release(self, uint32_t slot, uint64_t now) noexcept nogil
