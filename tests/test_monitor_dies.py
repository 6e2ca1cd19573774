"""The monitor's eBPF service dies (SIGKILL): no channel runs on
unmonitored. Its workers are killed at once and the user side's calls
fail with the reason; the next channel starts a new service, and the
programs are there once, not twice, and not left behind."""
import os
import signal
import subprocess

import pytest
from channel_env import BrokerProc, dead, hang_guard, wait_until

from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=8, cq_entries=8, slot_size=4096, slot_count=2)


def _service_pids() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"drb_uring.enforce.service" in f.read():
                        out.append(int(d))
            except OSError:
                pass
    return out


def _monitor_progs() -> int:
    out = subprocess.run(["bpftool", "prog", "show"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if " name raw_tracepoint" in line)


@pytest.fixture
def broker(tmp_path, no_fd_leak):
    m = BrokerProc(tmp_path, size=16 << 20)
    yield m
    m.stop()


def test_channels_stop_when_the_monitor_dies(broker):
    with Channel(broker.sock_path, 1 << 20, geometry=GEO) as a, \
            Channel(broker.sock_path, 1 << 20, geometry=GEO) as b:
        a.pwrite(0, b"before")
        assert a.monitored and b.monitored
        workers = [a.worker_pid, b.worker_pid]
        progs = _monitor_progs()
        (service,) = _service_pids()
        os.kill(service, signal.SIGKILL)
        # Every worker goes (killed, not left to notice); every call fails
        # with the reason.
        assert wait_until(lambda: all(dead(w) for w in workers), 10), workers
        for ch in (a, b):
            with pytest.raises(ChannelFailed, match="the eBPF monitor went away"):
                ch.pread(0, 6)
        assert wait_until(lambda: _monitor_progs() == 0, 5)
        # The next channel gets a new service, monitored, with one set of programs.
        with Channel(broker.sock_path, 1 << 20, geometry=GEO) as c:
            assert c.monitored
            c.pwrite(0, b"after")
            assert c.pread(0, 5) == b"after"
            assert len(_service_pids()) == 1 and _service_pids() != [service]
            assert _monitor_progs() == progs
    assert broker.proc.poll() is None


def test_with_the_restart_policy_the_monitor_comes_back_and_channels_carry_on(tmp_path,
                                                                           no_fd_leak):
    m = BrokerProc(tmp_path, size=16 << 20, monitor_restart=True)
    try:
        with Channel(m.sock_path, 1 << 20, geometry=GEO) as a, \
                Channel(m.sock_path, 1 << 20, geometry=GEO) as b:
            a.pwrite(0, b"before")
            b.pwrite(0, b"b-before")
            # Requests queued while the worker is stopped, then the monitor dies.
            worker = a.worker_pid
            progs = _monitor_progs()
            os.kill(worker, signal.SIGSTOP)
            queued = [a.submit_write(4096, b"W" * 4096), a.submit_read(0, 6)]
            (service,) = _service_pids()
            os.kill(service, signal.SIGKILL)
            assert wait_until(lambda: dead(worker), 10)
            with hang_guard(60, "channels across the monitor's death"):
                assert queued[0].result() == 4096
                assert queued[1].result() == 6 and bytes(queued[1].buf) == b"before"
                assert a.pread(4096, 4096) == b"W" * 4096
                assert b.pread(0, 8) == b"b-before"
                b.pwrite(8, b"-after")
                assert b.pread(0, 14) == b"b-before-after"
            # A new service, one set of programs, still enforcing: each
            # channel has a task table again, and a new worker.
            assert len(_service_pids()) == 1 and _service_pids() != [service]
            assert _monitor_progs() == progs
            assert a.monitored and a.restarts == 1 and b.restarts == 1
            assert a.worker_pid != worker and not dead(a.worker_pid)
        with open(m.backing, "rb") as f:
            assert f.read(8192)[4096:] == b"W" * 4096
        assert "the eBPF monitor is back" in m.log_text()
    finally:
        m.stop()
    assert wait_until(lambda: _monitor_progs() == 0 or _service_pids(), 10)
