"""Mounting a FUSE connection into another process's mount namespace, and
taking it away again, as the trusted side (root on the host).

Nothing here ever looks inside a FUSE mount: a server that is frozen or
gone would block the caller for good. The connection's number (its name
under /sys/fs/fuse/connections) comes from the mount's device number in
/proc/PID/mountinfo; aborting goes through fusectl; detaching is a lazy
umount after the abort, when nothing can block any more.

A mount point inside a domain is created (or checked) with the domain's
own host uid as the file-system uid: the domain's /tmp and /dev belong to
its user namespace, where host root has no mapping, and creating as that
uid means a symlink the domain planted can only lead where the domain could
write itself. The mount is then attached to the very file descriptor that
was created or checked (the new mount API, ``move_mount`` onto an fd), so
the path cannot be swapped between the check and the mount.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from dataclasses import dataclass

from drb_uring import linux

FUSECTL = "/sys/fs/fuse/connections"

# x86_64 system call numbers of the new mount API (Linux 5.2).
SYS_MOVE_MOUNT, SYS_FSOPEN, SYS_FSCONFIG, SYS_FSMOUNT = 429, 430, 431, 432
FSOPEN_CLOEXEC = 1
FSCONFIG_SET_FLAG, FSCONFIG_SET_STRING, FSCONFIG_CMD_CREATE = 0, 1, 6
FSMOUNT_CLOEXEC = 1
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 1, 2, 4
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40

SOURCE = "drb-disk"
CLONE_NEWUSER = 0x10000000


@dataclass(frozen=True)
class Mount:
    """A FUSE mount the trusted side made: where, and which connection."""
    pid: int            # a process whose mount namespace holds it
    path: str           # as that process sees it from its root
    major: int
    minor: int

    @property
    def conn(self) -> int:
        """The connection's name under /sys/fs/fuse/connections: the
        superblock's dev_t as the kernel encodes it (MKDEV)."""
        return (self.major << 20) | self.minor


def open_device() -> int:
    """A new FUSE connection's descriptor (close-on-exec)."""
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo(pid: int | str = "self") -> list[dict]:
    """The mounts of `pid`'s namespace as it sees them (paths from its root)."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            a, b = left.split(), right.split()
            major, minor = (int(x) for x in a[2].split(":"))
            out.append({"id": int(a[0]), "parent": int(a[1]), "major": major, "minor": minor,
                        "root": _unescape(a[3]), "mountpoint": _unescape(a[4]),
                        "fstype": b[0], "source": _unescape(b[1]) if len(b) > 1 else ""})
    return out


def find(pid: int, path: str) -> Mount:
    """The FUSE mount on `path` in `pid`'s namespace (the top one if several)."""
    hits = [m for m in mountinfo(pid)
            if m["mountpoint"] == path and m["fstype"].split(".")[0] in ("fuse", "fuseblk")]
    if not hits:
        raise FileNotFoundError(errno.ENOENT, f"no FUSE mount on {path} in process {pid}")
    m = hits[-1]
    return Mount(pid, path, m["major"], m["minor"])


def _fsconfig(fsfd: int, key: str, value: str | None) -> None:
    if value is None:
        linux.syscall(SYS_FSCONFIG, fsfd, FSCONFIG_SET_FLAG, key.encode(), None, 0,
                      what=f"fsconfig {key}")
    else:
        linux.syscall(SYS_FSCONFIG, fsfd, FSCONFIG_SET_STRING, key.encode(), value.encode(), 0,
                      what=f"fsconfig {key}={value}")


