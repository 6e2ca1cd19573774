"""The worker supervisor: one worker process per user domain, started,
handed over, restarted and retired.

A worker serves every channel of its user domain. Opening a channel starts
the user domain's next worker with every ring: io_uring descriptors do not
pass over Unix sockets, so a running worker cannot be handed a new one.
The current worker is told to stop (SIGTERM, once it said it can hear it),
finishes what it has in flight and exits; the next waits on a gate pipe
that ends when the old one is gone, then takes each ring over where it
stood. A worker that dies (not stopped by the monitor) is replaced after a
pause that doubles with each recent death; more than RESTART_LIMIT deaths
within RESTART_WINDOW fail every channel of its user domain instead. A
worker the monitor stopped is never restarted: its user domain's channels
fail with the violation.

Whom it distrusts: every worker. It is watched through a pidfd, never
waited on; its reports only ever let go of channels (a report for a channel
it was not given is ignored), and what it says is never the monitor's word.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable

from drb_uring import protocol
from drb_uring.channel.tenants import BrokerError
from drb_uring.channel.worker import REPORT, WorkerSpec
from drb_uring.channel.workerproc import READY_ID, SpawnFn, WorkerProc, spawn_plain

__all__ = ["NoMonitor", "Supervisor", "spawn_plain"]


class NoMonitor(BrokerError):
    """No worker may start: the eBPF monitor is down."""


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
DEATH_WAIT = 5.0           # for a killed worker to be gone (it may be in the kernel)
# Each worker runs as a user of its own in the driver domain, none of them
# ever used twice at once and none the domain's own (its root is 0): no
# other process there shares its user, so none may signal it, trace it or
# open its /proc files, and whatever it leaves behind is found by its user.
WORKER_UIDS = range(20000, 60000)

class Supervisor:
    """Every user domain's workers. `hub` is the broker: its selector, its
    device, its monitor link, and what finishes a channel or tells its
    user side something."""

    def __init__(self, hub, spawn: SpawnFn, spin_ns: int, cpus: list[int] | None,
                 sweep: Callable[[int], None] | None = None):
        """`sweep(uid)`, if given, ends whatever a dead worker's user left
        running in the driver domain."""
        self.hub = hub
        self.spawn = spawn
        self.spin_ns = spin_ns
        self.cpus = cpus
        self.sweep = sweep
        self.serial = 0

    def _next_uid(self) -> int:
        taken = {w.uid for w in self.workers()}
        while True:
            uid = WORKER_UIDS[self.serial % len(WORKER_UIDS)]
            self.serial += 1
            if uid not in taken:
                return uid

    def workers(self) -> list[WorkerProc]:
        return [w for t in self.hub.tenants.values() for w in t.workers]

    def timers_due(self) -> bool:
        """Whether anything waits on a clock (the loop then wakes often)."""
        return any(t.awaiting or t.restart_at for t in self.hub.tenants.values()) or any(
            w.kill_at for w in self.workers())

    # ---- starting and handing over ---------------------------------------------

    def start(self, t, new=None, tables: dict[int, int] | None = None) -> None:
        """Start the user domain's next worker with all its channels (and
        `new`); the current one is told to stop, finishes what it has in
        flight, and the next takes the rings over once it is gone (the
        gate). A worker cannot be handed a new grant ring while it runs:
        io_uring descriptors do not pass over Unix sockets."""
        hub = self.hub
        enforcer = hub.link.enforcer
        if hub.link.enforce and enforcer is None:
            raise NoMonitor("no worker runs while the eBPF monitor is down")
        # Closing channels too: the new worker lets go of them once the
        # kernel is done with what they have in flight (asked just below).
        chans = list(t.channels.values())
        if new is not None:
            chans.append(new)
        old = t.worker
        ctl_r, ctl_w = os.pipe()
        rep_r, rep_w = os.pipe()
        gate_r, hold_w = os.pipe()
        align = t.device_of(hub.device)[0].align
        restarted = bool(t.restart_at) or tables is not None
        held = set(tables or ()) | t.awaiting
        specs = [ch.spec(align).replace(held=ch.id in held).to_dict() for ch in chans]
        uid = self._next_uid()
        if self.sweep is not None:
            self.sweep(uid)             # nothing of an earlier user of the id is left
        spec = WorkerSpec(channels=specs,
                          ctl_fd=ctl_r, report_fd=rep_w, gate_fd=old.gate_r if old else -1,
                          hold_fd=hold_w, spin_ns=self.spin_ns, restarted=restarted, uid=uid)
        try:
            proc, pid = self.spawn(spec, spec.fds())
        except BaseException:
            protocol.close_fds([ctl_w, rep_r, gate_r])
            raise
        finally:
            protocol.close_fds([fd for fd in (ctl_r, rep_w, hold_w) if fd >= 0])
        w = WorkerProc(proc, pid, ctl_w, rep_r, gate_r, {ch.id for ch in chans})
        w.uid = uid
        try:
            w.pidfd = os.pidfd_open(proc.pid)
            if pid != proc.pid:
                try:
                    w.wpidfd = os.pidfd_open(pid)
                except ProcessLookupError:
                    pass                # already gone: the stand-in's exit says so
            if enforcer:
                # Should this broker die, the service kills the worker.
                for ch in chans:
                    if ch.gid:
                        enforcer.worker(ch.gid, pid)
            if self.cpus:
                try:
                    os.sched_setaffinity(pid, self.cpus)
                except ProcessLookupError:
                    pass    # dead as it started: its pidfd says so, and a restart follows
        except BaseException:
            w.kill()
            proc.wait()
            w.close_fds()
            raise
        if old is not None:
            # The next worker waits for the old one's end of the gate.
            protocol.close_fds([old.gate_r])
            old.gate_r = -1
            self.retire(old)
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
                hub.chans.tell(ch, {"op": "restarted", "pid": pid, "why": t.death,
                              "consumed": t.consumed.get(ch.id, 0)}, table)
            else:
                hub.chans.tell(ch, {"op": "worker", "pid": pid})
        if tables is not None:
            t.awaiting = {ch.id for ch in chans if ch.id in tables}
            t.resume_deadline = time.monotonic() + RESUME_GRACE
        if restarted:
            t.consumed = {}
            hub.notify("worker-restarted", user=t.name, pid=pid, why=t.death)
            hub.log.warning("user domain %s: worker %d took over from the one that died",
                            t.name, pid)
        hub.sel.register(w.pidfd, hub.EVENT_READ, ("worker", (t, w)))
        hub.sel.register(w.report_r, hub.EVENT_READ, ("report", (t, w)))

    def retire(self, w: WorkerProc) -> None:
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

    def retire_current(self, t) -> None:
        """Nothing left to serve: no worker waits idle. The next open starts
        one afresh (no rings to take over)."""
        w, t.worker = t.worker, None
        protocol.close_fds([w.gate_r] if w.gate_r >= 0 else [])
        w.gate_r = -1
        self.retire(w)

    def forget(self, t, w: WorkerProc) -> None:
        """The worker is gone, or is made to be: once this returns, its
        process is dead (not only its stand-in), and so are its copies of
        every ring it was handed."""
        sel = self.hub.sel
        for fd in (w.pidfd, w.report_r):
            if fd >= 0 and fd in sel.get_map():
                sel.unregister(fd)
        if w.proc.poll() is None or not w.wait_gone(0):
            w.kill()
            w.proc.wait()
            if not w.wait_gone(DEATH_WAIT):
                self.hub.log.error("worker %d is still not gone %.0f s after SIGKILL",
                                   w.pid, DEATH_WAIT)
        if self.sweep is not None and w.uid >= 0:
            self.sweep(w.uid)
        w.close_fds()
        if w in t.workers:
            t.workers.remove(w)
        if t.worker is w:
            t.worker = None

    def resume_overdue(self, t) -> None:
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

    def tick(self, now: float) -> None:
        """What is due by the clock: resumes overdue, restarts, kills."""
        hub = self.hub
        for t in list(hub.tenants.values()):
            if t.awaiting and now >= t.resume_deadline:
                self.resume_overdue(t)
            if t.restart_at and now >= t.restart_at:
                try:
                    self.start(t)
                except Exception as e:      # noqa: BLE001 - told to every channel
                    t.restart_at = 0.0
                    if hub.link.died_under_us():
                        # The monitor died under the restart: its return
                        # starts this user domain's worker too.
                        hub.link.service_gone()
                        continue
                    hub.log.exception("user domain %s: no worker could be started", t.name)
                    self.fail_tenant(t, f"backend worker died and none could be started "
                                        f"again: {e}")
        for w in self.workers():
            if w.kill_at and now >= w.kill_at and w.proc.poll() is None:
                hub.log.warning("worker %d ignored SIGTERM; killing it", w.pid)
                w.kill()
                w.kill_at = 0.0

    # ---- what workers say, and how they end --------------------------------------

    def on_report(self, t, w: WorkerProc) -> None:
        """The worker let go of channels: asked to (a close), or because a
        channel's ring was corrupt."""
        try:
            raw = os.read(w.report_r, REPORT.size * 64)
        except OSError:
            raw = b""
        if not raw:
            self.hub.sel.unregister(w.report_r)
            return
        for i in range(0, len(raw) - len(raw) % REPORT.size, REPORT.size):
            cid, err = REPORT.unpack_from(raw, i)
            if cid == READY_ID:
                w.ready = True
                if w.retired:
                    self.retire(w)
                continue
            ch = t.channels.get(cid)
            if ch is None:
                continue
            if err:
                ch.fail_reason = ch.fail_reason or (
                    f"backend worker {w.pid} dropped the channel: its ring is corrupt "
                    f"({os.strerror(-err) if err < 0 else err})")
                self.hub.log.error("channel %d failed: %s", cid, ch.fail_reason)
            nxt = t.worker
            if w is nxt or nxt is None or cid not in nxt.cids:
                self.hub.chans.finish(ch, ch.fail_reason)
            else:
                nxt.ask_drop(cid)           # the next worker has it too

    def on_exit(self, t, w: WorkerProc) -> None:
        hub = self.hub
        rc = w.proc.wait()
        # Reports it wrote before it went still count, every one.
        while w.report_r >= 0 and w.report_r in hub.sel.get_map():
            self.on_report(t, w)
        self.forget(t, w)
        if hub.tenants.get(t.name) is not t:
            return
        if w.retired and rc == 0:
            # Handed over. Channels closed meanwhile that the next worker
            # was not given are let go of now.
            nxt = t.worker
            for ch in list(t.channels.values()):
                if ch.closing and (nxt is None or ch.id not in nxt.cids):
                    hub.chans.finish(ch, ch.fail_reason)
            return
        # A worker died with channels in its hands. Stopped by the monitor:
        # every channel of the user domain fails, and says why; it is not
        # restarted behind the user's back.
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        if rc == 137:     # a stand-in in the driver domain reports 128 + signal
            how = "killed by signal 9"
        enforcer = hub.link.enforcer
        violations = {}
        for ch in [*t.channels.values(), *hub.limbo.of(t)]:
            v = enforcer.failed(ch.gid) if enforcer and ch.gid else None
            if v:
                violations[ch.id] = v
                hub.log.error("VIOLATION channel %d: %s", ch.id, v)
                hub.notify("violation", user=t.name, channel=ch.id, reason=v, pid=w.pid)
        hub.notify("worker-died", user=t.name, pid=w.pid, how=how,
                   violation=bool(violations))
        for wk in list(t.workers):
            wk.kill()
            self.forget(t, wk)
        now = time.monotonic()
        t.deaths = [d for d in t.deaths if now - d < RESTART_WINDOW] + [now]
        if not violations and t.channels and enforcer is not None:
            if len(t.deaths) <= RESTART_LIMIT:
                self.schedule_restart(t, w.pid, how, now)
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
            hub.log.error("channel %d failed: %s", ch.id, reason)
            hub.chans.finish(ch, reason)

    def schedule_restart(self, t, pid: int, how: str, now: float) -> None:
        """The next worker, after a pause that doubles with each recent
        death. What the dead one took from each request ring is read now,
        before anyone drives the rings again."""
        for ch in list(t.channels.values()):
            # Closing ones too: the next worker lets go of them once the
            # kernel is done with them (its count starts from the ring).
            t.consumed[ch.id] = ch.request_head()
        if not t.channels:
            t.consumed = {}
            return
        t.death = f"backend worker {pid} {how}"
        t.restart_at = now + RESTART_PAUSE * 2 ** (len(t.deaths) - 1)
        self.hub.log.error("user domain %s: backend worker %d %s; starting another (death %d "
                           "of at most %d in %.0f s)", t.name, pid, how, len(t.deaths),
                           RESTART_LIMIT, RESTART_WINDOW)

    def fail_tenant(self, t, reason: str | None) -> None:
        """Stop every worker of the user domain and finish all its channels."""
        t.awaiting = set()
        for w in t.workers:
            w.ready = True            # the channels end either way: no waiting for it
            self.retire(w)
        end = time.monotonic() + WORKER_STOP_GRACE
        for w in list(t.workers):
            try:
                w.proc.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            self.forget(t, w)
        for ch in list(t.channels.values()):
            self.hub.chans.finish(ch, reason)
