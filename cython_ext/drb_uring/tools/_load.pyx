# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load generator behind `drb bench` and `drb demo`
(drb_uring.tools._load).

One loop, entirely in C without the GIL: keep `qd` requests in flight on a
transport, re-post each slot as soon as its response arrives, and record
every request's latency. Every transport (the double ring and the
baselines in _baselines) sits behind the same four calls (_load.pxd), so
the loop is the same for all of them. On the double ring it writes task
entries exactly as the channel client does, so the monitor checks every
request it makes.
"""
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from drb_uring.includes.atomic cimport drb_now_ns
from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe
from drb_uring.includes.sys cimport EBUSY
from drb_uring.ring.spsc cimport (prod_entry, prod_publish, cons_entry, cons_release,
                                  drb_notify, drb_wait_cons)
from drb_uring.ring.loops cimport ERR_TIMEOUT, loop_result
from drb_uring.ring._spsc cimport UserEnd
from drb_uring.enforce.tasks cimport (task_post, task_release, task_reaped,
                                      DRB_OP_READ_FIXED, DRB_OP_WRITE_FIXED)

from array import array

# The opcodes the loop speaks, for every transport (io_uring's own).
OP_READ = DRB_OP_READ_FIXED
OP_WRITE = DRB_OP_WRITE_FIXED


cdef class Transport:
    """The base: subclasses fill in the four calls and the pool."""

    cdef int post(self, uint32_t k, uint32_t slot, int opcode, uint32_t bs, uint64_t off,
                  uint64_t now) noexcept nogil:
        return 0

    cdef int64_t publish(self, uint32_t k) noexcept nogil:
        return 0

    cdef int64_t wait(self, io_done *out, uint32_t cap, uint64_t timeout_ns) noexcept nogil:
        return ERR_TIMEOUT

    cdef int64_t release(self, uint32_t slot, uint64_t now) noexcept nogil:
        return 0

    @property
    def stats(self):
        return {}

    def batch(self, int opcode, offsets, uint32_t bs, datas=None, uint32_t first_slot=0,
              double timeout=5.0):
        """Requests at `offsets` (bs bytes each, slots first_slot...),
        published together and reaped together through the same four calls
        the loop uses: reads return the bytes of each, writes (of `datas`)
        the counts. The integrity checks of every transport go through here."""
        cdef uint32_t n = len(offsets), i, got = 0
        cdef int64_t r = 0
        cdef io_done *done
        cdef uint64_t t_ns = <uint64_t>(timeout * 1e9)
        if self.pool == NULL:
            raise ValueError("transport is closed")
        if n == 0 or n > self.depth or first_slot + n > self.slot_count:
            raise ValueError(f"1 to {self.depth} requests within {self.slot_count} slots")
        if bs == 0 or bs > self.slot_size:
            raise ValueError(f"bs must be in [1, {self.slot_size}]")
        if opcode == DRB_OP_WRITE_FIXED:
            if datas is None or len(datas) != n or any(len(d) != bs for d in datas):
                raise ValueError(f"writes need {n} buffers of {bs} bytes")
            for i in range(n):
                memcpy(self.pool + <size_t>(first_slot + i) * self.slot_size,
                       <const char *>datas[i], bs)
        offs = [int(o) for o in offsets]
        done = <io_done *>malloc(sizeof(io_done) * n)
        if done == NULL:
            raise MemoryError()
        results = {}
        try:
            for i in range(n):
                self.post(i, first_slot + i, opcode, bs, offs[i], drb_now_ns())
            with nogil:
                r = self.publish(n)
            while r == 0 and got < n:
                with nogil:
                    r = self.wait(done, n - got, t_ns)
                if r <= 0:
                    break
                for i in range(<uint32_t>r):
                    if done[i].slot - first_slot >= n or done[i].slot in results:
                        raise OSError(71, f"response for slot {done[i].slot}, not one asked")
                    results[done[i].slot] = done[i].res
                    if self.release(done[i].slot, drb_now_ns()) != 0:
                        raise OSError(16, "slot still in use by the kernel")
                got += <uint32_t>r
                r = 0
        finally:
            free(done)
        if got < n:
            raise OSError(-r if 0 < -r < 4096 else 110, f"transport request failed ({r})")
        out = []
        for i in range(n):
            res = results[first_slot + i]
            if res < 0:
                raise OSError(<int>-res, f"request {i} failed on the driver side")
            if opcode == DRB_OP_WRITE_FIXED:
                out.append(res)
            else:
                out.append(bytes((self.pool + <size_t>(first_slot + i) * self.slot_size)[:res]))
        return out


cdef inline void fill_io(UserEnd u, io_uring_sqe *s, int opcode, uint32_t slot, uint32_t bs,
                         uint64_t off, uint64_t now) noexcept nogil:
    if u.tasks != NULL:
        task_post(&u.tasks[slot], opcode, bs, off, now)
    memset(s, 0, sizeof(io_uring_sqe))
    s.opcode = opcode
    s.buf_index = <uint16_t>slot
    s.len = bs
    s.off = off
    s.user_data = slot


cdef class RingTransport(Transport):
    """The double ring: a channel's user end (drb and drb-poll)."""
    cdef UserEnd u

    def __init__(self, UserEnd u):
        self.u = u
        self.pool = u.pool
        self.slot_count = u.geometry.slot_count
        self.slot_size = u.geometry.slot_size
        self.depth = min(u.geometry.slot_count, u.prod.size)

    @property
    def stats(self):
        return self.u.stats

    cdef int post(self, uint32_t k, uint32_t slot, int opcode, uint32_t bs, uint64_t off,
                  uint64_t now) noexcept nogil:
        fill_io(self.u, <io_uring_sqe *>prod_entry(&self.u.prod, k), opcode, slot, bs, off, now)
        return 0

    cdef int64_t publish(self, uint32_t k) noexcept nogil:
        if k:
            prod_publish(&self.u.prod, k)
        drb_notify(&self.u.waiter)
        return 0

    cdef int64_t wait(self, io_done *out, uint32_t cap, uint64_t timeout_ns) noexcept nogil:
        cdef int64_t n = drb_wait_cons(&self.u.waiter, &self.u.cons, timeout_ns)
        cdef uint32_t i
        cdef io_uring_cqe cqe
        if n <= 0:
            return n if n < 0 else ERR_TIMEOUT
        if n > cap:
            n = cap
        for i in range(<uint32_t>n):
            memcpy(&cqe, cons_entry(&self.u.cons, i), sizeof(cqe))
            # A tag past 32 bits is no slot: it must not alias one.
            out[i].slot = <uint32_t>(cqe.user_data if cqe.user_data >> 32 == 0 else 0xffffffff)
            out[i].res = cqe.res
        cons_release(&self.u.cons, <uint32_t>n)
        return n

    cdef int64_t release(self, uint32_t slot, uint64_t now) noexcept nogil:
        if self.u.tasks != NULL:
            # Revoke, and reuse the slot only if the kernel is done with
            # it, as the channel client does.
            task_reaped(&self.u.tasks[slot], self.u.reap_hist, now)
            if task_release(&self.u.tasks[slot]) != 0:
                return -EBUSY
        return 0


