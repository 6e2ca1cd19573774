"""The broker: the trusted process that opens every channel of a pair.

It opens the device on the host and listens on two Unix SOCK_SEQPACKET
sockets: the user domain's, on which each user side opens channels by
sending its ring's memory and eventfds, and the host's control socket
(trace). For every channel the broker checks the layout, gives the channel
an extent of the device that it alone decides, builds the grant ring (the
user's pool as fixed buffers, the device as fixed file 0, restricted, then
enabled), has the enforcement service check every submission on it, and
starts a worker that inherits the grant ring. It watches each worker through
a pidfd: a worker that dies fails its channel at once, and the user side
hears it on its connection.

Whom it distrusts: every peer on the socket (messages are length-, type-
and fd-checked in drb_uring.protocol; ring memory is checked by
ring.validate_peer_fds) and every worker (it is watched, never waited on).
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import selectors
import signal
import stat
import struct
import subprocess
import sys
import time
from typing import Callable

from drb_uring import linux, procs, protocol, ring
from drb_uring.channel import _grant, _worker
from drb_uring.channel.extents import ExtentError, Extents
from drb_uring.channel.worker import WorkerSpec
from drb_uring.enforce import tasks
from drb_uring.errors import DrbError
from drb_uring.spec import Spec, SpecError

log = logging.getLogger("drb.broker")

BLKGETSIZE64 = 0x80081272
WORKER_STOP_GRACE = 1.0    # seconds between SIGTERM and SIGKILL

# spawn(spec, fds) -> (a process to watch, the pid of the worker itself): the
# worker inherits `fds`, which the spec names.
SpawnFn = Callable[["WorkerSpec", list[int]], tuple[subprocess.Popen, int]]


class BrokerError(DrbError):
    pass


MAX_CHANNELS = 64          # per user domain, by default
MAX_PINNED = 512 << 20     # bytes of user memory pinned as fixed buffers, per user domain


@dataclasses.dataclass(frozen=True)
class Limits(Spec):
    """What one user domain may hold; going past a limit gets an error
    naming it and hurts no one else."""

    channels: int = MAX_CHANNELS
    pinned: int = MAX_PINNED

    def check(self) -> None:
        if self.channels < 1 or self.pinned < 4096:
            raise SpecError("limits must allow at least one channel and one page")


@dataclasses.dataclass(frozen=True)
class BrokerSpec(Spec):
    """A broker started as its own process (python -m drb_uring.channel.broker)."""

    socket: str                    # for user sides
    control: str | None = None     # for the host only: trace
    device: str | None = None      # opened here, on the host (tests and benchmarks)
    o_direct: bool = False
    worker_spin_ns: int = ring.DEFAULT_SPIN_NS
    enforce: bool = True
    limits: dict = dataclasses.field(default_factory=dict)

    def check(self) -> None:
        Limits.from_dict(self.limits)


class Device:
    """The driver domain's device: its fd, size and the extents handed out.
    Everything is read from the fd itself, never taken from the sender's
    word: its size, and whether it was opened with O_DIRECT and so needs
    aligned offsets and lengths (`align`, 0 when it does not)."""

    def __init__(self, fd: int):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        else:
            raise protocol.ProtocolError("the device must be a regular file or a block device")
        self.fd = fd
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        self.align = linux.dio_alignment(fd) if direct else 0
        self.extents = Extents(size, self.align or 1)

    @property
    def size(self) -> int:
        return self.extents.size


class BrokerChannel:
    """The broker's record of one open channel."""

    def __init__(self, cid: int, peer: protocol.Peer, extent: tuple[int, int], pinned: int):
        self.id = cid
        self.peer: protocol.Peer | None = peer
        self.extent = extent
        self.pinned = pinned
        self.worker: subprocess.Popen | None = None
        self.worker_pid = 0
        self.pidfd = -1
        self.gid = 0            # the channel's id in the host's eBPF maps
        self.closing = False
        self.kill_at = 0.0      # when a worker told to stop gets SIGKILL
        self.reply_close = False   # answer "close" once the worker is gone


def spawn_plain(spec: WorkerSpec, fds: list[int]) -> tuple[subprocess.Popen, int]:
    """Start a worker as a child of the broker (no domain)."""
    proc = procs.spawn("drb_uring.channel.worker", spec, fds)
    return proc, proc.pid


# Which operations each kind of peer may ask for. The user socket is the
# only one a domain can reach; the control socket is the host's alone.
OPS_FOR = {"user": {"open"}, "host": {"trace"}}


