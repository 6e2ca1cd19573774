"""Hostile peers of the broker and of the host's enforcement service: a
client that never reads, messages too big or too deep, more channels and
memory than a user domain may have, and switches that only the host may
flip. After each, the broker still answers others within a second and a
worker's death still reaches its channel."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from channel_env import PRIVATE_NS, brokers_made, hang_guard

from drb_uring import procs, protocol
from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=8, cq_entries=8, slot_size=65536, slot_count=2)


def _connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    return s


def _still_serving(m):
    """A new client gets a channel and its bytes back while the hostile
    peer is still there: the broker is not blocked on it."""
    with hang_guard(what="a new client of the broker"):
        with Channel(m.sock_path, 1 << 20, geometry=GEO) as ch:
            ch.pwrite(0, b"alive")
            assert ch.pread(0, 5) == b"alive"


def _worker_death_reaches(ch):
    """A caller waiting with no timeout of its own hears of the worker's
    death (through the control socket) instead of waiting for ever."""
    os.kill(ch.worker_pid, signal.SIGKILL)
    with hang_guard(what="a read on a channel whose worker died"):
        with pytest.raises(ChannelFailed, match="killed by signal 9"):
            while True:
                ch.pread(0, 10)


@pytest.fixture
def broker(tmp_path, no_fd_leak):
    with brokers_made(tmp_path, size=64 << 20) as start:
        yield start


def test_a_client_that_never_reads_is_dropped_not_waited_for(broker):
    m = broker()
    victim = Channel(m.sock_path, 1 << 20, geometry=GEO, reconnect=False)
    silent = _connect(m.sock_path)
    sent = [0]

    def flood():
        bad = json.dumps({"v": 1, "op": "open", "size": "lots"}).encode()
        try:
            for _ in range(20000):
                silent.send(bad)
                sent[0] += 1
        except OSError:
            pass                      # dropped by the broker: the point
    t = threading.Thread(target=flood, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive() and sent[0] < 20000, sent   # the broker hung up on it
    _still_serving(m)
    _worker_death_reaches(victim)
    victim.close()
    silent.close()
    assert "dropping a peer that does not read its replies" in m.log_text()


@pytest.mark.parametrize("body, words", [
    (b"x" * (protocol.MAX_MSG + 100), "truncated"),
    (b'{"v": 1, "op": "open", "x": ' + b"[" * 4000 + b"]" * 4000 + b"}",
     "message nests too deeply"),
    (b"\xff\xfe not json", "message is not JSON"),
])
def test_bad_messages_get_a_reply(broker, body, words):
    m = broker()
    s = _connect(m.sock_path)
    with s:
        s.send(body)
        s.settimeout(5)
        reply = json.loads(s.recv(protocol.MAX_MSG + 1))
    assert reply["op"] == "error" and words in reply["error"], reply
    _still_serving(m)


def test_channels_past_the_limit(broker):
    m = broker(limits={"channels": 3})
    chans = [Channel(m.sock_path, 1 << 20, geometry=GEO, reconnect=i != 0) for i in range(3)]
    try:
        with pytest.raises(protocol.ProtocolError,
                           match="limit reached: 3 channels per user domain"):
            Channel(m.sock_path, 1 << 20, geometry=GEO)
        for i, ch in enumerate(chans):
            ch.pwrite(0, b"ch%d" % i)
            assert ch.pread(0, 3) == b"ch%d" % i
        chans.pop().close()                      # one closes: one more may open
        chans.append(Channel(m.sock_path, 1 << 20, geometry=GEO))
        _worker_death_reaches(chans[0])
    finally:
        for ch in chans:
            ch.close()


def test_pinned_memory_past_the_limit(broker):
    pool = GEO.pool_size
    m = broker(limits={"pinned": 2 * pool + pool // 2})
    a = Channel(m.sock_path, 1 << 20, geometry=GEO)
    b = Channel(m.sock_path, 1 << 20, geometry=GEO)
    try:
        with pytest.raises(protocol.ProtocolError, match="would pin more than"):
            Channel(m.sock_path, 1 << 20, geometry=GEO)
        a.pwrite(0, b"a")
        assert a.pread(0, 1) == b"a"
    finally:
        a.close()
        b.close()


def test_trace_only_on_the_control_socket(broker):
    m = broker()
    with _connect(m.sock_path) as s:
        with pytest.raises(protocol.ProtocolError, match="'trace' is not served here"):
            protocol.request(s, {"op": "trace", "lease": 3600})
    with _connect(m.control_path) as s:
        reply = protocol.request(s, {"op": "trace", "lease": 1})
    assert reply["op"] == "ok" and "channels" in reply
    with _connect(m.control_path) as s:           # the host's socket serves trace only
        with pytest.raises(protocol.ProtocolError, match="'close' is not served here"):
            protocol.request(s, {"op": "close"})


def test_a_false_hello_does_not_unregister_a_broker(broker):
    m = broker()
    from drb_uring.enforce.client import OPS, SERVICE_SOCK
    s = _connect(SERVICE_SOCK)
    protocol.request(s, {"op": "hello", "tgid": m.proc.pid}, table=OPS)
    s.close()                                     # hang up: its own hello goes, no other
    time.sleep(0.2)
    with Channel(m.sock_path, 1 << 20, geometry=GEO) as ch:
        assert ch.monitored


SERVICE_AS_NOBODY = textwrap.dedent("""
    import os, socket, sys
    from drb_uring.enforce.client import EnforceClient, SERVICE_SOCK
    c = EnforceClient()                       # root: starts the service, is served
    os.chmod(SERVICE_SOCK, 0o666)             # let anyone connect(): the check is ours
    pid = os.fork()
    if pid == 0:
        os.setgid(65534); os.setuid(65534)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(SERVICE_SOCK)
        s.settimeout(5)
        try:
            s.send(b'{"v": 1, "op": "hello"}')
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
        print("nobody got", repr(got), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    c.close()
""")


def test_service_serves_only_root_on_the_host():
    """In a private mount namespace with a private /run: a service of its
    own, whose socket is made world-writable so that only the credential
    check stands between an unprivileged process and the monitor's maps."""
    proc = subprocess.run([sys.executable, PRIVATE_NS, "sh", "-c",
                           "mount -t tmpfs tmpfs /run && mkdir -p /run/lock && "
                           "exec \"$0\" -c \"$1\"", sys.executable, SERVICE_AS_NOBODY],
                          capture_output=True, text=True, env=procs.module_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "nobody got b''" in proc.stdout          # hung up on, unanswered
    with open("/var/log/drb-ebpfd.log") as f:
        assert ", uid 65534 (only root on the host)" in f.read()
