"""Two real processes on one double ring: soak, wake-ups, page protection."""
import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import maps

from drb_uring import procs, ring
from drb_uring.ring import _bench
from drb_uring.ring import layout as L
from drb_uring.tools import ringpeer

SOAK = 10_000_000
GEO = L.Geometry(sq_entries=256, cq_entries=256, slot_size=4096, slot_count=1)


def run_soak(spin_ns, pause_every=0, pause_ns=0, count=SOAK):
    u, peer = ring.create(GEO, spin_ns=spin_ns)
    with u:
        proc = ringpeer.spawn("echo", peer.as_list(), count=count, batch=32,
                              spin_ns=spin_ns, timeout=20.0)
        peer.close()
        try:
            mine = _bench.stream_user(u, count, 32, 20.0, pause_every, pause_ns)
        finally:
            theirs = ringpeer.result(proc, timeout=180)
    return mine, theirs


def test_ten_million_each_way_spinning():
    mine, theirs = run_soak(spin_ns=10**9)
    assert theirs["returncode"] == 0, theirs
    assert (theirs["done"], theirs["errors"], theirs["error"]) == (SOAK, 0, None)
    assert (mine["done"], mine["errors"], mine["error"]) == (SOAK, 0, None)


def test_ten_million_each_way_consumer_sleeping_often():
    # No spinning at all, and the producer pauses every 64 batches so the
    # driver keeps finding the ring empty: every one of those gaps is a
    # sleep that only a correct wake-up ends (a lost one times out at 20 s).
    mine, theirs = run_soak(spin_ns=0, pause_every=64, pause_ns=20_000)
    assert theirs["returncode"] == 0, theirs
    assert (theirs["done"], theirs["errors"], theirs["error"]) == (SOAK, 0, None)
    assert (mine["done"], mine["errors"], mine["error"]) == (SOAK, 0, None)
    assert theirs["sleeps"] >= 1000, theirs
    assert mine["notifies"] >= 1000, mine


def test_no_system_calls_while_both_sides_spin():
    mine, theirs = run_soak(spin_ns=10**10, count=1_000_000)
    assert theirs["returncode"] == 0 and mine["errors"] == 0
    # Neither side slept, so neither had to signal the other: zero eventfd
    # writes and zero ppoll calls over a million entries each way.
    assert (mine["notifies"], theirs["notifies"]) == (0, 0)
    assert theirs["sleeps"] == 0


DRIVER_WRITES_USER_PAGE = textwrap.dedent("""
    import ctypes, sys
    from drb_uring import ring
    from drb_uring.ring import layout as L
    from helpers import maps
    d = ring.attach(ring.PeerFds.from_list([int(x) for x in sys.argv[1:]]))
    print("about_to_write", flush=True)
    ctypes.memset(maps.address("drb-ctl-user", "r--s") + L.OFF_SQ_TAIL, 0xff, 4)
    print("survived", flush=True)
""")


def test_driver_writing_user_page_dies_with_sigsegv():
    u, peer = ring.create(GEO)
    with u:
        env = procs.module_env()
        env["PYTHONPATH"] += os.pathsep + os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.run([sys.executable, "-c", DRIVER_WRITES_USER_PAGE,
                               *map(str, peer.as_list())], pass_fds=peer.as_list(),
                              capture_output=True, env=env, timeout=30)
        peer.close()
        assert proc.returncode == -signal.SIGSEGV, proc.stderr
        assert proc.stdout.split() == [b"about_to_write"]
        assert u.indexes == (0, 0)
        addr = maps.address("drb-ctl-user", "rw-s")
        assert ctypes.c_uint32.from_address(addr + L.OFF_SQ_TAIL).value == 0


USER_WRITES_DRIVER_PAGE = textwrap.dedent("""
    import ctypes, sys
    from drb_uring import ring
    from drb_uring.ring import layout as L
    from helpers import maps
    u, peer = ring.create(L.Geometry(sq_entries=8, cq_entries=8, slot_size=4096, slot_count=1))
    addr = maps.address("drb-ctl-driver", "r--s")      # the user's view of it
    d = ring.attach(peer)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rc = libc.mprotect(addr, 4096, 3)
    print("mprotect", rc, ctypes.get_errno(), flush=True)
    ctypes.memset(addr + L.OFF_CQ_TAIL, 0xff, 4)
    print("survived", flush=True)
""")


def test_user_writing_driver_page_dies_with_sigsegv():
    env = procs.module_env()
    env["PYTHONPATH"] += os.pathsep + os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", USER_WRITES_DRIVER_PAGE], capture_output=True,
                          env=env, timeout=30)
    assert proc.returncode == -signal.SIGSEGV, proc.stderr
    # Nor could it make the page writable first: the descriptor is read-only.
    assert proc.stdout.decode().split() == ["mprotect", "-1", str(errno.EACCES)]


def test_nobody_can_map_driver_page_writable_after_attach(no_fd_leak):
    u, peer = ring.create(GEO)
    rw_fd = peer.ctl_driver
    with u, ring.attach(peer):
        with pytest.raises(PermissionError) as e:
            mmap.mmap(rw_fd, GEO.ctl_driver_size)
        assert e.value.errno == errno.EPERM
        # And the user's own page, through the fd the driver got.
        with pytest.raises(PermissionError) as e:
            mmap.mmap(peer.ctl_user, GEO.ctl_user_size)
        assert e.value.errno == errno.EACCES


def test_wait_times_out_and_is_interruptible(ring_pair):
    u, d = ring_pair(spin_ns=0)
    assert u.wait_readable(timeout=0.05) == 0
    assert u.stats["sleeps"] == 1

    def on_alarm(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            d.wait_readable()          # no timeout: only the signal ends it
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_push_wakes_a_sleeping_peer(ring_pair):
    import threading
    u, d = ring_pair(spin_ns=0)
    got = []
    t = threading.Thread(target=lambda: got.append(d.wait_readable(timeout=10)))
    t.start()
    import time
    deadline = time.monotonic() + 5
    while d.stats["sleeps"] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert u.push(bytes(64)) == 1
    t.join(10)
    assert got == [1]
    assert u.stats["notifies"] == 1
