"""The user side of a channel: a file-like API over the double ring.

A :class:`Channel` creates its ring memory and eventfds, hands them to the
monitor, and from then on talks to its backend worker only through shared
memory: requests are ``struct io_uring_sqe`` naming a slot of the data pool,
responses ``struct io_uring_cqe`` with the device's result or the exact
negative errno of the check that refused the request.

Requests larger than a slot are split into slot-sized pieces and put back
together. When every slot or the request ring is in use, a call waits (or
raises BlockingIOError if it asked not to). Nothing is dropped: every posted
piece is accounted for until its response arrives or the channel fails.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import select
import socket
import struct
import time

from drb_uring import protocol, ring
from drb_uring.channel.faces import AsyncChannel, ChannelFile, _readable
from drb_uring.channel.odirect import DirectAlignment
from drb_uring.channel.request import ChannelClosed, ChannelFailed, Request
from drb_uring.enforce import tasks
from drb_uring.enforce.tasks import OP_FSYNC, OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.ring import layout as L

__all__ = ["AsyncChannel", "Channel", "ChannelClosed", "ChannelFailed", "ChannelFile",
           "Request"]

SLOT_BITS = 16
NOTICE_WAIT = 1.0    # seconds an unproven answer waits for word that the monitor died
_CQE = struct.Struct("<QiI")



def read_notice(sock) -> tuple[dict, mmap.mmap | None]:
    """The monitor's next notice on a channel's control connection: the
    message (a connection that broke or closed is a "failed" one) and, with
    "restarted", the new monitor's task table, mapped. Shared by Channel
    and the disk's backend, which hear the same notices."""
    fds: list[int] = []
    try:
        msg, fds = protocol.recv(sock)
    except (OSError, protocol.ProtocolError) as e:
        msg = {"op": "failed", "reason": f"control connection broke: {e}"}
    if msg is None:
        msg = {"op": "failed", "reason": "the monitor closed the channel"}
    table = None
    try:
        if msg.get("op") == "restarted" and fds:
            table = mmap.mmap(fds[0], tasks.TABLE_BYTES)
    except OSError as e:
        msg = {"op": "failed", "reason": f"the new monitor's task table: {e}"}
    finally:
        protocol.close_fds(fds)
    return msg, table

