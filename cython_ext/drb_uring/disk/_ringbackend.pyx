# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The disk's backend over a channel (drb_uring.disk._ringbackend): the
FUSE loop's requests go through the double ring and the monitor, as every
request of the channel client does.

The loop's pool is the channel's pool: a WRITE's payload is read from
/dev/fuse straight into the channel's slot, and a READ answered from it.
Per request, in C without the GIL:

- the slot's task is written in the I/O task table before the request is
  published (the monitor lets the worker touch the slot only then), and
  requests go in batches (one publish, one wake-up check per kick);
- every answer is checked as the channel client checks it: its tag names a
  slot in flight in its current use, it is not more than was asked, the
  bytes the monitor counted on the slot grew by exactly what it says (a
  flush: the monitor counted a flush done), the task is revoked and the
  kernel has nothing left on the slot, and the channel's status word says
  no violation happened (checked after the batch, before any data is
  answered from a slot). Anything else fails the channel: every request
  then ends with EIO, and the disk answers EIO from then on.

What only Python can do, the server does when the loop pauses for the
channel's control connection (notice_fd): a worker that took over (resume:
each request the dead one had taken is settled from the monitor's counts,
done or posted again whole), a monitor that died and came back (the tasks
move to its new table), a failure. An answer the counts do not bear out
while the monitor may have died waits for that word (up to NOTICE_WAIT),
as in the channel client.

Whom it distrusts: the worker (every answer, as above) and the driver page
(indexes are checked by the ring itself).
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, int32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset

from drb_uring.disk._backend cimport (Backend, disk_cqe, DISK_READ, DISK_WRITE, DISK_FSYNC,
                                      DISK_NO_SLOT, DISK_F_DATASYNC)
from drb_uring.includes.atomic cimport drb_now_ns, drb_store_relaxed, drb_fence
from drb_uring.includes.io_uring cimport (io_uring_sqe, io_uring_cqe, IORING_OP_READ_FIXED,
                                          IORING_OP_WRITE_FIXED, IORING_OP_FSYNC)
from drb_uring.ring.spsc cimport (prod_space, prod_entry, prod_publish, cons_avail, cons_entry,
                                  cons_release, drb_notify, DRB_NEED_WAKEUP)
from drb_uring.ring._spsc cimport UserEnd
from drb_uring.enforce.tasks cimport (drb_task, task_post, task_release, task_reaped,
                                      task_moved, task_table_failed, DRB_STATUS_ENTRY)

import errno as _errno
import os

cdef extern from "<errno.h>" nogil:
    int EAGAIN
    int EIO

cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t n)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    short POLLIN

NOTICE_WAIT_S = 1.0     # an unproven answer waits this long for word the monitor died
cdef uint64_t NOTICE_WAIT_NS = <uint64_t>(NOTICE_WAIT_S * 1e9)
cdef double REPOST_WAIT_S = 10.0
cdef uint64_t GEN_MASK = (<uint64_t>1 << 48) - 1       # a tag's generation bits

cdef enum:
    SLOT_BITS = 16
    MAX_FLUSHES = 64              # flushes in flight at once
    SETTLED_MAX = 4096            # answers a takeover settled, waiting for reap
    STALE_MAX = 4096              # tags a takeover made moot
    REAP_MAX = 64
    FLUSH_BIT = 1 << 15           # in a tag's slot bits: a flush, not a slot
    IORING_FSYNC_DATASYNC = 1

# A slot's (or a flush's) request: what it asked, where it is.
cdef struct req_t:
    uint64_t tag                  # the FUSE loop's
    uint64_t gen                  # its use of the slot (or flush entry)
    uint64_t off
    uint32_t want
    uint32_t before               # the monitor's count at post (bytes; a flush: flushes)
    uint32_t posted_at            # its place in the request ring
    uint8_t op                    # DISK_* + 1, or 0: none
    uint8_t suspect               # answered unproven while the monitor may be dead
    uint32_t flags
    int32_t suspect_res


