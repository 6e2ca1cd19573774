"""Garbage in the request ring, written by hand by a user side that
ignores the client: random bytes, unknown opcodes, slots past the pool,
near misses of good requests with no task behind them, and a tail that
jumps ahead of the ring or back. The worker answers each bad request with
an errno or the channel fails; no request without a task moves a byte;
the worker never spins on a broken ring; the broker's other channels
carry on."""
import ctypes
import errno
import hashlib
import os
import random

import pytest
from channel_env import BrokerProc, dead, wait_until, wake_every_eventfd
from helpers import maps

from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.enforce import tasks
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=8, cq_entries=8, slot_size=4096, slot_count=4)
SIZE = 8 << 20
ERRNOS = {errno.EINVAL, errno.EFAULT, errno.ERANGE, errno.EOPNOTSUPP}


@pytest.fixture
def broker(tmp_path, no_fd_leak):
    dev = tmp_path / "device"
    dev.write_bytes(os.urandom(SIZE))
    m = BrokerProc(tmp_path, device=str(dev))
    m.device = str(dev)
    m.digest = hashlib.sha256(dev.read_bytes()).hexdigest()
    yield m
    m.stop()


def _sqe(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return rng.randbytes(64)
    fields = dict.fromkeys(L.SQE_FIELDS, 0)
    fields.update(opcode=rng.choice([OP_READ_FIXED, OP_WRITE_FIXED, 0, 22, 255]),
                  len=rng.choice([0, 1, 4096, 4097, 1 << 31]),
                  off=rng.choice([0, 4096, SIZE, 2**64 - 4096]),
                  buf_index=rng.choice([0, 3, 4, 65535]),
                  addr=rng.choice([0, 1, 4096]), user_data=rng.getrandbits(64))
    if kind == 1:
        fields["flags"] = rng.choice([1, 2, 0x40])
    return L.SQE.pack(*(fields[f] for f in L.SQE_FIELDS))


def _still_serving(m):
    with Channel(m.sock_path, 1 << 20, geometry=GEO) as ch:
        ch.pwrite(0, b"alive")
        assert ch.pread(0, 5) == b"alive"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_requests(broker, seed):
    rng = random.Random(seed)
    answered = []
    with Channel(broker.sock_path, 1 << 20, geometry=GEO) as ch:
        worker = ch.worker_pid
        failed = False
        for _ in range(300):
            assert ch.end.push(_sqe(rng)) == 1
            try:
                if not ch.end.wait_readable(5):
                    break
            except BrokenPipeError:        # the monitor's word on the control socket
                failed = True
                break
            for _tag, res, _ in L.CQE.iter_unpack(ch.end.pop()):
                answered.append(res)
            if ch.end.channel_failed():
                failed = True
                break
        # Every answer is a refusal by the worker's own check: no request
        # without a task ran.
        assert answered and all(-r in ERRNOS for r in answered), set(answered) - {
            -e for e in ERRNOS}
        if failed:
            # A near miss the worker passed on: the monitor stopped it first.
            assert tasks.REASONS[ch.end.channel_failed()] == "no active task for the slot"
            assert wait_until(lambda: dead(worker), 5)
        else:
            assert not dead(worker)
    with open(broker.device, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == broker.digest
    _still_serving(broker)


@pytest.mark.parametrize("jump", [1000, GEO.sq_entries + 1, -5])
def test_a_tail_that_jumps(broker, jump):
    with Channel(broker.sock_path, 1 << 20, geometry=GEO) as ch:
        worker = ch.worker_pid
        assert ch.pread(0, 16)                 # the worker is serving
        addr = maps.address("drb-ctl-user", "rw-s")
        tail = ctypes.c_uint32.from_address(addr + L.OFF_SQ_TAIL)
        tail.value = (tail.value + jump) & 0xFFFFFFFF
        # Wake the worker as a hostile user would, without publishing.
        wake_every_eventfd()
        # The worker finds an impossible index and drops the channel: no
        # spinning. Its user domain has no other channel, so it leaves.
        # (Posting before that would write an honest tail over the bad one.)
        assert wait_until(lambda: ch.worker_pid and ch.failed, 10)
        with pytest.raises(ChannelFailed, match="ring is corrupt"):
            ch.pread(0, 16)
        assert wait_until(lambda: dead(worker), 5)
    with open(broker.device, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == broker.digest
    _still_serving(broker)
