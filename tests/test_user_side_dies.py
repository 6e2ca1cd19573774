"""The user side dies at any moment (SIGKILL, mid-request too), over and
over: the monitor takes back everything it held for the channel (the task
table, the grant ring, the pinned pages, the worker), so the host's
counts stay flat. DRB_KILL_CYCLES sets the number of cycles (default
1000)."""
import os
import random
import signal
import subprocess
import time

import pytest
from channel_env import BrokerProc, children_of, wait_until

from drb_uring.channel.client import Channel
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=8, cq_entries=8, slot_size=65536, slot_count=4)
POOL = GEO.slot_size * GEO.slot_count
CYCLES = int(os.environ.get("DRB_KILL_CYCLES", "1000"))


def _bpf_count(kind: str) -> int:
    out = subprocess.run(["bpftool", kind, "show"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line[:1].isdigit())


def _fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return sorted(out)


def _user_side(sock: str) -> None:
    """In a forked child: open a channel and do I/O until killed."""
    try:
        with Channel(sock, 1 << 20, geometry=GEO) as ch:
            while True:
                ch.pwrite(0, b"x" * 65536)
                ch.pread(0, 65536)
    finally:
        os._exit(0)


@pytest.fixture
def broker(tmp_path, no_fd_leak):
    # Room for exactly two channels' pools: a leak of one shows at once.
    m = BrokerProc(tmp_path, size=64 << 20, limits={"pinned": 2 * POOL})
    yield m
    m.stop()


def test_user_side_killed_over_and_over(broker):
    with Channel(broker.sock_path, 1 << 20, geometry=GEO) as ch:   # warm: service, caches
        ch.pread(0, 1)
    assert wait_until(lambda: not children_of(broker.proc.pid), 10)
    fds0, progs0, maps0 = _fds(broker.proc.pid), _bpf_count("prog"), _bpf_count("map")
    rng = random.Random(7)
    for _ in range(CYCLES):
        pid = os.fork()
        if pid == 0:
            _user_side(broker.sock_path)
        time.sleep(rng.choice([0, 0.0005, 0.002, 0.01, 0.03]))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    # Every worker gone, and the broker holds what it held before.
    assert wait_until(lambda: not children_of(broker.proc.pid), 20), children_of(broker.proc.pid)
    assert wait_until(lambda: _fds(broker.proc.pid) == fds0, 10), \
        set(_fds(broker.proc.pid)) ^ set(fds0)
    assert _bpf_count("prog") == progs0 and _bpf_count("map") == maps0
    # The pinned pages came back: the limit still allows two whole channels.
    with Channel(broker.sock_path, 1 << 20, geometry=GEO) as a, \
            Channel(broker.sock_path, 1 << 20, geometry=GEO) as b:
        for ch, data in ((a, b"a"), (b, b"b")):
            ch.pwrite(0, data)
            assert ch.pread(0, 1) == data
    assert broker.proc.poll() is None