def _attach(target_fd: int, fuse_fd: int, rootmode: int, uid: int, gid: int, *,
            allow_other: bool, default_permissions: bool, read_only: bool,
            max_read: int | None, subtype: str | None, source: str) -> None:
    """Mount connection `fuse_fd` onto the file or directory `target_fd`
    refers to, in this process's mount namespace."""
    fsfd = linux.syscall(SYS_FSOPEN, b"fuse", FSOPEN_CLOEXEC, what="fsopen fuse")
    try:
        _fsconfig(fsfd, "source", source)
        _fsconfig(fsfd, "fd", str(fuse_fd))
        _fsconfig(fsfd, "rootmode", f"{rootmode:o}")
        _fsconfig(fsfd, "user_id", str(uid))
        _fsconfig(fsfd, "group_id", str(gid))
        if allow_other:
            _fsconfig(fsfd, "allow_other", None)
        if default_permissions:
            _fsconfig(fsfd, "default_permissions", None)
        if max_read:
            _fsconfig(fsfd, "max_read", str(max_read))
        if subtype:
            _fsconfig(fsfd, "subtype", subtype)
        linux.syscall(SYS_FSCONFIG, fsfd, FSCONFIG_CMD_CREATE, None, None, 0,
                      what="fsconfig create (fuse)")
        attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (MOUNT_ATTR_RDONLY if read_only else 0)
        mfd = linux.syscall(SYS_FSMOUNT, fsfd, FSMOUNT_CLOEXEC, attrs, what="fsmount")
    finally:
        os.close(fsfd)
    try:
        linux.syscall(SYS_MOVE_MOUNT, mfd, b"", target_fd, b"",
                      MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH, what="move_mount")
    finally:
        os.close(mfd)


def _setfs(uid: int, gid: int) -> None:
    # setfsuid/setfsgid report no error; they return the previous value.
    linux.libc.setfsgid(gid)
    linux.libc.setfsuid(uid)
    if linux.libc.setfsuid(-1) != uid or linux.libc.setfsgid(-1) != gid:
        raise PermissionError(errno.EPERM, f"setfsuid/setfsgid to {uid}:{gid}")


def pidfd_pid(pidfd: int) -> int:
    """The pid a pidfd refers to, or -1 once that process has exited."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise OSError(errno.EBADF, f"fd {pidfd} is not a pidfd")


@dataclass(frozen=True)
class WithFd:
    """What fn returns to in_namespace to hand a descriptor back too."""
    value: object
    fd: int


def other_userns(pid: int) -> bool:
    """Whether `pid` lives in another user namespace than this process."""
    return os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino


def inside_id(pid: int, host_id: int, which: str = "uid_map") -> int:
    """The id of pid's user namespace that host id `host_id` is."""
    with open(f"/proc/{pid}/{which}") as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if outside <= host_id < outside + count:
                return inside + host_id - outside
    raise PermissionError(errno.EPERM, f"host id {host_id} has no id in process {pid}'s "
                                       "user namespace")


def in_namespace(pid: int, fn, *args, pidfd: int | None = None, userns: bool = False,
                 **kwargs):
    """Run fn(*args, **kwargs) in a child that entered `pid`'s mount
    namespace and root (with `userns`, its user namespace first); return
    its JSON result (and, when fn returns WithFd, the descriptor: a pair)
    or raise its OSError. setns needs a single-threaded caller, hence the
    fork.

    With `pidfd` (a process that asked over a socket: SO_PEERPIDFD), the
    namespace is checked to be that very process's: it is still alive after
    its /proc entries were opened, so the pid was not reused meanwhile."""
    ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    user = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC) \
        if userns and other_userns(pid) else -1
    if pidfd is not None and pidfd_pid(pidfd) != pid:
        for fd in (ns, root, user):
            if fd >= 0:
                os.close(fd)
        raise ProcessLookupError(errno.ESRCH, f"process {pid} went away")
    r, w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds: list[int] = []
    try:
        child = os.fork()
        if child == 0:     # pragma: no cover (runs in the child)
            r.close()
            given = []
            try:
                if user >= 0:
                    # First: what the child opens and mounts from here on
                    # belongs to that namespace (and it has its capabilities).
                    linux.setns(user, CLONE_NEWUSER, f"setns into the user namespace of {pid}")
                linux.setns(ns, linux.CLONE_NEWNS, f"setns into the mount namespace of {pid}")
                os.fchdir(root)
                os.chroot(".")
                os.chdir("/")
                out = fn(*args, **kwargs)
                if isinstance(out, WithFd):
                    out, given = out.value, [out.fd]
                res = {"ok": out}
            except OSError as e:
                res = {"errno": e.errno or errno.EIO, "error": str(e)}
            except BaseException as e:   # noqa: BLE001 - reported to the parent
                res = {"errno": errno.EIO, "error": f"{type(e).__name__}: {e}"}
            try:
                socket.send_fds(w, [json.dumps(res).encode()], given)
            finally:
                os._exit(0)
        w.close()
        data = b""
        while True:
            chunk, got, _flags, _addr = socket.recv_fds(r, 65536, 4)
            fds += got
            if not chunk:
                break
            data += chunk
        os.waitpid(child, 0)
    finally:
        r.close()
        w.close()
        for fd in (ns, root, user):
            if fd >= 0:
                os.close(fd)
    try:
        if not data:
            raise OSError(errno.EIO, f"the helper in the namespace of {pid} died")
        res = json.loads(data)
        if "errno" in res:
            raise OSError(res["errno"], res["error"])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return (res["ok"], fds[0]) if fds else res["ok"]