class Channel(DirectAlignment):
    """A channel to part of its user domain's extent, which the monitor gives it."""

    def __init__(self, socket_path: str, size: int, *, offset: int | None = None,
                 geometry: L.Geometry | None = None,
                 spin_ns: int = ring.DEFAULT_SPIN_NS, reconnect: bool = True,
                 retry_writes: bool = True):
        """size bytes of the user domain's extent: at `offset` in it (the
        same offset reaches the same bytes every time, across channels and
        restarts of the pair), or wherever there is room (None). `base`
        says where it is.
        reconnect: when the worker dies (not stopped by the monitor) and
        another takes over, carry on (see _resume); False: fail instead.
        retry_writes: a write the dead worker had taken and the kernel did
        not finish is posted again (the same bytes to the same place); False:
        it fails with EIO, and reads alone are posted again."""
        _need_int("size", size, 1)
        if offset is not None:
            _need_int("offset", offset, 0)
        self.closed = True
        self.failed: str | None = None
        self.reconnect = reconnect
        self.retry_writes = retry_writes
        self.restarts = 0                   # workers that died under this channel
        self.posted_at: dict[int, int] = {}     # slot -> its request's place in the ring
        self.posted_off: dict[int, int] = {}    # slot -> its request's device offset
        self.stale: set[int] = set()    # tags a takeover settled or posted again
        self.monitor_down = False       # the monitor died; a new one is on its way
        self.geometry = geometry or L.Geometry()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            try:
                self.sock.connect(socket_path)
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT, "no monitor socket there (is the pair "
                                        "up? inside a user domain it is "
                                        "/run/drb/NAME/monitor.sock)", socket_path) from None
            self.end, peer = ring.create(self.geometry, spin_ns=spin_ns)
        except BaseException:
            self.sock.close()
            raise
        try:
            try:
                msg = {"op": "open", "size": size}
                if offset is not None:
                    msg["offset"] = offset
                reply, rfds = protocol.request(self.sock, msg, peer.as_list(), keep_fds=True)
            finally:
                peer.close()
            self.tasks = None
            if rfds:
                # The I/O task table: writable here only. The monitor's program
                # lets the worker touch a slot only while its task is active.
                if reply.get("task_table_version") != tasks.VERSION:
                    protocol.close_fds(rfds)
                    raise L.LayoutError(f"task table layout version "
                                        f"{reply.get('task_table_version')!r}; this client "
                                        f"writes version {tasks.VERSION}")
                try:
                    self.tasks = mmap.mmap(rfds[0], reply["task_table_bytes"])
                finally:
                    protocol.close_fds(rfds)
                self.end.set_task_table(self.tasks, reply.get("reap_hist_offset", 0))
            self.size = reply["extent_size"]
            # Where in the user domain's extent this channel's offset 0 is.
            self.base = reply.get("base", 0)
            # O_DIRECT devices take offsets and lengths in multiples of this.
            self.align = reply.get("align") or 1
            self._worker_pid = reply["worker_pid"]
            self.id = reply["channel"]
            self.end.watch_fd = self.sock.fileno()
            self.pool = memoryview(self.end.pool_buffer())
        except BaseException:
            self.end.close()
            self.sock.close()
            raise
        slots = self.geometry.slot_count
        self.slot_size = self.geometry.slot_size
        self.free = list(range(slots - 1, -1, -1))
        self.gen = [0] * slots
        # slot -> (request, position in the request, piece length)
        self.inflight: dict[int, tuple[Request, int, int]] = {}
        self.moved_before: dict[int, int] = {}  # slot -> the monitor's bytes moved, at post
        self.closed = False

    @property
    def monitored(self) -> bool:
        """Whether the eBPF monitor checks this channel (it sent a task table)."""
        return self.tasks is not None

    # ---- plumbing ------------------------------------------------------------

    def _check(self) -> None:
        if self.failed:
            raise ChannelFailed(self.failed)
        if self.closed:
            raise ChannelClosed("channel is closed")

    def _fail(self, reason: str) -> None:
        if self.failed:
            return
        self.failed = reason
        exc = ChannelFailed(reason)
        for req, _, _ in list(self.inflight.values()):
            req._fail(exc)
        self.inflight.clear()

    @property
    def worker_pid(self) -> int:
        """The pid of the worker serving this channel now (one per user
        domain; the monitor says when a new one takes over)."""
        while not self.failed and not self.closed and _readable([self.sock]):
            try:
                self._hear_monitor()
            except ChannelFailed:
                break
        return self._worker_pid

    def _hear_monitor(self) -> None:
        """The control connection became readable: the monitor says which
        worker serves the channel now (returns), reports a failure, or is
        gone (both raise ChannelFailed)."""
        msg, table = read_notice(self.sock)
        if msg.get("op") == "worker" and isinstance(msg.get("pid"), int):
            self._worker_pid = msg["pid"]
            return
        if msg.get("op") == "monitor-down" and self.reconnect:
            self.monitor_down = True    # it comes back: "restarted" follows
            return
        if (msg.get("op") == "restarted" and isinstance(msg.get("pid"), int)
                and isinstance(msg.get("consumed"), int)):
            dead = self._worker_pid
            self._worker_pid = msg["pid"]
            self._resume(str(msg.get("why") or f"backend worker {dead} died"),
                         msg["consumed"] & 0xFFFFFFFF, table)
            return
        self._fail(msg.get("reason", f"unexpected message {msg.get('op')!r}"))
        raise ChannelFailed(self.failed)

    def _resume(self, why: str, consumed: int, table: mmap.mmap | None = None) -> None:
        """The worker died and another took the rings over. Requests still
        in the request ring (at or past `consumed`) the new one serves. Each
        request the dead one had taken is settled from the kernel's own
        counts, never from a worker's word: done (the monitor saw all its
        bytes move, or its flush succeed) is answered as done; anything else
        (never run, failed, cut short) is posted again whole, reads and
        writes alike: the same bytes to the same place.

        With `table`, the monitor itself died and came back: its counts went
        with it, so every request the dead worker had taken is posted again,
        and those still queued get their tasks in the new table."""
        if not self.reconnect or self.tasks is None:
            what = "reconnect=False" if not self.reconnect else "the channel is unmonitored"
            self._fail(f"{why} ({what}: not carried on with worker {self._worker_pid})")
            raise ChannelFailed(self.failed)
        self.restarts += 1
        if table is not None:
            self.tasks = table
            self.end.set_task_table(table, tasks.REAP_HIST_OFFSET)
            self.monitor_down = False
        settled, again = [], []
        for slot, (req, _pos, want) in list(self.inflight.items()):
            queued = ((self.posted_at[slot] - consumed) & 0xFFFFFFFF) < 0x80000000
            if not queued:
                # Whatever the dead worker may still have said of it is moot.
                self.stale.add(self.gen[slot] << SLOT_BITS | slot)
            if table is not None:
                if not queued:
                    again.append(slot)
                    continue
                if req.op != OP_FSYNC:
                    self.end.write_task(slot, req.op, want, self.posted_off[slot])
                self.moved_before[slot] = (self.end.task_moved(slot) if req.op != OP_FSYNC
                                           else self.end.flushes_done())
                continue
            if queued:
                continue                    # the new worker has it
            if self.end.task_inflight(slot):
                # Still in the kernel (asynchronous I/O outlives its
                # submitter): its completion comes through the new worker,
                # and is checked as any answer is.
                self.stale.discard(self.gen[slot] << SLOT_BITS | slot)
                continue
            before = self.moved_before[slot]
            tag = self.gen[slot] << SLOT_BITS | slot
            self.stale.discard(tag)         # settled here, through _take
            if req.op == OP_FSYNC:
                if self.end.flushes_done() != before:
                    settled.append(self._take(tag, 0))
                else:
                    again.append(slot)
                self.stale.add(tag)
                continue
            moved = (self.end.task_moved(slot) - before) & 0xFFFFFFFF
            if moved == want:
                settled.append(self._take(tag, want))
                self.stale.add(tag)         # the dead worker's own answer, if it comes
            elif moved < want:
                # Never run, failed, or cut short by the death (a short
                # read or write is no answer to give the caller for it):
                # posted again whole, the same bytes to the same place.
                self.stale.add(tag)
                again.append(slot)
            else:
                raise self._broken(f"{why}; the kernel moved {moved} bytes on slot {slot} "
                                   f"for a request of {want}")
        if table is not None:
            # Every task is in the new table now: the new worker may start.
            protocol.send(self.sock, {"op": "resumed"})
        for slot in again:
            req, pos, want = self.inflight.pop(slot)
            if req.op == OP_WRITE_FIXED and not self.retry_writes:
                # Not finished, not posted again: the caller said so.
                if self.end.release_task(slot) == 0:
                    self.free.append(slot)
                settled.append((req, pos, want, -errno.EIO))
                continue
            req.pending -= 1
            self._post(req, slot, req.op, self.posted_off[slot], pos, want, True)
        for req, pos, want, res in settled:
            req._piece_done(pos, want, res)

    def _reap(self, timeout: float | None) -> int:
        """Handle responses; wait up to `timeout` for at least one."""
        try:
            if self.end.wait_readable(timeout) == 0:
                return 0
        except OSError as e:
            if e.errno == errno.EPIPE:
                self._hear_monitor()
                return 0            # a notice: wait again
            raise
        raw = self.end.pop()
        done = []
        try:
            for user_data, res, _flags in _CQE.iter_unpack(raw):
                got = self._take(user_data, res)
                if got is not None:
                    done.append(got)
            # A violation is recorded before the I/O it stops can move data:
            # with a clean status here, what was copied above is the device's.
            code = self.end.channel_failed()
            if code:
                raise self._broken(f"monitor killed backend worker {self._worker_pid}: "
                                   f"{tasks.REASONS.get(code, code)}")
        except ChannelFailed as e:
            for req, _, _, _ in done:
                req._fail(e)
            raise
        for req, pos, want, res in done:
            req._piece_done(pos, want, res)
        return len(raw) // L.CQE_SIZE

    def _broken(self, reason: str) -> ChannelFailed:
        self._fail(reason)
        return ChannelFailed(self.failed)

    def _take(self, user_data: int, res: int):
        """Check one response (the worker is not trusted) and take the
        slot back: its task is revoked, and the kernel must have no
        request on it left. Returns what finishes the piece, or None for an
        answer a takeover made moot (see _resume)."""
        if user_data in self.stale:
            self.stale.discard(user_data)
            return None
        slot = user_data & ((1 << SLOT_BITS) - 1)
        entry = self.inflight.get(slot)
        if entry is None or self.gen[slot] != user_data >> SLOT_BITS:
            raise self._broken(f"worker answered a request that is not in flight "
                               f"(user_data 0x{user_data:x})")
        req, pos, want = entry
        if res > want:
            raise self._broken(f"worker answered {res} bytes for a request of {want}")
        lie = self._unproven(req.op, slot, res)
        # An answer the counts bear out needs no second look; release_task
        # below still checks the kernel is done with the slot.
        early = self.end.task_inflight(slot) if lie else 0
        if (early or lie) and self.reconnect and self._monitor_down_heard():
            # Unchecked: the request stays in flight, and the takeover
            # under the new monitor posts it again.
            return None
        self.inflight.pop(slot)
        busy = self.end.release_task(slot) or early
        if busy:
            # The slot is never used again: the kernel may still write it.
            raise self._broken(f"worker {self._worker_pid} answered for slot {slot} while the "
                               f"kernel still had {busy} request(s) on it")
        if lie:
            raise self._broken(lie)
        if req.op == OP_READ_FIXED and res > 0 and req.buf is None:
            req.lent_slot = slot        # zero copy: the slot stays lent out
        else:
            if req.op == OP_READ_FIXED and res > 0:
                base = slot * self.slot_size
                req.buf[pos:pos + res] = self.pool[base:base + res]
            self.free.append(slot)
        return req, pos, want, res

    def _unproven(self, op: int, slot: int, res: int) -> str | None:
        """Why the kernel's counts do not bear an answer out, or None."""
        before = self.moved_before.get(slot, -1)
        if res < 0 or before < 0:
            return None
        if op == OP_FSYNC:
            if self.end.flushes_done() == before:
                return f"worker {self._worker_pid} answered a flush the kernel never ran"
            return None
        moved = (self.end.task_moved(slot) - before) & 0xFFFFFFFF
        if moved != res:
            return (f"worker {self._worker_pid} answered {res} bytes for slot {slot}; the "
                    f"kernel moved {moved}")
        return None

    def _monitor_down_heard(self) -> bool:
        """Whether the monitor has died (the broker says so at once). An
        answer the counts do not bear out is a lie, unless the monitor died
        and the answer went out after its programs had gone and before the
        worker was stopped. The broker's word comes within moments of the
        death; a lie waits for it for NOTICE_WAIT, then fails the channel."""
        end = time.monotonic() + NOTICE_WAIT
        while not self.monitor_down and not self.failed:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return False
            self._hear_monitor()
        return self.monitor_down

    def _drive(self, until, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            self._check()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._reap(left) == 0 and left == 0.0:
                raise TimeoutError("no response within the timeout")

    def _slot(self, wait: bool) -> int:
        while not self.free:
            self._check()
            if not wait:
                raise BlockingIOError(errno.EAGAIN, "every slot of the pool is in use")
            self._reap(None)
        return self.free.pop()

    def _post(self, req: Request, slot: int, op: int, off: int, pos: int, n: int,
              wait: bool) -> None:
        # The tag names the slot and its use, so a stale or forged response
        # is recognised; a flush holds a slot only for its tag.
        self.gen[slot] = (self.gen[slot] + 1) & 0xFFFFFFFFFFFF
        tag = self.gen[slot] << SLOT_BITS | slot
        # What the kernel has moved on the slot so far: an answer of n bytes
        # must come back with this grown by n (see _take).
        self.moved_before[slot] = (self.end.task_moved(slot) if op != OP_FSYNC
                                   else self.end.flushes_done())
        while True:
            at = self.end.indexes[0]
            if self.end.post(op, slot if op != OP_FSYNC else 0, 0, n, off, tag):
                break
            self._check()
            if not wait:
                self.free.append(slot)
                raise BlockingIOError(errno.EAGAIN, "the request ring is full")
            self._reap(None)
        self.posted_at[slot] = at
        self.posted_off[slot] = off
        self.inflight[slot] = (req, pos, n)
        req.pending += 1

    def _submit(self, op: int, off: int, n: int, buf, wait: bool,
                inner: tuple | None = None) -> Request:
        self._check()
        if off < 0 or n < 0:
            raise ValueError(f"offset and length must be >= 0, got {off} and {n}")
        if off + n > self.size:
            # Past the extent: the worker would refuse it with ERANGE; do it
            # here, for the whole request, before anything is posted.
            if op == OP_WRITE_FIXED or off > self.size:
                raise OSError(errno.ERANGE, f"offset {off}+{n} is beyond the extent "
                                            f"of {self.size} bytes")
            n = self.size - off
        req = Request(self, op, buf, n)
        req.inner = inner
        if n == 0:
            req._finish()
            return req
        pieces = -(-n // self.slot_size)
        if not wait and (len(self.free) < pieces or self.end.writable < pieces):
            # All or nothing: never leave part of a request posted.
            raise BlockingIOError(errno.EAGAIN, "not enough free slots or ring entries")
        # Posting a piece may reap responses (to free a slot or ring entry);
        # the guard count keeps the request from finishing while pieces
        # remain to be posted.
        req.pending += 1
        for pos in range(0, n, self.slot_size):
            piece = min(self.slot_size, n - pos)
            slot = self._slot(wait)
            if op == OP_WRITE_FIXED:
                base = slot * self.slot_size
                self.pool[base:base + piece] = buf[pos:pos + piece]
            self._post(req, slot, op, off + pos, pos, piece, wait)
        if not req.done:
            req.pending -= 1
            if req.pending == 0:
                req._finish()
        return req

    # ---- the API -------------------------------------------------------------

    def submit_read(self, offset: int, n: int, *, wait: bool = True) -> Request:
        _need_int("offset", offset)
        _need_int("n", n)
        if not self.aligned(offset, n) and offset >= 0 and n >= 0:
            return self._read_bounced(offset, n, None, wait)
        buf = bytearray(max(0, min(n, self.size - offset)))
        return self._submit(OP_READ_FIXED, offset, n, buf, wait)

    def submit_readinto(self, offset: int, buffer, *, wait: bool = True) -> Request:
        _need_int("offset", offset)
        mv = _bytes_view("buffer", buffer, writable=True)
        if not self.aligned(offset, len(mv)) and offset >= 0:
            return self._read_bounced(offset, len(mv), mv, wait)
        return self._submit(OP_READ_FIXED, offset, len(mv), mv, wait)

    def submit_write(self, offset: int, data, *, wait: bool = True) -> Request:
        _need_int("offset", offset)
        mv = _bytes_view("data", data)
        if not self.aligned(offset, len(mv)):
            return self._write_bounced(offset, mv, wait)
        return self._submit(OP_WRITE_FIXED, offset, len(mv), mv, wait)

    def submit_flush(self, *, wait: bool = True) -> Request:
        self._check()
        req = Request(self, OP_FSYNC, None, 0)
        self._post(req, self._slot(wait), OP_FSYNC, 0, 0, 0, wait)
        return req

    def pread(self, offset: int, n: int) -> bytes:
        req = self.submit_read(offset, n)
        req.result()
        return bytes(req.buf[:req.short])

    def preadinto(self, offset: int, buffer) -> int:
        return self.submit_readinto(offset, buffer).result()

    def pwrite(self, offset: int, data) -> int:
        return self.submit_write(offset, data).result()

    def flush(self) -> None:
        self.submit_flush().result()

    def reap(self, timeout: float | None = 0) -> int:
        """Handle whatever responses arrived (waiting up to `timeout`)."""
        self._check()
        return self._reap(timeout)

    @contextlib.contextmanager
    def read_view(self, offset: int, n: int):
        """Zero copy: read at most one slot and lend a read-only view of the
        slot itself; the slot is reused only after the block ends."""
        lo, hi = self._span(offset, n) if n > 0 and offset >= 0 else (offset, offset + n)
        if not 0 < n <= hi - lo <= self.slot_size:
            raise ValueError(f"a view covers 1 to {self.slot_size} bytes (one slot"
                             f"{', aligned to ' + str(self.align) if self.align > 1 else ''})"
                             f", got {n} at {offset}")
        req = self._submit(OP_READ_FIXED, lo, hi - lo, None, True)
        got = max(0, min(req.result() - (offset - lo), n))
        slot = req.lent_slot
        base = 0 if slot is None else slot * self.slot_size + offset - lo
        view = (self.pool[base:base + got].toreadonly() if slot is not None
                else memoryview(b""))
        try:
            yield view
        finally:
            view.release()
            if slot is not None:
                self.free.append(slot)
        # The view was the slot itself: valid only if no violation happened
        # while it was lent.
        code = self.end.channel_failed()
        if code:
            raise self._broken(f"monitor killed backend worker {self._worker_pid}: "
                               f"{tasks.REASONS.get(code, code)}")

    def file(self) -> "ChannelFile":
        return ChannelFile(self)

    def close(self) -> None:
        """Fail anything still in flight with ChannelClosed, tell the
        monitor, release the ring. Idempotent."""
        if self.closed:
            return
        self.closed = True
        exc = ChannelClosed("channel closed with the request in flight")
        for req, _, _ in list(self.inflight.values()):
            req._fail(exc)
        self.inflight.clear()
        with contextlib.suppress(OSError, protocol.ProtocolError, ConnectionError):
            if not self.failed:
                # Answered once the worker is gone and the extent is free.
                self.sock.settimeout(5.0)
                protocol.send(self.sock, {"op": "close"})
                while True:         # notices may come first: the answer is ok or failed
                    reply, fds = protocol.recv(self.sock)
                    protocol.close_fds(fds)
                    if reply is None or reply["op"] in ("ok", "error", "failed"):
                        break
        self.sock.close()
        self.pool.release()
        self.end.drop_task_table()
        if self.tasks is not None:
            self.tasks.close()
        self.end.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _need_int(name: str, v, lo: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")


def _bytes_view(name: str, obj, writable: bool = False) -> memoryview:
    try:
        mv = memoryview(obj).cast("B")
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object{' (writable)' if writable else ''}"
                        f", not {type(obj).__name__}") from None
    if writable and mv.readonly:
        raise TypeError(f"{name} must be writable (a bytearray, memoryview, ...), "
                        f"not read-only {type(obj).__name__}")
    return mv
