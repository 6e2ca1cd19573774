"""A channel's life in the broker: opened, closed, ended, released.

- open: the user side's ring memory is checked, the channel gets an extent
  of its user domain's share that the broker alone decides, the grant ring
  is built and granted, and the user domain's next worker takes it over. An
  open whose extent a channel that ended still holds waits for it (up to
  PARK_WAIT), instead of failing while the kernel finishes with the old ring.
- its user side's messages: "resumed" (its tasks are in a new monitor's
  table), "close", or the connection's end.
- finish: the channel ended (closed, or failed with a reason its user side
  hears at once). Its grant is closed in the monitor, and the worker that
  holds its ring is handed over to one that does not, or retired.
- release: the kernel's word that the ring is gone came (see release): the
  grant goes, the extent is free again, and a "close" is answered.

Whom it distrusts: the user side (every message is checked in protocol,
its ring memory by ring.validate_peer_fds) and every worker: a worker's
word that it let go of a ring never frees anything by itself.
"""

from __future__ import annotations

import selectors
import time

from drb_uring import protocol, ring
from drb_uring.channel import grants
from drb_uring.channel.tenants import BrokerError, Tenant
from drb_uring.enforce import tasks
from drb_uring.errors import DrbError

PARK_WAIT = 10.0        # seconds an open waits for an extent an ended channel holds


class Parked(BrokerError):
    """The open waits: its extent comes back when an ended channel's ring
    is released (the answer is sent then)."""


