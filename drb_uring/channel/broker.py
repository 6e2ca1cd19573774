"""The broker: the trusted process that opens every channel of a pair.

It listens on a Unix SOCK_SEQPACKET socket per user domain, on which each
user side opens channels by sending its ring's memory and eventfds, and on
the host's control socket (trace, and the host's own operations). This
module is the router: one loop that reads every socket and pidfd and hands
each event to the part that owns it:

- listeners: the sockets, and connections that have no channel yet;
- tenants: the user domains, their shares of the device and their limits;
- device: the device, opened here on the host;
- grants: each channel's record and its grant ring (build, re-grant);
- supervisor: one worker per user domain (start, hand over, restart, retire);
- monitor_link: the eBPF monitor (grants, its death and its return).

Opening a channel: the layout is checked, the channel gets an extent of its
user domain's share that the broker alone decides, the grant ring is built
and granted, and the user domain's next worker takes it over. A channel
ends when its user side closes it or goes away (once its worker has let
go of it), or fails when its worker was stopped by the monitor, could not
be started again, or the monitor went away for good; its user side then
hears why on its connection.

Whom it distrusts: every peer on the socket (messages are length-, type-
and fd-checked in drb_uring.protocol; ring memory is checked by
ring.validate_peer_fds) and every worker (see supervisor).
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import selectors
import signal
import sys
import time
from typing import Callable

from drb_uring import procs, protocol, ring
from drb_uring.channel import grants
from drb_uring.channel.device import Device
from drb_uring.channel.extents import ExtentError
from drb_uring.channel.listeners import Listeners
from drb_uring.channel.monitor_link import MonitorLink
from drb_uring.channel.supervisor import SpawnFn, Supervisor, spawn_plain
from drb_uring.channel.tenants import DEFAULT_TENANT, BrokerError, Limits, Tenant, check_extent
from drb_uring.enforce import tasks
from drb_uring.errors import DrbError
from drb_uring.spec import Spec, SpecError

__all__ = ["Broker", "BrokerError", "BrokerSpec", "Limits", "serve", "spawn_plain"]

log = logging.getLogger("drb.broker")


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


class Broker:
    EVENT_READ = selectors.EVENT_READ
    log = log

    def __init__(self, path: str | None = None, *, control: str | None = None,
                 worker_spin_ns: int = ring.DEFAULT_SPIN_NS, spawn: SpawnFn = spawn_plain,
                 enforce: bool = True, limits: Limits | None = None,
                 host_ops: dict[str, Callable[[dict], dict]] | None = None,
                 worker_cpus: list[int] | None = None, monitor_restart: bool = False):
        # Every channel holds a handful of descriptors here (its grant ring
        # and ring fds, its connection); 1024 would not hold 16 user domains
        # with 64 channels each.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.limits = limits or Limits()
        self.host_ops = dict(host_ops or {})
        self.sel = selectors.DefaultSelector()
        self.device: Device | None = None
        self.tenants: dict[str, Tenant] = {}
        self.channels: dict[int, grants.BrokerChannel] = {}
        self.next_id = 1
        self.stopping = False
        self.supervisor = Supervisor(self, spawn, worker_spin_ns, worker_cpus)
        self.link = MonitorLink(self, enforce, monitor_restart)
        self.listeners = Listeners(self, control)
        if path:
            self.add_tenant(DEFAULT_TENANT, path)

    @property
    def enforcer(self):
        return self.link.enforcer

    # ---- user domains, the device, the domains counted --------------------------------

    def add_tenant(self, name: str, socket_path: str, extent: tuple[int, int] | None = None,
                   limits: Limits | None = None) -> None:
        """Serve a user domain on its own socket. Its channels get parts of
        `extent` (base, size) of the device; None: the whole device (one
        user domain only)."""
        if name in self.tenants:
            raise BrokerError(f"user domain {name!r} is already served")
        check_extent(self.tenants, extent, self.device.size if self.device else None)
        t = Tenant(name, socket_path, None, extent, limits or self.limits)
        self.listeners.listen(t)
        self.tenants[name] = t

    def remove_tenant(self, name: str) -> None:
        """Stop serving a user domain: its socket goes, its workers are
        stopped, and each of its channels' user sides hears why."""
        t = self.tenants.pop(name, None)
        if t is None:
            raise BrokerError(f"no user domain {name!r}")
        self.listeners.close_listener(t)
        self.supervisor.fail_tenant(t, "user domain removed")

    def tenant_info(self) -> dict[str, dict]:
        return {t.name: {"extent": list(t.extent) if t.extent else None,
                         "channels": len(t.channels),
                         "worker_pid": t.worker.pid if t.worker else 0}
                for t in self.tenants.values()}

    def watch_domains(self, groups: dict[str, str]) -> None:
        """Count the mode switches of these domains (role -> cgroup) for
        `drb trace` and `drb bench`."""
        self.link.watch(groups)

    def unwatch_domain(self, role: str) -> None:
        self.link.unwatch(role)

    def open_device(self, path: str, o_direct: bool) -> None:
        """Open the device, here on the host: the trusted side opens it, and
        the driver domain reaches it only through the grant rings."""
        self.device = Device.open(path, o_direct)

    # ---- the loop ------------------------------------------------------------------

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

    def _step(self, timeout: float) -> None:
        """One round of the loop: whatever is ready within `timeout`, then
        what is due by the clock."""
        if self.link.retry_at or self.supervisor.timers_due():
            timeout = min(timeout, 0.05)
        for key, events in self.sel.select(timeout=timeout):
            kind, obj = key.data
            if self.sel.get_map().get(key.fd) is not key:
                continue        # unregistered by an earlier event of this batch
            try:
                self._dispatch(kind, obj, key, events)
            except Exception:   # one bad party must not take the broker down
                log.exception("while handling %s", kind)
        now = time.monotonic()
        self.link.tick(now)
        self.supervisor.tick(now)

    def _dispatch(self, kind: str, obj, key, events: int) -> None:
        if kind == "listen":
            self.listeners.accept(key.fileobj, obj)
        elif kind == "conn":
            self.listeners.on_event(obj, key.data, events)
        elif kind == "channel":
            if events & selectors.EVENT_WRITE and obj.peer is not None:
                obj.peer.flush()
            if events & selectors.EVENT_READ and obj.peer is not None:
                self._on_channel_message(obj)
            self._watch_channel(obj)
        elif kind == "report":
            self.supervisor.on_report(*obj)
        elif kind == "worker":
            self.supervisor.on_exit(*obj)
        elif kind == "service":
            self.link.service_gone()

    # ---- channels ---------------------------------------------------------------------

    def open(self, t: Tenant, peer: protocol.Peer, msg: dict,
              fds: list[int]) -> tuple[dict, list[int]]:
        if self.device is None:
            raise BrokerError("the broker has no device")
        extents = t.extents_of(self.device)
        size = protocol.int_field(msg, "size", 1, extents.size)
        if self.link.retry_at:
            self.link.recover()         # the channels that wait for it first
        enforcer = self.link.ensure()
        ring_fds = ring.PeerFds.from_list(fds)
        try:
            geo = ring.validate_peer_fds(ring_fds)
            t.check_limits(geo.pool_size)
            if self.device.align and geo.slot_size % self.device.align:
                raise BrokerError("slot size is not a multiple of the device alignment")
            try:
                rel = extents.alloc(size)
            except ExtentError as e:
                raise BrokerError(str(e)) from None
        except BaseException:
            ring_fds.close()
            raise
        ch = grants.BrokerChannel(self.next_id, t, peer, (t.extent[0] + rel[0], rel[1]),
                                  geo.pool_size)
        ch.geo = geo
        tt_fd = -1
        try:
            tt_fd = grants.build(ch, ring_fds, self.device.fd, enforcer)
            self.supervisor.start(t, ch)
        except BaseException:
            ring_fds.close()
            ch.ring_fds = []
            if ch.gid:
                enforcer.ungrant(ch.gid)
            ch.close_fds()
            protocol.close_fds([tt_fd] if tt_fd >= 0 else [])
            extents.release(*rel)
            raise
        self.next_id += 1
        self.channels[ch.id] = ch
        t.channels[ch.id] = ch
        # From now on the connection is the channel's: it hears "failed".
        self.listeners.hand_over(peer)
        self.sel.modify(peer, selectors.EVENT_READ, ("channel", ch))
        log.info("channel %d open for %s: extent %d+%d, worker pid %d%s", ch.id, t.name,
                 ch.extent[0], ch.extent[1], t.worker.pid, "" if enforcer else " (UNMONITORED)")
        reply = {"channel": ch.id, "extent_size": ch.extent[1], "worker_pid": t.worker.pid,
                 "align": self.device.align}
        if tt_fd >= 0:
            reply["task_table_version"] = tasks.VERSION
            reply["task_table_bytes"] = tasks.TABLE_BYTES
            reply["reap_hist_offset"] = tasks.REAP_HIST_OFFSET
            return reply, [tt_fd]
        return reply, []

    def _on_channel_message(self, ch: grants.BrokerChannel) -> None:
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
            self.finish(ch, None)
        else:
            w.ask_drop(ch.id)

    def finish(self, ch: grants.BrokerChannel, reason: str | None) -> None:
        """The channel is over: ungranted, its extent free, its user side
        told (the reason if it failed), and no worker waits idle for it."""
        enforcer = self.link.enforcer
        if enforcer and ch.gid:
            try:
                enforcer.ungrant(ch.gid)
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
            self.supervisor.retire_current(t)

    def tell(self, ch: grants.BrokerChannel, msg: dict, fds=()) -> None:
        """A notice to a channel's user side; what cannot be sent now waits
        for room (the loop watches for it)."""
        ch.peer.send(msg, list(fds))
        self._watch_channel(ch)

    def _watch_channel(self, ch: grants.BrokerChannel) -> None:
        if ch.peer is None or ch.peer not in self.sel.get_map():
            return
        if ch.peer.dead:
            log.warning("channel %d: its user side does not read its notices", ch.id)
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if ch.peer.wants_write else 0)
        if self.sel.get_key(ch.peer).events != want:
            self.sel.modify(ch.peer, want, ("channel", ch))

    def close(self) -> None:
        """Stop every worker and release everything. Idempotent."""
        for t in list(self.tenants.values()):
            self.listeners.close_listener(t)
            self.supervisor.fail_tenant(t, None)
        self.tenants.clear()
        if self.device:
            self.device.close()
            self.device = None
        self.listeners.close()
        self.sel.close()
        self.link.close()


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
