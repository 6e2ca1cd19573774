"""One driver serving many user domains: one worker process per user
domain, whatever the number of its channels, and what a violation, a
corrupt ring or a new channel does to the others.

A real broker with several user domains (each its own socket and extent),
real workers, the real monitor. No timing thresholds: hang guards bound the
waits that could otherwise never end.
"""
import ctypes
import errno
import hashlib
import os
import threading

import pytest
from channel_env import brokers_made, dead, hang_guard, wait_until, wake_every_eventfd
from helpers import maps

from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=16, cq_entries=16, slot_size=65536, slot_count=4)
SIZE = 64 << 20


@pytest.fixture
def broker(tmp_path, no_fd_leak):
    with brokers_made(tmp_path, size=SIZE) as start:
        yield start


def _device(m, base, size) -> bytes:
    with open(m.backing, "rb") as f:
        f.seek(base)
        return f.read(size)


def test_one_worker_per_user_domain_whatever_its_channels(broker):
    m = broker(tenants=2)
    a = [Channel(m.sock_paths[0], 1 << 20, geometry=GEO) for _ in range(5)]
    b = [Channel(m.sock_paths[1], 1 << 20, geometry=GEO) for _ in range(3)]
    try:
        for i, ch in enumerate(a + b):
            ch.pwrite(0, b"ch%d" % i)
        for i, ch in enumerate(a + b):
            assert ch.pread(0, 2 + len(str(i))) == b"ch%d" % i
        # Every channel of a user domain is served by the same process, and
        # the earlier workers handed over and left.
        assert len({ch.worker_pid for ch in a}) == 1
        assert len({ch.worker_pid for ch in b}) == 1
        assert a[0].worker_pid != b[0].worker_pid
        assert wait_until(lambda: sorted(m.workers()) == sorted(
            {a[0].worker_pid, b[0].worker_pid}), 10), m.workers()
    finally:
        for ch in a + b:
            ch.close()
    # No channel left: no worker waits idle.
    assert wait_until(lambda: not m.workers(), 10), m.workers()


def test_each_user_domain_stays_in_its_extent(broker):
    m = broker(tenants=2)
    (base0, size0), (base1, size1) = m.extents
    with Channel(m.sock_paths[0], size0, geometry=GEO) as a, \
            Channel(m.sock_paths[1], size1, geometry=GEO) as b:
        a.pwrite(0, b"A" * 4096)
        b.pwrite(0, b"B" * 4096)
        # Offsets are the channel's own: the same offset is another place.
        assert _device(m, base0, 4096) == b"A" * 4096
        assert _device(m, base1, 4096) == b"B" * 4096
        # The whole of a user domain's share, and not a byte more.
        with pytest.raises(OSError) as e:
            a.pwrite(size0 - 2, b"xyz")
        assert e.value.errno == errno.ERANGE
        a.pwrite(size0 - 2, b"yz")
    assert _device(m, base0 + size0 - 2, 4) == b"yz" + b"B" * 2   # then b's share
    with pytest.raises(Exception, match="size"):
        Channel(m.sock_paths[0], size0 + 4096, geometry=GEO)


def test_a_violation_takes_down_only_its_own_user_domain(tmp_path, no_fd_leak):
    with brokers_made(tmp_path, size=SIZE) as start:
        # The second user domain's worker is rogue: it reads into a slot no
        # task allows. The first user domain's is the real one.
        probe = start(tenants=2)
        rogue_base = probe.extents[1][0]
        probe.stop()
        m = start(tenants=2, rogue=f"read-untasked@{rogue_base}")
        good = Channel(m.sock_paths[0], 1 << 20, geometry=GEO)
        good.pwrite(0, b"before")
        good_worker = good.worker_pid
        before = hashlib.sha256(_device(m, rogue_base, 1 << 20)).hexdigest()
        bad = Channel(m.sock_paths[1], 1 << 20, geometry=GEO)
        rogue_pid = bad.worker_pid
        with hang_guard(what="a read served by a rogue worker"):
            with pytest.raises(ChannelFailed, match=f"monitor killed backend worker "
                                                    f"{rogue_pid}: no active task"):
                bad.pread(0, 4096)
        assert wait_until(lambda: dead(rogue_pid))
        # The other user domain never noticed: same worker, same bytes.
        assert good.worker_pid == good_worker and not dead(good_worker)
        good.pwrite(6, b"after")
        assert good.pread(0, 11) == b"beforeafter"
        assert hashlib.sha256(_device(m, rogue_base, 1 << 20)).hexdigest() == before
        bad.close()
        good.close()


def test_channels_opening_and_closing_never_disturb_a_busy_one(broker):
    """Each open starts the user domain's next worker, which takes every
    ring over from the previous one: requests in flight meanwhile are
    answered, exactly once, with the right bytes."""
    m = broker(tenants=1)
    errors, rounds = [], [0]
    stop = threading.Event()
    with Channel(m.sock_paths[0], 4 << 20, geometry=GEO) as busy:
        def hammer():
            try:
                k = 0
                while not stop.is_set():
                    data = os.urandom(GEO.slot_size * 3)
                    off = (k % 16) * len(data)
                    busy.pwrite(off, data)
                    if busy.pread(off, len(data)) != data:
                        errors.append(f"round {k}: wrong bytes")
                    k += 1
                rounds[0] = k
            except Exception as e:   # noqa: BLE001 - reported below
                errors.append(repr(e))
        t = threading.Thread(target=hammer)
        t.start()
        pids = set()
        try:
            with hang_guard(120, "opening and closing channels beside a busy one"):
                for i in range(12):
                    with Channel(m.sock_paths[0], 1 << 20, geometry=GEO) as other:
                        other.pwrite(0, b"%d" % i)
                        assert other.pread(0, len(b"%d" % i)) == b"%d" % i
                        pids.add(other.worker_pid)
        finally:
            stop.set()
            t.join(60)
        assert not t.is_alive()
        assert errors == []
        assert rounds[0] > 0
        assert len(pids) == 12          # a new worker for each open


def test_a_corrupt_ring_drops_only_its_channel(broker):
    m = broker(tenants=1)
    with Channel(m.sock_paths[0], 1 << 20, geometry=GEO) as bad:
        # This channel's request ring, as the user side maps it (the only
        # one yet).
        tail = ctypes.c_uint32.from_address(maps.address("drb-ctl-user", "rw-s")
                                            + L.OFF_SQ_TAIL)
        with Channel(m.sock_paths[0], 1 << 20, geometry=GEO) as good:
            good.pwrite(0, b"good")
            pid = good.worker_pid
            assert bad.worker_pid == pid
            # The request tail jumps past the ring's capacity, and the
            # worker is woken as a hostile user would, without publishing.
            tail.value = (tail.value + 1000) & 0xFFFFFFFF
            wake_every_eventfd()
            # (Posting now would write an honest tail over the bad one.)
            assert wait_until(lambda: bad.worker_pid and bad.failed, 10)
            with pytest.raises(ChannelFailed, match="ring is corrupt"):
                bad.pread(0, 4)
            assert good.pread(0, 4) == b"good"
            # The bad channel's grant ring leaves the worker's hands only
            # with the worker: the next one serves the good channel alone,
            # and the one that held both is gone.
            assert wait_until(lambda: good.worker_pid != pid and dead(pid), 10)
            assert good.pwrite(4, b"!") == 1 and good.pread(0, 5) == b"good!"
