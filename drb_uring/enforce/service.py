"""The host's enforcement service: loads the eBPF programs once for all pairs.

Started by the first broker that needs it (EnforceClient), it serves every
broker on this host over a Unix socket, and when the last one disconnects
it detaches and unloads the programs and exits. Each client is a broker
process; what a client registered (its tgid, its grants, its watched
cgroups) goes away with its connection.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import selectors
import signal
import socket
import struct
import sys

from drb_uring import linux, procs, protocol
from drb_uring.enforce.client import OPS, SERVICE_LOCK, SERVICE_SOCK
from drb_uring.enforce.programs import EnforceError, Enforcer
from drb_uring.spec import Spec

log = logging.getLogger("drb.enforce")

WORKER_DEATH_WAIT = 2.0     # seconds for a killed worker's pidfd to say it is gone


@dataclasses.dataclass(frozen=True)
class ServiceSpec(Spec):
    # Under a service manager (drb-ebpfd.service, `drb ebpfd`): stay in the
    # foreground, and keep the programs loaded while no broker is connected,
    # so that a pair comes up without compiling them.
    foreground: bool = False


class Client:
    """A connected broker (or a benchmark), known by what the kernel says of
    it (SO_PEERCRED), never by what it claims."""

    def __init__(self, peer: protocol.Peer, tgid: int):
        self.peer = peer
        self.tgid = tgid
        self.registered = False
        self.gids: set[int] = set()
        self.workers: dict[int, int] = {}      # channel -> pidfd of its worker
        self.watched: set[str] = set()
        # Where its workers run (watch workers=True): path -> the group's
        # inode, so that a group made again at the same path is not taken
        # for it.
        self.worker_groups: dict[str, int] = {}
        self.counting = False
        try:
            self.pidfd = os.pidfd_open(tgid)    # so that its death is known, whatever its pid
        except OSError as e:
            log.warning("no pidfd of client %d (%s): its grants go as soon as it does", tgid, e)
            self.pidfd = -1


@dataclasses.dataclass(eq=False)
class _Limbo:
    """The closed grants of a departed broker (see Service._settle)."""
    groups: dict[str, int]          # where its workers ran: path -> inode
    pidfd: int                      # the broker's
    killed: bool = False            # (told once in the log)
    emptied: bool = False


def _same_group(path: str, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _kill_group(path: str, inode: int) -> None:
    """SIGKILL every process in the cgroup (v2) and below, at once:
    cgroup.kill also takes a process that forks meanwhile."""
    if not _same_group(path, inode):
        return                  # gone (or another group made at its path): empty
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError as e:        # being removed (ENODEV): empty, or soon
        log.warning("could not kill the processes in %s: %s", path, e)


def _populated(path: str, inode: int) -> bool:
    """Whether any process is in the group or below (the kernel's own flag)."""
    if not _same_group(path, inode):
        return False
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return any(line.split() == ["populated", "1"] for line in f)
    except FileNotFoundError:
        return False            # removed
    except OSError as e:
        # ENODEV: removed as it was read. Anything else: count it as full
        # (the grants stay closed) and look again.
        return e.errno != errno.ENODEV


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel
    recorded them at connect(), in this process's namespaces."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)


class Service:
    def __init__(self, persist: bool = False):
        self.persist = persist
        self.enforcer = Enforcer()
        self.sel = selectors.DefaultSelector()
        self.sock = protocol.listen(SERVICE_SOCK)
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.clients: dict[protocol.Peer, Client] = {}
        self.limbo: dict[int, _Limbo] = {}       # a departed broker's closed grants
        self.broker_refs: dict[int, int] = {}      # tgid -> its connections
        self.stopping = False
        self.served = 0

    def _accept(self) -> None:
        conn, _ = self.sock.accept()
        pid, uid, _gid = peer_credentials(conn)
        # Host root only: a domain's root maps to an unprivileged host uid,
        # and a process of another pid namespace shows as pid 0 here.
        if uid != 0 or pid <= 0:
            log.warning("refused a client: pid %d, uid %d (only root on the host)", pid, uid)
            conn.close()
            return
        c = Client(protocol.Peer(conn), pid)
        self.clients[c.peer] = c
        self.sel.register(c.peer, selectors.EVENT_READ, c)
        self.served += 1

    def _forget_worker(self, c: Client, gid: int, kill: bool) -> None:
        fd = c.workers.pop(gid, None)
        if fd is None:
            return
        if kill:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            # Ungranted only once it is gone: until then it could submit.
            linux.readable(fd, WORKER_DEATH_WAIT)
        os.close(fd)

    def _drop(self, c: Client, departed: bool = True) -> None:
        """Forget a client: it went away (departed), or this service stops
        (the brokers then handle the service's going themselves)."""
        # Its workers go with it: a channel whose broker is gone is not
        # enforced any more, and must not run. Its grants are closed first:
        # from here on, any use of its rings kills the user.
        for gid in c.gids:
            self.enforcer.close_grant(gid)
        for gid in list(c.workers):
            if gid in c.gids:
                log.warning("broker %d went away: killing the worker of channel %d",
                            c.tgid, gid)
            self._forget_worker(c, gid, kill=True)
        if departed and c.gids and c.worker_groups and c.pidfd >= 0:
            # A worker may have handed its rings to a child (fork), and the
            # broker, which waits for the kernel's word that a ring is gone
            # before it ungrants, is not here to. The grants stay, closed,
            # until the broker is dead and nothing is left where its workers
            # ran (see _settle).
            left = _Limbo(dict(c.worker_groups), c.pidfd)
            c.pidfd = -1                # the limbo's now
            for gid in c.gids:
                self.limbo[gid] = left
            self._settle()
        else:
            for gid in c.gids:
                self.enforcer.ungrant(gid)
        for path in c.watched:
            self.enforcer.unwatch(path)
        if c.counting:
            self.enforcer.count_off()
        if c.registered:
            self.broker_refs[c.tgid] -= 1
            if not self.broker_refs[c.tgid]:
                del self.broker_refs[c.tgid]
                self.enforcer.remove_broker(c.tgid)
        self.sel.unregister(c.peer)
        self.clients.pop(c.peer, None)
        c.peer.close()
        if c.pidfd >= 0:
            os.close(c.pidfd)
            c.pidfd = -1

    def _handle(self, c: Client, msg: dict) -> tuple[dict, list[int]]:
        op = msg["op"]
        if op == "hello":
            # The grant rings this process creates are recorded from now on:
            # the process is the one the kernel says is at the other end.
            if not c.registered:
                c.registered = True
                self.broker_refs[c.tgid] = self.broker_refs.get(c.tgid, 0) + 1
                self.enforcer.add_broker(c.tgid)
            # The programs' attachments: see Enforcer.link_fds.
            links = self.enforcer.link_fds()
            return {"links": len(links)}, links
        if not c.registered:
            raise protocol.ProtocolError("say hello first")
        if op == "grant":
            extent = msg.get("extent")
            if not (isinstance(extent, list) and len(extent) == 2):
                raise protocol.ProtocolError("grant needs extent [base, size]")
            gid, fd = self.enforcer.grant(c.tgid, protocol.int_field(msg, "fd", 0, 1 << 20),
                                     protocol.int_field(msg, "pool_base", 0, (1 << 64) - 1),
                                     protocol.int_field(msg, "slot_size", 1, 1 << 30),
                                     protocol.int_field(msg, "slot_count", 1, 1 << 16),
                                     (int(extent[0]), int(extent[1])))
            c.gids.add(gid)
            return {"channel": gid}, [fd]
        gid_ok = lambda g: g in c.gids   # noqa: E731 - a client sees only its own
        if op == "failed":
            gid = protocol.int_field(msg, "channel", 1, 1 << 31)
            return {"reason": self.enforcer.failed(gid) if gid_ok(gid) else None}, []
        if op == "worker":
            gid = protocol.int_field(msg, "channel", 1, 1 << 31)
            if not gid_ok(gid):
                raise protocol.ProtocolError(f"channel {gid} is not this broker's")
            self._forget_worker(c, gid, kill=False)
            pid = protocol.int_field(msg, "pid", 1, 1 << 22)
            try:
                c.workers[gid] = os.pidfd_open(pid)
            except ProcessLookupError:
                # Dead already (killed as it started): nothing left to kill
                # should the broker go, and the broker hears of the death
                # from its own pidfd of the worker and starts the next one.
                pass
            return {}, []
        if op == "close":
            gid = protocol.int_field(msg, "channel", 1, 1 << 31)
            if gid_ok(gid):
                self.enforcer.close_grant(gid)
            return {}, []
        if op == "ungrant":
            gid = protocol.int_field(msg, "channel", 1, 1 << 31)
            if gid_ok(gid):
                self._forget_worker(c, gid, kill=False)
                self.enforcer.ungrant(gid)
                c.gids.discard(gid)
            return {}, []
        if op == "hist":
            lease = msg.get("lease", 0)
            if isinstance(lease, (int, float)) and 0 < lease <= 3600:
                self.enforcer.trace_lease(lease, counters=msg.get("counters", True) is True)
            gids = [g for g in msg.get("channels", []) if isinstance(g, int) and gid_ok(g)]
            return {"hist": {str(g): {st: {str(b): n for b, n in bk.items()}
                                      for st, bk in v.items()}
                             for g, v in self.enforcer.histograms(gids).items()}}, []
        if op == "count":
            on = bool(msg.get("on"))
            if on != c.counting:
                self.enforcer.count_on() if on else self.enforcer.count_off()
                c.counting = on
            return {}, []
        if op in ("watch", "unwatch", "counters"):
            path = msg.get("path")
            if not isinstance(path, str) or not os.path.isdir(path):
                raise protocol.ProtocolError(f"not a cgroup directory: {path!r}")
            if op == "watch":
                self.enforcer.watch(path)
                c.watched.add(path)
                if msg.get("workers") is True:
                    c.worker_groups[path] = os.stat(path).st_ino
                return {}, []
            if op == "unwatch":
                self.enforcer.unwatch(path)
                c.watched.discard(path)
                c.worker_groups.pop(path, None)
                return {}, []
            return {"counters": self.enforcer.counters(path)}, []
        raise protocol.ProtocolError(f"unknown operation {op!r}")

    def _on_message(self, c: Client) -> None:
        try:
            got = c.peer.recv(OPS)
        except (protocol.ProtocolError, OSError) as e:
            log.warning("dropping a client: %s", e)
            self._drop(c)
            return
        if got is None:
            return
        msg, fds = got
        protocol.close_fds(fds)
        if msg is None:
            self._drop(c)
            return
        try:
            # The fds sent (a task table) stay the enforcer's: Peer.send
            # duplicates any it has to queue.
            reply, out_fds = self._handle(c, msg)
            c.peer.send({"op": "ok", **reply}, out_fds)
        except (protocol.ProtocolError, EnforceError, OSError, KeyError, ValueError) as e:
            c.peer.send({"op": "error", "error": str(e)})
        if c.peer.dead:
            log.warning("dropping a client that does not read its replies")
            self._drop(c)

    def _last_one_out(self) -> bool:
        """With no clients left: exit unless one is already queued. Taken
        under the same lock clients take to connect or start us."""
        lock = os.open(SERVICE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.sock.setblocking(False)
            try:
                self._accept()
                return False
            except BlockingIOError:
                pass
            finally:
                self.sock.setblocking(True)
            os.unlink(SERVICE_SOCK)
            return True
        finally:
            os.close(lock)

    def run(self) -> None:
        while not self.stopping:
            for key, events in self.sel.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                    continue
                c = key.data
                if events & selectors.EVENT_WRITE:
                    c.peer.flush()
                if events & selectors.EVENT_READ:
                    self._on_message(c)
                if c.peer in self.clients:
                    want = selectors.EVENT_READ | (
                        selectors.EVENT_WRITE if c.peer.wants_write else 0)
                    if self.sel.get_key(c.peer).events != want:
                        self.sel.modify(c.peer, want, c)
            self.enforcer.poll()
            self.enforcer.expire()
            self._settle()
            if self.served and not self.clients and not self.limbo and not self.persist \
                    and self._last_one_out():
                break

    def _settle(self) -> None:
        """The closed grants of departed brokers. A broker that still lives
        (its link was dropped) keeps its rings and lets go of them itself:
        its grants stay closed. Once it is dead, every process in its
        workers' cgroups is killed (cgroup.kill also takes a process that
        forks meanwhile), and its grants go once those cgroups have been
        empty: the broker was the rings' only holder outside them."""
        for gid, left in list(self.limbo.items()):
            if not left.emptied:
                if not linux.readable(left.pidfd):
                    continue            # the broker lives
                if not left.killed:
                    left.killed = True
                    log.warning("broker of channel %d is dead: killing every process in %s",
                                gid, ", ".join(left.groups))
                full = [p for p, ino in left.groups.items() if _populated(p, ino)]
                for path in full:       # again on every pass: a kill that failed is retried
                    _kill_group(path, left.groups[path])
                if full:
                    continue
                left.emptied = True     # what comes into the group later never had the ring
            self.enforcer.ungrant(gid)
            del self.limbo[gid]
            if left not in self.limbo.values():
                os.close(left.pidfd)

    def close(self) -> None:
        # Connected brokers see this service go and carry on under the next
        # (--restart) or fail their channels; their workers are killed here,
        # as before, but not their driver domains. A dead broker's workers'
        # groups die before the checks go.
        for c in list(self.clients.values()):
            self._drop(c, departed=False)
        for left in {id(x): x for x in self.limbo.values()}.values():
            if not left.emptied and linux.readable(left.pidfd):
                for path, inode in left.groups.items():
                    _kill_group(path, inode)
            os.close(left.pidfd)
        self.limbo.clear()
        self.sel.close()
        self.sock.close()
        try:
            os.unlink(SERVICE_SOCK)
        except FileNotFoundError:
            pass
        self.enforcer.close()


def _start_foreground() -> Service:
    """The service, unless one already serves: under the lock clients take
    to connect or start one, so that no second one starts meanwhile."""
    os.makedirs(os.path.dirname(SERVICE_LOCK), exist_ok=True)
    lock = os.open(SERVICE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with probe:
            try:
                probe.connect(SERVICE_SOCK)
            except OSError:
                pass
            else:
                raise EnforceError(f"an eBPF service already serves on {SERVICE_SOCK}")
        return Service(persist=True)
    finally:
        os.close(lock)


def main(argv: list[str] | None = None) -> int:
    spec = procs.spec_from_argv(ServiceSpec, argv)
    if not spec.foreground:
        # Detach from whichever monitor started us: we outlive it, and must
        # not be its child (nor a zombie in its process table when we exit).
        if os.fork():
            os._exit(0)
        os.setsid()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s drb-ebpfd[%(process)d] %(message)s")
    try:
        svc = _start_foreground() if spec.foreground else Service()
    except (EnforceError, OSError) as e:
        print(f"error: {e}", flush=True)
        return 1
    except Exception as e:       # a bug: the log keeps the traceback
        log.exception("the service could not start")
        print(f"error: the eBPF service could not start ({type(e).__name__}: {e}); "
              "see /var/log/drb-ebpfd.log", flush=True)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: setattr(svc, "stopping", True))
    signal.signal(signal.SIGINT, (lambda *_: setattr(svc, "stopping", True))
                  if spec.foreground else signal.SIG_IGN)
    print("ready", flush=True)
    sys.stdout.close()
    log.info("programs loaded; serving monitors")
    try:
        svc.run()
    finally:
        svc.close()
        log.info("last monitor gone; programs unloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
