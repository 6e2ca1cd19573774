"""The broker's link to the host's eBPF monitor (drb_uring.enforce.service).

Every monitored channel is granted through it, every worker registered
with it (the service kills a vanished broker's workers), and the domains'
mode switches counted by it. When the service goes away its programs go
with it and nothing checks the grant rings any more, so no monitored
channel may go on: every worker is killed at once. With the restart policy
(drb up --restart) the service is started again, every channel gets a new
grant ring under it and its user domain a new worker, and each user side
its new task table; without it every channel fails with the reason.

Whom it distrusts: nobody here is a domain. The service is host root's, and
it knows this broker by the kernel's word (SO_PEERCRED), not by a claim.
"""

from __future__ import annotations

import select
import time

from drb_uring import protocol
from drb_uring.channel import grants
from drb_uring.channel.supervisor import RESTART_LIMIT, RESTART_PAUSE, RESTART_WINDOW
from drb_uring.channel.tenants import BrokerError
from drb_uring.errors import DrbError


class MonitorLink:
    def __init__(self, hub, enforce: bool, restart: bool):
        self.hub = hub
        # Without enforcement no task table exists and nothing checks what a
        # worker submits. Turning it off is loud on purpose.
        self.enforce = enforce
        self.restart = restart
        self.enforcer = None
        self.deaths: list[float] = []
        self.retry_at = 0.0
        self.domains: dict[str, str] = {}     # role -> cgroup whose mode switches count
        self.workers_role: str | None = None  # the one drb made, where the workers run
        if enforce:
            self._connect()
        else:
            hub.log.warning("RUNNING WITHOUT THE eBPF MONITOR (--no-monitor): workers' "
                            "access to user memory is bounded by the grant rings only, "
                            "not checked against any I/O task table")

    def _connect(self) -> None:
        from drb_uring.enforce.client import EnforceClient
        self.enforcer = EnforceClient()
        # Between calls the service says nothing: its socket turns readable
        # only when it goes away.
        self.hub.sel.register(self.enforcer.sock, self.hub.EVENT_READ, ("service", None))

    def ensure(self):
        """The enforcement service, started again if it went away; never
        None when this broker enforces (a channel is then refused)."""
        if self.enforce and self.enforcer is None:
            try:
                self._connect()
                for role, group in self.domains.items():
                    self.enforcer.watch(group, workers=role == self.workers_role)
            except (DrbError, OSError) as e:
                if self.enforcer is not None:
                    self.hub.sel.unregister(self.enforcer.sock)
                    self.enforcer.close()
                self.enforcer = None
                raise BrokerError(f"the eBPF monitor is gone and could not be started "
                                  f"again: {e}") from None
            self.hub.log.warning("the eBPF monitor was started again")
        return self.enforcer

    def died_under_us(self) -> bool:
        """Whether the service went away and the loop has not heard yet."""
        return self.enforcer is not None and bool(
            select.select([self.enforcer.sock], [], [], 0)[0])

    # ---- the domains it counts ------------------------------------------------------

    def watch(self, groups: dict[str, str], workers: str | None = None) -> None:
        """Count the mode switches of these domains (role -> cgroup) for
        `drb trace` and `drb bench`. `workers`: the role whose cgroup drb
        made and runs the workers in; should this broker die with grants,
        the service kills every process there (see enforce.service)."""
        self.domains.update(groups)
        if workers is not None:
            self.workers_role = workers
        if self.enforcer:
            for role, group in groups.items():
                self.enforcer.watch(group, workers=role == self.workers_role)

    def unwatch(self, role: str) -> None:
        group = self.domains.pop(role, None)
        if group and self.enforcer:
            self.enforcer.unwatch(group)

    def trace(self, channels, lease) -> dict:
        """Histograms of the channels (broker id by gid) and the domains' counters."""
        if not self.enforcer:
            raise BrokerError("this pair runs without eBPF (--no-monitor): nothing traced")
        by_gid = {ch.gid: ch.id for ch in channels if ch.gid}
        hist = self.enforcer.histograms(list(by_gid),
                                        lease if isinstance(lease, (int, float)) else 0)
        # "io": completions by operation (reads, writes, flushes are every
        # other entry of programs.IO_COUNTS), every one counted: the stage
        # histograms time a sample only.
        return {"channels": {str(by_gid[g]): {st: {str(b): n for b, n in bk.items()}
                                              for st, bk in v.items() if st != "io"}
                             for g, v in hist.items()},
                "ios": {str(by_gid[g]): sum(n for i, n in v.get("io", {}).items() if i % 2 == 0)
                        for g, v in hist.items()},
                "counters": {role: self.enforcer.counters(path)
                             for role, path in self.domains.items()}}

    # ---- death and return -----------------------------------------------------------

    def service_gone(self) -> None:
        """The eBPF service closed its connection: it died, and its programs
        went with it. Nothing checks the grant rings any more, so no
        monitored channel may go on: each worker is killed now. With the
        restart policy the monitor is brought back and the channels carry on
        (see recover); otherwise each user side is told why, and the next
        open starts a new service."""
        hub = self.hub
        hub.log.error("the eBPF monitor went away: stopping every monitored channel")
        hub.notify("monitor-down", restart=self.restart)
        hub.sel.unregister(self.enforcer.sock)
        dying, self.enforcer = self.enforcer, None
        for ch in [*hub.channels.values(), *hub.limbo.rings.values()]:
            ch.gid = 0                      # the grant goes with the service
        for w in hub.supervisor.workers():  # all of them first, at once
            w.kill()
        for t in hub.tenants.values():
            for w in list(t.workers):
                hub.supervisor.forget(t, w)     # each one dead
        # Only now may the programs go (this broker's copy of their
        # attachments kept them checking and counting every submission until
        # the last worker was dead): nothing ran unchecked, and no count is
        # left half-made.
        dying.close()
        if not self.restart:
            self.down("the eBPF monitor went away: the channel cannot run unmonitored")
            return
        now = time.monotonic()
        self.deaths = [d for d in self.deaths if now - d < RESTART_WINDOW] + [now]
        if len(self.deaths) > RESTART_LIMIT:
            self.down(f"the eBPF monitor went away, the {len(self.deaths)}th time in "
                      f"{RESTART_WINDOW:.0f} s: not brought back again")
            return
        for t in hub.tenants.values():
            t.restart_at = 0.0          # the monitor's return starts the next worker
            t.death = "the eBPF monitor went away"
            # Answers sent between the programs' end and the workers' could
            # not be counted: the user sides must hear why at once.
            for ch in t.channels.values():
                if ch.peer is not None and not ch.closing:
                    hub.chans.tell(ch, {"op": "monitor-down"})
            for ch in list(t.channels.values()):
                if ch.closing:
                    hub.chans.finish(ch, None)
                else:
                    t.consumed[ch.id] = ch.request_head()
        self.retry_at = now + RESTART_PAUSE * 2 ** (len(self.deaths) - 1)

    def down(self, reason: str) -> None:
        """Every channel fails with `reason`."""
        hub = self.hub
        for w in hub.supervisor.workers():
            w.kill()
        for t in list(hub.tenants.values()):
            try:
                hub.supervisor.fail_tenant(t, reason)
            except Exception:
                hub.log.exception("user domain %s: finishing after the monitor went away",
                                  t.name)

    def recover(self) -> None:
        """The monitor came back (restart policy): every channel gets a new
        grant ring under it, every user domain a new worker, and each user
        side its new task table."""
        hub = self.hub
        self.retry_at = 0.0
        try:
            self.ensure()
            for t in list(hub.tenants.values()):
                tables = {}
                try:
                    for ch in t.channels.values():
                        tables[ch.id] = grants.regrant(ch, t.device_of(hub.device)[0].fd,
                                                       self.enforcer)
                    if t.channels:
                        hub.supervisor.start(t, tables=tables)
                finally:
                    protocol.close_fds(list(tables.values()))
        except (DrbError, OSError) as e:
            hub.log.error("the eBPF monitor could not be brought back: %s", e)
            self.down(f"the eBPF monitor went away and could not be brought back: {e}")
            return
        hub.notify("monitor-back")
        hub.log.warning("the eBPF monitor is back; every channel carries on")

    def tick(self, now: float) -> None:
        if self.retry_at and now >= self.retry_at:
            try:
                self.recover()
            except Exception:   # noqa: BLE001 - every channel hears it
                self.hub.log.exception("bringing the eBPF monitor back")
                self.down("the eBPF monitor went away and could not be brought back")

    def close(self) -> None:
        if self.enforcer:
            self.enforcer.close()
            self.enforcer = None
