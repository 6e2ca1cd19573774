# The single-producer/single-consumer ring core and the sleep/wake protocol.
#
# Everything here is `cdef inline ... nogil` so the per-entry work compiles
# to straight C in every module that cimports it (the ring API, the
# benchmark loops, the channel worker and the load generator).
#
# Each side keeps private copies of its own index and of the last peer index
# it saw. It never reads back from shared memory what it wrote itself, and it
# checks every peer index it loads: a hostile or corrupted peer can stall the
# ring but cannot make this side read or write outside it.
from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.string cimport memcpy

from drb_uring.includes.atomic cimport (drb_load_acquire, drb_store_release,
                              drb_load_relaxed, drb_store_relaxed,
                              drb_fence, drb_cpu_relax, drb_now_ns)
from drb_uring.includes.sys cimport (pollfd, ppoll, timespec, POLLIN, POLLERR, POLLHUP,
                           POLLNVAL, read, write, errno, EINTR, EAGAIN,
                           EPROTO, EPIPE)

# Bit in a party's flags word: "I am about to sleep or sleeping; signal my
# eventfd when you publish".
cdef enum:
    DRB_NEED_WAKEUP = 1
    # How many spin iterations between two clock reads while spinning.
    DRB_SPIN_CHUNK = 64
    # Adaptive spinning (drb_spin_*): a budget below the floor is no spin.
    DRB_SPIN_FLOOR_NS = 2000
    # A wait this many times the most a spin lasts says the other side is
    # off a core; between one and this many, the budget stays (a batch at
    # depth 32 takes longer than a spin, and its waits are not a sign).
    DRB_SPIN_LONG = 4


cdef struct drb_prod:
    uint32_t *tail            # shared, written by us
    const uint32_t *head      # shared, written by the peer
    char *entries
    uint32_t size             # number of entries, a power of two
    uint32_t mask
    uint32_t esize            # bytes per entry
    uint32_t local_tail       # private: what we last published
    uint32_t cached_head      # private: last valid head we loaded


cdef struct drb_cons:
    const uint32_t *tail      # shared, written by the peer
    uint32_t *head            # shared, written by us
    const char *entries
    uint32_t size
    uint32_t mask
    uint32_t esize
    uint32_t local_head
    uint32_t cached_tail


# Whether spinning pays lately, and so how long to spin next time (see
# drb_spin_budget). Zeroed is the start: the full budget.
cdef struct drb_spin:
    uint32_t cut              # the budget is the most >> cut


cdef struct drb_waiter:
    uint32_t *my_flags        # in our own page
    const uint32_t *peer_flags
    int my_efd                # we sleep on this one
    int peer_efd              # we signal this one
    int extra_fd              # -1, or an fd whose readiness also ends a sleep
    uint64_t spin_ns          # the most it spins before sleeping
    drb_spin spin             # how much of it pays now
    uint64_t notifies         # eventfd writes we made
    uint64_t sleeps           # times we blocked in ppoll


# ---- producer -------------------------------------------------------------

cdef inline int64_t prod_space(drb_prod *p, uint32_t want) noexcept nogil:
    """Free entries, loading the peer's head (a shared cache line) only when
    the cached one leaves fewer than `want`; -EPROTO if the peer published
    an impossible head."""
    cdef uint32_t used = p.local_tail - p.cached_head
    cdef uint32_t h
    if p.size - used < want:
        h = drb_load_acquire(p.head)
        used = p.local_tail - h
        if used > p.size:
            return -EPROTO
        p.cached_head = h
    return p.size - used


cdef inline int64_t prod_space_fresh(drb_prod *p) noexcept nogil:
    cdef uint32_t h = drb_load_acquire(p.head)
    cdef uint32_t used = p.local_tail - h
    if used > p.size:
        return -EPROTO
    p.cached_head = h
    return p.size - used


cdef inline char *prod_entry(drb_prod *p, uint32_t i) noexcept nogil:
    """Address of the i-th entry after the current tail (not yet published)."""
    return p.entries + <size_t>((p.local_tail + i) & p.mask) * p.esize


cdef inline void prod_publish(drb_prod *p, uint32_t n) noexcept nogil:
    p.local_tail += n
    drb_store_release(p.tail, p.local_tail)


