# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The channel load generator behind `drb bench` and `drb demo`
(drb_uring.tools._load).

One loop, entirely in C without the GIL: keep `qd` requests in flight on a
channel's user end, re-post each slot as soon as its response arrives, and
record every request's latency. It writes task entries exactly as the
channel client does, so the monitor checks every request it makes.
"""
from libc.stdint cimport uint16_t, uint32_t, uint64_t, int64_t, int32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

from drb_uring.includes.atomic cimport drb_now_ns
from drb_uring.includes.io_uring cimport io_uring_sqe, io_uring_cqe
from drb_uring.includes.sys cimport EBUSY
from drb_uring.ring.spsc cimport (prod_entry, prod_publish, cons_avail, cons_entry,
                                  cons_release, drb_notify, drb_wait_cons)
from drb_uring.ring.loops cimport ERR_TIMEOUT, loop_result
from drb_uring.ring._spsc cimport UserEnd
from drb_uring.enforce.tasks cimport task_post, task_release, task_reaped

from array import array


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


def run(UserEnd u, int opcode, uint32_t bs, uint32_t qd, double seconds,
                     uint64_t extent, bint rand, uint64_t seed, uint32_t max_samples=2000000,
                     samples=None):
    """The `drb bench` loop: keep `qd` requests of `bs` bytes in flight on
    one channel for `seconds`, one slot per request (zero copy: the data
    stays in the pool). Returns counts and an array('Q') of latencies (ns).

    With `samples` (a preallocated array('Q')), latencies go there and the
    result has "nsamples" instead: the call then allocates nothing, so
    mapping calls counted around it are the I/O path's own."""
    if qd == 0 or qd > u.geometry.slot_count or qd > u.prod.size:
        raise ValueError(f"qd must be in [1, {min(u.geometry.slot_count, u.prod.size)}]")
    if bs == 0 or bs > u.geometry.slot_size or bs > extent:
        raise ValueError(f"bs must be in [1, {min(u.geometry.slot_size, extent)}]")
    own = samples is None
    if own:
        samples = array("Q", bytes(8 * max_samples))
    cdef uint64_t[:] lat = samples
    max_samples = min(max_samples, len(samples))
    cdef uint64_t *posted = <uint64_t *>malloc(sizeof(uint64_t) * qd)
    cdef uint64_t blocks = extent // bs
    cdef uint64_t next_block = 0, state = seed | 1
    cdef uint64_t ios = 0, errors = 0, nsamp = 0, t0, now, end_ns
    cdef uint32_t i, slot, inflight = 0, k
    cdef int64_t n, err = 0
    cdef io_uring_cqe cqe
    if posted == NULL:
        raise MemoryError()
    with nogil:
        t0 = drb_now_ns()
        end_ns = t0 + <uint64_t>(seconds * 1e9)
        now = t0
        for slot in range(qd):
            fill_io(u, <io_uring_sqe *>prod_entry(&u.prod, slot), opcode, slot, bs,
                    next_offset(&state, &next_block, blocks, bs, rand), now)
            posted[slot] = now
        prod_publish(&u.prod, qd)
        drb_notify(&u.waiter)
        inflight = qd
        while inflight:
            n = drb_wait_cons(&u.waiter, &u.cons, 5000000000)
            if n <= 0:
                err = n if n < 0 else ERR_TIMEOUT
                break
            now = drb_now_ns()
            k = 0
            for i in range(<uint32_t>n):
                memcpy(&cqe, cons_entry(&u.cons, i), sizeof(cqe))
                slot = <uint32_t>cqe.user_data
                if slot >= qd:
                    errors += 1
                    continue
                if cqe.res != <int32_t>bs:
                    errors += 1
                ios += 1
                if u.tasks != NULL:
                    # Revoke, and reuse the slot only if the kernel is done
                    # with it, as the channel client does.
                    task_reaped(&u.tasks[slot], u.reap_hist, now)
                    if task_release(&u.tasks[slot]) != 0:
                        err = -EBUSY
                        break
                if nsamp < max_samples:
                    lat[nsamp] = now - posted[slot]
                    nsamp += 1
                if now >= end_ns:
                    inflight -= 1
                    continue
                # Re-post in the same slot: the ring has room, since every
                # response frees exactly one request entry.
                fill_io(u, <io_uring_sqe *>prod_entry(&u.prod, k), opcode, slot, bs,
                        next_offset(&state, &next_block, blocks, bs, rand), now)
                posted[slot] = now
                k += 1
            if err:
                break
            cons_release(&u.cons, <uint32_t>n)
            if k:
                prod_publish(&u.prod, k)
            drb_notify(&u.waiter)
        now = drb_now_ns()
    free(posted)
    res = loop_result(err, ios, errors, t0, now, u)
    if own:
        res["latencies_ns"] = samples[:nsamp]
    else:
        res["nsamples"] = nsamp
    return res
