"""The monitor's eBPF service dies (SIGKILL): no channel runs on
unmonitored. Its workers are killed at once and the user side's calls
fail with the reason; the next channel starts a new service, and the
programs are there once, not twice, and not left behind."""
import os
import random
import signal
import subprocess
import threading

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


KILLS = 5


def test_the_monitor_dies_again_and_again_with_requests_in_flight(tmp_path, no_fd_leak):
    """Requests in flight (32 at once, reads and writes) while the monitor
    is killed again and again: each is answered once, rightly, under
    whichever monitor counted it; nothing fails, and the device holds every
    write. (Before the brokers kept the programs attached until their
    workers were dead, the programs went one by one with the dying service,
    and a submission the first to go never saw was counted done by one
    still there: a count of -1, and a request nothing had checked.)"""
    geo = L.Geometry(sq_entries=64, cq_entries=64, slot_size=4096, slot_count=32)
    m = BrokerProc(tmp_path, size=16 << 20, monitor_restart=True)
    errors, done = [], []
    stop = threading.Event()
    model = bytearray(1 << 20)
    try:
        with Channel(m.sock_path, 1 << 20, geometry=geo) as ch:
            def load():
                rng = random.Random(7)
                try:
                    while not stop.is_set():
                        blocks = rng.sample(range(256), 32)
                        reqs = []
                        for i, blk in enumerate(blocks):
                            if i % 2:
                                data = rng.randbytes(4096)
                                model[blk * 4096:(blk + 1) * 4096] = data
                                reqs.append((blk, None, ch.submit_write(blk * 4096, data)))
                            else:
                                want = bytes(model[blk * 4096:(blk + 1) * 4096])
                                reqs.append((blk, want, ch.submit_read(blk * 4096, 4096)))
                        for blk, want, r in reqs:
                            assert r.result() == 4096
                            if want is not None and bytes(r.buf) != want:
                                errors.append(f"block {blk}: wrong bytes")
                        done.append(1)
                except Exception as e:   # noqa: BLE001 - reported below
                    errors.append(repr(e))
            t = threading.Thread(target=load)
            t.start()
            try:
                for _ in range(KILLS):
                    n = len(done)
                    assert wait_until(lambda n=n: len(done) > n + 20 or errors, 60), errors
                    assert not errors, (errors, m.log_text()[-3000:])
                    (service,) = _service_pids()
                    os.kill(service, signal.SIGKILL)
                    assert wait_until(lambda s=service: _service_pids() not in ([], [s]), 60), \
                        m.log_text()[-3000:]
            finally:
                n = len(done)
                wait_until(lambda: len(done) > n + 20 or errors, 60)
                stop.set()
                t.join(60)
            assert not t.is_alive() and errors == [], errors
            assert ch.restarts == KILLS and ch.failed is None
        with open(m.backing, "rb") as f:
            assert f.read(1 << 20) == model
    finally:
        m.stop()


def test_every_submission_is_checked_until_the_workers_are_dead(tmp_path, no_fd_leak):
    """The service dies and the broker has not noticed yet (it is stopped):
    a worker that submits now is still checked, because the broker's copy
    of the programs' attachments keeps them on. The rogue's read into a
    slot no task allows is stopped; the slot keeps its bytes."""
    geo = L.Geometry(sq_entries=8, cq_entries=8, slot_size=4096, slot_count=4)
    m = BrokerProc(tmp_path, size=16 << 20, rogue="read-untasked")
    with open(m.backing, "r+b") as f:
        f.write(b"D" * (1 << 20))
    try:
        with Channel(m.sock_path, 1 << 20, geometry=geo) as ch:
            ch.pool[4096:8192] = b"P" * 4096       # slot 1: the rogue reads into it
            rogue = ch.worker_pid
            (service,) = _service_pids()
            os.kill(m.proc.pid, signal.SIGSTOP)
            try:
                os.kill(service, signal.SIGKILL)
                assert wait_until(lambda: service not in _service_pids(), 10)
                req = ch.submit_read(0, 4096)      # slot 0; the rogue takes it
                assert wait_until(lambda: dead(rogue), 10)
                assert bytes(ch.pool[4096:8192]) == b"P" * 4096
            finally:
                os.kill(m.proc.pid, signal.SIGCONT)
            with pytest.raises(ChannelFailed):
                req.result()
    finally:
        m.stop()