class Broker:
    def __init__(self, path: str, *, control: str | None = None,
                 worker_spin_ns: int = ring.DEFAULT_SPIN_NS, spawn: SpawnFn = spawn_plain,
                 enforce: bool = True, limits: Limits | None = None):
        self.path = path
        self.control_path = control
        self.limits = limits or Limits()
        # Without enforcement no task table exists and nothing checks what a
        # worker submits. Turning it off is loud on purpose.
        self.enforcer = None
        self.enforce = enforce
        self.domains: dict[str, str] = {}
        if enforce:
            from drb_uring.enforce.client import EnforceClient
            self.enforcer = EnforceClient()
        else:
            log.warning("RUNNING WITHOUT THE eBPF MONITOR (--no-monitor): workers' "
                        "access to user memory is bounded by the grant rings only, "
                        "not checked against any I/O task table")
        self.spawn = spawn
        self.worker_spin_ns = worker_spin_ns
        self.sel = selectors.DefaultSelector()
        self.device: Device | None = None
        self.channels: dict[int, BrokerChannel] = {}
        self.peers: dict[protocol.Peer, str] = {}      # waiting for a request: role
        self.next_id = 1
        self.stopping = False
        self.listeners = [protocol.listen(path)]
        self.sel.register(self.listeners[0], selectors.EVENT_READ, ("listen", "user"))
        if control:
            self.listeners.append(protocol.listen(control))
            self.sel.register(self.listeners[1], selectors.EVENT_READ, ("listen", "host"))
        if self.enforcer:
            # Between calls the service says nothing: its socket turns
            # readable only when it goes away.
            self.sel.register(self.enforcer.sock, selectors.EVENT_READ, ("service", None))

    def watch_domains(self, groups: dict[str, str]) -> None:
        """Count the mode switches of these domains (role -> cgroup) for
        `drb trace` and `drb bench`."""
        self.domains.update(groups)
        if self.enforcer:
            for group in groups.values():
                self.enforcer.watch(group)

    def open_device(self, path: str, o_direct: bool) -> None:
        """Open the device, here on the host: the trusted side opens it, and
        the driver domain reaches it only through the grant rings."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if o_direct else 0))
        try:
            self.device = Device(fd)
        except BaseException:
            os.close(fd)
            raise

    # ---- the loop ------------------------------------------------------------

    def run(self) -> None:
        """Serve until stop() is called (a signal handler may call it)."""
        while not self.stopping:
            self._step(1.0)

    def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Serve until done() holds or `timeout` seconds pass; returns done()."""
        end = time.monotonic() + timeout
        while not done() and not self.stopping and time.monotonic() < end:
            self._step(0.05)
        return done()

    def stop(self, *_) -> None:
        self.stopping = True

    def _add(self, peer: protocol.Peer, role: str) -> None:
        self.peers[peer] = role
        self.sel.register(peer, selectors.EVENT_READ, ("conn", peer))

    def _events(self, peer: protocol.Peer, data) -> None:
        """Watch for room to write while replies wait; drop a dead peer."""
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.wants_write else 0)
        key = self.sel.get_map().get(peer)
        if key is not None and key.events != want:
            self.sel.modify(peer, want, data)

    def _step(self, timeout: float) -> None:
        """One round of the loop: whatever is ready within `timeout`, then
        the workers whose grace period ran out."""
        if any(ch.kill_at for ch in self.channels.values()):
            timeout = min(timeout, 0.05)
        for key, events in self.sel.select(timeout=timeout):
            kind, obj = key.data
            try:
                if kind == "listen":
                    conn, _ = key.fileobj.accept()
                    self._add(protocol.Peer(conn), obj)
                elif kind == "conn":
                    if events & selectors.EVENT_WRITE:
                        obj.flush()
                    if events & selectors.EVENT_READ:
                        self._on_message(obj)
                    if obj in self.peers:
                        self._settle(obj, key.data)
                elif kind == "channel":
                    self._on_channel_message(obj)
                elif kind == "worker":
                    self._on_worker_exit(obj)
                elif kind == "service":
                    self._service_gone()
            except Exception:   # one bad party must not take the broker down
                log.exception("while handling %s", kind)
        now = time.monotonic()
        for ch in list(self.channels.values()):
            if ch.kill_at and now >= ch.kill_at and ch.worker and ch.worker.poll() is None:
                log.warning("channel %d: worker %d ignored SIGTERM; killing it",
                            ch.id, ch.worker_pid)
                ch.worker.kill()
                ch.kill_at = 0.0

    def _service_gone(self) -> None:
        """The eBPF service closed its connection: it died, and its programs
        went with it. Nothing checks the grant rings any more, so no
        monitored channel may go on: each worker is killed now and each user
        side told why. The next open starts a new service."""
        log.error("the eBPF monitor went away: stopping every monitored channel")
        self.sel.unregister(self.enforcer.sock)
        self.enforcer.close()
        self.enforcer = None
        gone = [ch for ch in self.channels.values() if ch.gid]
        for ch in gone:                     # all of them first, at once
            ch.gid = 0                      # the grant went with the service
            try:
                os.kill(ch.worker_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for ch in gone:
            try:
                self._finish(ch, "the eBPF monitor went away: the channel cannot run "
                                 "unmonitored")
            except Exception:
                log.exception("channel %d: finishing after the monitor went away", ch.id)

    def _monitor(self):
        """The enforcement service, started again if it went away; never
        None when this broker enforces (a channel is then refused)."""
        if self.enforce and self.enforcer is None:
            from drb_uring.enforce.client import EnforceClient
            try:
                self.enforcer = EnforceClient()
                for group in self.domains.values():
                    self.enforcer.watch(group)
            except (DrbError, OSError) as e:
                self.enforcer = None
                raise BrokerError(f"the eBPF monitor is gone and could not be started "
                                  f"again: {e}") from None
            self.sel.register(self.enforcer.sock, selectors.EVENT_READ, ("service", None))
            log.warning("the eBPF monitor was started again")
        return self.enforcer

    def _settle(self, peer: protocol.Peer, data) -> None:
        if peer.dead:
            log.warning("dropping a peer that does not read its replies")
            self._drop(peer)
        else:
            self._events(peer, data)

    def close(self) -> None:
        """Stop every worker and release everything. Idempotent."""
        for ch in list(self.channels.values()):
            self._stop_worker(ch)
        end = time.monotonic() + WORKER_STOP_GRACE
        for ch in list(self.channels.values()):
            if ch.worker is not None:
                try:
                    ch.worker.wait(max(0.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    ch.worker.kill()
            self._finish(ch, None)
        if self.device:
            protocol.close_fds([self.device.fd])
            self.device = None
        for peer in list(self.peers):
            self._drop(peer)
        self.sel.close()
        if self.enforcer:
            self.enforcer.close()
            self.enforcer = None
        for sock, path in zip(self.listeners, (self.path, self.control_path), strict=False):
            sock.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # ---- messages ------------------------------------------------------------

    def _reply_error(self, peer: protocol.Peer, err: Exception) -> None:
        log.warning("refused: %s", err)
        peer.send({"op": "error", "error": str(err)})

    def _drop(self, peer: protocol.Peer) -> None:
        self.peers.pop(peer, None)
        if peer.fileno() >= 0 and peer in self.sel.get_map():
            self.sel.unregister(peer)
        peer.close()

    def _on_message(self, peer: protocol.Peer) -> None:
        try:
            got = peer.recv()
        except protocol.ProtocolError as e:
            self._reply_error(peer, e)
            return
        except OSError:
            self._drop(peer)
            return
        if got is None:
            return                       # nothing there after all
        msg, fds = got
        if msg is None:
            self._drop(peer)
            return
        role = self.peers[peer]
        out_fds: list[int] = []
        try:
            if msg["op"] not in OPS_FOR[role]:
                raise protocol.ProtocolError(f"operation {msg['op']!r} is not served here")
            if msg["op"] == "open":
                reply, out_fds = self._open(peer, msg, fds)
            else:
                reply = self._trace(msg)
        except (DrbError, OSError) as e:
            protocol.close_fds(fds)
            self._reply_error(peer, e)
            return
        try:
            peer.send({"op": "ok", **reply}, out_fds)
        finally:
            protocol.close_fds(out_fds)

    def _trace(self, msg: dict) -> dict:
        if not self.enforcer:
            raise BrokerError("this pair runs without eBPF (--no-monitor): nothing traced")
        by_gid = {ch.gid: ch.id for ch in self.channels.values() if ch.gid}
        lease = msg.get("lease", 0)
        hist = self.enforcer.histograms(list(by_gid),
                                        lease if isinstance(lease, (int, float)) else 0)
        return {"channels": {str(by_gid[g]): {st: {str(b): n for b, n in bk.items()}
                                              for st, bk in v.items()}
                             for g, v in hist.items()},
                "counters": {role: self.enforcer.counters(path)
                             for role, path in self.domains.items()}}

    def _check_limits(self, pool_size: int) -> None:
        n = len(self.channels)
        if n >= self.limits.channels:
            raise BrokerError(f"limit reached: {self.limits.channels} channels per user domain "
                              "(drb up --max-channels)")
        pinned = sum(ch.pinned for ch in self.channels.values())
        if pinned + pool_size > self.limits.pinned:
            raise BrokerError(f"limit reached: a pool of {pool_size >> 10} KiB on top of "
                              f"{pinned >> 10} KiB would pin more than "
                              f"{self.limits.pinned >> 10} KiB per user domain "
                              "(drb up --max-pinned)")

    def _open(self, peer: protocol.Peer, msg: dict,
              fds: list[int]) -> tuple[dict, list[int]]:
        if self.device is None:
            raise BrokerError("the broker has no device")
        size = protocol.int_field(msg, "size", 1, self.device.size)
        self._monitor()
        ring_fds = ring.PeerFds.from_list(fds)
        geo = ring.validate_peer_fds(ring_fds)
        self._check_limits(geo.pool_size)
        if self.device.align and geo.slot_size % self.device.align:
            raise BrokerError("slot size is not a multiple of the device alignment")
        try:
            extent = self.device.extents.alloc(size)
        except ExtentError as e:
            raise BrokerError(str(e)) from None
        ch = BrokerChannel(self.next_id, peer, extent, geo.pool_size)
        tt_fd = -1
        try:
            ring_fd, params = _grant.setup_disabled(geo.sq_entries)
            try:
                pool_base = _grant.register_pool(ring_fd, ring_fds.pool, geo.slot_size,
                                                 geo.slot_count)
                _grant.register_device(ring_fd, self.device.fd)
                _grant.restrict(ring_fd, [tasks.OP_READ_FIXED, tasks.OP_WRITE_FIXED,
                                          tasks.OP_FSYNC],
                                _worker.FLAG_FIXED_FILE, _worker.FLAG_FIXED_FILE)
                _grant.enable(ring_fd)
                if self.enforcer:
                    # Enforced from before the worker exists.
                    ch.gid, tt_fd = self.enforcer.grant(ring_fd, pool_base, geo.slot_size,
                                                        geo.slot_count, extent)
                ch.worker, ch.worker_pid = self._spawn_worker(ring_fd, params, pool_base,
                                                              ring_fds, extent)
            finally:
                os.close(ring_fd)
        except BaseException:
            if ch.gid:
                self.enforcer.ungrant(ch.gid)
            protocol.close_fds([tt_fd] if tt_fd >= 0 else [])
            self.device.extents.release(*extent)
            raise
        finally:
            ring_fds.close()       # the worker has its own copies; never the pool
        self.next_id += 1
        try:
            ch.pidfd = os.pidfd_open(ch.worker.pid)
            if self.enforcer:
                # Should this broker die, the service kills the worker.
                self.enforcer.worker(ch.gid, ch.worker_pid)
        except BaseException:
            # A worker nobody would stop: stop it now and give all back.
            try:
                os.kill(ch.worker_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            ch.peer = None                  # the caller answers the open with the error
            if ch.pidfd >= 0:               # not watched yet
                os.close(ch.pidfd)
                ch.pidfd = -1
            self._finish(ch, None)
            protocol.close_fds([tt_fd] if tt_fd >= 0 else [])
            raise
        self.channels[ch.id] = ch
        # From now on the connection is the channel's: it hears "failed".
        self.peers.pop(peer, None)
        self.sel.modify(peer, selectors.EVENT_READ, ("channel", ch))
        self.sel.register(ch.pidfd, selectors.EVENT_READ, ("worker", ch))
        log.info("channel %d open: extent %d+%d, worker pid %d%s", ch.id, extent[0], extent[1],
                 ch.worker_pid, "" if self.enforcer else " (UNMONITORED)")
        reply = {"channel": ch.id, "extent_size": extent[1], "worker_pid": ch.worker_pid,
                 "align": self.device.align}
        if tt_fd >= 0:
            reply["task_table_version"] = tasks.VERSION
            reply["task_table_bytes"] = tasks.TABLE_BYTES
            reply["reap_hist_offset"] = tasks.REAP_HIST_OFFSET
            return reply, [tt_fd]
        return reply, []

    def _spawn_worker(self, ring_fd, params, pool_base, ring_fds,
                      extent) -> tuple[subprocess.Popen, int]:
        fds = [ring_fd, ring_fds.ctl_user, ring_fds.ctl_driver, ring_fds.user_efd,
               ring_fds.driver_efd]
        spec = WorkerSpec(ring_fd=ring_fd, params=params.hex(), pool_base=pool_base,
                          ring_fds=[ring_fds.ctl_user, ring_fds.ctl_driver, -1,
                                    ring_fds.user_efd, ring_fds.driver_efd],
                          extent_base=extent[0], extent_size=extent[1],
                          align=self.device.align, spin_ns=self.worker_spin_ns)
        return self.spawn(spec, fds)

    # ---- channel life --------------------------------------------------------

    def _on_channel_message(self, ch: BrokerChannel) -> None:
        try:
            got = ch.peer.recv()
        except (protocol.ProtocolError, OSError):
            got = (None, [])
        if got is None:
            return
        msg, fds = got
        protocol.close_fds(fds)
        # The extent is released only once the worker is gone: until then it
        # could still be doing I/O there. A "close" is answered after that,
        # so the user side may reuse the space as soon as it has the reply.
        ch.reply_close = msg is not None and msg["op"] == "close"
        self.sel.unregister(ch.peer)      # nothing more to read from this peer
        self._stop_worker(ch)

    def _stop_worker(self, ch: BrokerChannel) -> None:
        """Ask the worker to stop; its exit (pidfd) finishes the channel, and
        one that ignores SIGTERM gets SIGKILL after the grace period. Never
        waits: the loop goes on serving everyone else."""
        ch.closing = True
        w = ch.worker
        if w is None or w.poll() is not None or ch.kill_at:
            return
        try:
            os.kill(ch.worker_pid, signal.SIGTERM)   # the worker itself stops cleanly
        except ProcessLookupError:
            pass
        ch.kill_at = time.monotonic() + WORKER_STOP_GRACE

    def _on_worker_exit(self, ch: BrokerChannel) -> None:
        rc = ch.worker.wait()
        reason = None
        if not ch.closing:
            how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            if rc == 137:     # a stand-in in the driver domain reports 128 + signal
                how = "killed by signal 9"
            reason = f"backend worker {ch.worker_pid} {how}"
            violated = self.enforcer.failed(ch.gid) if self.enforcer and ch.gid else None
            if violated:
                reason = f"monitor killed backend worker {ch.worker_pid}: {violated}"
                log.error("VIOLATION channel %d: %s", ch.id, violated)
            log.error("channel %d failed: %s", ch.id, reason)
        self._finish(ch, reason)

    def _finish(self, ch: BrokerChannel, reason: str | None) -> None:
        if ch.pidfd >= 0:
            self.sel.unregister(ch.pidfd)
            os.close(ch.pidfd)
            ch.pidfd = -1
        if ch.worker is not None and ch.worker.poll() is None:
            ch.worker.kill()
            ch.worker.wait()
        if self.enforcer and ch.gid:
            try:
                self.enforcer.ungrant(ch.gid)
            except (DrbError, OSError) as e:      # the user side must hear anyway
                log.error("channel %d: ungrant failed: %s", ch.id, e)
            ch.gid = 0
        if self.device is not None:
            self.device.extents.release(*ch.extent)
        if ch.peer is not None:
            msg = {"op": "failed", "reason": reason} if reason else \
                {"op": "ok"} if ch.reply_close else None
            if msg:
                ch.peer.send(msg)
                ch.peer.flush()
            if ch.peer in self.sel.get_map():
                self.sel.unregister(ch.peer)
            ch.peer.close()
            ch.peer = None
        self.channels.pop(ch.id, None)
        log.info("channel %d closed", ch.id)


def serve(spec: BrokerSpec, spawn: SpawnFn = spawn_plain) -> int:
    """Run a broker as this process until SIGTERM or SIGINT; prints "ready"
    on stdout once it listens."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s drb-broker[%(process)d] %(message)s")
    try:
        broker = Broker(spec.socket, control=spec.control, worker_spin_ns=spec.worker_spin_ns,
                        enforce=spec.enforce, spawn=spawn,
                        limits=Limits.from_dict(spec.limits))
        if spec.device:
            broker.open_device(spec.device, spec.o_direct)
    except (DrbError, OSError) as e:
        print(f"drb-broker: {e}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    print("ready", flush=True)
    try:
        broker.run()
    finally:
        broker.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve(procs.spec_from_argv(BrokerSpec, argv))


if __name__ == "__main__":
    sys.exit(main())
