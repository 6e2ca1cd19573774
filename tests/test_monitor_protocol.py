"""The monitor refuses malformed set-up messages and leaks nothing; devices
opened with O_DIRECT and block devices work."""
import errno
import os
import socket
import subprocess

import pytest
from channel_env import BrokerProc, settled, wait_until

from drb_uring import linux, protocol, ring
from drb_uring.channel.client import Channel
from drb_uring.enforce.tasks import OP_READ_FIXED
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=16, cq_entries=16, slot_size=64 * 1024, slot_count=8)



def _ask(path, body: bytes = None, msg=None, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with s:
        s.connect(path)
        if body is not None:
            s.sendmsg([body])
        else:
            protocol.send(s, msg, list(fds))
        reply, rfds = protocol.recv(s)
        protocol.close_fds(rfds)
        return reply


def _fds(pid):
    out = []
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{f}"))
        except FileNotFoundError:      # closed while we looked
            pass
    return sorted(out)


def _settled_fds(pid):
    """The monitor's fds once it has finished with earlier connections (the
    device registration's may still be closing)."""
    return settled(lambda: _fds(pid))


@pytest.mark.parametrize("body, words", [
    (b"not json", "message is not JSON"),
    (b'{"v": 1}', "message has no operation"),
    (b'{"v": 9, "op": "open"}', "protocol version 9, this is 1"),
    (b'{"v": 1, "op": "launch"}', "unknown operation 'launch'"),
    (b'{"v": 1, "op": "open", "size": 1}', "operation 'open' carries 5 fds, got 0"),
    (b"x" * 9000, "truncated"),
])
def test_malformed_messages_refused(monitor, body, words):
    before = _settled_fds(monitor.proc.pid)
    reply = _ask(monitor.sock_path, body=body)
    assert reply["op"] == "error" and words in reply["error"]
    assert wait_until(lambda: _fds(monitor.proc.pid) == before)


def test_wrong_kind_of_fds_refused_and_closed(monitor):
    before = _settled_fds(monitor.proc.pid)
    pipes = [os.pipe() for _ in range(3)]
    fds = [fd for p in pipes for fd in p][:5]
    try:
        reply = _ask(monitor.sock_path, msg={"op": "open", "size": 4096}, fds=fds)
    finally:
        protocol.close_fds([fd for p in pipes for fd in p])
    assert reply["op"] == "error" and "not a memfd" in reply["error"]
    assert wait_until(lambda: _fds(monitor.proc.pid) == before)
    assert not monitor.workers()


def test_oversized_extent_refused(monitor):
    u, peer = ring.create(GEO)
    with u:
        try:
            reply = _ask(monitor.sock_path, msg={"op": "open", "size": 1 << 40},
                         fds=peer.as_list())
        finally:
            peer.close()
    assert reply["op"] == "error"
    assert "field 'size' must be an integer in [1, 268435456]" in reply["error"]


def test_o_direct_device_enforces_alignment(tmp_path, no_fd_leak):
    m = BrokerProc(tmp_path, o_direct=True)
    try:
        fd = os.open(m.backing, os.O_RDONLY | os.O_DIRECT)
        try:
            want = linux.dio_alignment(fd)      # what the file system asks for
        finally:
            os.close(fd)
        with Channel(m.sock_path, 1 << 20, geometry=GEO) as ch:
            a = ch.align
            assert a == want and a & (a - 1) == 0
            model = bytearray(os.urandom(4 * a))
            assert ch.pwrite(0, model) == len(model)
            # The README's example, unaligned: staged through aligned blocks.
            assert ch.pwrite(a + 3, b"hello") == 5
            model[a + 3:a + 8] = b"hello"
            assert ch.pread(a + 3, 5) == b"hello"
            assert ch.pwrite(a - 2, b"XYZW") == 4           # across a block boundary
            model[a - 2:a + 2] = b"XYZW"
            assert ch.pread(0, 4 * a) == bytes(model)
            f = ch.file()
            f.seek(7)
            assert f.read(9) == bytes(model[7:16])
            with ch.read_view(a + 1, 10) as v:
                assert bytes(v) == bytes(model[a + 1:a + 11])
            with pytest.raises(OSError, match=f"multiples of {a} bytes") as e:
                ch.submit_write(5, b"nowait", wait=False)
            assert e.value.errno == errno.EINVAL
            # The worker itself refuses what is not aligned, with the errno.
            assert ch.end.post(OP_READ_FIXED, 0, 0, a, a + 100, 1, 0)
            assert ch.end.wait_readable(5) == 1
            assert L.decode_cqes(ch.end.pop()) == [(1, -errno.EINVAL, 0)]
    finally:
        m.stop()
    with open(m.backing, "rb") as f:
        assert f.read(4 * a) == bytes(model)


@pytest.mark.parametrize("o_direct", [False, True])
def test_block_device(tmp_path, no_fd_leak, o_direct):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    try:
        dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True,
                             capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no loop device available: {e}")
    try:
        m = BrokerProc(tmp_path, device=dev, o_direct=o_direct)
        try:
            with Channel(m.sock_path, 8 << 20, geometry=GEO) as ch:
                assert ch.size == 8 << 20
                # A loop device's logical blocks are 512 bytes: O_DIRECT asks
                # for that much alignment, not a page.
                assert ch.align == (512 if o_direct else 1)
                ch.pwrite(4096, b"block!")
                ch.flush()
                assert ch.pread(4096, 6) == b"block!"
        finally:
            m.stop()
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    with open(img, "rb") as f:
        f.seek(4096)
        assert f.read(6) == b"block!"