def _mount_file_here(path, fuse_fd, uid, gid, mode, opts):
    _setfs(uid, gid)
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, mode)
        except FileExistsError:
            fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    finally:
        _setfs(0, 0)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
            raise PermissionError(errno.EPERM, f"{path} is not a regular file owned by {uid}")
        _attach(fd, fuse_fd, stat.S_IFREG, uid, gid, **opts)
    finally:
        os.close(fd)
    return path


def _mount_dir_here(path, fuse_fd, uid, gid, opts):
    _setfs(uid, gid)
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    finally:
        _setfs(0, 0)
    try:
        st = os.fstat(fd)
        if uid != 0 and st.st_uid != uid:
            raise PermissionError(errno.EPERM, f"{path} is not owned by {uid}")
        _attach(fd, fuse_fd, stat.S_IFDIR, uid, gid, **opts)
    finally:
        os.close(fd)
    return path


def _open_and_mount_dir_here(path, dev_dir, uid, gid, opts):
    """A new connection, opened here (in the user namespace entered: the
    kernel mounts a connection only in the namespace that opened it), and
    mounted on `path`."""
    fd = os.open("fuse", os.O_RDWR | os.O_CLOEXEC, dir_fd=dev_dir)
    try:
        _mount_dir_here(path, fd, uid, gid, opts)
    except BaseException:
        os.close(fd)
        raise
    return WithFd(path, fd)


def _opts(allow_other, default_permissions, read_only, max_read, subtype, source):
    return {"allow_other": allow_other, "default_permissions": default_permissions,
            "read_only": read_only, "max_read": max_read, "subtype": subtype, "source": source}


def mount_file(fuse_fd: int, pid: int, path: str, uid: int, gid: int, *, mode: int = 0o600,
               allow_other: bool = True, default_permissions: bool = True,
               read_only: bool = False, max_read: int | None = None,
               subtype: str | None = None, source: str = SOURCE) -> Mount:
    """Mount connection `fuse_fd` on the regular file `path` in `pid`'s
    mount namespace (rootmode 100000), creating the file as uid:gid if it is
    not there; nosuid, nodev. The file shows as uid:gid inside (user_id,
    group_id). With default_permissions the kernel checks the file's mode
    itself, so allow_other lets the namespace's other users in only as the
    mode says."""
    if not path.startswith("/"):
        raise ValueError(f"{path} is not absolute")
    in_namespace(pid, _mount_file_here, path, fuse_fd, uid, gid, mode,
                 _opts(allow_other, default_permissions, read_only, max_read, subtype, source))
    return find(pid, path)


