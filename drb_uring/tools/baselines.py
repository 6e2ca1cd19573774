"""The mechanisms drb is measured against, set up for ``drb bench``.

Each baseline has a user end (a :class:`_load.Transport`, driven by the
same workload loop as the double ring) and, except ``direct``, a driver
side: this module run as a helper process. The host makes the plumbing
(:func:`plumb`) and hands each side its descriptors, so both sides can
run in real domains, which may create neither rings nor shared memory
for each other:

- ``grant-map``: shared request/response ring + the user's buffers in a
  memfd + two eventfds; the driver side maps each request's buffer for
  that request only (_baselines.serve_grant_map).
- ``socket``: a Unix SOCK_SEQPACKET pair, the data inside the messages.
- ``direct``: an io_uring on the device with the user's buffers
  registered, handed to the user side: no driver side at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading

from drb_uring import procs
from drb_uring.channel import _grant, _worker
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.errors import DrbError
from drb_uring.ring import layout as L
from drb_uring.spec import Spec, SpecError
from drb_uring.tools import _baselines

KINDS = ("grant-map", "socket", "direct")
SO_SNDBUFFORCE = 32          # root may size a socket's buffer past wmem_max
RECV_TIMEOUT_S = 5


class BaselineError(DrbError):
    pass


@dataclasses.dataclass(frozen=True)
class ServerSpec(Spec):
    """The driver side's spec. fds: 3 the device, then grant-map: 4 ring
    memfd, 5 pool memfd, 6 request eventfd, 7 response eventfd; socket: 4
    the socket."""
    kind: str
    slot_count: int
    slot_size: int
    entries: int = 0          # grant-map: the shared ring's entries

    def check(self) -> None:
        if self.kind not in ("grant-map", "socket"):
            raise SpecError(f"ServerSpec.kind: {self.kind!r} has no driver side")
        if self.slot_count < 1 or self.slot_size < 1:
            raise SpecError("ServerSpec: slot_count and slot_size must be positive")
        if self.kind == "grant-map" and (self.entries < 2 or self.entries & (self.entries - 1)):
            raise SpecError("ServerSpec.entries: a power of two of at least 2")


def main(argv: list[str] | None = None) -> int:
    spec = procs.spec_from_argv(ServerSpec, argv)
    if spec.kind == "grant-map":
        served, err = _baselines.serve_grant_map(4, spec.entries, 5, spec.slot_count,
                                                 spec.slot_size, 3, 6, 7)
    else:
        served, err = _baselines.serve_socket(4, spec.slot_size, 3)
    if err:
        print(f"drb baseline {spec.kind}: {err} after {served} requests", file=sys.stderr)
        return 1
    return 0


@dataclasses.dataclass
class Plumbing:
    """What the host made for one baseline channel: the descriptors each
    side gets (in order, at 3..), the driver side's spec, and what the user
    end needs to know besides its descriptors."""
    kind: str
    server: ServerSpec | None
    driver_fds: list[int]
    user_fds: list[int]
    user_args: dict
    owned: list[int]

    def stop(self) -> None:
        """Wake both sides for the end (the driver side exits)."""
        if self.kind == "grant-map":
            ring, _, efd_req, efd_rsp = self.user_fds
            _baselines.grant_stop(ring, efd_req, efd_rsp)
        elif self.kind == "socket":
            # Shut down, not closed: the user end may hold a copy too.
            with socket.socket(fileno=os.dup(self.user_fds[0])) as s:
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        while self.owned:
            os.close(self.owned.pop())


def plumb(kind: str, dev_fd: int, slot_count: int, slot_size: int, depth: int) -> Plumbing:
    if kind not in KINDS:
        raise BaselineError(f"unknown baseline {kind!r}; choose from {', '.join(KINDS)}")
    owned: list[int] = []

    def own(fd: int) -> int:
        owned.append(fd)
        return fd
    try:
        args = {"slot_count": slot_count, "slot_size": slot_size, "depth": depth}
        if kind == "socket":
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            # Room for every request and response in flight, so neither
            # side ever blocks on a full buffer while the other does too.
            room = 2 * depth * (slot_size + 64) + (1 << 20)
            for s in (mine, theirs):
                s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, room)
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                            RECV_TIMEOUT_S.to_bytes(8, "little") + bytes(8))
            u, d = own(mine.detach()), own(theirs.detach())
            return Plumbing(kind, ServerSpec(kind=kind, slot_count=slot_count,
                                             slot_size=slot_size),
                            [dev_fd, d], [u], args, owned)
        pool = own(os.memfd_create(f"drb-{kind}-pool", os.MFD_CLOEXEC))
        os.ftruncate(pool, slot_count * slot_size)
        entries = L.next_pow2(depth, 2)
        if kind == "direct":
            ring, params = _grant.setup_disabled(entries)
            own(ring)
            base = _grant.register_pool(ring, pool, slot_size, slot_count)
            _grant.register_device(ring, dev_fd)
            # Restricted as a grant ring is: otherwise the ring would let
            # the user domain do what its seccomp profile refuses
            # (IORING_OP_SOCKET, OPENAT, ...).
            _grant.restrict(ring, [OP_READ_FIXED, OP_WRITE_FIXED], _worker.FLAG_FIXED_FILE,
                            _worker.FLAG_FIXED_FILE)
            _grant.enable(ring)
            args.update(params=params.hex(), base=base)
            return Plumbing(kind, None, [], [ring, pool], args, owned)
        ring = own(os.memfd_create("drb-grant-map-ring", os.MFD_CLOEXEC))
        os.ftruncate(ring, _baselines.grant_ring_size(entries))
        efd_req = own(os.eventfd(0, os.EFD_CLOEXEC))
        efd_rsp = own(os.eventfd(0, os.EFD_CLOEXEC))
        args["entries"] = entries
        return Plumbing(kind, ServerSpec(kind=kind, slot_count=slot_count, slot_size=slot_size,
                                         entries=entries),
                        [dev_fd, ring, pool, efd_req, efd_rsp], [ring, pool, efd_req, efd_rsp],
                        args, owned)
    except BaseException:
        for fd in owned:
            os.close(fd)
        raise


def user_end(kind: str, fds: list[int], args: dict):
    """The user end of a baseline from the descriptors `plumb` handed over."""
    n, size, depth = args["slot_count"], args["slot_size"], args["depth"]
    if kind == "socket":
        return _baselines.SocketUser(fds[0], n, size, depth)
    if kind == "direct":
        return _baselines.DirectUser(fds[0], bytes.fromhex(args["params"]), fds[1],
                                     args["base"], n, size, depth)
    if kind == "grant-map":
        return _baselines.GrantMapUser(fds[0], args["entries"], fds[1], n, size, fds[2], fds[3])
    raise BaselineError(f"unknown baseline {kind!r}")


class DriverSide:
    """A running driver side, and the one thread that waits for it: if it
    dies, the user end must not sleep for ever on an eventfd nobody will
    write, so its death wakes the ring (a socket's end sees its peer close
    by itself)."""

    def __init__(self, plumbing: Plumbing, argv: list[str], before_exec=None,
                 stderr: int = procs.NULL):
        self.plumbing = plumbing
        self.proc = procs.spawn_at(argv, plumbing.driver_fds, before_exec=before_exec,
                                   stderr=stderr)
        self.reaper = threading.Thread(target=self._reap, daemon=True)
        self.reaper.start()

    def _reap(self) -> None:
        self.proc.wait()
        with contextlib.suppress(OSError):
            self.plumbing.stop()

    def stop(self, timeout: float = 10) -> int:
        """End it (after the user end is closed); its exit status."""
        self.plumbing.stop()
        self.reaper.join(timeout)
        if self.reaper.is_alive():
            self.proc.kill()
            self.reaper.join()
        return self.proc.returncode


if __name__ == "__main__":
    sys.exit(main())
