"""The Linux calls Python's os module lacks, through one libc handle.

Every call checks its result and raises OSError with the errno the call
itself set, naming what failed.
"""

from __future__ import annotations

import ctypes
import os
import select

libc = ctypes.CDLL(None, use_errno=True)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


def readable(fd: int, timeout: float = 0) -> bool:
    """Whether `fd` polls readable within `timeout` seconds (a pidfd: its
    process has exited). poll(2), not select(2): a descriptor may be above
    FD_SETSIZE in a process that holds many."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


def check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def syscall(nr: int, *args, what: str = "syscall") -> int:
    """A raw system call with integer, bytes or pointer arguments."""
    conv = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return check(libc.syscall(ctypes.c_long(nr), *conv), what)


def die_with_parent(sig: int = 9) -> None:
    """Have the kernel send `sig` to this process when its parent exits.
    Call it in the child; a parent that died before this call left us
    reparented, which the caller should check with os.getppid()."""
    check(libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


PR_SET_DUMPABLE = 4


def not_dumpable() -> None:
    """Make this process's memory and descriptors its own: no other process
    of its user (not even root of its user namespace) may then open its
    /proc/PID/mem, fd, environ and their kin, ptrace it, or read its
    core dump. Only a capability in the host's namespace may."""
    check(libc.prctl(PR_SET_DUMPABLE, ctypes.c_ulong(0), 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def setns(fd: int, nstype: int, what: str = "setns") -> None:
    check(libc.setns(fd, nstype), what)


SYS_STATX = 332            # x86_64
AT_EMPTY_PATH = 0x1000
STATX_DIOALIGN = 0x2000
BLKSSZGET = 0x1268


def dio_alignment(fd: int) -> int:
    """The offset and length alignment O_DIRECT I/O on `fd` needs: a block
    device's logical block size, or what statx reports for a file (its
    file system's rule, e.g. 512 on ext4 over a 512-byte disk)."""
    import fcntl
    import stat
    import struct
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    buf = ctypes.create_string_buffer(256)
    syscall(SYS_STATX, fd, b"", AT_EMPTY_PATH, STATX_DIOALIGN, buf, what="statx")
    mask, = struct.unpack_from("<I", buf, 0)
    mem_align, offset_align = struct.unpack_from("<II", buf, 152)
    if not mask & STATX_DIOALIGN or not offset_align:
        raise OSError(22, "the file system does not say how O_DIRECT I/O must be aligned "
                          "(no STATX_DIOALIGN): it may not support O_DIRECT")
    return max(offset_align, mem_align)


CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
SYS_PIVOT_ROOT = 155       # x86_64
MNT_DETACH = 2


def mount(src: str | None, dst: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    check(libc.mount(src.encode() if src else None, dst.encode(),
                     fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                     data.encode() if data else None), f"mount {src} on {dst}")


def root_is_mount_point() -> bool:
    """False in a chroot whose root directory is not itself a mount."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == "/" for line in f)


def private_mount_namespace() -> None:
    """Move this (single-threaded) process into a new mount namespace in
    which no mount propagates to or from the one it came from.

    Where "/" is a mount point that is one call (make everything private).
    In a chroot whose root is a plain directory it is not: the kernel
    refuses to change the propagation of "/" (and so does every container
    runtime), and a process that joins the namespace with setns() would
    land at the namespace's real root, outside the chroot. There the
    namespace is re-rooted at the chroot (see _reroot)."""
    check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    if not root_is_mount_point():
        _reroot()
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def _reroot() -> None:
    """Make this namespace's root a bind mount of the chroot we are in.

    Only in our own fresh namespace, as root: step out of the chroot to the
    namespace's real root (a chroot(2) elsewhere leaves the working
    directory outside the new root, from where ".." climbs to the top), bind
    the chroot's directory onto itself, and pivot_root(2) into it, which
    also makes it what setns() lands on."""
    cwd = os.getcwd()
    jail = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir("/")
        os.chroot("/proc")
        for _ in range(256):
            os.chdir("..")
        os.chroot(".")
        path = os.readlink(f"/proc/self/fd/{jail}")
    finally:
        os.close(jail)
    mount(None, "/", None, MS_REC | MS_PRIVATE)    # pivot_root refuses shared parents
    mount(path, path, None, MS_BIND | MS_REC)
    os.chdir(path)
    syscall(SYS_PIVOT_ROOT, b".", b".", what="pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "umount2 of the old root")
    os.chdir(cwd if os.path.isdir(cwd) else "/")
