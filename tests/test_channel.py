"""One channel carrying real I/O: user process -> monitor -> worker -> file."""
import errno
import hashlib
import io
import json
import os
import random
import signal

import pytest
from channel_env import BrokerProc, settled, wait_until

from drb_uring.channel import _grant, _worker
from drb_uring.channel.client import Channel, ChannelClosed, ChannelFailed
from drb_uring.enforce import tasks
from drb_uring.enforce.tasks import OP_READ_FIXED
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=128, cq_entries=256, slot_size=64 * 1024, slot_count=64)
EXTENT = 64 << 20



def test_kernel_constants_literal():
    # The channel's opcodes are io_uring's (bpf/drb_task.h; the build
    # checks them against <linux/io_uring.h> too).
    assert (tasks.OP_FSYNC, tasks.OP_READ_FIXED, tasks.OP_WRITE_FIXED) == (3, 4, 5)
    assert _worker.FLAG_FIXED_FILE == 1 << 0
    assert _grant.SETUP_R_DISABLED == 1 << 6
    assert (_grant.REGISTER_BUFFERS, _grant.REGISTER_FILES) == (0, 2)
    assert (_grant.REGISTER_RESTRICTIONS, _grant.REGISTER_ENABLE_RINGS) == (11, 12)


def test_integrity_against_reference(monitor):
    rng = random.Random(1234)
    ref = bytearray(EXTENT)
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
        ops = 0
        while ops < 100_000:
            qd = rng.randint(1, 64)
            taken: list[tuple[int, int]] = []
            batch = []
            for _ in range(qd):
                n = int(2 ** rng.uniform(0, 20))          # 1 B .. 1 MiB, log-uniform
                off = rng.randrange(0, EXTENT - n + 1)
                if any(off < b + m and b < off + n for b, m in taken):
                    continue                             # keep a batch's ranges disjoint
                taken.append((off, n))
                if rng.random() < 0.5:
                    data = rng.randbytes(n)
                    batch.append(("w", off, n, ch.submit_write(off, data), data))
                else:
                    batch.append(("r", off, n, ch.submit_read(off, n), None))
            for kind, off, n, req, data in batch:
                got = req.result()
                assert got == n
                if kind == "w":
                    ref[off:off + n] = data
                else:
                    assert bytes(req.buf) == ref[off:off + n], (off, n)
            ops += len(batch)
        ch.flush()
    with open(monitor.backing, "rb") as f:
        disk = f.read(EXTENT)
    assert hashlib.sha256(disk).hexdigest() == hashlib.sha256(ref).hexdigest()


def _raw(ch, **f):
    """Post one request with exactly these fields and return its result."""
    assert ch.end.post(f.get("opcode", OP_READ_FIXED), f.get("slot", 0), f.get("addr", 0),
                       f.get("len", 4096), f.get("off", 0), 0xABCDEF, f.get("rw_flags", 0))
    assert ch.end.wait_readable(5.0) == 1
    (user_data, res, _), = L.decode_cqes(ch.end.pop())
    assert user_data == 0xABCDEF
    return res


@pytest.mark.parametrize("fields, err", [
    ({"opcode": 22}, errno.EOPNOTSUPP),                       # IORING_OP_READ: not ours
    ({"opcode": 1}, errno.EOPNOTSUPP),                        # READV
    ({"slot": 64}, errno.EFAULT),                             # no such slot
    ({"len": 64 * 1024 + 1}, errno.EFAULT),                   # longer than a slot
    ({"addr": 64 * 1024 - 10, "len": 11}, errno.EINVAL),      # not at the slot's start
    ({"addr": 4096, "len": 4096}, errno.EINVAL),
    ({"off": EXTENT - 10, "len": 11}, errno.ERANGE),          # runs off the extent
    ({"off": 1 << 62}, errno.ERANGE),
    ({"len": 0}, errno.EINVAL),
    ({"rw_flags": 1}, errno.EINVAL),                          # reserved field set
    ({"opcode": 3, "len": 5}, errno.EINVAL),                  # fsync with a length
])
def test_bad_request_gets_exact_errno_and_channel_keeps_working(monitor, fields, err):
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
        assert _raw(ch, **fields) == -err
        assert ch.pwrite(10, b"still works") == 11
        assert ch.pread(10, 11) == b"still works"