cdef inline uint32_t prod_push(drb_prod *p, const char *src, uint32_t n) noexcept nogil:
    """Copy up to n entries from src; returns how many went in (0 if full or
    the peer is corrupt; callers that care use prod_space first)."""
    cdef int64_t free_ = prod_space(p, n)
    cdef uint32_t i, k
    if free_ <= 0:
        return 0
    k = n if n <= free_ else <uint32_t>free_
    for i in range(k):
        memcpy(prod_entry(p, i), src + <size_t>i * p.esize, p.esize)
    prod_publish(p, k)
    return k


# ---- consumer -------------------------------------------------------------

cdef inline int64_t cons_avail(drb_cons *c, uint32_t want) noexcept nogil:
    """Entries ready to read, loading the peer's tail only when the cached
    one shows fewer than `want`; -EPROTO if the peer published an
    impossible tail."""
    cdef uint32_t avail = c.cached_tail - c.local_head
    cdef uint32_t t
    if avail < want:
        t = drb_load_acquire(c.tail)
        avail = t - c.local_head
        if avail > c.size:
            return -EPROTO
        c.cached_tail = t
    return avail


cdef inline const char *cons_entry(drb_cons *c, uint32_t i) noexcept nogil:
    return c.entries + <size_t>((c.local_head + i) & c.mask) * c.esize


cdef inline void cons_release(drb_cons *c, uint32_t n) noexcept nogil:
    c.local_head += n
    drb_store_release(c.head, c.local_head)


cdef inline uint32_t cons_pop(drb_cons *c, char *dst, uint32_t n) noexcept nogil:
    """Copy up to n entries out (the only read of them: no double fetch)."""
    cdef int64_t avail = cons_avail(c, n)
    cdef uint32_t i, k
    if avail <= 0:
        return 0
    k = n if n <= avail else <uint32_t>avail
    for i in range(k):
        memcpy(dst + <size_t>i * c.esize, cons_entry(c, i), c.esize)
    cons_release(c, k)
    return k


# ---- sleep and wake -------------------------------------------------------

cdef inline void drb_notify(drb_waiter *w) noexcept nogil:
    """Call after publishing an index: signal the peer only if it sleeps.
    While both sides are busy this is a fence and a load, no system call."""
    cdef uint64_t one = 1
    drb_fence()
    if drb_load_relaxed(w.peer_flags) & DRB_NEED_WAKEUP:
        # EAGAIN (counter saturated) still leaves the peer readable: fine.
        write(w.peer_efd, &one, 8)
        w.notifies += 1


cdef inline int drb_block(drb_waiter *w, int64_t deadline) noexcept nogil:
    """Sleep on our eventfd (and extra_fd) until signalled or the deadline
    (absolute, drb_now_ns clock; < 0 for none). Returns 1 when woken,
    0 on timeout, -EPIPE when extra_fd fired, -EINTR on a signal."""
    cdef pollfd fds[2]
    cdef timespec ts
    cdef timespec *tsp = NULL
    cdef int64_t left
    cdef uint64_t drain
    cdef int nfds = 1
    cdef int r
    fds[0].fd = w.my_efd
    fds[0].events = POLLIN
    fds[0].revents = 0
    if w.extra_fd >= 0:
        fds[1].fd = w.extra_fd
        fds[1].events = POLLIN
        fds[1].revents = 0
        nfds = 2
    if deadline >= 0:
        left = deadline - <int64_t>drb_now_ns()
        if left <= 0:
            return 0
        ts.tv_sec = left // 1000000000
        ts.tv_nsec = left % 1000000000
        tsp = &ts
    w.sleeps += 1
    r = ppoll(fds, nfds, tsp, NULL)
    if r < 0:
        return -errno
    if r == 0:
        return 0
    if fds[0].revents & POLLIN:
        # Non-blocking eventfd: one read resets the counter.
        read(w.my_efd, &drain, 8)
        return 1
    if nfds == 2 and fds[1].revents:
        return -EPIPE
    return 1


cdef inline uint64_t drb_spin_budget(drb_spin *s, uint64_t most) noexcept nogil:
    """How long to spin in this wait: `most` halved once for each recent
    wait that lasted longer than `most`; none once that is below the floor."""
    cdef uint64_t b = most >> s.cut if s.cut < 64 else 0
    return b if b >= DRB_SPIN_FLOOR_NS else 0


