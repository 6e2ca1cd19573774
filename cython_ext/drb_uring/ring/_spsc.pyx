# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The two ends of a double ring over shared memory (drb_uring.ring._spsc).

Set-up (memfds, seals, header checks) happens in drb_uring.ring.setup;
this module maps the memory, owns the mappings, and does every per-entry
operation in C without the GIL.
"""
import errno as _errno
import os
import warnings

from cpython.buffer cimport PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memset

from drb_uring.includes.atomic cimport drb_store_relaxed, drb_load_relaxed, drb_fence, drb_now_ns
from drb_uring.enforce.tasks cimport (drb_task, task_post, task_release, task_reaped,
                                      task_moved, task_table_failed, DRB_HIST_BUCKETS,
                                      DRB_STATUS_ENTRY)
from drb_uring.includes.io_uring cimport io_uring_sqe, IORING_OP_FSYNC
from drb_uring.includes.sys cimport (mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED,
                           MAP_FAILED, errno, EINTR, EPROTO)
from drb_uring.ring.spsc cimport (prod_space, prod_space_fresh, prod_push, prod_entry, prod_publish,
                   DRB_NEED_WAKEUP,
                   cons_avail, cons_pop, drb_notify, drb_wait_cons,
                   drb_wait_prod)

from drb_uring.ring import layout as L

# Layout offsets as C values (the layout is defined once, in layout.py).
cdef size_t OFF_SQ_TAIL = L.OFF_SQ_TAIL
cdef size_t OFF_CQ_HEAD = L.OFF_CQ_HEAD
cdef size_t OFF_USER_FLAGS = L.OFF_USER_FLAGS
cdef size_t OFF_SQ_HEAD = L.OFF_SQ_HEAD
cdef size_t OFF_CQ_TAIL = L.OFF_CQ_TAIL
cdef size_t OFF_DRIVER_FLAGS = L.OFF_DRIVER_FLAGS
cdef size_t OFF_ENTRIES = L.OFF_ENTRIES
cdef uint32_t SQE_SIZE = L.SQE_SIZE
cdef uint32_t CQE_SIZE = L.CQE_SIZE


cdef object _oserror(int64_t neg):
    cdef int e = <int>(-neg)
    if e == EPROTO:
        return OSError(e, "peer published an impossible ring index (corrupt or hostile peer)")
    return OSError(e, os.strerror(e))


cdef char *_map(int fd, size_t size, bint writable) except NULL:
    cdef int prot = PROT_READ | (PROT_WRITE if writable else 0)
    cdef void *p = mmap(NULL, size, prot, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        e = errno
        raise OSError(e, f"mmap of {size} bytes ({'rw' if writable else 'ro'}): {os.strerror(e)}")
    return <char *>p


cdef int64_t _timeout_ns(object timeout) except? -2:
    if timeout is None:
        return -1
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
    return <int64_t>(timeout * 1e9)


cdef class RingEnd:
    """One party's end: a producer on one ring and a consumer on the other.

    Not constructed directly: use drb_uring.ring.create() (user side) or
    drb_uring.ring.attach() (driver side).
    """

    def __cinit__(self):
        self.ctl_mine = NULL
        self.ctl_peer = NULL
        self.pool = NULL
        self.exports = 0
        self.closed = True
        self.owned_fds = ()
        self.tasks = NULL
        self.reap_hist = NULL
        self.ntasks = 0
        self.tasks_owner = None

    def _map_all(self, geometry, int mine_fd, size_t mine_size, int peer_fd,
                 size_t peer_size, int pool_fd, int my_efd, int peer_efd,
                 uint64_t spin_ns, owned_fds):
        # Fds are recorded first so a failure below still closes them.
        self.owned_fds = tuple(owned_fds)
        self.geometry = geometry
        self.ctl_mine = _map(mine_fd, mine_size, True)
        self.mine_size = mine_size
        self.ctl_peer = _map(peer_fd, peer_size, False)
        self.peer_size = peer_size
        if pool_fd >= 0:
            self.pool = _map(pool_fd, geometry.pool_size, True)
            self.pool_size_ = geometry.pool_size
        self.waiter.my_efd = my_efd
        self.waiter.peer_efd = peer_efd
        self.waiter.extra_fd = -1
        self.waiter.spin_ns = spin_ns
        self.waiter.notifies = 0
        self.waiter.sleeps = 0
        self.closed = False

    cdef void _set_prod(self, char *tail_page, size_t tail_off, char *head_page,
                        size_t head_off, char *entries, uint32_t size, uint32_t esize):
        self.prod.tail = <uint32_t *>(tail_page + tail_off)
        self.prod.head = <const uint32_t *>(head_page + head_off)
        self.prod.entries = entries
        self.prod.size = size
        self.prod.mask = size - 1
        self.prod.esize = esize
        self.prod.local_tail = self.prod.tail[0]
        self.prod.cached_head = self.prod.head[0]

    cdef void _set_cons(self, char *tail_page, size_t tail_off, char *head_page,
                        size_t head_off, const char *entries, uint32_t size, uint32_t esize):
        self.cons.tail = <const uint32_t *>(tail_page + tail_off)
        self.cons.head = <uint32_t *>(head_page + head_off)
        self.cons.entries = entries
        self.cons.size = size
        self.cons.mask = size - 1
        self.cons.esize = esize
        self.cons.local_head = self.cons.head[0]
        self.cons.cached_tail = self.cons.local_head

    cdef int _check(self) except -1:
        if self.closed:
            raise ValueError("ring end is closed")
        return 0

    cdef int _check_indexes(self) except -1:
        # The initial indexes were written by the peer (creator): refuse a
        # ring whose counts are already impossible instead of trusting them.
        if <uint32_t>(self.prod.local_tail - self.prod.cached_head) > self.prod.size:
            raise L.LayoutError("outgoing ring indexes out of range at attach")
        if <uint32_t>(self.cons.tail[0] - self.cons.local_head) > self.cons.size:
            raise L.LayoutError("incoming ring indexes out of range at attach")
        return 0

    # ---- properties ------------------------------------------------------

    @property
    def out_entry_size(self):
        return self.prod.esize

    @property
    def in_entry_size(self):
        return self.cons.esize

    @property
    def readable(self):
        """Entries waiting in the incoming ring."""
        self._check()
        cdef int64_t n = cons_avail(&self.cons, 0xffffffff)
        if n < 0:
            raise _oserror(n)
        return n

    @property
    def writable(self):
        """Free entries in the outgoing ring."""
        self._check()
        cdef int64_t n = prod_space_fresh(&self.prod)
        if n < 0:
            raise _oserror(n)
        return n

    @property
    def eventfd(self):
        """The eventfd this end sleeps on (readable when the peer signals)."""
        return self.waiter.my_efd

    @property
    def spin_ns(self):
        return self.waiter.spin_ns

    @spin_ns.setter
    def spin_ns(self, uint64_t v):
        self.waiter.spin_ns = v

    @property
    def watch_fd(self):
        """An fd whose readiness also ends a wait (as OSError EPIPE): the
        control connection, so a failure report or the monitor's death
        interrupts a wait at once. -1 for none."""
        return self.waiter.extra_fd

    @watch_fd.setter
    def watch_fd(self, int fd):
        self.waiter.extra_fd = fd

    def hold_wakeup(self, bint on):
        """Keep NEED_WAKEUP set (on) so the peer signals our eventfd after
        every publish: for event loops that wait on the eventfd themselves."""
        self._check()
        drb_store_relaxed(self.waiter.my_flags, DRB_NEED_WAKEUP if on else 0)
        drb_fence()

    @property
    def stats(self):
        """System-call counts of the wake-up protocol on this end."""
        return {"notifies": self.waiter.notifies, "sleeps": self.waiter.sleeps}

    @property
    def indexes(self):
        """(out tail, in head) as this end last published them."""
        return (self.prod.local_tail, self.cons.local_head)

    # ---- data ------------------------------------------------------------

    def push(self, data):
        """Copy whole entries from a bytes-like object into the outgoing ring,
        as many as fit; wake the peer if it sleeps. Returns entries pushed."""
        self._check()
        cdef Py_buffer view
        cdef uint32_t n, done
        PyObject_GetBuffer(data, &view, 0)
        try:
            if view.len % self.prod.esize:
                raise ValueError(f"data length {view.len} is not a multiple of "
                                 f"the entry size {self.prod.esize}")
            n = <uint32_t>min(view.len // self.prod.esize, 0xffffffff)
            with nogil:
                done = prod_push(&self.prod, <const char *>view.buf, n)
                if done:
                    drb_notify(&self.waiter)
        finally:
            PyBuffer_Release(&view)
        if done == 0 and n:
            # Distinguish "full" from a corrupt peer index.
            _ = self.writable
        return done

    def pop(self, size_t max_entries=0xffffffff):
        """Remove up to max_entries entries from the incoming ring and return
        their bytes (each entry read once from shared memory)."""
        self._check()
        cdef int64_t avail = cons_avail(&self.cons, <uint32_t>min(max_entries, 0xffffffff))
        if avail < 0:
            raise _oserror(avail)
        cdef uint32_t n = <uint32_t>min(<size_t>avail, max_entries)
        out = bytearray(n * self.cons.esize)
        cdef char *dst = out
        cdef uint32_t got
        with nogil:
            got = cons_pop(&self.cons, dst, n)
            if got:
                drb_notify(&self.waiter)
        return bytes(out)

    def pop_into(self, buffer):
        """Like pop() but into a writable buffer; returns entries copied."""
        self._check()
        cdef Py_buffer view
        cdef uint32_t got, room
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            room = <uint32_t>min(<size_t>(view.len // self.cons.esize), 0xffffffff)
            with nogil:
                got = cons_pop(&self.cons, <char *>view.buf, room)
                if got:
                    drb_notify(&self.waiter)
        finally:
            PyBuffer_Release(&view)
        if got == 0:
            _ = self.readable
        return got

    def wait_readable(self, timeout=None):
        """Block (spinning first, then sleeping without the GIL) until the
        incoming ring has entries. Returns the count, or 0 on timeout."""
        self._check()
        cdef int64_t t = _timeout_ns(timeout)
        cdef int64_t r
        while True:
            with nogil:
                r = drb_wait_cons(&self.waiter, &self.cons, t)
            if r != -EINTR:
                break
            PyErr_CheckSignals()
        if r < 0:
            raise _oserror(r)
        return r

    def wait_writable(self, uint32_t need=1, timeout=None):
        """Block until the outgoing ring has room for `need` entries.
        Returns the free count, or 0 on timeout."""
        self._check()
        if need == 0 or need > self.prod.size:
            raise ValueError(f"need must be in [1, {self.prod.size}], got {need}")
        cdef int64_t t = _timeout_ns(timeout)
        cdef int64_t r
        while True:
            with nogil:
                r = drb_wait_prod(&self.waiter, &self.prod, need, t)
            if r != -EINTR:
                break
            PyErr_CheckSignals()
        if r < 0:
            raise _oserror(r)
        return r if r >= need else 0

    def pool_buffer(self):
        """A writable buffer over the whole data pool (zero copy). While any
        view of it is alive, close() refuses with BufferError."""
        self._check()
        if self.pool == NULL:
            raise ValueError("this end has no mapping of the data pool")
        return _PoolBuffer(self)

    # ---- lifetime --------------------------------------------------------

    def close(self):
        """Unmap and close everything this end owns. Idempotent."""
        self.tasks = NULL
        self.reap_hist = NULL
        if self.tasks_owner is not None:
            self.tasks_owner.release()
            self.tasks_owner = None
        if self.exports:
            raise BufferError(f"{self.exports} view(s) of the data pool are still alive")
        if self.ctl_mine != NULL:
            munmap(self.ctl_mine, self.mine_size)
            self.ctl_mine = NULL
        if self.ctl_peer != NULL:
            munmap(self.ctl_peer, self.peer_size)
            self.ctl_peer = NULL
        if self.pool != NULL:
            munmap(self.pool, self.pool_size_)
            self.pool = NULL
        fds, self.owned_fds = self.owned_fds, ()
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __dealloc__(self):
        if not self.closed or self.ctl_mine != NULL:
            warnings.warn(f"unclosed {type(self).__name__}", ResourceWarning)
            if self.ctl_mine != NULL:
                munmap(self.ctl_mine, self.mine_size)
            if self.ctl_peer != NULL:
                munmap(self.ctl_peer, self.peer_size)
            if self.pool != NULL:
                munmap(self.pool, self.pool_size_)
            for fd in self.owned_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass


cdef class UserEnd(RingEnd):
    """The user side: produces requests (SQEs), consumes responses (CQEs)."""

    def __init__(self, geometry, int ctl_user_fd, int ctl_driver_fd, int pool_fd,
                 int user_efd, int driver_efd, uint64_t spin_ns=0, owned_fds=()):
        self._map_all(geometry, ctl_user_fd, geometry.ctl_user_size, ctl_driver_fd,
                      geometry.ctl_driver_size, pool_fd, user_efd, driver_efd,
                      spin_ns, owned_fds)
        self._set_prod(self.ctl_mine, OFF_SQ_TAIL, self.ctl_peer, OFF_SQ_HEAD,
                       self.ctl_mine + OFF_ENTRIES, geometry.sq_entries, SQE_SIZE)
        self._set_cons(self.ctl_peer, OFF_CQ_TAIL, self.ctl_mine, OFF_CQ_HEAD,
                       self.ctl_peer + OFF_ENTRIES, geometry.cq_entries, CQE_SIZE)
        self.waiter.my_flags = <uint32_t *>(self.ctl_mine + OFF_USER_FLAGS)
        self.waiter.peer_flags = <const uint32_t *>(self.ctl_peer + OFF_DRIVER_FLAGS)
        self._check_indexes()


    def post(self, unsigned char opcode, unsigned short slot, uint64_t addr, uint32_t length,
             uint64_t off, uint64_t user_data, uint32_t op_flags=0):
        """Write one request straight into the request ring and publish it
        (no encoding in Python). Returns False if the ring is full."""
        self._check()
        cdef int64_t space = prod_space(&self.prod, 1)
        cdef io_uring_sqe *s
        if space < 0:
            raise _oserror(space)
        if space == 0:
            return False
        if self.tasks != NULL and opcode != IORING_OP_FSYNC and slot < self.ntasks:
            # A flush touches no slot and has no task. The entry is complete
            # before the request is published.
            task_post(&self.tasks[slot], opcode, length, off, drb_now_ns())
        s = <io_uring_sqe *>prod_entry(&self.prod, 0)
        memset(s, 0, sizeof(io_uring_sqe))
        s.opcode = opcode
        s.buf_index = slot
        s.addr = addr
        s.len = length
        s.off = off
        s.user_data = user_data
        s.rw_flags = op_flags
        with nogil:
            prod_publish(&self.prod, 1)
            drb_notify(&self.waiter)
        return True


    def set_task_table(self, buffer, size_t hist_offset=0):
        """Use a writable buffer (the mmapped task table) for task entries:
        post() fills the slot's entry, clear_task() revokes it. With
        hist_offset, the post->reap histogram lives at that offset."""
        cdef Py_buffer view
        PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE)
        try:
            if <size_t>view.len < <size_t>(DRB_STATUS_ENTRY + 1) * sizeof(drb_task):
                raise ValueError(f"task table of {view.len} bytes is too small")
            if hist_offset and hist_offset + DRB_HIST_BUCKETS * 8 > <size_t>view.len:
                raise ValueError("reap histogram beyond the task table")
            self.tasks = <drb_task *>view.buf
            self.ntasks = self.geometry.slot_count
            self.reap_hist = <uint64_t *>(<char *>view.buf + hist_offset) if hist_offset \
                else NULL
            self.tasks_owner = memoryview(buffer)   # keeps the mapping exported
        finally:
            PyBuffer_Release(&view)

    def release_task(self, unsigned short slot):
        """Revoke the slot's task (its response was reaped), count its
        post->reap latency, and return how many requests on the slot the
        kernel still has (0 without a task table). Only a slot at 0 may be
        reused or read."""
        if self.tasks != NULL and slot < self.ntasks:
            task_reaped(&self.tasks[slot], self.reap_hist, drb_now_ns())
            return task_release(&self.tasks[slot])
        return 0

    def write_task(self, unsigned short slot, unsigned char opcode, uint32_t length,
                   uint64_t off):
        """(Re)write the slot's task without posting: a request already in
        the ring, under a new monitor's table."""
        if self.tasks != NULL and slot < self.ntasks:
            task_post(&self.tasks[slot], opcode, length, off, drb_now_ns())

    def task_inflight(self, unsigned short slot):
        """Requests on the slot the kernel has now, as the monitor counts
        them (0 without a task table); the task stays as it is."""
        if self.tasks != NULL and slot < self.ntasks:
            drb_fence()
            return drb_load_relaxed(&self.tasks[slot].inflight)
        return 0

    def task_moved(self, unsigned short slot):
        """Bytes the kernel's successful completions on the slot moved, as
        the monitor counted them (a counter that wraps), or -1 without a
        task table."""
        if self.tasks != NULL and slot < self.ntasks:
            return task_moved(&self.tasks[slot])
        return -1

    def flushes_done(self):
        """Flushes the kernel completed with success on this channel, as the
        monitor counted them in the status entry (wraps), or -1 without a
        task table."""
        if self.tasks == NULL:
            return -1
        return task_moved(&self.tasks[DRB_STATUS_ENTRY])

    def channel_failed(self):
        """The code of the monitor's first violation on this channel (see
        enforce.tasks.REASONS), or 0. Call it after copying data out of a
        slot: data copied before a 0 here is the device's."""
        if self.tasks == NULL:
            return 0
        return task_table_failed(self.tasks)

    def drop_task_table(self):
        self.tasks = NULL
        self.reap_hist = NULL
        self.ntasks = 0
        if self.tasks_owner is not None:
            self.tasks_owner.release()
            self.tasks_owner = None


