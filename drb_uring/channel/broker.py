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
import os
import resource
import selectors
import signal
import sys
import time
from typing import Callable

from drb_uring import procs, ring
from drb_uring.channel import grants
from drb_uring.channel.channels import Channels
from drb_uring.channel.device import Device
from drb_uring.channel.listeners import Listeners
from drb_uring.channel.monitor_link import MonitorLink
from drb_uring.channel.release import Limbo
from drb_uring.channel.supervisor import SpawnFn, Supervisor, spawn_plain
from drb_uring.channel.tenants import DEFAULT_TENANT, BrokerError, Limits, Tenant, check_extent
from drb_uring.errors import DrbError
from drb_uring.spec import Spec, SpecError

__all__ = ["Broker", "BrokerError", "BrokerSpec", "Limits", "serve", "spawn_plain"]

log = logging.getLogger("drb.broker")

CLOSE_WAIT = 2.0      # seconds the rings' requests in flight get at the end


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
                 worker_cpus: list[int] | None = None, monitor_restart: bool = False,
                 holders: Callable[[int], list[int]] | None = None,
                 sweep: Callable[[int], None] | None = None,
                 gone: Callable[[str, tuple[int, int] | None], None] | None = None,
                 observe: Callable[[str, dict], None] | None = None):
        """`holders(inode)` lists the driver domain's processes that hold a
        ring open, `sweep(uid)` ends whatever a dead worker's user left
        there (see release, supervisor), and `gone(name, extent)` hears
        that a removed user domain's rings are all gone, its extent free to
        wipe: a pair's daemon gives all three. `observe(event, fields)`
        hears what happens to channels, workers and the monitor (see
        notify)."""
        self.gone = gone
        self.observe = observe
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
        self.stopping = False
        self.chans = Channels(self)
        self.limbo = Limbo(self, holders)
        self.supervisor = Supervisor(self, spawn, worker_spin_ns, worker_cpus, sweep)
        self.link = MonitorLink(self, enforce, monitor_restart)
        self.listeners = Listeners(self, control)
        if path:
            self.add_tenant(DEFAULT_TENANT, path)

    @property
    def enforcer(self):
        return self.link.enforcer

    # ---- user domains, the device, the domains counted --------------------------------

    def add_tenant(self, name: str, socket_path: str, extent: tuple[int, int] | None = None,
                   limits: Limits | None = None, device_fd: int = -1) -> None:
        """Serve a user domain on its own socket. Its channels get parts of
        `extent` (base, size) of the device; None: the whole device (one
        user domain only). With `device_fd` (taken over, closed when the
        user domain's rings are gone), its grant rings reach that device,
        which is its extent, instead of the shared one."""
        t = Tenant(name, socket_path, None, extent, limits or self.limits)
        try:
            if name in self.tenants:
                raise BrokerError(f"user domain {name!r} is already served")
            check_extent(self.tenants, extent, self.device.size if self.device else None)
            if device_fd >= 0:
                t.device, device_fd = Device(device_fd), -1
                if extent is not None and t.device.size != extent[1]:
                    raise BrokerError(f"the device for {name} has {t.device.size} bytes, "
                                      f"its extent {extent[1]}")
            self.listeners.listen(t)
        except BaseException:
            if t.device is not None:
                t.device.close()
            elif device_fd >= 0:
                os.close(device_fd)
            raise
        self.tenants[name] = t

    def remove_tenant(self, name: str) -> None:
        """Stop serving a user domain: its socket goes, its workers are
        stopped, and each of its channels' user sides hears why."""
        t = self.tenants.pop(name, None)
        if t is None:
            raise BrokerError(f"no user domain {name!r}")
        self.listeners.close_listener(t)
        self.chans.retry_parked(t, give_up=True)
        self.supervisor.fail_tenant(t, "user domain removed")
        # Its workers are dead: its rings go as soon as the kernel is done
        # with them, and its share of the device stays taken until then
        # (limbo.held_extents, then gone()).
        self.limbo.poke()
        if not self.limbo.of(t):
            self.tenant_gone(t)

    def tenant_gone(self, t: Tenant) -> None:
        """A removed user domain's last ring is gone: its own device goes,
        and the pair hears that its extent may be wiped and given out."""
        if t.device is not None:
            t.device.close()
            t.device = None
        if self.gone is not None:
            self.gone(t.name, t.extent)

    def tenant_info(self) -> dict[str, dict]:
        return {t.name: {"extent": list(t.extent) if t.extent else None,
                         "channels": len(t.channels),
                         "pinned": sum(ch.pinned for ch in t.channels.values()),
                         "limits": t.limits.to_dict(),
                         "worker_pid": t.worker.pid if t.worker else 0}
                for t in self.tenants.values()}

    def notify(self, event: str, **fields) -> None:
        """Tell the observer what happened: channel-opened, channel-closed,
        violation, worker-died, worker-restarted, monitor-down,
        monitor-back. An observer's failure never reaches the loop."""
        if self.observe is not None:
            try:
                self.observe(event, fields)
            except Exception:   # noqa: BLE001 - the channels matter more than the record
                log.exception("observer of %s failed", event)

    def watch_domains(self, groups: dict[str, str], workers: str | None = None) -> None:
        """Count the mode switches of these domains (role -> cgroup) for
        `drb trace` and `drb bench`; `workers` names the role whose cgroup
        (made by drb) the workers run in."""
        self.link.watch(groups, workers)

    def unwatch_domain(self, role: str) -> None:
        self.link.unwatch(role)

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call callback() from the loop whenever fd polls readable (the
        pair's other parts: a disk server's exit, say)."""
        self.sel.register(fd, selectors.EVENT_READ, ("watch", callback))

    def unwatch(self, fd: int) -> None:
        if fd in self.sel.get_map():
            self.sel.unregister(fd)

    def open_device(self, path: str, o_direct: bool) -> None:
        """Open the device, here on the host: the trusted side opens it, and
        the driver domain reaches it only through the grant rings."""
        self.device = Device.open(path, o_direct)

    def adopt_device(self, fd: int) -> None:
        """The device, opened (and held exclusively) by the pair's daemon."""
        self.device = Device(fd)

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
        if self.link.retry_at or self.supervisor.timers_due() or len(self.limbo) or any(
                t.parked for t in self.tenants.values()):
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
        if len(self.limbo):
            self.limbo.poke()
        self.chans.tick(now)

    def _dispatch(self, kind: str, obj, key, events: int) -> None:
        if kind == "listen":
            self.listeners.accept(key.fileobj, obj)
        elif kind == "conn":
            self.listeners.on_event(obj, key.data, events)
        elif kind == "channel":
            if events & selectors.EVENT_WRITE and obj.peer is not None:
                obj.peer.flush()
            if events & selectors.EVENT_READ and obj.peer is not None:
                self.chans.on_message(obj)
            self.chans.watch(obj)
        elif kind == "report":
            self.supervisor.on_report(*obj)
        elif kind == "worker":
            self.supervisor.on_exit(*obj)
        elif kind == "service":
            self.link.service_gone()
        elif kind == "watch":
            obj()

    def close(self) -> None:
        """Stop every worker and release everything. Idempotent."""
        for t in list(self.tenants.values()):
            self.listeners.close_listener(t)
            self.chans.retry_parked(t, give_up=True)
            self.supervisor.fail_tenant(t, None)
        # Every worker is dead; what the kernel still has in flight of the
        # rings gets a moment to finish, then the rings go with us anyway.
        end = time.monotonic() + CLOSE_WAIT
        while len(self.limbo) and time.monotonic() < end:
            self.limbo.poke()
            if len(self.limbo):
                time.sleep(0.01)
        for cid, ch in list(self.limbo.rings.items()):
            log.warning("channel %d: its ring still had requests in flight at the end", ch.id)
            del self.limbo.rings[cid]
            self.chans.release(ch)
        for t in self.tenants.values():
            if t.device is not None:
                t.device.close()
                t.device = None
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
