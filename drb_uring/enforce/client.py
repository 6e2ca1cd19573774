"""How a broker talks to the host's enforcement service.

The service (drb_uring.enforce.service) loads the eBPF programs once for
every pair on the host; the first broker that needs it starts it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess

from drb_uring import procs, protocol
from drb_uring.enforce.programs import EnforceError
from drb_uring.spec import Spec

SERVICE_SOCK = "/run/drb-ebpfd.sock"
SERVICE_LOCK = "/run/lock/drb-ebpfd.lock"
SERVICE_LOG = "/var/log/drb-ebpfd.log"
OPS = {op: (0,) for op in ("hello", "grant", "worker", "failed", "close", "ungrant", "hist",
                           "watch", "unwatch", "counters", "count", "error")}
OPS["ok"] = tuple(range(protocol.MAX_FDS + 1))     # "hello" carries the programs' links


class EnforceClient:
    """A monitor's connection to the host service; starts it if needed."""

    def __init__(self, timeout: float = 60.0):
        os.makedirs(os.path.dirname(SERVICE_LOCK), exist_ok=True)
        lock = os.open(SERVICE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.sock = self._connect()
            except (FileNotFoundError, ConnectionRefusedError):
                self._start_service(timeout)
                self.sock = self._connect()
        finally:
            os.close(lock)
        # The service knows who we are from the socket. Its answer carries
        # the enforcing programs' attachments: holding them keeps the
        # programs checking every submission, should the service die, until
        # close() (after this broker's workers are dead).
        reply, self.links = self._call("hello")
        if len(self.links) != reply.get("links"):
            protocol.close_fds(self.links)
            self.sock.close()
            raise EnforceError("the eBPF service sent no program attachments")

    @staticmethod
    def _connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(SERVICE_SOCK)
        except OSError:
            s.close()
            raise
        return s

    @staticmethod
    def _start_service(timeout: float) -> None:
        log_f = open(SERVICE_LOG, "ab")
        proc = procs.spawn("drb_uring.enforce.service", Spec(), stdout=subprocess.PIPE,
                           stderr=log_f, stdin=subprocess.DEVNULL, start_new_session=True)
        log_f.close()
        proc.wait(timeout)       # the service forks away at once; reap the first half
        line = proc.stdout.readline().decode().strip()
        proc.stdout.close()
        if line != "ready":
            raise EnforceError(line.removeprefix("error: ")
                            or f"the eBPF service failed to start; see {SERVICE_LOG}")

    def _call(self, op: str, **kw):
        reply, fds = protocol.request(self.sock, {"op": op, **kw}, keep_fds=True, table=OPS)
        return reply, fds

    def grant(self, ring_fd: int, pool_base: int, slot_size: int, slot_count: int,
              extent: tuple[int, int]) -> tuple[int, int]:
        reply, fds = self._call("grant", fd=ring_fd, pool_base=pool_base, slot_size=slot_size,
                                slot_count=slot_count, extent=list(extent))
        if len(fds) != 1:
            protocol.close_fds(fds)
            raise EnforceError("the eBPF service sent no task table")
        return reply["channel"], fds[0]

    def failed(self, gid: int) -> str | None:
        return self._call("failed", channel=gid)[0].get("reason")

    def worker(self, gid: int, pid: int) -> None:
        """The process that serves channel `gid`: the service kills it if
        this broker goes away, so that no channel outlives its monitor."""
        self._call("worker", channel=gid, pid=pid)

    def close_grant(self, gid: int) -> None:
        """The channel ended: any submission on its ring is a violation from
        now on, until ungrant()."""
        self._call("close", channel=gid)

    def ungrant(self, gid: int) -> None:
        self._call("ungrant", channel=gid)

    def histograms(self, gids, lease: float = 0.0, counters: bool = True) -> dict:
        """Stage histograms; with lease > 0 keep collecting for that long,
        and with `counters` count the domains' mode switches as long."""
        h = self._call("hist", channels=list(gids), lease=lease,
                       counters=bool(counters))[0]["hist"]
        return {int(g): {st: {int(b): c for b, c in bk.items()} for st, bk in v.items()}
                for g, v in h.items()}

    def watch(self, path: str, workers: bool = False) -> None:
        """Count the mode switches of the processes in cgroup `path`. With
        `workers`, it is where this client's workers run: should this
        client go with grants in place, the service kills every process
        there and keeps the grants closed until the group is empty (a
        process that kept a grant ring could otherwise use it unchecked)."""
        self._call("watch", path=path, workers=workers)

    def unwatch(self, path: str) -> None:
        self._call("unwatch", path=path)

    def count(self, on: bool) -> None:
        """Keep the counters' hooks attached while this client wants them."""
        self._call("count", on=on)

    def counters(self, path: str) -> dict[str, int]:
        return self._call("counters", path=path)[0]["counters"]

    def close(self) -> None:
        """Disconnect, and let go of the programs' attachments: call it once
        no worker this broker started may still submit."""
        if getattr(self, "sock", None) is not None:
            self.sock.close()
            self.sock = None
        protocol.close_fds(getattr(self, "links", []))
        self.links = []