cdef class RingBackend(Backend):
    """Serve the FUSE loop over an open channel (drb_uring.channel.client),
    which it owns from then on: nothing else may post on it."""
    cdef UserEnd u
    cdef readonly object ch
    cdef req_t *slots
    cdef req_t flushes[MAX_FLUSHES]
    cdef uint32_t staged
    cdef uint32_t live
    cdef disk_cqe *settled
    cdef uint32_t nsettled
    cdef uint64_t *stale
    cdef uint32_t nstale
    cdef uint64_t suspect_deadline
    cdef int sock_fd
    cdef bint failed_flag
    cdef public bint monitor_down
    cdef readonly object failed
    cdef readonly uint64_t served, reposted, takeovers

    def __cinit__(self):
        self.slots = NULL
        self.settled = NULL
        self.stale = NULL

    def __init__(self, ch):
        cdef uint32_t n = ch.geometry.slot_count
        if ch.geometry.slot_size % 4096:
            raise ValueError("the channel's slot size must be a multiple of 4096")
        if n > FLUSH_BIT:
            raise ValueError(f"at most {FLUSH_BIT} slots")
        self.ch = ch
        self.u = ch.end
        self.sock_fd = ch.sock.fileno()
        self.base = self.u.pool
        self.slot_size = ch.geometry.slot_size
        self.slot_count = n
        self.size = ch.size
        self.ops = (1 << DISK_READ) | (1 << DISK_WRITE) | (1 << DISK_FSYNC)
        self.depth = min(n, self.u.prod.size)
        self.slots = <req_t *>calloc(n, sizeof(req_t))
        self.settled = <disk_cqe *>calloc(SETTLED_MAX, sizeof(disk_cqe))
        self.stale = <uint64_t *>calloc(STALE_MAX, sizeof(uint64_t))
        if self.slots == NULL or self.settled == NULL or self.stale == NULL:
            raise MemoryError()
        memset(self.flushes, 0, sizeof(self.flushes))
        self.failed = None

    def __dealloc__(self):
        free(self.slots)
        free(self.settled)
        free(self.stale)

    # ---- the contract ---------------------------------------------------------------

    cdef int submit(self, uint32_t op, uint32_t slot, uint64_t offset, uint64_t length,
                    uint32_t flags, uint64_t tag) noexcept nogil:
        cdef int64_t space
        cdef req_t *r
        cdef uint32_t i
        if self.failed_c():
            return -EIO
        space = prod_space(&self.u.prod, self.staged + 1)
        if space < 0:
            self.fail_c()
            return -EIO
        if space <= self.staged:
            return -EAGAIN
        if op == DISK_FSYNC:
            for i in range(MAX_FLUSHES):
                if self.flushes[i].op == 0:
                    break
            else:
                return -EAGAIN
            r = &self.flushes[i]
            r.gen = (r.gen + 1) & GEN_MASK
            r.before = self.flushes_done()
            self.stage(IORING_OP_FSYNC, 0, 0, 0, r.gen << SLOT_BITS | FLUSH_BIT | i,
                       IORING_FSYNC_DATASYNC if flags & DISK_F_DATASYNC else 0)
        elif (op == DISK_READ or op == DISK_WRITE) and slot < self.slot_count:
            if length == 0 or length > self.slot_size:
                return -22      # EINVAL: the loop never asks for this
            r = &self.slots[slot]
            if r.op:
                return -22      # the slot is in use: the loop's bug, not the worker's
            r.gen = (r.gen + 1) & GEN_MASK
            if self.u.tasks != NULL:
                # What the kernel has moved on the slot so far: the answer
                # must come with this grown by exactly its byte count.
                r.before = task_moved(&self.u.tasks[slot])
                task_post(&self.u.tasks[slot],
                          IORING_OP_READ_FIXED if op == DISK_READ else IORING_OP_WRITE_FIXED,
                          <uint32_t>length, offset, drb_now_ns())
            self.stage(IORING_OP_READ_FIXED if op == DISK_READ else IORING_OP_WRITE_FIXED,
                       slot, <uint32_t>length, offset, r.gen << SLOT_BITS | slot, 0)
        else:
            return -22
        r.tag = tag
        r.op = op + 1
        r.want = <uint32_t>length
        r.off = offset
        r.flags = flags
        r.suspect = 0
        r.posted_at = self.u.prod.local_tail + self.staged - 1
        self.live += 1
        return 0

    cdef inline void stage(self, uint8_t opcode, uint32_t slot, uint32_t length, uint64_t off,
                           uint64_t user_data, uint32_t fsync_flags) noexcept nogil:
        cdef io_uring_sqe *s = <io_uring_sqe *>prod_entry(&self.u.prod, self.staged)
        memset(s, 0, sizeof(io_uring_sqe))
        s.opcode = opcode
        s.buf_index = <uint16_t>slot
        s.len = length
        s.off = off
        s.user_data = user_data
        s.fsync_flags = fsync_flags
        self.staged += 1

    cdef int kick(self) noexcept nogil:
        # The loop kicks every turn; only a batch is worth the worker's
        # wake-up (a sleeping worker re-checks the ring after setting its
        # flag, so nothing published is missed).
        if self.staged:
            prod_publish(&self.u.prod, self.staged)
            self.staged = 0
            drb_notify(&self.u.waiter)
        return 0

    cdef int reap(self, disk_cqe *out, int max_n) noexcept nogil:
        cdef int n = 0, got
        cdef int64_t avail
        cdef uint32_t i, k
        cdef io_uring_cqe cqe
        # Settled by a takeover, or failed: first.
        while self.nsettled and n < max_n:
            self.nsettled -= 1
            out[n] = self.settled[self.nsettled]
            n += 1
        if self.suspect_deadline and drb_now_ns() > self.suspect_deadline and \
                not self.monitor_down:
            self.fail_c()           # the counts never bore the answer out
            return n
        if self.failed_c() or n >= max_n:
            return n
        avail = cons_avail(&self.u.cons, 1)
        if avail < 0:
            self.fail_c()
            return n
        k = <uint32_t>avail if avail < max_n - n else <uint32_t>(max_n - n)
        got = n
        for i in range(k):
            memcpy(&cqe, cons_entry(&self.u.cons, i), sizeof(cqe))
            if self.take(&cqe, &out[n]):
                n += 1
            if self.failed_c():
                break
        if k:
            cons_release(&self.u.cons, k)
            drb_notify(&self.u.waiter)
        # A violation is recorded before the I/O it stops can move data:
        # with a clean status now, every slot answered above is the device's.
        if self.u.tasks != NULL and task_table_failed(self.u.tasks):
            self.fail_c()
            for i in range(<uint32_t>got, <uint32_t>n):
                out[i].res = -EIO
        self.served += <uint64_t>(n - got)
        return n

    cdef bint take(self, io_uring_cqe *c, disk_cqe *out) noexcept nogil:
        """Check one answer and take its slot back; True when `out` holds
        the loop's completion for it."""
        cdef uint64_t ud = c.user_data
        cdef uint32_t idx = ud & ((1 << SLOT_BITS) - 1)
        cdef uint64_t gen = ud >> SLOT_BITS
        cdef req_t *r
        cdef int32_t res = c.res
        cdef uint32_t moved, busy
        cdef bint proven
        cdef bint flush = idx & FLUSH_BIT
        if self.is_stale(ud):
            return False
        if flush:
            idx &= ~(<uint32_t>FLUSH_BIT)
            if idx >= MAX_FLUSHES:
                self.fail_c()
                return False
            r = &self.flushes[idx]
            if r.op == 0 or r.gen != gen or res > 0:
                self.fail_c()
                return False
            proven = res < 0 or self.u.tasks == NULL or self.flushes_done() != r.before
        else:
            if idx >= self.slot_count:
                self.fail_c()
                return False
            r = &self.slots[idx]
            if r.op == 0 or r.gen != gen or res > <int32_t>r.want:
                self.fail_c()
                return False
            proven = True
            if self.u.tasks != NULL and res >= 0:
                moved = task_moved(&self.u.tasks[idx]) - r.before
                proven = moved == <uint32_t>res
        if not proven:
            # Unless the monitor died (its programs could not count this
            # answer), a lie: the server hears the broker's word, or the
            # deadline fails the channel.
            if self.monitor_down:
                return False            # the takeover posts it again
            if not r.suspect:
                r.suspect = 1
                r.suspect_res = res
                if not self.suspect_deadline:
                    self.suspect_deadline = drb_now_ns() + NOTICE_WAIT_NS
            return False
        if not flush and self.u.tasks != NULL:
            task_reaped(&self.u.tasks[idx], self.u.reap_hist, drb_now_ns())
            busy = task_release(&self.u.tasks[idx])
            if busy:
                # The kernel may still write the slot: never reuse it.
                self.fail_c()
                return False
        out.tag = r.tag
        out.res = res
        r.op = 0
        r.suspect = 0
        self.live -= 1
        return True

    cdef int pollfd(self) noexcept nogil:
        return self.u.waiter.my_efd

    cdef int arm(self) noexcept nogil:
        drb_store_relaxed(self.u.waiter.my_flags, DRB_NEED_WAKEUP)
        drb_fence()
        return 1 if (self.nsettled or cons_avail(&self.u.cons, 1) != 0) else 0

    cdef void disarm(self) noexcept nogil:
        cdef uint64_t drain
        cdef pollfd p
        drb_store_relaxed(self.u.waiter.my_flags, 0)
        # The eventfd stays readable until read: left set, every later
        # sleep would return at once and the idle loop would spin. What
        # woke it is in the response ring, which the loop reaps next. Read
        # only what poll says is there: the descriptor may be blocking
        # (runc exec, starting the next worker, makes its copies blocking,
        # and the file is one).
        p.fd = self.u.waiter.my_efd
        p.events = POLLIN
        p.revents = 0
        if poll(&p, 1, 0) > 0 and p.revents & POLLIN:
            read(self.u.waiter.my_efd, &drain, 8)

    cdef int notice_fd(self) noexcept nogil:
        return self.sock_fd

    # ---- helpers -------------------------------------------------------------------

    cdef inline uint32_t flushes_done(self) noexcept nogil:
        if self.u.tasks == NULL:
            return 0
        return task_moved(&self.u.tasks[DRB_STATUS_ENTRY])

    cdef inline bint failed_c(self) noexcept nogil:
        return self.failed_flag

    cdef void fail_c(self) noexcept nogil:
        """Every request in flight ends with EIO, its task revoked; so does
        every later one."""
        cdef uint32_t i
        if self.failed_flag:
            return
        self.failed_flag = True
        for i in range(self.slot_count + MAX_FLUSHES):
            self.settle_c(i, self.req_of(i), -EIO)

    cdef void settle_c(self, uint32_t i, req_t *r, int64_t res) noexcept nogil:
        """The loop hears `res` for the request; its slot's task is revoked."""
        if r.op == 0 or self.nsettled >= SETTLED_MAX:
            return
        if i < self.slot_count and self.u.tasks != NULL:
            task_release(&self.u.tasks[i])
        self.settled[self.nsettled].tag = r.tag
        self.settled[self.nsettled].res = res
        self.nsettled += 1
        r.op = 0
        r.suspect = 0
        self.live -= 1

    cdef inline req_t *req_of(self, uint32_t i) noexcept nogil:
        """Slot i's request, or (i >= slot_count) flush entry i - slot_count."""
        return &self.slots[i] if i < self.slot_count else &self.flushes[i - self.slot_count]

    cdef inline uint64_t ud_of(self, uint32_t i, req_t *r) noexcept nogil:
        if i < self.slot_count:
            return r.gen << SLOT_BITS | i
        return r.gen << SLOT_BITS | FLUSH_BIT | (i - self.slot_count)

    cdef bint is_stale(self, uint64_t ud) noexcept nogil:
        cdef uint32_t i
        for i in range(self.nstale):
            if self.stale[i] == ud:
                self.nstale -= 1
                self.stale[i] = self.stale[self.nstale]
                return True
        return False

    cdef void add_stale(self, uint64_t ud) noexcept nogil:
        if self.nstale < STALE_MAX:
            self.stale[self.nstale] = ud
            self.nstale += 1

    # ---- what only Python does: the channel's notices ------------------------------------

    def hear(self):
        """The control connection is readable: take the notice the way the
        channel client does, on this backend's requests. Returns its op."""
        from drb_uring.channel.client import read_notice
        msg, table = read_notice(self.ch.sock)
        op = msg.get("op")
        if op == "worker":
            return "worker"
        if op == "monitor-down":
            self.monitor_down = True
            return op
        if op == "restarted" and isinstance(msg.get("consumed"), int):
            self.resume(msg["consumed"] & 0xFFFFFFFF, table)
            return op
        self.fail(str(msg.get("reason") or f"unexpected message {op!r}"))
        return "failed"

    def fail(self, reason):
        if self.failed is None:
            self.failed = reason
        self.fail_c()

    def resume(self, uint32_t consumed, table=None):
        """The worker died and another took the rings over (see the channel
        client's _resume): requests still queued the new one serves; each the
        dead one had taken is settled from the monitor's counts (done), or
        posted again whole. With `table`, the monitor itself came back: every
        taken request is posted again, and queued ones get their tasks in
        the new table."""
        from drb_uring import protocol
        from drb_uring.enforce import tasks
        cdef uint32_t i, moved
        cdef req_t *r
        cdef uint64_t ud
        cdef list again = []
        self.takeovers += 1
        self.suspect_deadline = 0
        if table is not None:
            self.ch.tasks = table
            self.u.set_task_table(table, tasks.REAP_HIST_OFFSET)
            self.monitor_down = False
        for i in range(self.slot_count + MAX_FLUSHES):
            r = self.req_of(i)
            if r.op == 0:
                continue
            r.suspect = 0
            queued = <uint32_t>(r.posted_at - consumed) < 0x80000000
            ud = self.ud_of(i, r)
            if not queued:
                self.add_stale(ud)       # whatever the dead worker said of it is moot
            if table is not None:
                if not queued:
                    again.append(i)
                elif i < self.slot_count:
                    task_post(&self.u.tasks[i], IORING_OP_READ_FIXED if r.op - 1 == DISK_READ
                              else IORING_OP_WRITE_FIXED, r.want, r.off, drb_now_ns())
                    r.before = task_moved(&self.u.tasks[i])
                else:
                    r.before = self.flushes_done()
                continue
            if queued:
                continue
            if i < self.slot_count and self.u.tasks != NULL and self.u.tasks[i].inflight:
                self.is_stale(ud)        # still in the kernel: its answer comes through
                continue
            if i >= self.slot_count:
                if self.flushes_done() != r.before:
                    self.settle_c(i, r, 0)
                else:
                    again.append(i)
                continue
            moved = task_moved(&self.u.tasks[i]) - r.before if self.u.tasks != NULL else 0
            if moved == r.want:
                self.settle_c(i, r, r.want)
            elif moved < r.want:
                again.append(i)
            else:
                self.fail(f"a worker died; the kernel moved {moved} bytes on slot {i} for a "
                          f"request of {r.want}")
                return
        if table is not None:
            protocol.send(self.ch.sock, {"op": "resumed"})
        for i in again:
            self.repost(i, self.req_of(i))
        self.kick()

    cdef repost(self, uint32_t i, req_t *r):
        """The same request again, on the same slot: a new use of it."""
        import time
        cdef uint64_t tag = r.tag
        cdef uint32_t op = r.op - 1, want = r.want, flags = r.flags
        cdef uint64_t off = r.off
        cdef int ret
        r.op = 0
        self.live -= 1
        self.reposted += 1
        end = time.monotonic() + REPOST_WAIT_S
        while True:
            ret = self.submit(op, i if i < self.slot_count else DISK_NO_SLOT, off, want, flags,
                              tag)
            if ret != -EAGAIN:
                break
            # The ring is full of requests the new worker serves: let some go.
            self.kick()
            if time.monotonic() > end:
                self.fail("a worker took over, and its request ring stayed full")
                return
            time.sleep(0.001)
        if ret < 0:
            self.fail(f"posting a request again after a takeover: {os.strerror(-ret)}")

    @property
    def stats(self):
        return {"served": self.served, "reposted": self.reposted, "takeovers": self.takeovers,
                "in_flight": self.live, "failed": self.failed}
