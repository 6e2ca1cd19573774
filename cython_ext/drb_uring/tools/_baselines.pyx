# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The mechanisms drb is measured against (drb_uring.tools._baselines),
both sides of each, behind the load loop's four calls (_load.pxd).

- grant-map, the original split-driver mechanism: one shared ring whose
  entries hold a request and then its response (as Xen's blkif ring); for
  every request the driver side maps the user's granted buffer (mmap of
  the user's memfd), does the I/O with pread/pwrite, unmaps it, and each
  side notifies the other with an eventfd every time it publishes.
- socket: each request and each response a message on a Unix
  SOCK_SEQPACKET socket, the data inside it (the usual RPC way).
- direct: the user side does io_uring on the device itself with its
  buffers registered: the ceiling without isolation.

The driver sides are loops without the GIL too (serve_grant_map,
serve_socket), so every transport's both ends are C.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t, int32_t
from libc.string cimport memcpy, memset
from libc.stdlib cimport malloc, free
from posix.unistd cimport pread, pwrite, close

from drb_uring.includes.atomic cimport drb_load_acquire, drb_store_release
from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe, IOSQE_FIXED_FILE
from drb_uring.includes.liburing cimport (io_uring, io_uring_params, io_uring_queue_mmap,
                                          io_uring_queue_exit, io_uring_get_sqe,
                                          io_uring_submit_and_wait, io_uring_wait_cqe_timeout,
                                          io_uring_peek_batch_cqe, io_uring_cq_advance,
                                          __kernel_timespec, iovec, sq_array_identity)
from drb_uring.includes.sys cimport (mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED,
                                     MAP_FAILED, read, write, errno, EINTR, EPROTO, EPIPE,
                                     ETIMEDOUT)
from drb_uring.enforce.tasks cimport DRB_OP_READ_FIXED, DRB_OP_WRITE_FIXED
from drb_uring.ring.loops cimport ERR_TIMEOUT
from drb_uring.tools._load cimport Transport, io_done

import os

cdef extern from "<sys/mman.h>" nogil:
    int MAP_PRIVATE
    int MAP_ANONYMOUS
    int MAP_POPULATE

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned msg_len
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    int sendmmsg(int fd, mmsghdr *msgs, unsigned vlen, int flags)
    int MSG_NOSIGNAL
    int MSG_DONTWAIT

cdef extern from "<errno.h>" nogil:
    int EAGAIN
    int EWOULDBLOCK
    int EINVAL
    int EMSGSIZE

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE


# ---- grant-map: the shared ring --------------------------------------------

# The ring's layout: two index words, each on its own cache line, then the
# entries. An entry holds a request until the driver side overwrites it
# with the response (so one ring carries both, as in Xen).
cdef enum:
    GM_REQ_PROD = 0
    GM_RSP_PROD = 64
    GM_STOP = 128           # set by whoever tears the ring down, then a wake-up
    GM_ENTRIES = 192

cdef struct gm_entry:
    uint64_t off
    uint32_t slot
    uint32_t len
    int32_t op              # the request's opcode
    int32_t pad
    int64_t res             # the response's result

GM_ENTRY_SIZE = sizeof(gm_entry)


def grant_ring_size(uint32_t entries):
    return GM_ENTRIES + entries * sizeof(gm_entry)


cdef inline uint32_t *gm_word(char *ring, size_t off) noexcept nogil:
    return <uint32_t *>(ring + off)


cdef inline gm_entry *gm_at(char *ring, uint32_t mask, uint32_t i) noexcept nogil:
    return <gm_entry *>(ring + GM_ENTRIES) + (i & mask)


cdef char *_map(int fd, size_t size) except NULL:
    cdef void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    if p == MAP_FAILED:
        raise OSError(errno, os.strerror(errno))
    return <char *>p


cdef int64_t _notify(int efd) noexcept nogil:
    cdef uint64_t one = 1
    if write(efd, &one, 8) != 8:
        return -errno
    return 0


cdef int64_t _drain(int efd) noexcept nogil:
    """Block until the peer has notified at least once since the last drain."""
    cdef uint64_t v
    while read(efd, &v, 8) != 8:
        if errno != EINTR:
            return -errno
    return 0


cdef class GrantMapUser(Transport):
    """The user side: buffers in a memfd the driver side maps per request."""
    cdef char *ring
    cdef size_t ring_size
    cdef uint32_t mask, req_prod, rsp_cons
    cdef int efd_req, efd_rsp
    cdef size_t pool_size

    def __init__(self, int ring_fd, uint32_t entries, int pool_fd, uint32_t slot_count,
                 uint32_t slot_size, int efd_req, int efd_rsp):
        if entries == 0 or entries & (entries - 1):
            raise ValueError("entries must be a power of two")
        self.ring_size = grant_ring_size(entries)
        self.ring = _map(ring_fd, self.ring_size)
        self.pool_size = <size_t>slot_count * slot_size
        self.pool = _map(pool_fd, self.pool_size)
        self.mask = entries - 1
        self.slot_count, self.slot_size = slot_count, slot_size
        self.depth = min(entries, slot_count)
        self.efd_req, self.efd_rsp = efd_req, efd_rsp

    def close(self):
        if self.ring != NULL:
            munmap(self.ring, self.ring_size)
            munmap(self.pool, self.pool_size)
            self.ring = self.pool = NULL

    def __dealloc__(self):
        self.close()

    cdef int post(self, uint32_t k, uint32_t slot, int opcode, uint32_t bs, uint64_t off,
                  uint64_t now) noexcept nogil:
        cdef gm_entry *e = gm_at(self.ring, self.mask, self.req_prod + k)
        e.off, e.slot, e.len, e.op, e.res = off, slot, bs, opcode, 0
        return 0

    cdef int64_t publish(self, uint32_t k) noexcept nogil:
        if k == 0:
            return 0
        self.req_prod += k
        drb_store_release(gm_word(self.ring, GM_REQ_PROD), self.req_prod)
        return _notify(self.efd_req)

    cdef int64_t wait(self, io_done *out, uint32_t cap, uint64_t timeout_ns) noexcept nogil:
        cdef uint32_t prod, n, i
        cdef int64_t r
        cdef gm_entry *e
        while True:
            prod = drb_load_acquire(gm_word(self.ring, GM_RSP_PROD))
            n = prod - self.rsp_cons
            if n > self.req_prod - self.rsp_cons:
                return -EPROTO
            if n:
                break
            if drb_load_acquire(gm_word(self.ring, GM_STOP)):
                return -EPIPE
            r = _drain(self.efd_rsp)
            if r:
                return r
        if n > cap:
            n = cap
        for i in range(n):
            e = gm_at(self.ring, self.mask, self.rsp_cons + i)
            out[i].slot = e.slot
            out[i].res = e.res
        self.rsp_cons += n
        return n


def serve_grant_map(int ring_fd, uint32_t entries, int pool_fd, uint32_t slot_count,
                    uint32_t slot_size, int dev_fd, int efd_req, int efd_rsp):
    """The driver side of grant-map until the ring's stop word is set:
    per request mmap the granted buffer, pread/pwrite, munmap, respond,
    notify. Returns (requests, error or None)."""
    cdef char *ring = _map(ring_fd, grant_ring_size(entries))
    cdef uint32_t mask = entries - 1, cons = 0, prod, rsp = 0
    cdef gm_entry *e
    cdef size_t page = sysconf(_SC_PAGESIZE), span
    cdef void *buf
    cdef int64_t res, err = 0
    cdef uint64_t served = 0
    with nogil:
        while not drb_load_acquire(gm_word(ring, GM_STOP)):
            prod = drb_load_acquire(gm_word(ring, GM_REQ_PROD))
            if prod - cons > entries:
                err = -EPROTO
                break
            while cons != prod:
                e = gm_at(ring, mask, cons)
                if e.slot >= slot_count or e.len > slot_size or e.len == 0:
                    res = -EINVAL
                else:
                    # Map the grant: only this request's pages, for this request.
                    span = (e.len + page - 1) // page * page
                    buf = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_SHARED, pool_fd,
                               <long>e.slot * slot_size)
                    if buf == MAP_FAILED:
                        res = -errno
                    else:
                        if e.op == DRB_OP_READ_FIXED:
                            res = pread(dev_fd, buf, e.len, e.off)
                            if res < 0:
                                res = -errno
                        elif e.op == DRB_OP_WRITE_FIXED:
                            res = pwrite(dev_fd, buf, e.len, e.off)
                            if res < 0:
                                res = -errno
                        else:
                            res = -EINVAL
                        munmap(buf, span)
                e.res = res
                cons += 1
                rsp += 1
                served += 1
                drb_store_release(gm_word(ring, GM_RSP_PROD), rsp)
                err = _notify(efd_rsp)
                if err:
                    break
            if err:
                break
            err = _drain(efd_req)
            if err:
                break
    munmap(ring, grant_ring_size(entries))
    return served, (os.strerror(<int>-err) if err else None)