def mount_dir(fuse_fd: int, pid: int, path: str, uid: int, gid: int, *,
              allow_other: bool = False, default_permissions: bool = False,
              read_only: bool = False, max_read: int | None = None,
              subtype: str | None = None, source: str = SOURCE,
              pidfd: int | None = None) -> Mount:
    """Mount connection `fuse_fd` on the directory `path` in `pid`'s mount
    namespace (rootmode 40000), which must exist and belong to uid (what
    fusermount asks of an unprivileged user); nosuid, nodev."""
    if not path.startswith("/"):
        raise ValueError(f"{path} is not absolute")
    in_namespace(pid, _mount_dir_here, path, fuse_fd, uid, gid,
                 _opts(allow_other, default_permissions, read_only, max_read, subtype, source),
                 pidfd=pidfd)
    return find(pid, path)


def mount_dir_as(pid: int, path: str, uid: int, gid: int, *, pidfd: int | None = None,
                 allow_other: bool = False, default_permissions: bool = False,
                 read_only: bool = False, max_read: int | None = None,
                 subtype: str | None = None, source: str = SOURCE) -> tuple[Mount, int]:
    """mount_dir for a process of another user namespace (a domain's): the
    connection is opened and mounted in pid's user namespace, so its
    requests carry that namespace's ids and its files' owners are the
    domain's own (uid 0 is the domain's root, whatever host ids the domain
    has this time). `uid`, `gid` are host ids. Returns the mount and the
    connection's descriptor (the caller's to close)."""
    if not path.startswith("/"):
        raise ValueError(f"{path} is not absolute")
    inner = other_userns(pid)
    if inner:
        uid, gid = inside_id(pid, uid), inside_id(pid, gid, "gid_map")
    dev = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _path, fd = in_namespace(pid, _open_and_mount_dir_here, path, dev, uid, gid,
                                 _opts(allow_other, default_permissions, read_only, max_read,
                                       subtype, source), pidfd=pidfd, userns=inner)
    finally:
        os.close(dev)
    try:
        return find(pid, path), fd
    except BaseException:
        os.close(fd)
        raise


def fusectl_mounted() -> bool:
    return any(m["fstype"] == "fusectl" and m["mountpoint"] == FUSECTL for m in mountinfo())


def ensure_fusectl() -> None:
    """fusectl is not mounted on a fresh machine; aborting needs it."""
    if not fusectl_mounted():
        linux.mount("fusectl", FUSECTL, "fusectl", 0)


def abort(conn: int) -> bool:
    """Abort connection `conn`: every request fails with ENOTCONN (or
    ECONNABORTED), every process waiting on it wakes, and the server's next
    read returns ECONNABORTED. False if there is no such connection."""
    ensure_fusectl()
    try:
        fd = os.open(f"{FUSECTL}/{conn}/abort", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
    return True


def waiting(conn: int) -> int:
    """Requests of connection `conn` not yet answered (fusectl's count)."""
    ensure_fusectl()
    with open(f"{FUSECTL}/{conn}/waiting") as f:
        return int(f.read())


def _detach_here(path):
    linux.check(linux.libc.umount2(path.encode(), linux.MNT_DETACH), f"umount2 {path}")
    return path


def detach(pid: int, path: str, *, pidfd: int | None = None) -> None:
    """Lazily detach the mount on `path` in `pid`'s namespace."""
    in_namespace(pid, _detach_here, path, pidfd=pidfd)


def unmount(m: Mount, *, abort_first: bool = True, pidfd: int | None = None) -> None:
    """Take a mount away whatever state its server is in: abort the
    connection (nothing can block after that), then detach it lazily."""
    if abort_first:
        abort(m.conn)
    try:
        current = find(m.pid, m.path)
    except (FileNotFoundError, ProcessLookupError):
        return
    if (current.major, current.minor) == (m.major, m.minor):
        detach(m.pid, m.path, pidfd=pidfd)


__all__ = ["Mount", "WithFd", "open_device", "mountinfo", "find", "mount_file", "mount_dir",
           "mount_dir_as", "in_namespace", "other_userns", "inside_id", "ensure_fusectl",
           "abort", "waiting", "detach", "unmount", "FUSECTL"]
