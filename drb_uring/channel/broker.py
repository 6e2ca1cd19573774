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
import mmap
import os
import resource
import select
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
from drb_uring.channel.worker import ChannelSpec, WorkerSpec
from drb_uring.enforce import tasks
from drb_uring.errors import DrbError
from drb_uring.ring import layout as L
from drb_uring.spec import Spec, SpecError

log = logging.getLogger("drb.broker")

BLKGETSIZE64 = 0x80081272
WORKER_STOP_GRACE = 1.0    # seconds between SIGTERM and SIGKILL
WORKER_START_GRACE = 30.0  # for a worker told to stop before it could hear it
# A worker that dies (not stopped by the monitor) is replaced, after a pause
# that doubles with each recent death; more deaths than this within the
# window (a worker that cannot stay up: five in a row take about 1.6 s of
# pauses) fail every channel of its user domain instead of looping.
RESTART_LIMIT = 5
RESTART_WINDOW = 10.0
RESTART_PAUSE = 0.05
RESUME_GRACE = 5.0         # for a user side to take up a new monitor's task table

# spawn(spec, fds) -> (a process to watch, the pid of the worker itself): the
# worker inherits `fds`, which the spec names.
SpawnFn = Callable[["WorkerSpec", list[int]], tuple[subprocess.Popen, int]]


class BrokerError(DrbError):
    pass


MAX_CHANNELS = 64          # per user domain, by default
MAX_PENDING = 16           # connections of one user domain that have no channel yet
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

    socket: str | None             # for the user side of the one user domain, or None
    control: str | None = None     # for the host only: trace
    device: str | None = None      # opened here, on the host (tests and benchmarks)
    o_direct: bool = False
    worker_spin_ns: int = ring.DEFAULT_SPIN_NS
    enforce: bool = True
    limits: dict = dataclasses.field(default_factory=dict)
    # Or several user domains: [{"name", "socket", "extent": [base, size]}]
    tenants: list = dataclasses.field(default_factory=list)
    worker_cpus: list = dataclasses.field(default_factory=list)   # [] = any
    monitor_restart: bool = False

    def check(self) -> None:
        Limits.from_dict(self.limits)
        if bool(self.socket) == bool(self.tenants):
            raise SpecError("a broker serves either one socket or a list of user domains")
        for t in self.tenants:
            if not (isinstance(t, dict) and isinstance(t.get("name"), str)
                    and isinstance(t.get("socket"), str) and isinstance(t.get("extent"), list)
                    and len(t["extent"]) == 2):
                raise SpecError(f"bad user domain {t!r}: name, socket, extent [base, size]")


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
    """The broker's record of one open channel. The broker keeps the grant
    ring and the ring descriptors (never the pool) for as long as the
    channel is open: each new worker of its user domain inherits them."""

    def __init__(self, cid: int, tenant: "Tenant", peer: protocol.Peer,
                 extent: tuple[int, int], pinned: int):
        self.id = cid
        self.tenant = tenant
        self.peer: protocol.Peer | None = peer
        self.extent = extent
        self.pinned = pinned
        self.ring_fd = -1
        self.params = b""
        self.pool_base = 0
        self.geo: ring.Geometry | None = None
        self.ring_fds: list[int] = []     # ctl_user, ctl_driver, -1, user_efd, driver_efd
        self.gid = 0            # the channel's id in the host's eBPF maps
        self.closing = False
        self.reply_close = False   # answer "close" once the worker has let go
        self.fail_reason: str | None = None

    @property
    def worker_pid(self) -> int:
        w = self.tenant.worker
        return w.pid if w else 0

    def spec(self, align: int) -> ChannelSpec:
        return ChannelSpec(id=self.id, ring_fd=self.ring_fd, params=self.params.hex(),
                           pool_base=self.pool_base, ring_fds=list(self.ring_fds),
                           extent_base=self.extent[0], extent_size=self.extent[1],
                           align=align)

    def close_fds(self) -> None:
        protocol.close_fds([fd for fd in [self.ring_fd, *self.ring_fds] if fd >= 0])
        self.ring_fd = -1
        self.ring_fds = []