def test_driver_errno_reaches_caller_as_oserror(monitor):
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
        with pytest.raises(OSError) as e:
            ch.pwrite(EXTENT - 1, b"xy")
        assert e.value.errno == errno.ERANGE
        assert ch.pread(EXTENT - 2, 100) == bytes(2)     # reads stop at the end


def test_two_channels_cannot_reach_each_other(monitor):
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as a, \
            Channel(monitor.sock_path, EXTENT, geometry=GEO) as b:
        a.pwrite(0, b"A" * 4096)
        b.pwrite(0, b"B" * 4096)
        a.pwrite(EXTENT - 4096, b"a" * 4096)
        # Through the ring, the last bytes of a's extent are a's only.
        assert _raw(a, off=EXTENT, len=4096) == -errno.ERANGE
        assert _raw(b, off=EXTENT - 4096 + 1, len=4096) == -errno.ERANGE
        assert b.pread(0, 4096) == b"B" * 4096
        assert a.pread(0, 4096) == b"A" * 4096
    with open(monitor.backing, "rb") as f:
        disk = f.read(2 * EXTENT)
    assert disk[:4096] == b"A" * 4096
    assert disk[EXTENT - 4096:EXTENT] == b"a" * 4096
    assert disk[EXTENT:EXTENT + 4096] == b"B" * 4096


def test_worker_holds_no_pool(monitor):
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
        ch.pwrite(0, b"x" * 100)
        maps = open(f"/proc/{ch.worker_pid}/maps").read()
        fds = [os.readlink(f"/proc/{ch.worker_pid}/fd/{fd}")
               for fd in os.listdir(f"/proc/{ch.worker_pid}/fd")]
        assert "drb-pool" not in maps
        assert not any("drb-pool" in f for f in fds)
        assert "/memfd:drb-ctl-user" in maps            # it does map the rings


def test_grant_ring_refuses_what_is_not_fixed_buffer_io(tmp_path, no_fd_leak):
    # The grant ring's own restrictions, without the eBPF monitor (which
    # would kill the prober at its first register call: tests/test_ebpf.py).
    probe = tmp_path / "probe.json"
    m = BrokerProc(tmp_path, rogue=f"probe:{probe}", enforce=False)
    try:
        with Channel(m.sock_path, EXTENT, geometry=GEO):
            assert wait_until(probe.exists)
            res = json.loads(probe.read_text())
            assert res == {"nop": -errno.EACCES, "read_not_fixed_file": -errno.EACCES,
                           "register": -errno.EACCES}
    finally:
        m.stop()


def test_killed_worker_fails_pending_calls_fast(monitor):
    """Without reconnect, a worker's death fails the channel at once (with
    it, see test_worker_restart.py)."""
    ch = Channel(monitor.sock_path, EXTENT, geometry=GEO, reconnect=False)
    try:
        os.kill(ch.worker_pid, signal.SIGSTOP)        # keep the requests in flight
        reqs = [ch.submit_read(i * 4096, 4096) for i in range(32)]
        os.kill(ch.worker_pid, signal.SIGKILL)
        with pytest.raises(ChannelFailed, match="killed by signal 9 .reconnect=False"):
            reqs[0].result(timeout=1.0)
        for r in reqs[1:]:
            with pytest.raises(ChannelFailed):
                r.result(timeout=1.0)
        with pytest.raises(ChannelFailed):
            ch.pread(0, 10)
    finally:
        ch.close()
    assert "killed by signal 9; starting another" in monitor.log_text()


def test_closed_channel_refuses_calls(monitor):
    ch = Channel(monitor.sock_path, EXTENT, geometry=GEO)
    ch.close()
    ch.close()
    with pytest.raises(ChannelClosed):
        ch.pread(0, 1)


