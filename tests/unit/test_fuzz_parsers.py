"""Fuzzing, within the default run's time: the worker's check of each
request, the monitor's message parser and the frontend's check of each
response take any bytes and answer with a named refusal, never with a
crash or with an I/O outside what was granted. `make fuzz` runs the same
properties for longer (DRB_FUZZ_EXAMPLES)."""
import array
import os
import socket

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drb_uring import protocol
from drb_uring.channel import _worker
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.ring import layout as L

EXAMPLES = int(os.environ.get("DRB_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
OP_FSYNC = 3
EINVAL, EFAULT, ERANGE, EOPNOTSUPP = 22, 14, 34, 95

POOL_BASE = 0x7F0000000000
SLOT, SLOTS = 4096, 16
EXTENT_BASE, EXTENT = 1 << 30, 1 << 24


def sqe(opcode=OP_READ_FIXED, flags=0, ioprio=0, fd=0, off=0, addr=0, len_=0, rw_flags=0,
        user_data=0, buf_index=0, personality=0, file_index=0, addr3=0):
    return L.SQE.pack(*[dict(opcode=opcode, flags=flags, ioprio=ioprio, fd=fd, off=off,
                             addr=addr, len=len_, rw_flags=rw_flags, user_data=user_data,
                             buf_index=buf_index, personality=personality,
                             file_index=file_index, addr3=addr3).get(f, 0)
                        for f in L.SQE_FIELDS])


u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))
near = st.one_of(st.integers(0, 3 * SLOT), u64, st.sampled_from([EXTENT - 1, EXTENT, 2**63,
                                                                 2**64 - 1, 2**64 - SLOT]))


@FUZZ
@given(st.binary(min_size=64, max_size=64))
def test_worker_check_of_random_bytes(raw):
    _assert_contained(raw)


@FUZZ
@given(opcode=st.sampled_from([OP_READ_FIXED, OP_WRITE_FIXED, OP_FSYNC, 0, 22, 255]),
       flags=st.sampled_from([0, 0, 0, 1, 0x40]), addr=near, len_=near, off=near,
       buf_index=st.one_of(st.integers(0, SLOTS + 1), u16), rw=st.sampled_from([0, 0, 1]),
       align=st.sampled_from([0, 512, 4096]))
def test_worker_check_of_near_misses(opcode, flags, addr, len_, off, buf_index, rw, align):
    raw = sqe(opcode=opcode, flags=flags, addr=addr, len_=len_ & 0xFFFFFFFF, off=off,
              buf_index=buf_index, rw_flags=rw)
    _assert_contained(raw, align)


def _assert_contained(raw, align=0):
    err, op, addr, n, off, idx = _worker.check_request(raw, POOL_BASE, SLOT, SLOTS,
                                                       EXTENT_BASE, EXTENT, align)
    assert err in (0, EINVAL, EFAULT, ERANGE, EOPNOTSUPP)
    if err:
        return
    fields = dict(zip(L.SQE_FIELDS, L.SQE.unpack(raw), strict=True))
    assert op == fields["opcode"] in (OP_READ_FIXED, OP_WRITE_FIXED, OP_FSYNC)
    if op == OP_FSYNC:
        assert addr == n == off == idx == 0
        return
    # What goes to the kernel: inside the request's own slot and inside the
    # channel's extent, whatever the user wrote.
    assert idx == fields["buf_index"] < SLOTS
    lo = POOL_BASE + idx * SLOT
    assert addr == lo and n <= SLOT and n > 0     # at the slot's start, inside it
    assert EXTENT_BASE <= off and off + n <= EXTENT_BASE + EXTENT
    if align:
        assert (addr - POOL_BASE) % align == 0 and n % align == 0 and off % align == 0


def test_worker_check_examples():
    ok = sqe(len_=4096, off=EXTENT - 4096, buf_index=SLOTS - 1)
    assert _worker.check_request(ok, POOL_BASE, SLOT, SLOTS, EXTENT_BASE, EXTENT)[0] == 0
    for bad, want in ((sqe(len_=4097), EFAULT), (sqe(len_=1, buf_index=SLOTS), EFAULT),
                      (sqe(len_=4096, off=EXTENT - 4095), ERANGE),
                      (sqe(len_=8, off=2**64 - 4), ERANGE), (sqe(len_=0), EINVAL),
                      (sqe(opcode=22, len_=1), EOPNOTSUPP), (sqe(len_=1, flags=1), EINVAL),
                      (sqe(opcode=OP_FSYNC, addr=1), EINVAL)):
        assert _worker.check_request(bad, POOL_BASE, SLOT, SLOTS, EXTENT_BASE, EXTENT)[0] == want


# ---- the monitor's messages ------------------------------------------------------------

def _through_a_socket(raw: bytes, nfds: int = 0):
    """`raw` (with `nfds` descriptors) as one datagram, parsed by
    protocol.recv: (message, fds) or the ProtocolError, and whether any
    descriptor leaked."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    extra = [os.open(os.devnull, os.O_RDONLY) for _ in range(nfds)]
    try:
        before = set(os.listdir("/proc/self/fd"))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", extra).tobytes())] \
            if extra else []
        a.sendmsg([raw], anc)
        try:
            out = protocol.recv(b)
        except protocol.ProtocolError as e:
            out = e
        got = set(os.listdir("/proc/self/fd")) - before
        if not isinstance(out, Exception):
            protocol.close_fds(out[1])
        return out, got
    finally:
        for fd in extra:
            os.close(fd)
        a.close()
        b.close()


def _check_parsed(out, leaked):
    if isinstance(out, protocol.ProtocolError):
        assert not leaked                     # a refused message's fds are closed
        return
    msg, fds = out
    if msg is None:                           # an empty datagram: end of stream
        assert fds == []
        return
    assert isinstance(msg, dict) and msg["v"] == protocol.VERSION
    assert len(fds) in protocol.FDS_FOR[msg["op"]]


@FUZZ
@given(st.binary(max_size=600), st.integers(0, 6))
def test_message_parser_takes_any_bytes(raw, nfds):
    _check_parsed(*_through_a_socket(raw, nfds))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)


@FUZZ
@given(st.fixed_dictionaries({"v": st.sampled_from([1, 1, 1, 0, "1", None]),
                              "op": st.sampled_from(list(protocol.FDS_FOR) + ["x", ""])},
                             optional={"size": json_values, "geometry": json_values,
                                       "reason": json_values}),
       st.integers(0, 6))
def test_message_parser_takes_any_message(obj, nfds):
    import json
    _check_parsed(*_through_a_socket(json.dumps(obj).encode(), nfds))


def test_message_parser_refuses_deep_nesting_and_size():
    out, leaked = _through_a_socket(b"[" * 100_000 + b"]" * 100_000)
    assert isinstance(out, protocol.ProtocolError) and not leaked
