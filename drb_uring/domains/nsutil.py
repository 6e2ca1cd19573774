"""Entering a domain: namespaces, cgroup, and the user domain's syscall filter.

Python 3.11 has no os.setns, so setns comes from libc. A process joins a
pid namespace only for its children; to run a program *inside* a domain's
pid namespace we fork once more after setns (see spawn_in).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess

from drb_uring import linux
from drb_uring.domains import cgroup

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
NAMESPACES = (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("net", CLONE_NEWNET),
              ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
AF_PACKET = 17


def setns_all(pid: int) -> None:
    """Join every namespace of `pid` (mount last: it changes what /proc is)."""
    fds = [(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag)
           for name, flag in NAMESPACES]
    try:
        for fd, flag in fds:
            linux.setns(fd, flag, f"setns into {pid}")
    finally:
        for fd, _ in fds:
            os.close(fd)


def deny_packet_sockets() -> None:
    """Install a seccomp filter refusing socket(AF_PACKET, ...) with EPERM.

    The cgroup socket hook runs for AF_INET and AF_INET6 only, so the user
    domain's AF_PACKET rule is a syscall filter, inherited by every child.
    libseccomp builds it: calls made through another architecture's entry
    (i386's int 0x80, x32 numbers) do not match the native arch and are
    killed, so they cannot slip past the rule."""
    import seccomp
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    f.add_rule(seccomp.ERRNO(errno.EPERM), "socket", seccomp.Arg(0, seccomp.EQ, AF_PACKET))
    f.load()        # sets no_new_privs too


def _enter(pid: int, group: str | None, packet_filter: bool, die: bool) -> None:
    """Runs in the forked child before exec (single-threaded)."""
    if die:
        linux.die_with_parent()
    if group:
        cgroup.join(group)
    cwd = os.getcwd()
    setns_all(pid)
    # Joining a mount namespace moves us to its root; keep the caller's
    # directory where the domain has it too (relative paths then work).
    try:
        os.chdir(cwd)
    except OSError:
        pass
    # setns(pid) applies to children only: fork, let the parent wait and pass
    # the exit status on, and let the child go on to exec.
    child = os.fork()
    if child:
        # Close everything, so the pipe subprocess uses to see our exec is
        # closed by the real program's exec, not held open by us. A Ctrl-C
        # is the program's to handle (it is in the same process group); this
        # stand-in only passes its exit status on.
        os.closerange(3, 65536)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    if die:
        linux.die_with_parent()
    if packet_filter:
        deny_packet_sockets()


def spawn_in(pid: int, argv: list[str], *, group: str | None = None, fds=(),
             packet_filter: bool = False, die_with_spawner: bool = False,
             **kw) -> subprocess.Popen:
    """Start argv inside the namespaces of `pid` and the cgroup `group`.

    The returned Popen is an intermediate process in the host's pid
    namespace that lives exactly as long as the program and exits with its
    status; its only child is the program."""
    return subprocess.Popen(argv, pass_fds=list(fds),
                            preexec_fn=lambda: _enter(pid, group, packet_filter,
                                                      die_with_spawner), **kw)


def child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except FileNotFoundError:
        return None
    return int(kids[0]) if kids else None


SYS_OPEN_TREE, SYS_MOVE_MOUNT = 428, 429       # x86_64
OPEN_TREE_CLONE, AT_EMPTY_PATH, MOVE_MOUNT_F_EMPTY_PATH, MNT_DETACH = 1, 0x1000, 0x4, 2
AT_FDCWD = -100


def in_child(pid: int, action) -> str:
    """Run action() in a forked child (which may join pid's namespaces) and
    return what it returned, as text; raise OSError with the child's message
    if it failed. The caller's own namespaces never change."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            out = action() or ""
            os.write(w, b"ok:" + str(out).encode()[:4000])
            os._exit(0)
        except BaseException as e:   # report, never return into the parent's code
            os.write(w, b"error:" + str(e).encode()[:4000])
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not msg.startswith("ok:"):
        raise OSError(msg.removeprefix("error:") or f"helper for pid {pid} failed")
    return msg[3:]


def hostname_of(pid: int) -> str:
    """The host name process `pid` sees (its UTS namespace's)."""
    def action():
        import socket
        fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
        linux.setns(fd, CLONE_NEWUTS, f"setns(uts) into {pid}")
        return socket.gethostname()
    return in_child(pid, action)


def _setns_mnt(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, CLONE_NEWNS, f"setns(mnt) into {pid}")
    finally:
        os.close(fd)


def bind_into(pid: int, src: str, dst: str) -> None:
    """Bind-mount the host's file `src` at `dst` inside pid's mount namespace
    (open_tree clones the mount here; move_mount places it there)."""
    def action():
        fd = linux.syscall(SYS_OPEN_TREE, AT_FDCWD, src.encode(),
                           OPEN_TREE_CLONE | os.O_CLOEXEC, what=f"open_tree {src}")
        _setns_mnt(pid)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "w").close()
        linux.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, dst.encode(),
                      MOVE_MOUNT_F_EMPTY_PATH, what=f"move_mount to {dst}")
    in_child(pid, action)


def unbind_from(pid: int, path: str) -> None:
    def action():
        _setns_mnt(pid)
        linux.libc.umount2(path.encode(), MNT_DETACH)
    try:
        in_child(pid, action)
    except (OSError, FileNotFoundError):
        pass        # the container is gone: so is the mount
