"""Messages between the parties and the trusted processes, over SOCK_SEQPACKET.

One message is one datagram: a JSON object with a version, and the file
descriptors it carries as SCM_RIGHTS. Every message is length-checked, its
JSON depth bounded, and its fd count checked against what its operation
needs; a message that fails is refused with a clear error and its fds are
closed. A server talks to each peer through a :class:`Peer`, which never
blocks on it.
"""

from __future__ import annotations

import array
import collections
import json
import os
import socket

from drb_uring.errors import DrbError

VERSION = 1
MAX_MSG = 8192
MAX_FDS = 8

# Operation -> numbers of fds it may carry.
FDS_FOR = {
    "open": (5,),             # user side: ring fds (ctl_user ro, ctl_driver, pool, 2 eventfds)
    "close": (0,),
    "resumed": (0,),          # user -> monitor: took up the new monitor's task table
    "trace": (0,),            # the host only (control socket): histograms and counters
    "user_add": (0,),         # the host only: a user domain more (drb user add)
    "user_rm": (0,),          # the host only: one user domain less (drb user rm)
    "users": (0,),            # the host only: the user domains and their extents
    "metrics": (0,),          # the host only: the pair's counters (drb metrics)
    "ok": (0, 1),             # the reply to "open" carries the task table when monitored
    "error": (0,),
    "failed": (0,),           # monitor -> user: the channel failed (reason)
    "worker": (0,),           # monitor -> user: this worker (pid) serves the channel now
    "monitor-down": (0,),     # monitor -> user: the eBPF monitor died; it is coming back
    "restarted": (0, 1),      # monitor -> user: the worker died; this one took over
                              # (with a new task table when the monitor came back)
}


class ProtocolError(DrbError):
    """A peer sent something this version does not accept."""


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def listen(path: str) -> socket.socket:
    """A SOCK_SEQPACKET listener at `path` (replacing a stale one), root only."""
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


def _encode(msg: dict) -> bytes:
    body = json.dumps({"v": VERSION, **msg}).encode()
    if len(body) > MAX_MSG:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MSG}")
    return body


def _ancillary(fds) -> list:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
        else []


def send(sock: socket.socket, msg: dict, fds: list[int] = ()) -> None:
    sock.sendmsg([_encode(msg)], _ancillary(fds))


class Peer:
    """A server's connection to one peer, which the server never waits on.

    Replies leave at once when the socket has room; otherwise they wait in
    a short queue (with duplicates of their fds) until it drains. A peer
    whose queue overflows does not read its replies, and is to be dropped
    (``dead``), so that one silent client cannot stall a server."""

    MAX_QUEUED = 8

    def __init__(self, conn: socket.socket):
        conn.setblocking(False)
        self.conn = conn
        self.queue: collections.deque = collections.deque()
        self.dead = False

    def fileno(self) -> int:
        return self.conn.fileno()

    def send(self, msg: dict, fds=()) -> None:
        if self.dead:
            return
        body = _encode(msg)
        if not self.queue and self._try(body, fds):
            return
        if len(self.queue) >= self.MAX_QUEUED:
            self.dead = True
            return
        self.queue.append((body, [os.dup(fd) for fd in fds]))

    def _try(self, body: bytes, fds) -> bool:
        try:
            self.conn.sendmsg([body], _ancillary(fds))
            return True
        except BlockingIOError:
            return False
        except OSError:
            self.dead = True
            return True

    def flush(self) -> None:
        """Send what waits, as far as the socket takes it."""
        while self.queue and not self.dead:
            body, fds = self.queue[0]
            if not self._try(body, fds):
                return
            self.queue.popleft()
            close_fds(fds)

    @property
    def wants_write(self) -> bool:
        return bool(self.queue)

    def recv(self, table: dict = FDS_FOR) -> tuple[dict | None, list[int]] | None:
        """One message as recv() gives it, or None if none is there yet."""
        try:
            return recv(self.conn, table)
        except BlockingIOError:
            return None

    def close(self) -> None:
        while self.queue:
            close_fds(self.queue.popleft()[1])
        self.conn.close()


def recv(sock: socket.socket, table: dict = FDS_FOR) -> tuple[dict | None, list[int]]:
    """One message, or (None, []) at end of stream. Raises ProtocolError
    (having closed any fds received) when the message is malformed."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_MSG + 1, socket.CMSG_LEN(MAX_FDS * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    fds = list(fds)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MSG:
            raise ProtocolError("message or its file descriptors were truncated")
        if not data:
            if fds:
                raise ProtocolError("file descriptors without a message")
            return None, []
        try:
            msg = json.loads(data)
        except ValueError:
            raise ProtocolError("message is not JSON") from None
        except RecursionError:       # nesting deeper than the parser's stack
            raise ProtocolError("message nests too deeply") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ProtocolError("message has no operation")
        if msg.get("v") != VERSION:
            raise ProtocolError(f"protocol version {msg.get('v')!r}, this is {VERSION}")
        want = table.get(msg["op"])
        if want is None:
            raise ProtocolError(f"unknown operation {msg['op']!r}")
        if len(fds) not in want:
            raise ProtocolError(f"operation {msg['op']!r} carries "
                                f"{' or '.join(map(str, want))} fds, got {len(fds)}")
        return msg, fds
    except ProtocolError:
        close_fds(fds)
        raise


def request(sock: socket.socket, msg: dict, fds: list[int] = (),
            keep_fds: bool = False, table: dict = FDS_FOR):
    """Send a message and wait for the monitor's reply; raise on 'error'.
    With keep_fds, returns (reply, fds) and the caller owns the fds."""
    send(sock, msg, fds)
    reply, rfds = recv(sock, table)
    if not keep_fds:
        close_fds(rfds)
    if reply is None:
        raise ConnectionError("the monitor closed the connection")
    if reply["op"] == "error":
        close_fds(rfds)
        raise ProtocolError(reply.get("error", "refused"))
    return (reply, rfds) if keep_fds else reply


def int_field(msg: dict, name: str, lo: int, hi: int) -> int:
    v = msg.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ProtocolError(f"field {name!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v