cdef inline void drb_spin_waited(drb_spin *s, uint64_t most, uint64_t waited_ns) noexcept nogil:
    """A wait ended in what it waited for, after waited_ns (its spin and its
    sleep together). Judged by the whole wait, not by whether this spin
    caught it: two parties that both stopped spinning wake each other with
    a sleep's latency, and only the length of the wait says that a spin
    would have caught it (and so turns spinning back on). A wait of more
    than DRB_SPIN_LONG times the most a spin may last halves the next
    budget (the other side is off a core: 16 user domains on 2 cores), one
    shorter than the most doubles it."""
    if waited_ns <= most:
        if s.cut > 0:
            s.cut -= 1
    elif waited_ns // DRB_SPIN_LONG > most and s.cut < 64 \
            and (most >> s.cut) >= DRB_SPIN_FLOOR_NS:
        s.cut += 1


cdef inline void drb_spin_slept(drb_waiter *w, uint64_t start) noexcept nogil:
    """A wait that went past its spin ended in what it waited for."""
    if w.spin_ns > 0:
        drb_spin_waited(&w.spin, w.spin_ns, drb_now_ns() - start)


cdef inline int64_t drb_deadline(int64_t timeout_ns) noexcept nogil:
    if timeout_ns < 0:
        return -1
    return <int64_t>drb_now_ns() + timeout_ns


cdef inline int64_t drb_wait_cons(drb_waiter *w, drb_cons *c, int64_t timeout_ns) noexcept nogil:
    """Wait until the consumer has entries: spin for the budget, then sleep.
    Returns the number available, 0 on timeout, or a negative errno."""
    cdef int64_t n = cons_avail(c, 1)
    cdef int64_t deadline, spin_end
    cdef uint64_t budget, now, start = 0
    cdef int i, r
    if n != 0:
        return n
    deadline = drb_deadline(timeout_ns)
    budget = drb_spin_budget(&w.spin, w.spin_ns)
    if w.spin_ns > 0:
        start = drb_now_ns()
    if budget > 0:
        now = start
        spin_end = <int64_t>(now + budget)
        if deadline >= 0 and deadline < spin_end:
            spin_end = deadline
        while True:
            for i in range(DRB_SPIN_CHUNK):
                drb_cpu_relax()
                n = cons_avail(c, 1)
                if n != 0:
                    drb_spin_waited(&w.spin, w.spin_ns, 0)
                    return n
            now = drb_now_ns()
            if <int64_t>now >= spin_end:
                break
    while True:
        drb_store_relaxed(w.my_flags, DRB_NEED_WAKEUP)
        drb_fence()       # pairs with the fence in the peer's drb_notify
        n = cons_avail(c, 1)
        if n != 0:
            drb_store_relaxed(w.my_flags, 0)
            drb_spin_slept(w, start)
            return n
        r = drb_block(w, deadline)
        drb_store_relaxed(w.my_flags, 0)
        n = cons_avail(c, 1)
        if n != 0:
            drb_spin_slept(w, start)
            return n
        if r <= 0:
            return r


cdef inline int64_t drb_wait_prod(drb_waiter *w, drb_prod *p, uint32_t need, int64_t timeout_ns) noexcept nogil:
    """Wait until the producer has room for `need` entries (need <= size).
    Returns the free count, 0 on timeout, or a negative errno."""
    cdef int64_t n = prod_space(p, need)
    cdef int64_t deadline, spin_end
    cdef uint64_t budget, now, start = 0
    cdef int i, r
    if n < 0 or n >= need:
        return n
    deadline = drb_deadline(timeout_ns)
    budget = drb_spin_budget(&w.spin, w.spin_ns)
    if w.spin_ns > 0:
        start = drb_now_ns()
    if budget > 0:
        now = start
        spin_end = <int64_t>(now + budget)
        if deadline >= 0 and deadline < spin_end:
            spin_end = deadline
        while True:
            for i in range(DRB_SPIN_CHUNK):
                drb_cpu_relax()
                n = prod_space_fresh(p)
                if n < 0 or n >= need:
                    drb_spin_waited(&w.spin, w.spin_ns, 0)
                    return n
            now = drb_now_ns()
            if <int64_t>now >= spin_end:
                break
    while True:
        drb_store_relaxed(w.my_flags, DRB_NEED_WAKEUP)
        drb_fence()
        n = prod_space_fresh(p)
        if n < 0 or n >= need:
            drb_store_relaxed(w.my_flags, 0)
            drb_spin_slept(w, start)
            return n
        r = drb_block(w, deadline)
        drb_store_relaxed(w.my_flags, 0)
        n = prod_space_fresh(p)
        if n < 0 or n >= need:
            drb_spin_slept(w, start)
            return n
        if r <= 0:
            return r
