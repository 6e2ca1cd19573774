# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The channel worker's loop (drb_uring.channel._worker).

Runs in the driver domain, one per channel. It copies each request out of
the shared request ring once, validates every field against private copies
of the channel's limits, turns good ones into fixed-buffer I/O on the grant
ring (many per io_uring_enter), and answers every request, good or bad,
with a response carrying the kernel's result or the exact negative errno of
the check that refused it. The whole loop runs without the GIL.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int32_t
from libc.string cimport memcpy, memset

from drb_uring.includes.atomic cimport drb_store_relaxed, drb_fence, drb_cpu_relax, drb_now_ns
from drb_uring.includes.io_uring cimport (io_uring_sqe, io_uring_cqe, IORING_OP_READ_FIXED,
                                IORING_OP_WRITE_FIXED, IORING_OP_FSYNC, IOSQE_FIXED_FILE)
from drb_uring.includes.liburing cimport (io_uring, io_uring_params, io_uring_queue_mmap,
                                io_uring_queue_exit, io_uring_get_sqe, io_uring_submit,
                                io_uring_peek_batch_cqe, io_uring_cq_advance,
                                io_uring_cq_ready, io_uring_sq_space_left)
from drb_uring.includes.sys cimport (pollfd, ppoll, POLLIN, read, errno, EINTR, EPROTO)
from drb_uring.ring.spsc cimport (prod_space, prod_entry, prod_publish, cons_avail, cons_entry,
                   cons_release, drb_notify, drb_wait_prod, DRB_NEED_WAKEUP)
from drb_uring.ring._spsc cimport DriverEnd

import os

cdef extern from "<errno.h>" nogil:
    int EINVAL
    int EFAULT
    int ERANGE
    int EOPNOTSUPP

cdef extern from "<signal.h>" nogil:
    ctypedef void (*sighandler_t)(int)
    sighandler_t signal(int signum, sighandler_t handler)
    int SIGTERM
    int SIGINT

# Set from a C signal handler: the loop sees it when ppoll returns EINTR.
cdef volatile int g_stop = 0

cdef void _on_stop(int sig) noexcept nogil:
    global g_stop
    g_stop = 1

cdef enum:
    BATCH = 64
    IORING_FSYNC_DATASYNC = 1

# For the broker's restrictions on the grant ring.
FLAG_FIXED_FILE = IOSQE_FIXED_FILE


cdef struct limits:
    uint64_t pool_base        # where the monitor registered slot 0
    uint32_t slot_size
    uint32_t slot_count
    uint64_t extent_base      # on the device; set by the monitor alone
    uint64_t extent_size
    uint32_t align            # 0, or the O_DIRECT alignment


cdef inline int validate(const io_uring_sqe *r, const limits *lim) noexcept nogil:
    """0 if the request may run, else the positive errno that refuses it."""
    if r.opcode == IORING_OP_FSYNC:
        if (r.flags or r.ioprio or r.fd or r.addr or r.len or r.off or r.buf_index
                or r.personality or r.file_index or r.addr3
                or (r.fsync_flags & ~IORING_FSYNC_DATASYNC)):
            return EINVAL
        return 0
    if r.opcode != IORING_OP_READ_FIXED and r.opcode != IORING_OP_WRITE_FIXED:
        return EOPNOTSUPP
    if (r.flags or r.ioprio or r.fd or r.rw_flags or r.personality or r.file_index
            or r.addr3):
        return EINVAL
    if r.len == 0:
        return EINVAL
    if r.buf_index >= lim.slot_count:
        return EFAULT
    if r.addr:
        return EINVAL             # a request starts at its slot's start
    if r.addr > lim.slot_size or r.len > lim.slot_size - r.addr:
        return EFAULT
    if r.off > lim.extent_size or r.len > lim.extent_size - r.off:
        return ERANGE
    if lim.align and ((r.off | r.len | r.addr) & (lim.align - 1)):
        return EINVAL
    return 0


