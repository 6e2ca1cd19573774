"""Properties of the SPSC rings, against a model queue (hypothesis)."""
import collections
import errno
import struct

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from drb_uring import ring
from drb_uring.ring import layout as L


def sqe(n: int) -> bytes:
    return struct.pack("<Q", n) + bytes(48) + struct.pack("<Q", ~n & (2**64 - 1))


def cqe(n: int) -> bytes:
    return struct.pack("<QiI", n, n & 0x7fffffff, n >> 32 & 0xffffffff)


class RingModel(RuleBasedStateMachine):
    """Both rings of one double ring, each checked against a deque.

    Counters start near 2**32 so most runs cross the wrap of the 32-bit
    free-running indexes."""

    @initialize(sq_log=st.integers(1, 6), cq_extra=st.integers(0, 2),
                start=st.one_of(st.integers(2**32 - 70, 2**32 - 1), st.integers(0, 2**32 - 1)))
    def make(self, sq_log, cq_extra, start):
        self.geo = L.Geometry(sq_entries=1 << sq_log, cq_entries=1 << (sq_log + cq_extra),
                              slot_size=4096, slot_count=1)
        self.u, peer = ring.create(self.geo, start_index=start, spin_ns=0)
        self.d = ring.attach(peer, spin_ns=0)
        self.sq = collections.deque()
        self.cq = collections.deque()
        self.next = 0

    def teardown(self):
        if hasattr(self, "u"):
            self.u.close()
            self.d.close()

    def _push(self, end, model, capacity, encode, k):
        """Push k numbered entries; exactly the free room is taken, in order."""
        n = end.push(b"".join(encode(self.next + i) for i in range(k)))
        assert n == min(k, capacity - len(model))
        model.extend(range(self.next, self.next + n))
        self.next += n

    @rule(k=st.integers(0, 80))
    def push_requests(self, k):
        self._push(self.u, self.sq, self.geo.sq_entries, sqe, k)

    @rule(k=st.integers(0, 80))
    def pop_requests(self, k):
        raw = self.d.pop(k)
        got = [struct.unpack_from("<Q", raw, i)[0] for i in range(0, len(raw), 64)]
        want = [self.sq.popleft() for _ in range(min(k, len(self.sq)))]
        assert got == want
        assert raw == b"".join(sqe(n) for n in want)

    @rule(k=st.integers(0, 80))
    def push_responses(self, k):
        self._push(self.d, self.cq, self.geo.cq_entries, cqe, k)

    @rule(k=st.integers(0, 80))
    def pop_responses(self, k):
        buf = bytearray(16 * k)
        n = self.u.pop_into(buf)
        want = [self.cq.popleft() for _ in range(min(k, len(self.cq)))]
        assert n == len(want)
        assert bytes(buf[:16 * n]) == b"".join(cqe(x) for x in want)

    @invariant()
    def counts_agree(self):
        if not hasattr(self, "u"):
            return
        assert self.d.readable == len(self.sq)
        assert self.u.writable == self.geo.sq_entries - len(self.sq)
        assert self.u.readable == len(self.cq)
        assert self.d.writable == self.geo.cq_entries - len(self.cq)
        # A zero-timeout wait agrees with the counts and never blocks.
        assert self.u.wait_readable(0) == len(self.cq)


TestRingModel = RingModel.TestCase
TestRingModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_full_and_empty_edges(ring_pair):
    u, d = ring_pair(start_index=2**32 - 2)
    assert d.pop() == b"" and d.readable == 0
    assert u.push(b"".join(sqe(i) for i in range(8))) == 8
    assert u.push(sqe(99)) == 0            # full: nothing taken, nothing lost
    assert u.writable == 0
    assert u.wait_writable(1, timeout=0) == 0
    got = d.pop(8)
    assert [struct.unpack_from("<Q", got, i)[0] for i in range(0, 512, 64)] == list(range(8))
    assert u.indexes == (6, 2**32 - 2)      # the tail wrapped past 2**32
    assert u.push(sqe(8)) == 1 and d.pop() == sqe(8)


def test_push_rejects_partial_entries(ring_pair):
    u, d = ring_pair()
    import pytest
    with pytest.raises(ValueError, match="not a multiple of the entry size 64"):
        u.push(b"x" * 65)
    assert d.readable == 0


def test_corrupt_peer_index_is_detected(ring_pair):
    import pytest
    u, d = ring_pair()
    # The driver writes an impossible response tail into its own page.
    import ctypes

    from helpers import maps
    addr = maps.address("drb-ctl-driver", "rw-s")      # the driver's own page
    ctypes.c_uint32.from_address(addr + L.OFF_CQ_TAIL).value = 1000
    with pytest.raises(OSError, match="impossible ring index") as e:
        _ = u.readable
    assert e.value.errno == errno.EPROTO   # EPROTO
