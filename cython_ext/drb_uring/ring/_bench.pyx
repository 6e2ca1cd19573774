# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Per-entry loops that measure and soak the double ring (drb_uring.ring._bench).

Each loop runs entirely in C without the GIL. Entries carry a sequence
number and a checksum derived from it, so the receiving side can prove that
nothing was lost, duplicated, reordered or torn.
"""
from cpython.buffer cimport PyBUF_WRITABLE, PyObject_GetBuffer, PyBuffer_Release
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from drb_uring.includes.atomic cimport (drb_load_acquire, drb_store_release, drb_cpu_relax,
                              drb_now_ns)
from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe
from drb_uring.includes.sys cimport timespec, EPROTO
from drb_uring.ring.spsc cimport (prod_space, prod_space_fresh, prod_entry, prod_publish,
                   cons_avail, cons_entry, cons_release, drb_notify,
                   drb_wait_cons, drb_wait_prod)
from drb_uring.ring.loops cimport ERR_TIMEOUT, loop_result
from drb_uring.ring._spsc cimport UserEnd, DriverEnd

from array import array

cdef extern from "<time.h>" nogil:
    int nanosleep(const timespec *req, timespec *rem)


cdef inline uint64_t mix(uint64_t x) noexcept nogil:
    # splitmix64: a cheap checksum that differs for every sequence number.
    x += 0x9E3779B97F4A7C15ULL
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL
    return x ^ (x >> 31)


cdef inline void fill_sqe(io_uring_sqe *s, uint64_t seq) noexcept nogil:
    memset(s, 0, sizeof(io_uring_sqe))
    s.user_data = seq
    s.off = mix(seq)
    s.addr = ~mix(seq)
    s.len = <uint32_t>seq


cdef inline bint sqe_ok(const io_uring_sqe *s, uint64_t seq) noexcept nogil:
    return (s.user_data == seq and s.off == mix(seq) and s.addr == ~mix(seq)
            and s.len == <uint32_t>seq and s.opcode == 0)


cdef inline void fill_cqe(io_uring_cqe *c, uint64_t seq) noexcept nogil:
    c.user_data = seq
    c.res = <int32_t>(mix(seq) & 0x7fffffff)
    c.flags = <uint32_t>(mix(seq) >> 32)


cdef inline bint cqe_ok(const io_uring_cqe *c, uint64_t seq) noexcept nogil:
    return (c.user_data == seq and c.res == <int32_t>(mix(seq) & 0x7fffffff)
            and c.flags == <uint32_t>(mix(seq) >> 32))


cdef inline int64_t _ns(double seconds) noexcept nogil:
    return <int64_t>(seconds * 1e9) if seconds >= 0 else -1


def stream_user(UserEnd u, uint64_t count, uint32_t batch=32, double timeout=10.0,
                uint32_t pause_every=0, uint64_t pause_ns=0):
    """User side of the two-way soak: post `count` requests (batches of up
    to `batch`), reap and check `count` responses. With pause_every > 0 the
    producer sleeps pause_ns after every pause_every batches so the peer
    keeps finding an empty ring and must sleep."""
    cdef uint64_t sent = 0, recvd = 0, errors = 0, batches = 0
    cdef int64_t space, n, err = 0
    cdef uint32_t i, k
    cdef io_uring_cqe cqe
    cdef int64_t tmo = _ns(timeout)
    cdef timespec ts
    cdef uint64_t t0, t1
    if batch == 0:
        raise ValueError("batch must be >= 1")
    ts.tv_sec = pause_ns // 1000000000
    ts.tv_nsec = pause_ns % 1000000000
    with nogil:
        t0 = drb_now_ns()
        while recvd < count:
            space = 0
            if sent < count:
                space = prod_space(&u.prod, batch)
                if space < 0:
                    err = space
                    break
                k = batch
                if k > space:
                    k = <uint32_t>space
                if k > count - sent:
                    k = <uint32_t>(count - sent)
                if k > 0:
                    for i in range(k):
                        fill_sqe(<io_uring_sqe *>prod_entry(&u.prod, i), sent + i)
                    prod_publish(&u.prod, k)
                    drb_notify(&u.waiter)
                    sent += k
                    batches += 1
                    if pause_every and batches % pause_every == 0:
                        nanosleep(&ts, NULL)
            n = cons_avail(&u.cons, 1)
            if n < 0:
                err = n
                break
            if n == 0 and (sent == count or space == 0):
                n = drb_wait_cons(&u.waiter, &u.cons, tmo)
                if n == 0:
                    err = ERR_TIMEOUT
                    break
                if n < 0:
                    err = n
                    break
            if n > 0:
                for i in range(<uint32_t>n):
                    memcpy(&cqe, cons_entry(&u.cons, i), sizeof(cqe))
                    if not cqe_ok(&cqe, recvd + i):
                        errors += 1
                cons_release(&u.cons, <uint32_t>n)
                drb_notify(&u.waiter)
                recvd += <uint64_t>n
        t1 = drb_now_ns()
    return loop_result(err, recvd, errors, t0, t1, u)


def echo_driver(DriverEnd d, uint64_t count, uint32_t batch=32, double timeout=10.0):
    """Driver side of the two-way soak and of the round-trip benchmark: copy
    each request out once, check it, answer it."""
    cdef uint64_t done = 0, errors = 0
    cdef int64_t n, err = 0
    cdef uint32_t i, k
    cdef int64_t tmo = _ns(timeout)
    cdef io_uring_sqe *local = <io_uring_sqe *>malloc(sizeof(io_uring_sqe) * batch)
    cdef uint64_t t0, t1
    if local == NULL:
        raise MemoryError()
    try:
        with nogil:
            t0 = drb_now_ns()
            while done < count:
                n = drb_wait_cons(&d.waiter, &d.cons, tmo)
                if n <= 0:
                    err = n if n < 0 else ERR_TIMEOUT
                    break
                k = batch if n > batch else <uint32_t>n
                for i in range(k):
                    memcpy(&local[i], cons_entry(&d.cons, i), sizeof(io_uring_sqe))
                cons_release(&d.cons, k)
                drb_notify(&d.waiter)
                n = drb_wait_prod(&d.waiter, &d.prod, k, tmo)
                if n < k:
                    err = n if n < 0 else ERR_TIMEOUT
                    break
                for i in range(k):
                    if not sqe_ok(&local[i], done + i):
                        errors += 1
                    fill_cqe(<io_uring_cqe *>prod_entry(&d.prod, i), local[i].user_data)
                prod_publish(&d.prod, k)
                drb_notify(&d.waiter)
                done += k
            t1 = drb_now_ns()
    finally:
        free(local)
    return loop_result(err, done, errors, t0, t1, d)


def push_stream(UserEnd u, uint64_t count, uint32_t batch=32, double timeout=10.0):
    """One-way rate: post `count` requests in batches of `batch`, then wait
    until the peer has consumed them all. Returns the result with seconds."""
    cdef uint64_t sent = 0
    cdef int64_t space, err = 0
    cdef uint32_t i, k
    cdef int64_t tmo = _ns(timeout)
    cdef uint64_t t0, t1
    if batch == 0 or batch > u.prod.size:
        raise ValueError(f"batch must be in [1, {u.prod.size}]")
    with nogil:
        t0 = drb_now_ns()
        while sent < count:
            k = batch
            if k > count - sent:
                k = <uint32_t>(count - sent)
            space = drb_wait_prod(&u.waiter, &u.prod, k, tmo)
            if space < k:
                err = space if space < 0 else ERR_TIMEOUT
                break
            for i in range(k):
                fill_sqe(<io_uring_sqe *>prod_entry(&u.prod, i), sent + i)
            prod_publish(&u.prod, k)
            drb_notify(&u.waiter)
            sent += k
        if err == 0:
            space = drb_wait_prod(&u.waiter, &u.prod, u.prod.size, tmo)
            if space < u.prod.size:
                err = space if space < 0 else ERR_TIMEOUT
        t1 = drb_now_ns()
    return loop_result(err, sent, 0, t0, t1, u)


def drain_driver(DriverEnd d, uint64_t count, uint32_t batch=32, double timeout=10.0):
    """Consumer for push_stream: take requests in batches, check them, no answer."""
    cdef uint64_t done = 0, errors = 0
    cdef int64_t n, err = 0
    cdef uint32_t i, k
    cdef int64_t tmo = _ns(timeout)
    cdef io_uring_sqe local
    cdef uint64_t t0, t1
    with nogil:
        t0 = drb_now_ns()
        while done < count:
            n = drb_wait_cons(&d.waiter, &d.cons, tmo)
            if n <= 0:
                err = n if n < 0 else ERR_TIMEOUT
                break
            k = batch if n > batch else <uint32_t>n
            for i in range(k):
                memcpy(&local, cons_entry(&d.cons, i), sizeof(local))
                if not sqe_ok(&local, done + i):
                    errors += 1
            cons_release(&d.cons, k)
            drb_notify(&d.waiter)
            done += k
        t1 = drb_now_ns()
    return loop_result(err, done, errors, t0, t1, d)


def pingpong_user(UserEnd u, uint64_t iters, double timeout=10.0, uint64_t first=0):
    """Round trips of one request and its response, numbered from `first`;
    returns an array('Q') of per-trip nanoseconds."""
    samples = array("Q", bytes(8 * iters))
    cdef uint64_t[:] out = samples
    cdef uint64_t i, t0
    cdef int64_t n, err = 0
    cdef int64_t tmo = _ns(timeout)
    cdef io_uring_cqe cqe
    with nogil:
        for i in range(iters):
            t0 = drb_now_ns()
            fill_sqe(<io_uring_sqe *>prod_entry(&u.prod, 0), first + i)
            prod_publish(&u.prod, 1)
            drb_notify(&u.waiter)
            n = drb_wait_cons(&u.waiter, &u.cons, tmo)
            if n <= 0:
                err = n if n < 0 else ERR_TIMEOUT
                break
            memcpy(&cqe, cons_entry(&u.cons, 0), sizeof(cqe))
            cons_release(&u.cons, 1)
            out[i] = drb_now_ns() - t0
            if not cqe_ok(&cqe, first + i):
                err = -EPROTO
                break
    if err:
        raise RuntimeError(loop_result(err, i, 0, 0, 0, u)["error"])
    return samples


cdef class _Line:
    """Two 32-bit words in one cache line of a shared mapping."""
    cdef Py_buffer view
    cdef uint32_t *ping
    cdef uint32_t *pong

    def __cinit__(self, buffer):
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        if self.view.len < 64:
            PyBuffer_Release(&self.view)
            raise ValueError("need at least one cache line")
        self.ping = <uint32_t *>self.view.buf
        self.pong = self.ping + 1

    def __dealloc__(self):
        PyBuffer_Release(&self.view)


def raw_pingpong(buffer, uint64_t iters, bint initiator, double timeout=10.0):
    """The physical floor: one cache line bounced between two processes.
    The initiator returns an array('Q') of round-trip ns; the echoer None."""
    cdef _Line line = _Line(buffer)
    samples = array("Q", bytes(8 * iters if initiator else 0))
    cdef uint64_t[:] out = samples if initiator else array("Q", [0])
    cdef uint64_t i, t0
    cdef uint32_t seq
    cdef uint64_t limit = <uint64_t>(timeout * 1e9)
    cdef uint64_t start
    cdef bint stalled = False
    with nogil:
        for i in range(iters):
            seq = <uint32_t>(i + 1)
            if initiator:
                t0 = drb_now_ns()
                drb_store_release(line.ping, seq)
                while drb_load_acquire(line.pong) != seq:
                    drb_cpu_relax()
                out[i] = drb_now_ns() - t0
            else:
                start = drb_now_ns()
                while drb_load_acquire(line.ping) != seq:
                    drb_cpu_relax()
                    if drb_now_ns() - start > limit:
                        stalled = True
                        break
                if stalled:
                    break
                drb_store_release(line.pong, seq)
    if stalled:
        raise RuntimeError("raw ping-pong peer stalled")
    return samples if initiator else None
