"""A worker dies (not stopped by the monitor): the broker starts another,
which takes the rings over, and each channel carries on by itself. Nothing
acknowledged is lost: every request the dead worker had taken is settled
from the kernel's own counts (done, or never run and posted again), and
what a returned flush covered is in the backing file.

Real broker, real workers killed with SIGKILL, the real monitor. No timing
thresholds; hang guards bound the waits.
"""
import errno
import os
import random
import signal
import threading

import pytest
from channel_env import brokers_made, dead, hang_guard, wait_until

from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=32, cq_entries=32, slot_size=16384, slot_count=16)
EXTENT = 4 << 20
BLOCK = 4096


@pytest.fixture
def broker(tmp_path, no_fd_leak):
    with brokers_made(tmp_path, size=16 << 20) as start:
        yield start


def _worker(m) -> int:
    """The broker's one worker (a single user domain)."""
    assert wait_until(lambda: len(m.workers()) == 1, 10), m.workers()
    return m.workers()[0]


def _device(m, off, n) -> bytes:
    with open(m.backing, "rb") as f:
        f.seek(off)
        return f.read(n)


class Load(threading.Thread):
    """Random writes, reads and flushes, each checked against a model of
    what was acknowledged, until told to stop."""

    def __init__(self, ch, seed):
        super().__init__(daemon=True)
        self.ch, self.rng = ch, random.Random(seed)
        self.model = bytearray(EXTENT)
        self.flushed = bytes(EXTENT)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.ops = 0

    def run(self):
        try:
            while not self.stop.is_set():
                off = self.rng.randrange(0, EXTENT // BLOCK - 8) * BLOCK
                n = self.rng.choice([BLOCK, 4 * BLOCK, 8 * BLOCK])
                kind = self.rng.random()
                if kind < 0.45:
                    data = self.rng.randbytes(n)
                    # Several requests in flight at once: the write spans slots.
                    self.ch.pwrite(off, data)
                    self.model[off:off + n] = data
                elif kind < 0.95:
                    got = self.ch.pread(off, n)
                    if got != bytes(self.model[off:off + n]):
                        self.errors.append(f"op {self.ops}: read at {off} differs")
                else:
                    self.ch.flush()
                    self.flushed = bytes(self.model)
                self.ops += 1
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.errors.append(f"op {self.ops}: {e!r}")


def test_the_channel_carries_on_across_worker_deaths(broker):
    m = broker()
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        load = Load(ch, 7)
        load.start()
        killed = []
        with hang_guard(120, "I/O across five worker deaths"):
            for _ in range(5):
                before = load.ops
                assert wait_until(lambda b=before: load.ops > b + 50 or load.errors, 30)
                pid = _worker(m)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                assert wait_until(lambda p=pid: dead(p), 10)
                # Another worker serves the channel, and I/O goes on.
                assert wait_until(lambda p=pid: m.workers() and m.workers()[0] != p, 10)
            before = load.ops
            assert wait_until(lambda: load.ops > before + 50 or load.errors, 30)
        load.stop.set()
        load.join(60)
        assert not load.is_alive()
        assert load.errors == []
        assert ch.restarts == 5
        assert ch.worker_pid not in killed
        # Every acknowledged write is on the device, read outside the pair.
        ch.flush()
        assert _device(m, 0, EXTENT) == bytes(load.model)
    log = m.log_text()
    assert log.count("starting another") == 5
    assert "channel 1 failed" not in log


def test_a_returned_flush_is_in_the_file_whatever_dies_after(broker):
    m = broker()
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        data = os.urandom(64 * 1024)
        ch.pwrite(8192, data)
        ch.flush()
        os.kill(_worker(m), signal.SIGKILL)
        # Read outside the pair, with the channel's worker dead.
        assert _device(m, 8192, len(data)) == data
        # The channel carries on: the same bytes come back through it.
        assert ch.pread(8192, len(data)) == data


def test_requests_in_flight_when_the_worker_dies_are_settled(broker):
    """A worker stopped (SIGSTOP) with requests taken and queued, then
    killed: each request is answered exactly once with the right bytes."""
    m = broker()
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        blocks = [os.urandom(BLOCK) for _ in range(24)]
        for i, b in enumerate(blocks):
            ch.pwrite(i * BLOCK, b)
        pid = _worker(m)
        os.kill(pid, signal.SIGSTOP)
        reads = [ch.submit_read(i * BLOCK, BLOCK) for i in range(12)]
        writes = [ch.submit_write((24 + i) * BLOCK, blocks[i]) for i in range(4)]
        os.kill(pid, signal.SIGKILL)
        with hang_guard(60, "requests in flight across a worker's death"):
            assert [r.result() for r in reads] == [BLOCK] * 12
            assert [bytes(r.buf) for r in reads] == blocks[:12]
            assert [w.result() for w in writes] == [BLOCK] * 4
        assert _device(m, 24 * BLOCK, 4 * BLOCK) == b"".join(blocks[:4])
        assert ch.restarts == 1


def test_a_worker_that_keeps_dying_fails_the_channel_with_the_reason(broker):
    m = broker()
    with Channel(m.sock_path, EXTENT, geometry=GEO) as ch:
        ch.pwrite(0, b"x")
        with hang_guard(60, "a worker killed over and over"):
            for _ in range(6):
                pid = _worker(m)
                os.kill(pid, signal.SIGKILL)
                assert wait_until(lambda p=pid: dead(p), 10)
                assert wait_until(lambda p=pid: (m.workers() and m.workers()[0] != p)
                                  or "not started again" in m.log_text(), 10)
            with pytest.raises(ChannelFailed, match="6th death in 10 s: not started again"):
                while True:
                    ch.pread(0, 1)
        assert wait_until(lambda: not m.workers(), 10)


def test_without_retry_writes_an_unfinished_write_fails_and_reads_are_retried(broker):
    m = broker()
    with Channel(m.sock_path, EXTENT, geometry=GEO, retry_writes=False) as ch:
        ch.pwrite(0, b"R" * BLOCK)
        pid = _worker(m)
        os.kill(pid, signal.SIGSTOP)
        write = ch.submit_write(BLOCK, b"W" * BLOCK)
        read = ch.submit_read(0, BLOCK)
        # The stopped worker has taken neither; make it take both, then die.
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        with hang_guard(60, "requests across a worker's death"):
            assert read.result() == BLOCK and bytes(read.buf) == b"R" * BLOCK
            try:
                done = write.result()
            except OSError as e:
                assert e.errno == errno.EIO
                done = None
        # Done (the kernel finished it before the death) or failed with EIO,
        # never posted again; either way the device says which.
        assert _device(m, BLOCK, BLOCK) == (b"W" * BLOCK if done == BLOCK else bytes(BLOCK))
        assert ch.pread(0, BLOCK) == b"R" * BLOCK      # and it carries on