cdef class DriverEnd(RingEnd):
    """The driver side: consumes requests (SQEs), produces responses (CQEs)."""

    def __init__(self, geometry, int ctl_user_fd, int ctl_driver_fd, int pool_fd,
                 int user_efd, int driver_efd, uint64_t spin_ns=0, owned_fds=()):
        self._map_all(geometry, ctl_driver_fd, geometry.ctl_driver_size, ctl_user_fd,
                      geometry.ctl_user_size, pool_fd, driver_efd, user_efd,
                      spin_ns, owned_fds)
        self._set_prod(self.ctl_mine, OFF_CQ_TAIL, self.ctl_peer, OFF_CQ_HEAD,
                       self.ctl_mine + OFF_ENTRIES, geometry.cq_entries, CQE_SIZE)
        self._set_cons(self.ctl_peer, OFF_SQ_TAIL, self.ctl_mine, OFF_SQ_HEAD,
                       self.ctl_peer + OFF_ENTRIES, geometry.sq_entries, SQE_SIZE)
        self.waiter.my_flags = <uint32_t *>(self.ctl_mine + OFF_DRIVER_FLAGS)
        self.waiter.peer_flags = <const uint32_t *>(self.ctl_peer + OFF_USER_FLAGS)
        self._check_indexes()


cdef class _PoolBuffer:
    """Buffer-protocol view of a ring end's pool that pins the mapping."""
    cdef RingEnd end
    cdef Py_ssize_t shape[1]

    def __cinit__(self, RingEnd end):
        self.end = end
        self.shape[0] = end.pool_size_

    def __getbuffer__(self, Py_buffer *buf, int flags):
        if self.end.pool == NULL:
            raise ValueError("ring end is closed")
        buf.buf = self.end.pool
        buf.obj = self
        buf.len = self.end.pool_size_
        buf.readonly = 0
        buf.itemsize = 1
        buf.format = NULL
        if flags & 4:   # PyBUF_FORMAT
            buf.format = "B"
        buf.ndim = 1
        buf.shape = self.shape
        buf.strides = NULL
        buf.suboffsets = NULL
        buf.internal = NULL
        self.end.exports += 1

    def __releasebuffer__(self, Py_buffer *buf):
        self.end.exports -= 1