cdef inline uint64_t next_offset(uint64_t *state, uint64_t *next_block, uint64_t blocks,
                                 uint32_t bs, bint rand) noexcept nogil:
    """Block-aligned offset: xorshift64 for random, else the next block."""
    cdef uint64_t x
    if rand:
        x = state[0]
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        state[0] = x
        return (x % blocks) * bs
    x = next_block[0]
    next_block[0] = x + 1
    return (x % blocks) * bs


def run(t, int opcode, uint32_t bs, uint32_t qd, double seconds,
        uint64_t extent, bint rand, uint64_t seed, uint32_t max_samples=2000000,
        samples=None):
    """The `drb bench` loop: keep `qd` requests of `bs` bytes in flight on
    a transport (or a channel's UserEnd) for `seconds`, one slot per
    request. Returns counts and an array('Q') of latencies (ns).

    With `samples` (a preallocated array('Q')), latencies go there and the
    result has "nsamples" instead: the call then allocates nothing, so
    mapping calls counted around it are the I/O path's own."""
    cdef Transport tr = RingTransport(t) if isinstance(t, UserEnd) else t
    if qd == 0 or qd > tr.depth:
        raise ValueError(f"qd must be in [1, {tr.depth}]")
    if bs == 0 or bs > tr.slot_size or bs > extent:
        raise ValueError(f"bs must be in [1, {min(tr.slot_size, extent)}]")
    own = samples is None
    if own:
        samples = array("Q", bytes(8 * max_samples))
    cdef uint64_t[:] lat = samples
    max_samples = min(max_samples, len(samples))
    cdef uint64_t *posted = <uint64_t *>malloc(sizeof(uint64_t) * qd)
    cdef io_done *done = <io_done *>malloc(sizeof(io_done) * qd)
    cdef uint64_t blocks = extent // bs
    cdef uint64_t next_block = 0, state = seed | 1
    cdef uint64_t ios = 0, errors = 0, nsamp = 0, t0, now, end_ns
    cdef uint32_t i, slot, inflight = 0, k
    cdef int64_t n, err = 0
    if posted == NULL or done == NULL:
        free(posted)
        free(done)
        raise MemoryError()
    with nogil:
        t0 = drb_now_ns()
        end_ns = t0 + <uint64_t>(seconds * 1e9)
        now = t0
        for slot in range(qd):
            tr.post(slot, slot, opcode, bs, next_offset(&state, &next_block, blocks, bs, rand),
                    now)
            posted[slot] = now
        err = tr.publish(qd)
        inflight = qd if err == 0 else 0
        while inflight:
            n = tr.wait(done, qd, 5000000000)
            if n <= 0:
                err = n
                break
            now = drb_now_ns()
            k = 0
            for i in range(<uint32_t>n):
                slot = done[i].slot
                if slot >= qd:
                    errors += 1
                    continue
                if done[i].res != <int64_t>bs:
                    errors += 1
                ios += 1
                err = tr.release(slot, now)
                if err:
                    break
                if nsamp < max_samples:
                    lat[nsamp] = now - posted[slot]
                    nsamp += 1
                if now >= end_ns:
                    inflight -= 1
                    continue
                # Re-post in the same slot: the request ring has room, since
                # every response frees exactly one request entry.
                tr.post(k, slot, opcode, bs, next_offset(&state, &next_block, blocks, bs, rand),
                        now)
                posted[slot] = now
                k += 1
            if err:
                break
            err = tr.publish(k)
            if err:
                break
        now = drb_now_ns()
    free(posted)
    free(done)
    res = loop_result(err, ios, errors, t0, now, tr)
    if own:
        res["latencies_ns"] = samples[:nsamp]
    else:
        res["nsamples"] = nsamp
    return res
