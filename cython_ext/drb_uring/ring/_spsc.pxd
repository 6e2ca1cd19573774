# C-level view of the ring ends, for the modules that run per-entry loops
# on them (the ring's benchmark loops, the channel worker, the load generator).
from libc.stdint cimport uint32_t, uint64_t
from drb_uring.ring.spsc cimport drb_prod, drb_cons, drb_waiter
from drb_uring.enforce.tasks cimport drb_task


cdef class RingEnd:
    cdef drb_prod prod
    cdef drb_cons cons
    cdef drb_waiter waiter
    cdef char *ctl_mine
    cdef char *ctl_peer
    cdef char *pool
    cdef size_t mine_size
    cdef size_t peer_size
    cdef size_t pool_size_
    cdef int exports
    cdef readonly object geometry
    cdef readonly bint closed
    cdef object owned_fds
    cdef drb_task *tasks          # the I/O task table, or NULL (no monitor)
    cdef uint32_t ntasks
    cdef uint64_t *reap_hist      # after the entries, in the same map
    cdef object tasks_owner

    cdef void _set_prod(self, char *tail_page, size_t tail_off, char *head_page,
                        size_t head_off, char *entries, uint32_t size, uint32_t esize)
    cdef void _set_cons(self, char *tail_page, size_t tail_off, char *head_page,
                        size_t head_off, const char *entries, uint32_t size, uint32_t esize)
    cdef int _check(self) except -1
    cdef int _check_indexes(self) except -1


cdef class UserEnd(RingEnd):
    pass


cdef class DriverEnd(RingEnd):
    pass
