"""Processes that live inside a domain.

``python -m drb_uring.domains.init {"command": "init", ...}`` is PID 1 of a domain made by
``unshare``: it names the host, shapes the mount namespace (the user domain
gets a private /run/drb holding only its pair's monitor socket, a /dev with
only harmless character devices, and no view of the backing file), reports
ready, and reaps children until told to stop; when it exits the kernel ends
every process of the domain.

``python -m drb_uring.domains.init {"command": "register", ...}`` runs inside the driver domain:
it opens the device there and hands the fd to the monitor, once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import socket
import sys

from drb_uring import linux, procs, protocol
from drb_uring.domains import nsutil
from drb_uring.spec import Spec, SpecError

MS_BIND, MS_RDONLY, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NOEXEC = 4096, 1, 16384, 1 << 18, 2, 8
HARMLESS_DEVS = ("null", "zero", "full", "random", "urandom", "tty")


def mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    linux.check(linux.libc.mount(src.encode(), dst.encode(),
                                 fstype.encode() if fstype else None, flags,
                                 data.encode() if data else None), f"mount {src} on {dst}")


def shape_user_mounts(socket_path: str, hide: list[str]) -> None:
    """The user domain's view: its monitor socket under a private /run/drb,
    a minimal /dev, and the given paths covered by empty directories."""
    mount("none", "/", None, MS_REC | MS_PRIVATE)
    # Keep a handle on the socket before /run/drb is covered.
    sock_fd = os.open(socket_path, os.O_PATH | os.O_CLOEXEC)
    dev_fds = {n: os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC) for n in HARMLESS_DEVS
               if os.path.exists(f"/dev/{n}")}
    for path in hide:
        if os.path.isdir(path):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    mount("tmpfs", "/run/drb", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    os.makedirs(os.path.dirname(socket_path), exist_ok=True)
    open(socket_path, "w").close()
    mount(f"/proc/self/fd/{sock_fd}", socket_path, None, MS_BIND)
    os.close(sock_fd)
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "size=64k,mode=0755")
    for name, fd in dev_fds.items():
        open(f"/dev/{name}", "w").close()
        mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    os.makedirs("/dev/shm", exist_ok=True)
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID, "size=16m")


@dataclasses.dataclass(frozen=True)
class InitSpec(Spec):
    command: str        # "init"
    role: str
    hostname: str
    socket: str
    ready_fd: int
    hide: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        if self.command != "init" or self.role not in ("user", "driver"):
            raise SpecError("bad init spec")


@dataclasses.dataclass(frozen=True)
class RegisterSpec(Spec):
    command: str        # "register"
    sock_fd: int        # inherited: the broker's end is in the pair's daemon
    device: str
    o_direct: bool = False

    def check(self) -> None:
        if self.command != "register":
            raise SpecError("bad register spec")


def init(a: InitSpec) -> int:
    socket.sethostname(a.hostname)
    if a.role == "user":
        shape_user_mounts(a.socket, a.hide or [])
        nsutil.deny_packet_sockets()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.signal(signal.SIGCHLD, lambda *_: None)
    os.write(a.ready_fd, b"ready\n")
    os.close(a.ready_fd)
    while not stop:
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:   # reap orphans, as PID 1 must
                pass
        except ChildProcessError:
            pass
        select.select([], [], [], 0.5)
    return 0


def register(a: RegisterSpec) -> int:
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if a.o_direct else 0)
    try:
        fd = os.open(a.device, flags)
    except OSError as e:
        print(f"the driver domain cannot open {a.device}: {e.strerror}", file=sys.stderr)
        return 1
    s = socket.socket(fileno=a.sock_fd)
    try:
        protocol.request(s, {"op": "register-device"}, [fd])
    except (OSError, protocol.ProtocolError) as e:
        print(f"registering the device with the broker failed: {e}", file=sys.stderr)
        return 1
    finally:
        os.close(fd)
        s.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = json.loads(argv[0]).get("command") if len(argv) == 1 else None
    except (ValueError, AttributeError):
        command = None
    if command == "init":
        return init(procs.spec_from_argv(InitSpec, argv))
    return register(procs.spec_from_argv(RegisterSpec, argv))


if __name__ == "__main__":
    sys.exit(main())