class Channels:
    def __init__(self, hub):
        self.hub = hub
        self.next_id = 1

    # ---- open ------------------------------------------------------------------------

    def open(self, t: Tenant, peer: protocol.Peer, msg: dict,
             fds: list[int]) -> tuple[dict, list[int]]:
        hub = self.hub
        if hub.device is None:
            raise BrokerError("the broker has no device")
        dev, base0 = t.device_of(hub.device)
        extents = t.extents_of(hub.device)
        size = protocol.int_field(msg, "size", 1, extents.size)
        at = protocol.int_field(msg, "offset", 0, extents.size - 1) if "offset" in msg else None
        if not extents.fits(size, at) and hub.limbo.of(t):
            raise Parked(f"waiting for {size} bytes that channels which ended still hold")
        if hub.link.retry_at:
            hub.link.recover()          # the channels that wait for it first
        enforcer = hub.link.ensure()
        ring_fds = ring.PeerFds.from_list(fds)
        try:
            geo = ring.validate_peer_fds(ring_fds)
            t.check_limits(geo.pool_size)
            if dev.align and geo.slot_size % dev.align:
                raise BrokerError("slot size is not a multiple of the device alignment")
            try:
                rel = extents.alloc(size) if at is None else extents.alloc_at(at, size)
            except DrbError as e:
                raise BrokerError(str(e)) from None
        except BaseException:
            ring_fds.close()
            raise
        ch = grants.BrokerChannel(self.next_id, t, peer, (base0 + rel[0], rel[1]),
                                  geo.pool_size)
        ch.geo = geo
        tt_fd = -1
        try:
            tt_fd = grants.build(ch, ring_fds, dev.fd, enforcer)
            hub.supervisor.start(t, ch)
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
        hub.channels[ch.id] = ch
        t.channels[ch.id] = ch
        # From now on the connection is the channel's: it hears "failed".
        hub.listeners.hand_over(peer)
        hub.sel.modify(peer, selectors.EVENT_READ, ("channel", ch))
        hub.notify("channel-opened", user=t.name, channel=ch.id, base=rel[0], size=rel[1],
                   pinned=ch.pinned)
        hub.log.info("channel %d open for %s: extent %d+%d, worker pid %d%s", ch.id, t.name,
                     ch.extent[0], ch.extent[1], t.worker.pid,
                     "" if enforcer else " (UNMONITORED)")
        reply = {"channel": ch.id, "extent_size": ch.extent[1], "base": rel[0],
                 "worker_pid": t.worker.pid, "align": dev.align}
        if tt_fd >= 0:
            reply["task_table_version"] = tasks.VERSION
            reply["task_table_bytes"] = tasks.TABLE_BYTES
            reply["reap_hist_offset"] = tasks.REAP_HIST_OFFSET
            return reply, [tt_fd]
        return reply, []

    def park(self, t: Tenant, peer: protocol.Peer, msg: dict, fds: list[int]) -> None:
        t.parked.append([peer, msg, fds, time.monotonic() + PARK_WAIT])

    def parked_peer(self, peer: protocol.Peer) -> bool:
        return any(p[0] is peer for t in self.hub.tenants.values() for p in t.parked)

    def retry_parked(self, t: Tenant, give_up: bool = False) -> None:
        """Opens that waited: served in order, while their extents come."""
        while t.parked:
            peer, msg, fds, deadline = t.parked[0]
            if peer.fileno() < 0:           # it went away meanwhile
                t.parked.pop(0)
                protocol.close_fds(fds)
                continue
            out_fds: list[int] = []
            try:
                if give_up or time.monotonic() > deadline:
                    raise BrokerError(f"no free extent of the size asked for: channels that "
                                      f"ended still held it after {PARK_WAIT:.0f} s")
                reply, out_fds = self.open(t, peer, msg, fds)
                peer.send({"op": "ok", **reply}, out_fds)
            except Parked:
                return
            except (DrbError, OSError) as e:
                protocol.close_fds(fds)
                peer.send({"op": "error", "error": str(e)})
            finally:
                protocol.close_fds(out_fds)
            t.parked.pop(0)

    # ---- the user side's messages ----------------------------------------------------------

    def on_message(self, ch: grants.BrokerChannel) -> None:
        hub = self.hub
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
        # The extent is released only once the kernel is done with the
        # ring: until then it could still be doing I/O there. A "close" is
        # answered after that, so the user side may reuse the space as soon
        # as it has the reply.
        ch.reply_close = msg is not None and msg["op"] == "close"
        hub.sel.unregister(ch.peer)      # nothing more to read from this peer
        ch.closing = True
        w = ch.tenant.worker
        if w is None:
            self.finish(ch, None)
        else:
            w.ask_drop(ch.id)

    def tell(self, ch: grants.BrokerChannel, msg: dict, fds=()) -> None:
        """A notice to a channel's user side; what cannot be sent now waits
        for room (the loop watches for it)."""
        ch.peer.send(msg, list(fds))
        self.watch(ch)

    def watch(self, ch: grants.BrokerChannel) -> None:
        sel = self.hub.sel
        if ch.peer is None or ch.peer not in sel.get_map():
            return
        if ch.peer.dead:
            self.hub.log.warning("channel %d: its user side does not read its notices", ch.id)
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if ch.peer.wants_write else 0)
        if sel.get_key(ch.peer).events != want:
            sel.modify(ch.peer, want, ("channel", ch))

    def _hang_up(self, ch: grants.BrokerChannel, msg: dict | None) -> None:
        if ch.peer is None:
            return
        if msg:
            ch.peer.send(msg)
            ch.peer.flush()
        if ch.peer in self.hub.sel.get_map():
            self.hub.sel.unregister(ch.peer)
        ch.peer.close()
        ch.peer = None

    # ---- the end, and the release ----------------------------------------------------------

    def finish(self, ch: grants.BrokerChannel, reason: str | None) -> None:
        """The channel is over: its user side hears the reason if it
        failed, its grant is closed (any submission on the ring is now a
        violation), and no worker that is still to serve others keeps its
        ring. Its extent and a "close" answer wait for release()."""
        hub = self.hub
        if ch.ended:
            return
        ch.ended = True
        t = ch.tenant
        # Before the grant closes: an observer may take the channel's last counts.
        hub.notify("channel-closed", user=t.name, channel=ch.id, reason=reason)
        enforcer = hub.link.enforcer
        if enforcer and ch.gid:
            try:
                enforcer.close_grant(ch.gid)
            except (DrbError, OSError) as e:
                hub.log.error("channel %d: closing its grant failed: %s", ch.id, e)
        if reason or not ch.reply_close:
            self._hang_up(ch, {"op": "failed", "reason": reason} if reason else None)
        hub.channels.pop(ch.id, None)
        t.channels.pop(ch.id, None)
        hub.limbo.add(ch)
        hub.log.info("channel %d ended%s", ch.id, f": {reason}" if reason else "")
        w = t.worker
        if w is not None and not w.retired:
            if not t.channels:
                # Nothing left to serve: no worker waits idle. The next open
                # starts one afresh (no rings to take over).
                hub.supervisor.retire_current(t)
            elif ch.id in w.cids:
                # The ring leaves the worker's hands only with the worker:
                # the next one serves the others without it.
                try:
                    hub.supervisor.start(t)
                except (DrbError, OSError) as e:
                    hub.log.error("user domain %s: no worker to hand over to (%s); channel "
                                  "%d's ring is let go of with the next one", t.name, e, ch.id)

    def release(self, ch: grants.BrokerChannel) -> None:
        """The kernel is done with the channel's ring: the grant goes, the
        extent comes back, and a "close" is answered."""
        hub = self.hub
        # Ungranted while the broker still holds the ring (nobody else does,
        # and the broker never submits), then the last copy closed.
        enforcer = hub.link.enforcer
        if enforcer and ch.gid:
            try:
                enforcer.ungrant(ch.gid)
            except (DrbError, OSError) as e:
                hub.log.error("channel %d: ungrant failed: %s", ch.id, e)
        ch.gid = 0
        ch.close_fds()
        t = ch.tenant
        served = hub.tenants.get(t.name) is t
        if served and hub.device is not None and t.extents is not None:
            t.extents.release(ch.extent[0] - t.device_of(hub.device)[1], ch.extent[1])
        self._hang_up(ch, {"op": "ok"} if ch.reply_close else None)
        hub.log.info("channel %d released", ch.id)
        if served:
            self.retry_parked(t)
        elif not hub.limbo.of(t):
            hub.tenant_gone(t)

    def tick(self, now: float) -> None:
        for t in self.hub.tenants.values():
            if t.parked and (now > t.parked[0][3] or not self.hub.limbo.of(t)):
                self.retry_parked(t)
