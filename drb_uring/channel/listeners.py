"""The broker's sockets, and the connections on them that have no channel yet.

Each user domain has a socket of its own (its tenant's); the host has the
control socket. A connection asks for one operation at a time: a user side
may only open a channel, the host may trace and ask for its own operations
(drb user add|rm). Once a channel is open the connection is the channel's
(the broker's router watches it from then on).

Whom it distrusts: every peer. Messages are length-, type- and fd-checked
in drb_uring.protocol; an operation a peer's kind may not ask for is
refused; a peer that does not read its replies is dropped, and one user
domain's idle connections are capped (MAX_PENDING) so that they cannot use
up the broker's descriptors.
"""

from __future__ import annotations

import selectors

from drb_uring import protocol
from drb_uring.channel.channels import Parked
from drb_uring.channel.tenants import MAX_PENDING, BrokerError, Tenant, close_and_unlink
from drb_uring.errors import DrbError

# Which operations each kind of peer may ask for. The user sockets are the
# only ones a domain can reach; the control socket is the host's alone.
OPS_FOR = {"user": {"open"}, "host": {"trace"}}


class Listeners:
    def __init__(self, hub, control: str | None):
        self.hub = hub
        self.peers: dict[protocol.Peer, tuple[str, Tenant | None]] = {}   # waiting: role
        self.control_path = control
        self.control_sock = None
        if control:
            self.control_sock = protocol.listen(control)
            hub.sel.register(self.control_sock, selectors.EVENT_READ, ("listen", None))

    def listen(self, t: Tenant) -> None:
        t.sock = protocol.listen(t.path)
        self.hub.sel.register(t.sock, selectors.EVENT_READ, ("listen", t))

    def close_listener(self, t: Tenant) -> None:
        if t.sock is None:
            return
        if t.sock in self.hub.sel.get_map():
            self.hub.sel.unregister(t.sock)
        close_and_unlink(t.sock, t.path)
        t.sock = None

    def accept(self, listener, tenant: Tenant | None) -> None:
        conn, _ = listener.accept()
        if tenant is not None and sum(1 for _r, t in self.peers.values()
                                      if t is tenant) >= MAX_PENDING:
            conn.close()
            self.hub.log.warning("user domain %s: more than %d connections without a "
                                 "channel; refused one", tenant.name, MAX_PENDING)
            return
        peer = protocol.Peer(conn)
        self.peers[peer] = ("user" if tenant else "host", tenant)
        self.hub.sel.register(peer, selectors.EVENT_READ, ("conn", peer))

    def on_event(self, peer: protocol.Peer, data, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            peer.flush()
        if events & selectors.EVENT_READ:
            self._on_message(peer)
        if peer in self.peers:
            self._settle(peer, data)

    def hand_over(self, peer: protocol.Peer) -> None:
        """The connection is a channel's from now on."""
        self.peers.pop(peer, None)

    def _settle(self, peer: protocol.Peer, data) -> None:
        """Watch for room to write while replies wait; drop a dead peer."""
        if peer.dead:
            self.hub.log.warning("dropping a peer that does not read its replies")
            self.drop(peer)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.wants_write else 0)
        key = self.hub.sel.get_map().get(peer)
        if key is not None and key.events != want:
            self.hub.sel.modify(peer, want, data)

    def drop(self, peer: protocol.Peer) -> None:
        self.peers.pop(peer, None)
        if peer.fileno() >= 0 and peer in self.hub.sel.get_map():
            self.hub.sel.unregister(peer)
        peer.close()

    def _on_message(self, peer: protocol.Peer) -> None:
        hub = self.hub
        try:
            got = peer.recv()
        except protocol.ProtocolError as e:
            hub.log.warning("refused: %s", e)
            peer.send({"op": "error", "error": str(e)})
            return
        except OSError:
            self.drop(peer)
            return
        if got is None:
            return                       # nothing there after all
        msg, fds = got
        if msg is None:
            self.drop(peer)
            return
        role, tenant = self.peers[peer]
        out_fds: list[int] = []
        if hub.chans.parked_peer(peer):
            protocol.close_fds(fds)
            peer.send({"op": "error", "error": "an open of this connection is still waiting"})
            return
        try:
            op = msg["op"]
            if op not in OPS_FOR[role] and not (role == "host" and op in hub.host_ops):
                raise protocol.ProtocolError(f"operation {op!r} is not served here")
            if op == "open":
                if tenant is None or hub.tenants.get(tenant.name) is not tenant:
                    raise BrokerError("this user domain is not served any more")
                try:
                    reply, out_fds = hub.chans.open(tenant, peer, msg, fds)
                except Parked:
                    hub.chans.park(tenant, peer, msg, fds)     # answered once it can be
                    return
            elif op == "trace":
                reply = hub.link.trace(hub.channels.values(), msg.get("lease", 0))
            else:
                protocol.close_fds(fds)
                fds = []
                reply = hub.host_ops[op](msg)
        except (DrbError, OSError) as e:
            protocol.close_fds(fds)
            hub.log.warning("refused: %s", e)
            peer.send({"op": "error", "error": str(e)})
            return
        try:
            peer.send({"op": "ok", **reply}, out_fds)
        finally:
            protocol.close_fds(out_fds)

    def close(self) -> None:
        for peer in list(self.peers):
            self.drop(peer)
        if self.control_sock is not None:
            close_and_unlink(self.control_sock, self.control_path)
            self.control_sock = None
