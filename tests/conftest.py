import os

import pytest
from channel_env import BrokerProc, wait_until

from drb_uring import ring
from drb_uring.ring import layout as L


def open_fds() -> set[int]:
    return set(int(x) for x in os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves file descriptors open in this process."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # The listdir itself opens a descriptor that is gone by now.
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in leaked}


@pytest.fixture
def ring_pair(no_fd_leak):
    """A user end and a driver end of one small ring, in this process."""
    made = []

    def make(geometry=None, start_index=0, spin_ns=0):
        u, peer = ring.create(geometry or L.Geometry(sq_entries=8, cq_entries=8,
                                                     slot_size=4096, slot_count=2),
                              start_index=start_index, spin_ns=spin_ns)
        made.append(u)
        d = ring.attach(peer, spin_ns=spin_ns)
        made.append(d)
        return u, d

    try:
        yield make
    finally:
        for end in made:
            end.close()


@pytest.fixture
def monitor(tmp_path, no_fd_leak):
    m = BrokerProc(tmp_path)
    try:
        yield m
    finally:
        m.stop()
        # Every worker went with the monitor.
        assert wait_until(lambda: not m.workers()), m.workers()