def grant_stop(int ring_fd, int efd_req, int efd_rsp):
    """Tell both sides of a grant-map ring that it is over, and wake them."""
    cdef char *ring = _map(ring_fd, GM_ENTRIES)
    drb_store_release(gm_word(ring, GM_STOP), 1)
    munmap(ring, GM_ENTRIES)
    _notify(efd_req)
    _notify(efd_rsp)


# ---- socket -----------------------------------------------------------------

cdef struct sk_req:
    uint64_t off
    uint32_t slot
    uint32_t len
    int32_t op
    int32_t pad

cdef struct sk_rsp:
    uint32_t slot
    int32_t pad
    int64_t res


cdef class SocketUser(Transport):
    """The user side: a request (with a write's data) per message; the
    response carries a read's data. The driver side answers in order, so
    each response lands straight in the slot it belongs to."""
    cdef int fd
    cdef sk_req *staged
    cdef mmsghdr *msgs
    cdef iovec *iovs
    cdef uint32_t *fifo           # the slots in flight, in the order posted
    cdef uint32_t head, tail, cap
    cdef size_t pool_size

    def __init__(self, int sock_fd, uint32_t slot_count, uint32_t slot_size, uint32_t depth):
        self.fd = sock_fd
        self.slot_count, self.slot_size, self.depth = slot_count, slot_size, depth
        self.pool_size = <size_t>slot_count * slot_size
        cdef void *p = mmap(NULL, self.pool_size, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        if p == MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        self.pool = <char *>p
        self.cap = 1
        while self.cap < depth:
            self.cap <<= 1
        self.staged = <sk_req *>malloc(sizeof(sk_req) * depth)
        self.msgs = <mmsghdr *>malloc(sizeof(mmsghdr) * depth)
        self.iovs = <iovec *>malloc(sizeof(iovec) * 2 * depth)
        self.fifo = <uint32_t *>malloc(sizeof(uint32_t) * self.cap)
        if not (self.staged and self.msgs and self.iovs and self.fifo):
            raise MemoryError()

    def close(self):
        if self.pool != NULL:
            munmap(self.pool, self.pool_size)
            self.pool = NULL
        free(self.staged); free(self.msgs); free(self.iovs); free(self.fifo)
        self.staged = NULL; self.msgs = NULL; self.iovs = NULL; self.fifo = NULL

    def __dealloc__(self):
        self.close()

    cdef int post(self, uint32_t k, uint32_t slot, int opcode, uint32_t bs, uint64_t off,
                  uint64_t now) noexcept nogil:
        cdef sk_req *r = &self.staged[k]
        r.off, r.slot, r.len, r.op, r.pad = off, slot, bs, opcode, 0
        return 0

    cdef int64_t publish(self, uint32_t k) noexcept nogil:
        cdef uint32_t i, sent = 0
        cdef int n
        if k == 0:
            return 0
        memset(self.msgs, 0, sizeof(mmsghdr) * k)
        for i in range(k):
            self.iovs[2 * i].iov_base = &self.staged[i]
            self.iovs[2 * i].iov_len = sizeof(sk_req)
            self.iovs[2 * i + 1].iov_base = self.pool + <size_t>self.staged[i].slot * self.slot_size
            self.iovs[2 * i + 1].iov_len = (self.staged[i].len
                                            if self.staged[i].op == DRB_OP_WRITE_FIXED else 0)
            self.msgs[i].msg_hdr.msg_iov = &self.iovs[2 * i]
            self.msgs[i].msg_hdr.msg_iovlen = 2
            self.fifo[(self.tail + i) & (self.cap - 1)] = self.staged[i].slot
        while sent < k:
            n = sendmmsg(self.fd, &self.msgs[sent], k - sent, MSG_NOSIGNAL)
            if n < 0:
                if errno == EINTR:
                    continue
                return -errno
            sent += n
        self.tail += k
        return 0

    cdef int64_t wait(self, io_done *out, uint32_t cap, uint64_t timeout_ns) noexcept nogil:
        cdef msghdr m
        cdef iovec iov[2]
        cdef sk_rsp r
        cdef uint32_t got = 0, slot
        cdef ssize_t n
        while got < cap and self.head != self.tail:
            slot = self.fifo[self.head & (self.cap - 1)]
            iov[0].iov_base = &r
            iov[0].iov_len = sizeof(r)
            iov[1].iov_base = self.pool + <size_t>slot * self.slot_size
            iov[1].iov_len = self.slot_size
            memset(&m, 0, sizeof(m))
            m.msg_iov = iov
            m.msg_iovlen = 2
            # Block for the first response only (the socket's receive
            # timeout bounds it); take the rest that are already there.
            n = recvmsg(self.fd, &m, 0 if got == 0 else MSG_DONTWAIT)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN or errno == EWOULDBLOCK:
                    if got:
                        break
                    return ERR_TIMEOUT
                return -errno
            if n == 0:
                return -EPIPE
            if <size_t>n < sizeof(r) or r.slot != slot:
                return -EPROTO
            out[got].slot = slot
            out[got].res = r.res
            got += 1
            self.head += 1
        return got


def serve_socket(int sock_fd, uint32_t slot_size, int dev_fd):
    """The driver side of the socket baseline until the peer closes:
    receive a request, do it with pread/pwrite on its own buffer, send the
    response (with a read's data). Returns (requests, error or None)."""
    cdef char *buf = <char *>malloc(slot_size)
    cdef sk_req q
    cdef sk_rsp r
    cdef msghdr m
    cdef iovec iov[2]
    cdef ssize_t n
    cdef int64_t err = 0
    cdef uint64_t served = 0
    if buf == NULL:
        raise MemoryError()
    with nogil:
        while True:
            iov[0].iov_base = &q
            iov[0].iov_len = sizeof(q)
            iov[1].iov_base = buf
            iov[1].iov_len = slot_size
            memset(&m, 0, sizeof(m))
            m.msg_iov = iov
            m.msg_iovlen = 2
            n = recvmsg(sock_fd, &m, 0)
            if n < 0:
                if errno == EINTR:
                    continue
                err = -errno
                break
            if n == 0:
                break                      # the user side is gone: done
            r.slot, r.pad = q.slot, 0
            if <size_t>n < sizeof(q) or q.len > slot_size or q.len == 0:
                r.res = -EINVAL
            elif q.op == DRB_OP_READ_FIXED:
                r.res = pread(dev_fd, buf, q.len, q.off)
                if r.res < 0:
                    r.res = -errno
            elif q.op == DRB_OP_WRITE_FIXED and <size_t>n == sizeof(q) + q.len:
                r.res = pwrite(dev_fd, buf, q.len, q.off)
                if r.res < 0:
                    r.res = -errno
            else:
                r.res = -EINVAL
            iov[0].iov_base = &r
            iov[0].iov_len = sizeof(r)
            iov[1].iov_len = <size_t>r.res if q.op == DRB_OP_READ_FIXED and r.res > 0 else 0
            memset(&m, 0, sizeof(m))
            m.msg_iov = iov
            m.msg_iovlen = 2
            served += 1
            if sendmsg(sock_fd, &m, MSG_NOSIGNAL) < 0:
                err = -errno
                break
    free(buf)
    return served, (os.strerror(<int>-err) if err and err != -EPIPE else None)


# ---- direct -------------------------------------------------------------------

cdef class DirectUser(Transport):
    """The user side driving an io_uring on the device itself: no driver
    side. The ring is handed over ready (made by direct_ring on the host,
    since no domain may create one): the device is its fixed file 0 and
    the user's pool its fixed buffers, as a grant ring has them, so the
    only difference from drb is who submits."""
    cdef io_uring ring
    cdef bint ready
    cdef uint32_t pending
    cdef size_t pool_size
    cdef uint64_t base

    def __init__(self, int ring_fd, bytes params, int pool_fd, uint64_t base,
                 uint32_t slot_count, uint32_t slot_size, uint32_t depth):
        cdef io_uring_params p
        cdef int r
        if len(params) != sizeof(io_uring_params):
            raise ValueError("params: not an io_uring_params")
        memcpy(&p, <const char *>params, sizeof(p))
        self.slot_count, self.slot_size = slot_count, slot_size
        self.depth = min(depth, p.sq_entries)
        self.pool_size = <size_t>slot_count * slot_size
        self.pool = _map(pool_fd, self.pool_size)
        self.base = base
        # Our own descriptor: io_uring_queue_exit closes the one it has.
        cdef int fd = os.dup(ring_fd)
        r = io_uring_queue_mmap(fd, &p, &self.ring)
        if r < 0:
            os.close(fd)
            raise OSError(-r, f"io_uring_queue_mmap: {os.strerror(-r)}")
        self.ready = True
        # queue_mmap does not copy the features either: without EXT_ARG,
        # liburing would wait by queueing a timeout SQE of its own, whose
        # completion the batch peek would hand us as a response.
        self.ring.features = p.features
        sq_array_identity(&self.ring, p.flags)

    def close(self):
        if self.ready:
            io_uring_queue_exit(&self.ring)
            self.ready = False
        if self.pool != NULL:
            munmap(self.pool, self.pool_size)
            self.pool = NULL

    def __dealloc__(self):
        self.close()

    cdef int post(self, uint32_t k, uint32_t slot, int opcode, uint32_t bs, uint64_t off,
                  uint64_t now) noexcept nogil:
        cdef io_uring_sqe *s = io_uring_get_sqe(&self.ring)
        if s == NULL:
            return -EPROTO
        memset(s, 0, sizeof(io_uring_sqe))
        s.opcode = opcode
        s.flags = IOSQE_FIXED_FILE
        s.fd = 0
        s.addr = self.base + <uint64_t>slot * self.slot_size
        s.len = bs
        s.off = off
        s.buf_index = slot
        s.user_data = slot
        return 0

    cdef int64_t publish(self, uint32_t k) noexcept nogil:
        # Submitted with the next wait, in one system call.
        self.pending += k
        return 0

    cdef int64_t wait(self, io_done *out, uint32_t cap, uint64_t timeout_ns) noexcept nogil:
        cdef io_uring_cqe *cqes[256]
        cdef io_uring_cqe *c
        cdef __kernel_timespec ts
        cdef uint32_t n, i
        cdef int r
        if self.pending:
            r = io_uring_submit_and_wait(&self.ring, 1)
            if r < 0 and r != -EINTR:
                return r
            self.pending = 0
        if cap > 256:
            cap = 256
        n = io_uring_peek_batch_cqe(&self.ring, cqes, cap)
        if n == 0:
            ts.tv_sec = timeout_ns // 1000000000
            ts.tv_nsec = timeout_ns % 1000000000
            r = io_uring_wait_cqe_timeout(&self.ring, &c, &ts)
            if r == -ETIMEDOUT:
                return ERR_TIMEOUT
            if r < 0:
                return r
            n = io_uring_peek_batch_cqe(&self.ring, cqes, cap)
        for i in range(n):
            out[i].slot = <uint32_t>cqes[i].user_data
            out[i].res = cqes[i].res
        io_uring_cq_advance(&self.ring, n)
        return n
