"""Entering a domain: namespaces, cgroup, and the user domain's syscall filter.

Python 3.11 has no os.setns, so setns comes from libc. A process joins a
pid namespace only for its children; to run a program *inside* a domain's
pid namespace we fork once more after setns (see spawn_in).
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess

from drb_uring import cgroup

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
NAMESPACES = (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("net", CLONE_NEWNET),
              ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def setns_all(pid: int) -> None:
    """Join every namespace of `pid` (mount last: it changes what /proc is)."""
    fds = [(os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), flag)
           for name, flag in NAMESPACES]
    try:
        for fd, flag in fds:
            if _libc.setns(fd, flag) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"setns into {pid}: {os.strerror(e)}")
    finally:
        for fd, _ in fds:
            os.close(fd)


def die_with_parent(sig: int = 9) -> None:
    _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def deny_packet_sockets() -> None:
    """Install a seccomp filter refusing socket(AF_PACKET, ...) with EPERM.

    The cgroup socket hook runs for AF_INET and AF_INET6 only, so the user
    domain's AF_PACKET rule is a syscall filter, inherited by every child."""
    AF_PACKET = 17
    NR_SOCKET = 41            # x86_64
    AUDIT_ARCH_X86_64 = 0xC000003E
    ld, jeq, ret = 0x20, 0x15, 0x06
    prog = [
        (ld, 0, 0, 4),                       # A = arch
        (jeq, 1, 0, AUDIT_ARCH_X86_64),
        (ret, 0, 0, 0x7FFF0000),             # other arch: allow (not ours to judge)
        (ld, 0, 0, 0),                       # A = syscall nr
        (jeq, 0, 3, NR_SOCKET),
        (ld, 0, 0, 16),                      # A = args[0] (low 32 bits)
        (jeq, 0, 1, AF_PACKET),
        (ret, 0, 0, 0x00050000 | 1),         # SECCOMP_RET_ERRNO | EPERM
        (ret, 0, 0, 0x7FFF0000),             # SECCOMP_RET_ALLOW
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog)
    ul = ctypes.c_ulong
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, ul(1), ul(0), ul(0), ul(0)) != 0 or \
            _libc.prctl(PR_SET_SECCOMP, ul(SECCOMP_MODE_FILTER),
                        ctypes.c_void_p(ctypes.addressof(fbuf)), ul(0), ul(0)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"installing the socket filter: {os.strerror(e)}")


def _enter(pid: int, group: str | None, packet_filter: bool, die: bool) -> None:
    """Runs in the forked child before exec (single-threaded)."""
    if die:
        die_with_parent()
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
        # closed by the real program's exec, not held open by us.
        os.closerange(3, 65536)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    if die:
        die_with_parent()
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


def _in_mount_ns(pid: int, action) -> None:
    """Run action() in a forked child that joined pid's mount namespace;
    raise OSError with the child's message if it failed."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        try:
            action()
            os._exit(0)
        except BaseException as e:   # report, never return into the parent's code
            os.write(w, str(e).encode()[:4000])
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        msg = f.read().decode()
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(msg or f"helper for pid {pid} failed")


def _setns_mnt(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNS) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns(mnt) into {pid}: {os.strerror(e)}")
    finally:
        os.close(fd)


def bind_into(pid: int, src: str, dst: str) -> None:
    """Bind-mount the host's file `src` at `dst` inside pid's mount namespace
    (open_tree clones the mount here; move_mount places it there)."""
    def action():
        L = ctypes.c_long
        fd = _libc.syscall(L(SYS_OPEN_TREE), L(AT_FDCWD), src.encode(),
                           L(OPEN_TREE_CLONE | os.O_CLOEXEC))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"open_tree {src}: {os.strerror(e)}")
        _setns_mnt(pid)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "w").close()
        if _libc.syscall(L(SYS_MOVE_MOUNT), L(fd), b"", L(AT_FDCWD), dst.encode(),
                         L(MOVE_MOUNT_F_EMPTY_PATH)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"move_mount to {dst}: {os.strerror(e)}")
    _in_mount_ns(pid, action)


def unbind_from(pid: int, path: str) -> None:
    def action():
        _setns_mnt(pid)
        _libc.umount2(path.encode(), MNT_DETACH)
    try:
        _in_mount_ns(pid, action)
    except (OSError, FileNotFoundError):
        pass        # the container is gone: so is the mount