class WorkerProc:
    """One worker process of a user domain, and the broker's pipes to it."""

    def __init__(self, proc: subprocess.Popen, pid: int, ctl_w: int, report_r: int,
                 gate_r: int, cids: set[int]):
        self.proc = proc
        self.pid = pid
        self.ctl_w = ctl_w          # ids of channels to drop
        self.report_r = report_r    # report_t records: channels dropped
        self.gate_r = gate_r        # ends when this worker is gone: the next one's gate
        self.cids = cids            # the channels it was started with
        self.pidfd = -1
        self.kill_at = 0.0          # when a worker told to stop gets SIGKILL
        self.retired = False        # told to stop: the next worker takes over
        self.ready = False          # its SIGTERM handler is in (it said so)
        self.termed = False

    def ask_drop(self, cid: int) -> None:
        self._tell(cid)

    def ask_go(self, cid: int) -> None:
        """A held channel may be served now."""
        self._tell(cid | GO_BIT)

    def _tell(self, word: int) -> None:
        try:
            os.write(self.ctl_w, struct.pack("<I", word))
        except OSError:             # it is gone; its exit finishes the channel
            pass

    def close_fds(self) -> None:
        protocol.close_fds([fd for fd in (self.ctl_w, self.report_r, self.gate_r, self.pidfd)
                            if fd >= 0])
        self.ctl_w = self.report_r = self.gate_r = self.pidfd = -1


REPORT = struct.Struct("<Ii")      # the worker's report_t
READY_ID = 0xFFFFFFFF              # its first report: it hears SIGTERM now
GO_BIT = 1 << 31                   # in a control word: serve this held channel (else drop it)


class Tenant:
    """One user domain: its socket, its share of the device, its limits,
    its channels and the one worker that serves them all."""

    def __init__(self, name: str, path: str, sock, extent: tuple[int, int] | None,
                 limits: Limits):
        self.name = name
        self.path = path
        self.sock = sock
        self.extent = extent
        self.extents: Extents | None = None
        self.limits = limits
        self.channels: dict[int, BrokerChannel] = {}
        self.worker: WorkerProc | None = None
        self.workers: list[WorkerProc] = []     # the current one and any retiring
        self.deaths: list[float] = []           # when its workers died, recently
        self.restart_at = 0.0                   # when the next worker starts after one died
        self.consumed: dict[int, int] = {}      # channel -> request ring head the dead one left
        self.death = ""                         # how the last one died
        # After the monitor came back: the new worker holds each channel
        # until its user side has taken up its new task table.
        self.awaiting: set[int] = set()
        self.resume_deadline = 0.0

    def extents_of(self, device: "Device") -> Extents:
        if self.extents is None:
            if self.extent is None:
                self.extent = (0, device.size)
            self.extents = Extents(self.extent[1], device.align or 1)
        return self.extents


def _readable(sock) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def _close_and_unlink(sock, path: str) -> None:
    """A listening socket, and its name in the file system."""
    sock.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _request_head(ctl_driver: int) -> int:
    """The request ring's head as the driver left it (its own page)."""
    with mmap.mmap(ctl_driver, mmap.PAGESIZE, prot=mmap.PROT_READ) as m:
        return struct.unpack_from("<I", m, L.OFF_SQ_HEAD)[0]


def spawn_plain(spec: WorkerSpec, fds: list[int]) -> tuple[subprocess.Popen, int]:
    """Start a worker as a child of the broker (no domain)."""
    proc = procs.spawn("drb_uring.channel.worker", spec, fds)
    return proc, proc.pid


# Which operations each kind of peer may ask for. The user sockets are the
# only ones a domain can reach; the control socket is the host's alone.
OPS_FOR = {"user": {"open"}, "host": {"trace"}}
DEFAULT_TENANT = "user"


