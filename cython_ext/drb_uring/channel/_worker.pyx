# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The worker's loop (drb_uring.channel._worker).

Runs in the driver domain, one process per user domain, serving every
channel of that user domain. For each channel it copies each request out of
the shared request ring once, validates every field against private copies
of the channel's limits, turns good ones into fixed-buffer I/O on the
channel's grant ring (many per io_uring_enter), and answers every request,
good or bad, with a response carrying the kernel's result or the exact
negative errno of the check that refused it.

Channels are served round-robin, at most PER_TURN requests of one channel
per turn, so a busy channel cannot starve a quiet one; a channel whose user
side does not reap its responses is skipped (its completions wait in its
grant ring) instead of stalling the others. With every ring idle the loop
sleeps on all the channels' eventfds at once. A channel whose ring is
corrupt is dropped alone, and reported to the broker. The whole loop runs
without the GIL.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int32_t
from libc.string cimport memcpy, memset

from drb_uring.includes.atomic cimport drb_store_relaxed, drb_fence, drb_cpu_relax, drb_now_ns
from drb_uring.includes.io_uring cimport (io_uring_sqe, io_uring_cqe, IORING_OP_READ_FIXED,
                                IORING_OP_WRITE_FIXED, IORING_OP_FSYNC, IOSQE_FIXED_FILE)
from drb_uring.includes.liburing cimport (io_uring, io_uring_params, io_uring_queue_mmap,
                                io_uring_queue_exit, io_uring_get_sqe, io_uring_submit,
                                io_uring_peek_batch_cqe, io_uring_cq_advance,
                                io_uring_cq_ready, io_uring_sq_space_left, sq_array_identity)
from drb_uring.includes.sys cimport (pollfd, ppoll, timespec, sigset_t, POLLIN, read, write,
                                     errno, EINTR, EAGAIN, EPROTO)
from libc.stdlib cimport calloc, free
from drb_uring.ring.spsc cimport (prod_space, prod_entry, prod_publish, cons_avail, cons_entry,
                   cons_release, drb_notify, drb_prod, drb_cons, drb_waiter, DRB_NEED_WAKEUP,
                   drb_spin, drb_spin_budget, drb_spin_waited)
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
    int SIG_BLOCK
    int sigemptyset(sigset_t *s)
    int sigaddset(sigset_t *s, int signum)
    int sigismember(const sigset_t *s, int signum)
    int sigpending(sigset_t *s)
    int pthread_sigmask(int how, const sigset_t *s, sigset_t *old)

# Set from a C signal handler: the loop sees it when ppoll returns EINTR.
cdef volatile int g_stop = 0

cdef void _on_stop(int sig) noexcept nogil:
    global g_stop
    g_stop = 1

# SIGTERM and SIGINT stay blocked but in ppoll (which unblocks them for
# its sleep) and are looked for with sigpending while busy: one that lands
# between a check and the sleep is never lost.
cdef sigset_t g_stop_signals
cdef sigset_t g_none


def install_stop_handlers():
    """Take SIGTERM and SIGINT as "finish what is in flight, then exit",
    from now on (before anything else, so that none is lost)."""
    signal(SIGTERM, _on_stop)
    signal(SIGINT, _on_stop)
    sigemptyset(&g_none)
    sigemptyset(&g_stop_signals)
    sigaddset(&g_stop_signals, SIGTERM)
    sigaddset(&g_stop_signals, SIGINT)
    pthread_sigmask(SIG_BLOCK, &g_stop_signals, NULL)


cdef inline void check_stop() noexcept nogil:
    global g_stop
    cdef sigset_t pending
    if sigpending(&pending) == 0 and (sigismember(&pending, SIGTERM) == 1
                                      or sigismember(&pending, SIGINT) == 1):
        g_stop = 1

cdef enum:
    BATCH = 64
    # Requests taken from one channel per turn, submitted together. Half a
    # depth-32 queue: the user side gets the first half's answers while the
    # worker runs the second, instead of the two taking turns with a whole
    # queue each (0.41 of the direct ring's IOPS at depth 32 with 32 here,
    # 0.89 with 16; one more io_uring_enter per 32 requests).
    PER_TURN = 16
    IORING_FSYNC_DATASYNC = 1
    CTL_EVERY_NS = 1000000    # how often a busy loop looks for drop requests
    CLOCK_EVERY = 32          # loop rounds between two clock reads
    MAX_CHANNELS = 1024