def test_file_like_and_zero_copy(monitor):
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
        f = io.BufferedRandom(ch.file())
        f.seek(1000)
        f.write(b"0123456789" * 20000)
        f.flush()
        f.seek(1000 + 5)
        assert f.read(7) == b"5678901"
        assert f.seek(0, io.SEEK_END) == EXTENT
        with ch.read_view(1000, 10) as v:
            assert bytes(v) == b"0123456789"
            assert v.readonly
        assert len(ch.free) == GEO.slot_count


def test_asyncio_interface(monitor):
    import asyncio

    from drb_uring.channel.client import AsyncChannel

    async def main():
        with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
            ach = AsyncChannel(ch)
            try:
                await asyncio.gather(*(ach.pwrite(i * 70000, bytes([i]) * 70000)
                                       for i in range(100)))
                got = await asyncio.gather(*(ach.pread(i * 70000, 70000) for i in range(100)))
                await ach.flush()
            finally:
                ach.close()
            return got
    got = asyncio.run(main())
    assert got == [bytes([i]) * 70000 for i in range(100)]


def test_many_channels_leak_nothing(monitor):
    def fd_count(pid):
        return len(os.listdir(f"/proc/{pid}/fd"))
    Channel(monitor.sock_path, 1 << 20, geometry=GEO).close()   # warm up imports
    assert wait_until(lambda: not monitor.workers())
    mon_fds = settled(lambda: fd_count(monitor.proc.pid))
    my_fds = fd_count(os.getpid())
    for i in range(200):
        with Channel(monitor.sock_path, 1 << 20, geometry=GEO) as ch:
            ch.pwrite(0, b"%d" % i)
    assert wait_until(lambda: not monitor.workers())
    assert wait_until(lambda: fd_count(monitor.proc.pid) == mon_fds), fd_count(monitor.proc.pid)
    assert fd_count(os.getpid()) == my_fds
    memfds = [os.readlink(f"/proc/{monitor.proc.pid}/fd/{fd}")
              for fd in os.listdir(f"/proc/{monitor.proc.pid}/fd")]
    assert not any("memfd" in m for m in memfds)


def test_request_larger_than_free_slots_completes_whole(monitor):
    # 4 slots, a 1 MiB request (16 pieces): posting must reap the first
    # pieces to free slots, and the request may only finish with the last.
    geo = L.Geometry(sq_entries=4, cq_entries=4, slot_size=64 * 1024, slot_count=4)
    data = os.urandom(1 << 20)
    with Channel(monitor.sock_path, EXTENT, geometry=geo) as ch:
        assert ch.pwrite(4096, data) == len(data)
        for _ in range(20):
            assert ch.pread(4096, len(data)) == data


def test_wrong_arguments_get_clear_errors(monitor, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Channel(str(tmp_path / "no.sock"), EXTENT, geometry=GEO)
    assert e.value.filename == str(tmp_path / "no.sock") and "is the pair up?" in str(e.value)
    with pytest.raises(TypeError, match="size must be an int, not str"):
        Channel(monitor.sock_path, "1m", geometry=GEO)
    with pytest.raises(ValueError, match="offset must be at least 0, got -1"):
        Channel(monitor.sock_path, EXTENT, offset=-1, geometry=GEO)
    with Channel(monitor.sock_path, EXTENT, geometry=GEO) as ch:
        with pytest.raises(TypeError, match="offset must be an int, not str"):
            ch.pread("0", 5)
        with pytest.raises(TypeError, match="n must be an int, not float"):
            ch.pread(0, 5.0)
        with pytest.raises(TypeError, match="data must be a bytes-like object, not str"):
            ch.pwrite(0, "text")
        with pytest.raises(TypeError, match="buffer must be writable"):
            ch.preadinto(0, b"read-only")
        assert ch.pwrite(0, b"ok") == 2 and ch.base == 0