class Broker:
    def __init__(self, path: str | None = None, *, control: str | None = None,
                 worker_spin_ns: int = ring.DEFAULT_SPIN_NS, spawn: SpawnFn = spawn_plain,
                 enforce: bool = True, limits: Limits | None = None,
                 host_ops: dict[str, Callable[[dict], dict]] | None = None,
                 worker_cpus: list[int] | None = None, monitor_restart: bool = False):
        self.control_path = control
        # Every channel holds a handful of descriptors here (its grant ring
        # and ring fds, its connection); 1024 would not hold 16 user domains
        # with 64 channels each.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        # Bring a monitor that died back, and carry the channels on under it.
        self.monitor_restart = monitor_restart
        self.monitor_deaths: list[float] = []
        self.monitor_retry_at = 0.0
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
        self.worker_cpus = worker_cpus
        self.host_ops = dict(host_ops or {})
        self.sel = selectors.DefaultSelector()
        self.device: Device | None = None
        self.tenants: dict[str, Tenant] = {}
        self.channels: dict[int, BrokerChannel] = {}
        self.peers: dict[protocol.Peer, tuple[str, Tenant | None]] = {}   # waiting: role
        self.next_id = 1
        self.stopping = False
        self.control_sock = None
        if control:
            self.control_sock = protocol.listen(control)
            self.sel.register(self.control_sock, selectors.EVENT_READ, ("listen", None))
        if path:
            self.add_tenant(DEFAULT_TENANT, path)
        if self.enforcer:
            # Between calls the service says nothing: its socket turns
            # readable only when it goes away.
            self.sel.register(self.enforcer.sock, selectors.EVENT_READ, ("service", None))

    # ---- user domains ------------------------------------------------------

    def add_tenant(self, name: str, socket_path: str, extent: tuple[int, int] | None = None,
                   limits: Limits | None = None) -> None:
        """Serve a user domain on its own socket. Its channels get parts of
        `extent` (base, size) of the device; None: the whole device (one
        user domain only)."""
        if name in self.tenants:
            raise BrokerError(f"user domain {name!r} is already served")
        if extent is not None:
            base, size = extent
            if base < 0 or size <= 0 or (self.device and base + size > self.device.size):
                raise BrokerError(f"extent {base}+{size} is not on the device")
            for t in self.tenants.values():
                if t.extent is None or (t.extent[0] < base + size and base < sum(t.extent)):
                    raise BrokerError(f"extent {base}+{size} overlaps user domain {t.name}'s")
        elif self.tenants:
            raise BrokerError("a user domain beside others needs an extent of its own")
        sock = protocol.listen(socket_path)
        t = Tenant(name, socket_path, sock, extent, limits or self.limits)
        self.tenants[name] = t
        self.sel.register(sock, selectors.EVENT_READ, ("listen", t))

    def remove_tenant(self, name: str) -> None:
        """Stop serving a user domain: its socket goes, its workers are
        stopped, and each of its channels' user sides hears why."""
        t = self.tenants.pop(name, None)
        if t is None:
            raise BrokerError(f"no user domain {name!r}")
        self._close_listener(t)
        self._fail_tenant(t, "user domain removed")

    def tenant_info(self) -> dict[str, dict]:
        return {t.name: {"extent": list(t.extent) if t.extent else None,
                         "channels": len(t.channels),
                         "worker_pid": t.worker.pid if t.worker else 0}
                for t in self.tenants.values()}

    def _close_listener(self, t: Tenant) -> None:
        if t.sock is None:
            return
        if t.sock in self.sel.get_map():
            self.sel.unregister(t.sock)
        _close_and_unlink(t.sock, t.path)
        t.sock = None

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

    def _all_workers(self) -> list[WorkerProc]:
        return [w for t in self.tenants.values() for w in t.workers]

    def _add(self, peer: protocol.Peer, role: str, tenant: Tenant | None) -> None:
        self.peers[peer] = (role, tenant)
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
        if self.monitor_retry_at or any(t.awaiting for t in self.tenants.values()) or any(
                w.kill_at for w in self._all_workers()) or any(
                t.restart_at for t in self.tenants.values()):
            timeout = min(timeout, 0.05)
        for key, events in self.sel.select(timeout=timeout):
            kind, obj = key.data
            if self.sel.get_map().get(key.fd) is not key:
                continue        # unregistered by an earlier event of this batch
            try:
                if kind == "listen":
                    conn, _ = key.fileobj.accept()
                    if obj is not None and sum(1 for _r, t in self.peers.values()
                                               if t is obj) >= MAX_PENDING:
                        # One user domain's idle connections must not use up
                        # the broker's descriptors for everyone.
                        conn.close()
                        log.warning("user domain %s: more than %d connections without a "
                                    "channel; refused one", obj.name, MAX_PENDING)
                        continue
                    self._add(protocol.Peer(conn), "user" if obj else "host", obj)
                elif kind == "conn":
                    if events & selectors.EVENT_WRITE:
                        obj.flush()
                    if events & selectors.EVENT_READ:
                        self._on_message(obj)
                    if obj in self.peers:
                        self._settle(obj, key.data)
                elif kind == "channel":
                    if events & selectors.EVENT_WRITE and obj.peer is not None:
                        obj.peer.flush()
                    if events & selectors.EVENT_READ and obj.peer is not None:
                        self._on_channel_message(obj)
                    self._watch_channel(obj)
                elif kind == "report":
                    self._on_report(*obj)
                elif kind == "worker":
                    self._on_worker_exit(*obj)
                elif kind == "service":
                    self._service_gone()
            except Exception:   # one bad party must not take the broker down
                log.exception("while handling %s", kind)
        now = time.monotonic()
        if self.monitor_retry_at and now >= self.monitor_retry_at:
            try:
                self._recover_monitor()
            except Exception:   # noqa: BLE001 - every channel hears it
                log.exception("bringing the eBPF monitor back")
                self._monitor_down("the eBPF monitor went away and could not be brought back")
        for t in list(self.tenants.values()):
            if t.awaiting and now >= t.resume_deadline:
                self._resume_overdue(t)
            if t.restart_at and now >= t.restart_at:
                try:
                    self._start_worker(t)
                except Exception as e:      # noqa: BLE001 - told to every channel
                    t.restart_at = 0.0
                    if self.enforcer is not None and _readable(self.enforcer.sock):
                        # The monitor died under the restart: its return
                        # starts this user domain's worker too.
                        self._service_gone()
                        continue
                    log.exception("user domain %s: no worker could be started", t.name)
                    self._fail_tenant(t, f"backend worker died and none could be started "
                                         f"again: {e}")
        for w in self._all_workers():
            if w.kill_at and now >= w.kill_at and w.proc.poll() is None:
                log.warning("worker %d ignored SIGTERM; killing it", w.pid)
                self._kill(w)
                w.kill_at = 0.0

    @staticmethod
    def _kill(w: WorkerProc) -> None:
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if w.proc.poll() is None and w.proc.pid != w.pid:
            w.proc.kill()       # the stand-in that started it in the domain

    def _service_gone(self) -> None:
        """The eBPF service closed its connection: it died, and its programs
        went with it. Nothing checks the grant rings any more, so no
        monitored channel may go on: each worker is killed now. With the
        restart policy the monitor is brought back and the channels carry on
        (see _recover_monitor); otherwise each user side is told why, and
        the next open starts a new service."""
        log.error("the eBPF monitor went away: stopping every monitored channel")
        self.sel.unregister(self.enforcer.sock)
        self.enforcer.close()
        self.enforcer = None
        for ch in self.channels.values():
            ch.gid = 0                      # the grant went with the service
        for w in self._all_workers():       # all of them first, at once
            self._kill(w)
        if not self.monitor_restart:
            self._monitor_down("the eBPF monitor went away: the channel cannot run "
                               "unmonitored")
            return
        now = time.monotonic()
        self.monitor_deaths = [d for d in self.monitor_deaths
                               if now - d < RESTART_WINDOW] + [now]
        if len(self.monitor_deaths) > RESTART_LIMIT:
            self._monitor_down(f"the eBPF monitor went away, the {len(self.monitor_deaths)}th "
                               f"time in {RESTART_WINDOW:.0f} s: not brought back again")
            return
        for t in self.tenants.values():
            for w in list(t.workers):
                self._forget(t, w)
            t.restart_at = 0.0          # the monitor's return starts the next worker
            t.death = "the eBPF monitor went away"
            # Answers sent between the programs' end and the workers' could
            # not be counted: the user sides must hear why at once.
            for ch in t.channels.values():
                if ch.peer is not None and not ch.closing:
                    self._tell(ch, {"op": "monitor-down"})
            for ch in list(t.channels.values()):
                if ch.closing:
                    self._finish(ch, None)
                else:
                    t.consumed[ch.id] = _request_head(ch.ring_fds[1])
        self.monitor_retry_at = now + RESTART_PAUSE * 2 ** (len(self.monitor_deaths) - 1)

    def _monitor_down(self, reason: str) -> None:
        for w in self._all_workers():
            self._kill(w)
        for t in list(self.tenants.values()):
            try:
                self._fail_tenant(t, reason)
            except Exception:
                log.exception("user domain %s: finishing after the monitor went away", t.name)

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
        for t in list(self.tenants.values()):
            self._close_listener(t)
            self._fail_tenant(t, None)
        self.tenants.clear()
        if self.device:
            protocol.close_fds([self.device.fd])
            self.device = None
        for peer in list(self.peers):
            self._drop(peer)
        self.sel.close()
        if self.enforcer:
            self.enforcer.close()
            self.enforcer = None
        if self.control_sock is not None:
            _close_and_unlink(self.control_sock, self.control_path)
            self.control_sock = None

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
        role, tenant = self.peers[peer]
        out_fds: list[int] = []
        try:
            op = msg["op"]
            if op not in OPS_FOR[role] and not (role == "host" and op in self.host_ops):
                raise protocol.ProtocolError(f"operation {op!r} is not served here")
            if op == "open":
                if tenant is None or self.tenants.get(tenant.name) is not tenant:
                    raise BrokerError("this user domain is not served any more")
                reply, out_fds = self._open(tenant, peer, msg, fds)
            elif op == "trace":
                reply = self._trace(msg)
            else:
                protocol.close_fds(fds)
                fds = []
                reply = self.host_ops[op](msg)
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

    @staticmethod
    def _check_limits(t: Tenant, pool_size: int) -> None:
        n = len(t.channels)
        if n >= t.limits.channels:
            raise BrokerError(f"limit reached: {t.limits.channels} channels per user domain "
                              "(drb up --max-channels)")
        pinned = sum(ch.pinned for ch in t.channels.values())
        if pinned + pool_size > t.limits.pinned:
            raise BrokerError(f"limit reached: a pool of {pool_size >> 10} KiB on top of "
                              f"{pinned >> 10} KiB would pin more than "
                              f"{t.limits.pinned >> 10} KiB per user domain "
                              "(drb up --max-pinned)")

    def _open(self, t: Tenant, peer: protocol.Peer, msg: dict,
              fds: list[int]) -> tuple[dict, list[int]]:
        if self.device is None:
            raise BrokerError("the broker has no device")
        extents = t.extents_of(self.device)
        size = protocol.int_field(msg, "size", 1, extents.size)
        if self.monitor_retry_at:
            self._recover_monitor()     # the channels that wait for it first
        self._monitor()
        ring_fds = ring.PeerFds.from_list(fds)
        try:
            geo = ring.validate_peer_fds(ring_fds)
            self._check_limits(t, geo.pool_size)
            if self.device.align and geo.slot_size % self.device.align:
                raise BrokerError("slot size is not a multiple of the device alignment")
            try:
                rel = extents.alloc(size)
            except ExtentError as e:
                raise BrokerError(str(e)) from None
        except BaseException:
            ring_fds.close()
            raise
        extent = (t.extent[0] + rel[0], rel[1])
        ch = BrokerChannel(self.next_id, t, peer, extent, geo.pool_size)
        ch.geo = geo
        tt_fd = -1
        try:
            ch.ring_fd, ch.params = _grant.setup_disabled(geo.sq_entries)
            ch.pool_base = _grant.register_pool(ch.ring_fd, ring_fds.pool, geo.slot_size,
                                                geo.slot_count)
            self._seal_ring(ch.ring_fd)
            if self.enforcer:
                # Enforced from before any worker has it.
                ch.gid, tt_fd = self.enforcer.grant(ch.ring_fd, ch.pool_base, geo.slot_size,
                                                    geo.slot_count, extent)
            os.close(ring_fds.pool)          # never kept: the registration holds the pages
            ring_fds.pool = -1
            ch.ring_fds = ring_fds.as_list()
            self._start_worker(t, ch)
        except BaseException:
            ring_fds.close()
            ch.ring_fds = []
            if ch.gid:
                self.enforcer.ungrant(ch.gid)
            ch.close_fds()
            protocol.close_fds([tt_fd] if tt_fd >= 0 else [])
            extents.release(*rel)
            raise
        self.next_id += 1
        self.channels[ch.id] = ch
        t.channels[ch.id] = ch
        # From now on the connection is the channel's: it hears "failed".
        self.peers.pop(peer, None)
        self.sel.modify(peer, selectors.EVENT_READ, ("channel", ch))
        log.info("channel %d open for %s: extent %d+%d, worker pid %d%s", ch.id, t.name,
                 extent[0], extent[1], t.worker.pid, "" if self.enforcer else " (UNMONITORED)")
        reply = {"channel": ch.id, "extent_size": extent[1], "worker_pid": t.worker.pid,
                 "align": self.device.align}
        if tt_fd >= 0:
            reply["task_table_version"] = tasks.VERSION
            reply["task_table_bytes"] = tasks.TABLE_BYTES
            reply["reap_hist_offset"] = tasks.REAP_HIST_OFFSET
            return reply, [tt_fd]
        return reply, []

    def _seal_ring(self, ring_fd: int) -> None:
        """The device as fixed file 0, only the data opcodes, then enabled:
        what makes a ring a grant ring."""
        _grant.register_device(ring_fd, self.device.fd)
        _grant.restrict(ring_fd, [tasks.OP_READ_FIXED, tasks.OP_WRITE_FIXED, tasks.OP_FSYNC],
                        _worker.FLAG_FIXED_FILE, _worker.FLAG_FIXED_FILE)
        _grant.enable(ring_fd)

    def _regrant(self, ch: BrokerChannel) -> int:
        """A new grant ring for the channel, under a new monitor: the old
        ring's buffers (the same pages; the broker never keeps the pool),
        checked from before any worker has it. Returns the new task table's
        fd, for the user side."""
        fd, params = _grant.setup_disabled(ch.geo.sq_entries)
        try:
            _grant.clone_buffers(fd, ch.ring_fd)
            self._seal_ring(fd)
            gid, tt_fd = self.enforcer.grant(fd, ch.pool_base, ch.geo.slot_size,
                                             ch.geo.slot_count, ch.extent)
        except BaseException:
            os.close(fd)
            raise
        os.close(ch.ring_fd)
        ch.ring_fd, ch.params, ch.gid = fd, params, gid
        return tt_fd

    def _recover_monitor(self) -> None:
        """The monitor came back (restart policy): every channel gets a new
        grant ring under it, every user domain a new worker, and each user
        side its new task table."""
        self.monitor_retry_at = 0.0
        try:
            self._monitor()
            for t in list(self.tenants.values()):
                tables = {}
                try:
                    for ch in t.channels.values():
                        tables[ch.id] = self._regrant(ch)
                    if t.channels:
                        self._start_worker(t, tables=tables)
                finally:
                    protocol.close_fds(list(tables.values()))
        except (DrbError, OSError) as e:
            log.error("the eBPF monitor could not be brought back: %s", e)
            self._monitor_down(f"the eBPF monitor went away and could not be brought "
                               f"back: {e}")
            return
        log.warning("the eBPF monitor is back; every channel carries on")

    # ---- workers -------------------------------------------------------------

    def _tell(self, ch: BrokerChannel, msg: dict, fds=()) -> None:
        """A notice to a channel's user side; what cannot be sent now waits
        for room (the loop watches for it)."""
        ch.peer.send(msg, list(fds))
        self._watch_channel(ch)

    def _watch_channel(self, ch: BrokerChannel) -> None:
        if ch.peer is None or ch.peer not in self.sel.get_map():
            return
        if ch.peer.dead:
            log.warning("channel %d: its user side does not read its notices", ch.id)
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if ch.peer.wants_write else 0)
        if self.sel.get_key(ch.peer).events != want:
            self.sel.modify(ch.peer, want, ("channel", ch))

    def _start_worker(self, t: Tenant, new: BrokerChannel | None = None,
                      tables: dict[int, int] | None = None) -> None:
        """Start the user domain's next worker with all its channels (and
        `new`); the current one is told to stop, finishes what it has in
        flight, and the next takes the rings over once it is gone (the
        gate). A worker cannot be handed a new grant ring while it runs:
        io_uring descriptors do not pass over Unix sockets."""
        if self.enforce and self.enforcer is None:
            raise BrokerError("no worker runs while the eBPF monitor is down")
        # Closing channels too: the new worker lets go of them once the
        # kernel is done with what they have in flight (asked just below).
        chans = list(t.channels.values())
        if new is not None:
            chans.append(new)
        old = t.worker
        ctl_r, ctl_w = os.pipe()
        rep_r, rep_w = os.pipe()
        gate_r, hold_w = os.pipe()
        align = self.device.align
        restarted = bool(t.restart_at) or tables is not None
        held = set(tables or ()) | t.awaiting
        specs = [ch.spec(align).replace(held=ch.id in held).to_dict() for ch in chans]
        spec = WorkerSpec(channels=specs,
                          ctl_fd=ctl_r, report_fd=rep_w, gate_fd=old.gate_r if old else -1,
                          hold_fd=hold_w, spin_ns=self.worker_spin_ns, restarted=restarted)
        try:
            proc, pid = self.spawn(spec, spec.fds())
        except BaseException:
            protocol.close_fds([ctl_w, rep_r, gate_r])
            raise
        finally:
            protocol.close_fds([fd for fd in (ctl_r, rep_w, hold_w) if fd >= 0])
        w = WorkerProc(proc, pid, ctl_w, rep_r, gate_r, {ch.id for ch in chans})
        try:
            w.pidfd = os.pidfd_open(proc.pid)
            if self.enforcer:
                # Should this broker die, the service kills the worker.
                for ch in chans:
                    if ch.gid:
                        self.enforcer.worker(ch.gid, pid)
            if self.worker_cpus:
                os.sched_setaffinity(pid, self.worker_cpus)
        except BaseException:
            self._kill(w)
            proc.wait()
            w.close_fds()
            raise
        if old is not None:
            # The next worker waits for the old one's end of the gate.
            protocol.close_fds([old.gate_r])
            old.gate_r = -1
            self._retire(old)
        t.worker = w
        t.workers.append(w)
        t.restart_at = 0.0
        for ch in chans:
            if ch.closing:
                w.ask_drop(ch.id)
        for ch in chans:
            if ch is new or ch.peer is None or ch.closing:
                continue
            if restarted:
                # What the dead worker had taken from the request ring: the
                # user side settles those requests itself (see the client).
                table = [tables[ch.id]] if tables and ch.id in tables else []
                self._tell(ch, {"op": "restarted", "pid": pid, "why": t.death,
                                "consumed": t.consumed.get(ch.id, 0)}, table)
            else:
                self._tell(ch, {"op": "worker", "pid": pid})
        if tables is not None:
            t.awaiting = {ch.id for ch in chans if ch.id in tables}
            t.resume_deadline = time.monotonic() + RESUME_GRACE
        if restarted:
            t.consumed = {}
            log.warning("user domain %s: worker %d took over from the one that died",
                        t.name, pid)
        self.sel.register(w.pidfd, selectors.EVENT_READ, ("worker", (t, w)))
        self.sel.register(w.report_r, selectors.EVENT_READ, ("report", (t, w)))

    def _resume_overdue(self, t: Tenant) -> None:
        """Channels whose user side did not take up its new task table in
        time are dropped, never served: their requests carry tasks only in
        the old table."""
        if t.worker is None:
            return                      # held by whichever worker comes next
        for cid in t.awaiting:
            ch = t.channels.get(cid)
            if ch is not None:
                ch.fail_reason = (f"the eBPF monitor came back, and the user side did not "
                                  f"take up its new task table within {RESUME_GRACE:.0f} s")
                ch.closing = True
                t.worker.ask_drop(cid)
        t.awaiting = set()
        t.resume_deadline = 0.0

    def _retire(self, w: WorkerProc) -> None:
        """Ask a worker to stop (it finishes what is in flight); one that
        ignores SIGTERM gets SIGKILL after the grace period. A worker still
        starting is told once it says it can hear it. Never waits: the loop
        goes on serving everyone else."""
        if not w.retired:
            w.retired = True
            w.kill_at = time.monotonic() + WORKER_START_GRACE
        if w.ready and not w.termed:
            w.termed = True
            try:
                os.kill(w.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            w.kill_at = time.monotonic() + WORKER_STOP_GRACE

    def _forget(self, t: Tenant, w: WorkerProc) -> None:
        for fd in (w.pidfd, w.report_r):
            if fd >= 0 and fd in self.sel.get_map():
                self.sel.unregister(fd)
        if w.proc.poll() is None:
            self._kill(w)
            w.proc.wait()
        w.close_fds()
        if w in t.workers:
            t.workers.remove(w)
        if t.worker is w:
            t.worker = None

    def _on_report(self, t: Tenant, w: WorkerProc) -> None:
        """The worker let go of channels: asked to (a close), or because a
        channel's ring was corrupt."""
        try:
            raw = os.read(w.report_r, REPORT.size * 64)
        except OSError:
            raw = b""
        if not raw:
            self.sel.unregister(w.report_r)
            return
        for i in range(0, len(raw) - len(raw) % REPORT.size, REPORT.size):
            cid, err = REPORT.unpack_from(raw, i)
            if cid == READY_ID:
                w.ready = True
                if w.retired:
                    self._retire(w)
                continue
            ch = t.channels.get(cid)
            if ch is None:
                continue
            if err:
                ch.fail_reason = ch.fail_reason or (
                    f"backend worker {w.pid} dropped the channel: its ring is corrupt "
                    f"({os.strerror(-err) if err < 0 else err})")
                log.error("channel %d failed: %s", cid, ch.fail_reason)
            nxt = t.worker
            if w is nxt or nxt is None or cid not in nxt.cids:
                self._finish(ch, ch.fail_reason)
            else:
                nxt.ask_drop(cid)           # the next worker has it too

    def _on_worker_exit(self, t: Tenant, w: WorkerProc) -> None:
        rc = w.proc.wait()
        # Reports it wrote before it went still count, every one.
        while w.report_r >= 0 and w.report_r in self.sel.get_map():
            self._on_report(t, w)
        self._forget(t, w)
        if self.tenants.get(t.name) is not t:
            return
        if w.retired and rc == 0:
            # Handed over. Channels closed meanwhile that the next worker
            # was not given are let go of now.
            nxt = t.worker
            for ch in list(t.channels.values()):
                if ch.closing and (nxt is None or ch.id not in nxt.cids):
                    self._finish(ch, ch.fail_reason)
            return
        # A worker died with channels in its hands. Stopped by the monitor:
        # every channel of the user domain fails, and says why; it is not
        # restarted behind the user's back.
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        if rc == 137:     # a stand-in in the driver domain reports 128 + signal
            how = "killed by signal 9"
        violations = {}
        for ch in t.channels.values():
            v = self.enforcer.failed(ch.gid) if self.enforcer and ch.gid else None
            if v:
                violations[ch.id] = v
                log.error("VIOLATION channel %d: %s", ch.id, v)
        for wk in list(t.workers):
            self._kill(wk)
            self._forget(t, wk)
        now = time.monotonic()
        t.deaths = [d for d in t.deaths if now - d < RESTART_WINDOW] + [now]
        if not violations and t.channels and self.enforcer is not None:
            if len(t.deaths) <= RESTART_LIMIT:
                self._schedule_restart(t, w.pid, how, now)
                return
            give_up = (f"backend worker {w.pid} {how}, the {len(t.deaths)}th death in "
                       f"{RESTART_WINDOW:.0f} s: not started again")
        else:
            give_up = None
        for ch in list(t.channels.values()):
            if ch.id in violations:
                reason = f"monitor killed backend worker {w.pid}: {violations[ch.id]}"
            elif violations:
                first = min(violations)
                reason = (f"backend worker {w.pid} {how}: the monitor stopped it for a "
                          f"violation on channel {first} of the same user domain "
                          f"({violations[first]})")
            else:
                reason = ch.fail_reason or give_up or f"backend worker {w.pid} {how}"
            log.error("channel %d failed: %s", ch.id, reason)
            self._finish(ch, reason)

    def _schedule_restart(self, t: Tenant, pid: int, how: str, now: float) -> None:
        """The next worker, after a pause that doubles with each recent
        death. What the dead one took from each request ring is read now,
        before anyone drives the rings again."""
        for ch in list(t.channels.values()):
            # Closing ones too: the next worker lets go of them once the
            # kernel is done with them (its count starts from the ring).
            t.consumed[ch.id] = _request_head(ch.ring_fds[1])
        if not t.channels:
            t.consumed = {}
            return
        t.death = f"backend worker {pid} {how}"
        t.restart_at = now + RESTART_PAUSE * 2 ** (len(t.deaths) - 1)
        log.error("user domain %s: backend worker %d %s; starting another (death %d of at "
                  "most %d in %.0f s)", t.name, pid, how, len(t.deaths), RESTART_LIMIT,
                  RESTART_WINDOW)

    def _fail_tenant(self, t: Tenant, reason: str | None) -> None:
        """Stop every worker of the user domain and finish all its channels."""
        t.awaiting = set()
        for w in t.workers:
            w.ready = True            # the channels end either way: no waiting for it
            self._retire(w)
        end = time.monotonic() + WORKER_STOP_GRACE
        for w in list(t.workers):
            try:
                w.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self._forget(t, w)
        for ch in list(t.channels.values()):
            self._finish(ch, reason)

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
        if msg is not None and msg["op"] == "resumed":
            t = ch.tenant
            if ch.id in t.awaiting and t.worker is not None:
                t.awaiting.discard(ch.id)
                t.worker.ask_go(ch.id)       # its tasks are in the new table now
            return
        # The extent is released only once the worker has let go: until then
        # it could still be doing I/O there. A "close" is answered after
        # that, so the user side may reuse the space as soon as it has the
        # reply.
        ch.reply_close = msg is not None and msg["op"] == "close"
        self.sel.unregister(ch.peer)      # nothing more to read from this peer
        ch.closing = True
        w = ch.tenant.worker
        if w is None:
            self._finish(ch, None)
        else:
            w.ask_drop(ch.id)

    def _finish(self, ch: BrokerChannel, reason: str | None) -> None:
        if self.enforcer and ch.gid:
            try:
                self.enforcer.ungrant(ch.gid)
            except (DrbError, OSError) as e:      # the user side must hear anyway
                log.error("channel %d: ungrant failed: %s", ch.id, e)
            ch.gid = 0
        ch.close_fds()
        t = ch.tenant
        if self.device is not None and t.extents is not None:
            t.extents.release(ch.extent[0] - t.extent[0], ch.extent[1])
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
        t.channels.pop(ch.id, None)
        log.info("channel %d closed", ch.id)
        if not t.channels and t.worker is not None:
            # Nothing left to serve: no worker waits idle. The next open
            # starts one afresh (no rings to take over).
            w, t.worker = t.worker, None
            protocol.close_fds([w.gate_r] if w.gate_r >= 0 else [])
            w.gate_r = -1
            self._retire(w)


def serve(spec: BrokerSpec, spawn: SpawnFn = spawn_plain) -> int:
    """Run a broker as this process until SIGTERM or SIGINT; prints "ready"
    on stdout once it listens."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s drb-broker[%(process)d] %(message)s")
    try:
        broker = Broker(spec.socket, control=spec.control, worker_spin_ns=spec.worker_spin_ns,
                        enforce=spec.enforce, spawn=spawn,
                        limits=Limits.from_dict(spec.limits),
                        worker_cpus=spec.worker_cpus or None,
                        monitor_restart=spec.monitor_restart)
        if spec.device:
            broker.open_device(spec.device, spec.o_direct)
        for t in spec.tenants:
            broker.add_tenant(t["name"], t["socket"], tuple(t["extent"]))
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