cdef inline void to_grant(io_uring_sqe *g, const io_uring_sqe *r, const limits *lim) noexcept nogil:
    memset(g, 0, sizeof(io_uring_sqe))
    g.opcode = r.opcode
    g.flags = IOSQE_FIXED_FILE
    g.fd = 0                      # fixed file 0: the device
    g.user_data = r.user_data
    if r.opcode == IORING_OP_FSYNC:
        g.fsync_flags = r.fsync_flags
        return
    g.addr = lim.pool_base + <uint64_t>r.buf_index * lim.slot_size + r.addr
    g.len = r.len
    g.off = lim.extent_base + r.off
    g.buf_index = r.buf_index


cdef class WorkerLoop:
    cdef DriverEnd end
    cdef io_uring ring
    cdef bint mapped
    cdef limits lim
    cdef uint32_t cq_cap
    cdef uint32_t inflight
    cdef uint32_t staged        # responses written but not yet published
    cdef public uint64_t served, refused, submits, sleeps

    def __cinit__(self, DriverEnd end, int ring_fd, bytes params, uint64_t pool_base,
                  uint64_t extent_base, uint64_t extent_size, uint32_t align):
        cdef io_uring_params p
        cdef unsigned i
        if len(params) != sizeof(io_uring_params):
            raise ValueError(f"io_uring params must be {sizeof(io_uring_params)} bytes")
        memcpy(&p, <const char *>params, sizeof(p))
        cdef int r = io_uring_queue_mmap(ring_fd, &p, &self.ring)
        if r < 0:
            raise OSError(-r, f"mapping the grant ring: {os.strerror(-r)}")
        self.mapped = True
        # io_uring_queue_mmap (unlike queue_init) leaves the SQ index array
        # as the kernel made it, all zeros: map slot i to SQE i ourselves,
        # or every submission would name SQE 0.
        for i in range(self.ring.sq.kring_entries[0]):
            self.ring.sq.array[i] = i
        self.end = end
        self.cq_cap = p.cq_entries
        self.lim.pool_base = pool_base
        self.lim.slot_size = end.geometry.slot_size
        self.lim.slot_count = end.geometry.slot_count
        self.lim.extent_base = extent_base
        self.lim.extent_size = extent_size
        self.lim.align = align
        if align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")

    def close(self):
        if self.mapped:
            io_uring_queue_exit(&self.ring)
            self.mapped = False

    def __dealloc__(self):
        self.close()

    cdef int respond(self, uint64_t tag, int32_t res) noexcept nogil:
        """Stage one response; publish() makes a batch of them visible at
        once. Returns 0, -EINTR when told to stop while waiting for room,
        or -EPROTO for a corrupt ring."""
        cdef int64_t space = prod_space(&self.end.prod, self.staged + 1)
        cdef io_uring_cqe *c
        while 0 <= space <= self.staged:
            # The user is slow to reap: show it what we have, wait for room.
            self.publish()
            if g_stop:
                return -EINTR
            space = drb_wait_prod(&self.end.waiter, &self.end.prod, 1, 100000000)
        if space < 0:
            return <int>space
        c = <io_uring_cqe *>prod_entry(&self.end.prod, self.staged)
        c.user_data = tag
        c.res = res
        c.flags = 0
        self.staged += 1
        return 0

    cdef void publish(self) noexcept nogil:
        """One release store and one wake-up check for all staged responses."""
        if self.staged:
            prod_publish(&self.end.prod, self.staged)
            self.staged = 0
        drb_notify(&self.end.waiter)

    cdef int idle(self) noexcept nogil:
        """Spin for the budget, then sleep until a request or a grant
        completion arrives. Returns 0, or -EINTR on a signal."""
        cdef uint64_t end_ns = drb_now_ns() + self.end.waiter.spin_ns
        cdef pollfd fds[2]
        cdef uint64_t drain
        cdef int i, r
        if self.end.waiter.spin_ns:
            while drb_now_ns() < end_ns:
                for i in range(64):
                    drb_cpu_relax()
                    if cons_avail(&self.end.cons, 1) != 0 or io_uring_cq_ready(&self.ring):
                        return 0
        drb_store_relaxed(self.end.waiter.my_flags, DRB_NEED_WAKEUP)
        drb_fence()
        if cons_avail(&self.end.cons, 1) != 0 or io_uring_cq_ready(&self.ring):
            drb_store_relaxed(self.end.waiter.my_flags, 0)
            return 0
        fds[0].fd = self.end.waiter.my_efd
        fds[0].events = POLLIN
        fds[0].revents = 0
        fds[1].fd = self.ring.ring_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        self.sleeps += 1
        r = ppoll(fds, 2, NULL, NULL)
        drb_store_relaxed(self.end.waiter.my_flags, 0)
        if r < 0:
            return -errno
        if fds[0].revents & POLLIN:
            read(fds[0].fd, &drain, 8)
        return 0

    cdef int64_t loop(self) noexcept nogil:
        cdef io_uring_sqe local[BATCH]
        cdef io_uring_cqe *cqes[BATCH]
        cdef io_uring_sqe *g
        cdef int64_t n
        cdef uint32_t i, k, m, queued, room
        cdef int err, r
        while not g_stop:
            queued = 0
            # Intake: never more in flight than the grant CQ can hold.
            room = io_uring_sq_space_left(&self.ring)
            if room > self.cq_cap - self.inflight:
                room = self.cq_cap - self.inflight
            if room > BATCH:
                room = BATCH
            n = cons_avail(&self.end.cons, 1) if room else 0
            if n < 0:
                return n
            k = <uint32_t>n if n < room else room
            if k:
                for i in range(k):
                    memcpy(&local[i], cons_entry(&self.end.cons, i), sizeof(io_uring_sqe))
                cons_release(&self.end.cons, k)
                for i in range(k):
                    err = validate(&local[i], &self.lim)
                    if err:
                        self.refused += 1
                        r = self.respond(local[i].user_data, -err)
                        if r < 0:
                            return 0 if r == -EINTR else r
                        continue
                    g = io_uring_get_sqe(&self.ring)
                    if g == NULL:       # cannot happen: room <= SQ space
                        return -EPROTO
                    to_grant(g, &local[i], &self.lim)
                    queued += 1
                if queued:
                    r = io_uring_submit(&self.ring)
                    self.submits += 1
                    if r < 0:
                        return r
                    self.inflight += queued
                self.publish()          # refusals, and the freed request entries
            # Completions of the grant ring become responses.
            m = io_uring_peek_batch_cqe(&self.ring, cqes, BATCH)
            if m:
                for i in range(m):
                    r = self.respond(cqes[i].user_data, cqes[i].res)
                    if r < 0:
                        return 0 if r == -EINTR else r
                io_uring_cq_advance(&self.ring, m)
                self.inflight -= m
                self.served += m
                self.publish()
            if k or m:
                continue
            r = self.idle()
            if r < 0 and r != -EINTR:
                return r
        return 0

    def serve(self):
        """Serve until SIGTERM or SIGINT; returns 0 or a negative errno."""
        global g_stop
        g_stop = 0
        signal(SIGTERM, _on_stop)
        signal(SIGINT, _on_stop)
        cdef int64_t r
        with nogil:
            r = self.loop()
        return r

    @property
    def stats(self):
        return {"served": self.served, "refused": self.refused, "submits": self.submits,
                "sleeps": self.sleeps, "notifies": self.end.waiter.notifies}


def check_request(bytes sqe, uint64_t pool_base, uint32_t slot_size, uint32_t slot_count,
                  uint64_t extent_base, uint64_t extent_size, uint32_t align=0):
    """The worker's own check of one request (64 bytes, as the user wrote
    it), for the tests that fuzz it: (0, the grant ring's opcode, addr,
    len, off, buf_index) for a request it would pass on, or (errno, ...)
    with zeros."""
    cdef io_uring_sqe r, g
    cdef limits lim
    if len(sqe) != sizeof(io_uring_sqe):
        raise ValueError(f"an SQE is {sizeof(io_uring_sqe)} bytes")
    memcpy(&r, <const char *>sqe, sizeof(r))
    lim.pool_base, lim.slot_size, lim.slot_count = pool_base, slot_size, slot_count
    lim.extent_base, lim.extent_size, lim.align = extent_base, extent_size, align
    cdef int err = validate(&r, &lim)
    if err:
        return err, 0, 0, 0, 0, 0
    to_grant(&g, &r, &lim)
    return 0, g.opcode, g.addr, g.len, g.off, g.buf_index