# A channel's state in the loop.
cdef enum:
    LIVE = 0
    DRAINING = 1              # no new requests; dropped once its I/O is done
    DROPPED = 2
    HELD = 3                  # not served yet: its user side is not ready

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



cdef struct chan_t:
    drb_prod *prod            # into the DriverEnd, kept alive by WorkerLoop.ends
    drb_cons *cons
    drb_waiter *waiter
    io_uring ring             # the channel's grant ring
    bint mapped
    limits lim
    uint32_t cid              # the broker's channel id
    uint32_t cq_cap
    uint32_t inflight
    uint32_t staged           # responses written but not yet published
    int state
    int err                   # why it is draining: 0 (asked to), or a negative errno


# The report a worker writes to the broker when it drops a channel.
cdef struct report_t:
    uint32_t cid
    int32_t err


cdef class WorkerLoop:
    cdef chan_t *ch
    cdef uint32_t n
    cdef list ends
    cdef int ctl_fd           # broker -> worker: u32 channel ids to drop (non-blocking)
    cdef int report_fd        # worker -> broker: report_t per dropped channel
    cdef pollfd *fds
    cdef uint32_t *fd_chan
    cdef public uint64_t served, refused, submits, sleeps, dropped
    cdef drb_spin spin        # whether spinning pays lately (idle())

    def __cinit__(self, int ctl_fd, int report_fd):
        self.ch = <chan_t *>calloc(MAX_CHANNELS, sizeof(chan_t))
        self.fds = <pollfd *>calloc(2 * MAX_CHANNELS + 1, sizeof(pollfd))
        self.fd_chan = <uint32_t *>calloc(2 * MAX_CHANNELS + 1, sizeof(uint32_t))
        if self.ch == NULL or self.fds == NULL or self.fd_chan == NULL:
            raise MemoryError()
        self.n = 0
        self.ends = []
        self.ctl_fd = ctl_fd
        self.report_fd = report_fd

    def add(self, DriverEnd end, uint32_t cid, int ring_fd, bytes params, uint64_t pool_base,
            uint64_t extent_base, uint64_t extent_size, uint32_t align, bint discard=False,
            bint held=False):
        """Serve one more channel: its ring end and its grant ring (which may
        have been driven by an earlier worker: its indexes are taken over).
        `discard`: the earlier worker died; the completions of its requests
        are dropped (the user side settles those requests from the
        monitor's counts)."""
        cdef io_uring_params p
        cdef unsigned i
        cdef chan_t *c
        if self.n >= MAX_CHANNELS:
            raise ValueError(f"a worker serves at most {MAX_CHANNELS} channels")
        if len(params) != sizeof(io_uring_params):
            raise ValueError(f"io_uring params must be {sizeof(io_uring_params)} bytes")
        if align & (align - 1):
            raise ValueError(f"alignment {align} is not a power of two")
        c = &self.ch[self.n]
        memset(c, 0, sizeof(chan_t))
        memcpy(&p, <const char *>params, sizeof(p))
        cdef int r = io_uring_queue_mmap(ring_fd, &p, &c.ring)
        if r < 0:
            raise OSError(-r, f"mapping the grant ring: {os.strerror(-r)}")
        c.mapped = True
        # io_uring_queue_mmap starts its own SQ tail at 0: a ring an earlier
        # worker drove is further on (set below).
        sq_array_identity(&c.ring, p.flags)
        if discard:
            # Requests the dead worker published but never entered are not
            # submitted now (the user side posts them again: it saw their
            # slots unmoved), and its completions are dropped.
            c.ring.sq.ktail[0] = c.ring.sq.khead[0]
            io_uring_cq_advance(&c.ring, io_uring_cq_ready(&c.ring))
        c.ring.sq.sqe_head = c.ring.sq.ktail[0]
        c.ring.sq.sqe_tail = c.ring.sq.ktail[0]
        c.prod = &end.prod
        c.cons = &end.cons
        c.waiter = &end.waiter
        c.cid = cid
        c.cq_cap = p.cq_entries
        # Requests the kernel took and has not completed yet (a dead
        # worker's asynchronous I/O outlives it): one completion each.
        c.inflight = c.ring.sq.khead[0] - c.ring.cq.ktail[0]
        if c.inflight > c.cq_cap:
            io_uring_queue_exit(&c.ring)      # unmaps it, and closes ring_fd
            c.mapped = False
            raise ValueError(f"grant ring indexes out of range ({c.inflight} in flight)")
        c.lim.pool_base = pool_base
        c.lim.slot_size = end.geometry.slot_size
        c.lim.slot_count = end.geometry.slot_count
        c.lim.extent_base = extent_base
        c.lim.extent_size = extent_size
        c.lim.align = align
        c.state = HELD if held else LIVE
        self.ends.append(end)
        self.n += 1

    def close(self):
        cdef uint32_t i
        if self.ch != NULL:
            for i in range(self.n):
                if self.ch[i].mapped:
                    io_uring_queue_exit(&self.ch[i].ring)
                    self.ch[i].mapped = False
        for end in self.ends:
            end.close()
        self.ends = []

    def __dealloc__(self):
        self.close()
        free(self.ch)
        free(self.fds)
        free(self.fd_chan)

    cdef int respond(self, chan_t *c, uint64_t tag, int32_t res) noexcept nogil:
        """Stage one response; returns 1 when staged, 0 when the response
        ring is full (the caller leaves the rest for a later turn), or
        -EPROTO for a corrupt ring."""
        cdef int64_t space = prod_space(c.prod, c.staged + 1)
        cdef io_uring_cqe *e
        if space < 0:
            return <int>space
        if space <= c.staged:
            return 0
        e = <io_uring_cqe *>prod_entry(c.prod, c.staged)
        e.user_data = tag
        e.res = res
        e.flags = 0
        c.staged += 1
        return 1

    cdef void publish(self, chan_t *c) noexcept nogil:
        """One release store and one wake-up check for all staged responses."""
        self.publish_quiet(c)
        drb_notify(c.waiter)

    cdef inline void publish_quiet(self, chan_t *c) noexcept nogil:
        if c.staged:
            prod_publish(c.prod, c.staged)
            c.staged = 0

    cdef void drop(self, chan_t *c, int err) noexcept nogil:
        """Take no more requests from this channel; it is reported dropped
        once the kernel is done with what it has in flight."""
        if c.state == LIVE or c.state == HELD:
            c.state = DRAINING
            c.err = err
        elif c.state == DRAINING and err < 0:
            c.err = err             # its ring broke while it was being let go of

    cdef void settle(self, chan_t *c) noexcept nogil:
        cdef report_t rep
        if c.state == DRAINING and c.inflight == 0:
            c.state = DROPPED
            if c.err >= 0:
                self.publish(c)
            rep.cid = c.cid
            rep.err = c.err
            write(self.report_fd, &rep, sizeof(rep))
            self.dropped += 1

    cdef bint room_for_responses(self, chan_t *c) noexcept nogil:
        cdef int64_t space = prod_space(c.prod, c.staged + 1)
        return space != 0 and space > c.staged

    cdef bint ready(self, chan_t *c, bint intake) noexcept nogil:
        """Work this channel has now: requests it may take, or completions
        it has room to answer."""
        if c.state == DROPPED or c.state == HELD:
            return False
        if io_uring_cq_ready(&c.ring) and self.room_for_responses(c):
            return True
        return intake and c.state == LIVE and c.inflight < c.cq_cap and cons_avail(c.cons, 1) != 0

    cdef uint32_t turn(self, chan_t *c, bint intake) noexcept nogil:
        """One channel's turn: take up to PER_TURN requests, answer what
        completed. Returns how much it did."""
        cdef io_uring_sqe local[PER_TURN]
        cdef io_uring_cqe *cqes[BATCH]
        cdef io_uring_sqe *g
        cdef int64_t n
        cdef uint32_t i, k = 0, m, queued = 0, room
        cdef int err, r
        if c.state == HELD:
            return 0
        if intake and c.state == LIVE:
            room = io_uring_sq_space_left(&c.ring)
            if room > c.cq_cap - c.inflight:
                room = c.cq_cap - c.inflight     # never more in flight than its CQ holds
            if room > PER_TURN:
                room = PER_TURN
            n = cons_avail(c.cons, 1) if room else 0
            if n < 0:
                self.drop(c, <int>n)
                n = 0
            k = <uint32_t>n if n < room else room
            if k:
                for i in range(k):
                    memcpy(&local[i], cons_entry(c.cons, i), sizeof(io_uring_sqe))
                cons_release(c.cons, k)
                for i in range(k):
                    err = validate(&local[i], &c.lim)
                    if err:
                        self.refused += 1
                        r = self.respond(c, local[i].user_data, -err)
                        if r <= 0:
                            # No room to refuse: the user posted more than its
                            # response ring holds. Its own channel only.
                            self.drop(c, r if r < 0 else -EPROTO)
                            break
                        continue
                    g = io_uring_get_sqe(&c.ring)
                    if g == NULL:       # cannot happen: room <= SQ space
                        self.drop(c, -EPROTO)
                        break
                    to_grant(g, &local[i], &c.lim)
                    queued += 1
                if queued:
                    r = io_uring_submit(&c.ring)
                    self.submits += 1
                    if r < 0:
                        self.drop(c, r)
                    else:
                        c.inflight += <uint32_t>r
                # Refusals and the freed request entries: published now,
                # the user woken (if it sleeps) once, at the end of the turn.
                self.publish_quiet(c)
        # Completions of the grant ring become responses, as many as fit.
        m = io_uring_peek_batch_cqe(&c.ring, cqes, BATCH)
        i = 0
        if c.state == DRAINING and c.err < 0:
            i = m                       # its response ring is no good: nobody to answer
        while i < m and not (c.state == DRAINING and c.err < 0):
            r = self.respond(c, cqes[i].user_data, cqes[i].res)
            if r < 0:
                self.drop(c, r)
                break
            if r == 0:
                break
            i += 1
        if i:
            io_uring_cq_advance(&c.ring, i)
            c.inflight -= i if i <= c.inflight else c.inflight
            self.served += i
            if not (c.state == DRAINING and c.err < 0):
                self.publish_quiet(c)
        if (k or i) and not (c.state == DRAINING and c.err < 0):
            # One wake-up check for the whole turn: a user asleep on its
            # eventfd needs one write, whatever it waits for.
            drb_notify(c.waiter)
        self.settle(c)
        return k + i

    cdef uint32_t read_ctl(self) noexcept nogil:
        """Drop the channels the broker asks to (a user side closed one), or
        serve the held ones it says may go. Returns how many words it read."""
        cdef uint32_t ids[64]
        cdef ssize_t got
        cdef uint32_t i, j, words = 0
        while True:
            got = read(self.ctl_fd, ids, sizeof(ids))
            if got <= 0:
                return words
            words += <uint32_t>(got // 4)
            for i in range(<uint32_t>(got // 4)):
                for j in range(self.n):
                    if self.ch[j].cid == (ids[i] & 0x7FFFFFFF):
                        if ids[i] >> 31:
                            if self.ch[j].state == HELD:
                                self.ch[j].state = LIVE
                        else:
                            self.drop(&self.ch[j], 0)
                            self.settle(&self.ch[j])

    cdef int idle(self, bint intake) noexcept nogil:
        """Spin for the budget, then sleep until a request, a completion or
        a message from the broker arrives. Returns 0, or -EINTR on a signal."""
        cdef uint64_t most = self.ch[0].waiter.spin_ns if self.n else 0
        # Spin while spinning has paid off lately (see spsc.drb_spin_budget).
        cdef uint64_t spin_ns = drb_spin_budget(&self.spin, most)
        cdef uint64_t now = drb_now_ns()
        cdef uint64_t start = now
        cdef uint64_t end_ns = now + spin_ns
        cdef uint64_t next_ctl = now + CTL_EVERY_NS
        cdef uint64_t drain
        cdef uint32_t i, nf = 0
        cdef int j, r
        cdef chan_t *c
        if spin_ns:
            # Looked at after every pause, not every 64: at queue depth 1 a
            # request's whole round trip is a few microseconds.
            while True:
                now = drb_now_ns()
                if now >= end_ns:
                    break
                if now >= next_ctl:
                    # A long spin (a polling worker) still hears the broker
                    # (a channel to let go of) and a stop signal.
                    next_ctl = now + CTL_EVERY_NS
                    check_stop()
                    if g_stop or self.read_ctl():
                        return 0
                for j in range(64):
                    drb_cpu_relax()
                    for i in range(self.n):
                        if self.ready(&self.ch[i], intake):
                            drb_spin_waited(&self.spin, most, 0)
                            return 0
        for i in range(self.n):
            if self.ch[i].state != DROPPED and self.ch[i].state != HELD:
                drb_store_relaxed(self.ch[i].waiter.my_flags, DRB_NEED_WAKEUP)
        drb_fence()
        for i in range(self.n):
            if self.ready(&self.ch[i], intake):
                self.wake_flags_off()
                return 0
        for i in range(self.n):
            c = &self.ch[i]
            if c.state == DROPPED or c.state == HELD:
                continue
            self.fds[nf].fd = c.waiter.my_efd
            self.fds[nf].events = POLLIN
            self.fds[nf].revents = 0
            self.fd_chan[nf] = 1
            nf += 1
            # A full response ring leaves completions waiting: the grant
            # ring would stay readable, so only the user's wake-up counts.
            if self.room_for_responses(c) or not io_uring_cq_ready(&c.ring):
                self.fds[nf].fd = c.ring.ring_fd
                self.fds[nf].events = POLLIN
                self.fds[nf].revents = 0
                self.fd_chan[nf] = 0
                nf += 1
        self.fds[nf].fd = self.ctl_fd
        self.fds[nf].events = POLLIN
        self.fds[nf].revents = 0
        self.fd_chan[nf] = 0
        nf += 1
        self.sleeps += 1
        r = ppoll(self.fds, nf, NULL, &g_none)
        self.wake_flags_off()
        if r < 0:
            return -errno
        drb_spin_waited(&self.spin, most, drb_now_ns() - start)
        for i in range(nf):
            if self.fd_chan[i] and self.fds[i].revents & POLLIN:
                read(self.fds[i].fd, &drain, 8)
        if self.fds[nf - 1].revents & POLLIN:
            self.read_ctl()         # the broker wrote: only then a read of its pipe
        return 0

    cdef void wake_flags_off(self) noexcept nogil:
        cdef uint32_t i
        for i in range(self.n):
            drb_store_relaxed(self.ch[i].waiter.my_flags, 0)

    cdef int64_t loop(self) noexcept nogil:
        cdef uint32_t i, rr = 0, did, busy, rounds = 0
        cdef uint64_t next_ctl = 0, now
        cdef bint intake
        cdef int r
        self.read_ctl()             # drops asked for before it started come first
        while True:
            rounds += 1
            intake = not g_stop
            did = 0
            busy = 0
            for i in range(self.n):
                did += self.turn(&self.ch[(rr + i) % self.n], intake)
                busy += self.ch[i].inflight
            if self.n:
                rr = (rr + 1) % self.n
            if not intake and busy == 0:
                # Told to stop: everything taken is answered. The next
                # worker (or nobody) takes over the rings from here.
                for i in range(self.n):
                    self.publish(&self.ch[i])
                return 0
            # The broker's pipe and the stop signals, looked at about every
            # millisecond while busy: a clock read every CLOCK_EVERY rounds
            # (a round is a request at depth 1), not one per round.
            if rounds % CLOCK_EVERY == 0:
                now = drb_now_ns()
                if now >= next_ctl:
                    self.read_ctl()
                    check_stop()
                    next_ctl = now + CTL_EVERY_NS
            if did:
                continue
            r = self.idle(intake)
            if r < 0 and r != -EINTR:
                return r

    def serve(self):
        """Serve until SIGTERM or SIGINT (then finish what is in flight);
        returns 0 or a negative errno. install_stop_handlers() first."""
        cdef int64_t r
        with nogil:
            r = self.loop()
        return r

    @property
    def stats(self):
        return {"channels": self.n, "served": self.served, "refused": self.refused,
                "submits": self.submits, "sleeps": self.sleeps, "dropped": self.dropped,
                "notifies": sum(e.stats["notifies"] for e in self.ends) if self.ends else 0}


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
