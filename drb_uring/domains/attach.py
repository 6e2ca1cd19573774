"""Containers another runtime started (runc, podman, ...), paired by drb.

drb does to them only what the pair needs, and undoes it at `drb down`:
the user container gets its broker's socket directory at /run/drb/PAIR, and
both get drb's package, read-only, at /run/drb-lib/drb_uring (the worker
runs from it, the user side's programs import the client from it; the
containers provide python3 and liburing). A mount point drb had to make
inside is removed again.

Processes drb starts in such a container (workers, `drb exec`) join all of
its namespaces, its user namespace first, and then confine themselves as
runc confines a domain's processes: root of that user namespace (never of
the host's), no capability, no_new_privs, and the domain seccomp profile.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time

from drb_uring import linux, procs
from drb_uring.domains import cgroup, seccomp
from drb_uring.domains.runtime import ENV, PACKAGE_AT, package_dir
from drb_uring.errors import DrbError

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
# The user namespace first (it grants what joining the others needs), the
# mount namespace last (it changes what paths mean).
NAMESPACES = ("user", "ipc", "uts", "net", "cgroup", "pid", "mnt")
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_CAPSET = 428, 429, 126         # x86_64
OPEN_TREE_CLONE, AT_RECURSIVE, MOVE_MOUNT_F_EMPTY_PATH = 1, 0x8000, 0x4
AT_FDCWD, MNT_DETACH = -100, 2
MS_REMOUNT, MS_RDONLY = 32, 1
PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4


class AttachError(DrbError):
    pass


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
        linux.setns(fd, linux.CLONE_NEWUTS, f"setns(uts) into {pid}")
        return socket.gethostname()
    return in_child(pid, action)


def _setns_mnt(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        linux.setns(fd, CLONE_NEWNS, f"setns(mnt) into {pid}")
    finally:
        os.close(fd)


def child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except FileNotFoundError:
        return None
    return int(kids[0]) if kids else None


# The kernel's initial user and pid namespaces have fixed inode numbers
# (PROC_USER_INIT_INO, PROC_PID_INIT_INO); the host's mount namespace is
# the one drb's daemon started in (it makes a private one of its own).
HOST_NS = {"user": 0xEFFFFFFD, "pid": 0xEFFFFFFC,
           "mnt": os.stat("/proc/self/ns/mnt").st_ino}


def _host_shared(pid: int) -> list[str]:
    """The namespaces (user, pid, mnt) pid shares with the host."""
    out = []
    for ns, ino in HOST_NS.items():
        try:
            if os.stat(f"/proc/{pid}/ns/{ns}").st_ino == ino:
                out.append(ns)
        except OSError:
            pass
    return out


def check_container(role: str, pid: int, others: list[str],
                    allow_host_userns: bool = False) -> str:
    """The container's cgroup v2 group, after checking that drb may put a
    policy on it: its own, not the root, not drb's, not the other side's;
    and that it is a container at all: not in the host's user, pid or mount
    namespace (where a process drb starts in it would be host root, see the
    host's processes, or mount on the host), unless `allow_host_userns`."""
    if not os.path.exists(f"/proc/{pid}"):
        raise AttachError(f"--attach-{role} {pid}: no such process")
    shared = _host_shared(pid)
    if shared and not allow_host_userns:
        raise AttachError(f"--attach-{role} {pid}: the process is in the host's "
                          f"{', '.join(shared)} namespace{'s' if len(shared) > 1 else ''}: "
                          "drb exec there would run as host root or on the host's own "
                          "mounts. Use a container with its own user namespace (podman "
                          "--userns=auto, runc with uidMappings), or --allow-host-userns")
    group = cgroup.path_of(pid)
    if os.path.realpath(group) == os.path.realpath(cgroup.cgroup2_root()):
        raise AttachError(f"--attach-{role} {pid}: the process is in the root cgroup; "
                          "put the container in a cgroup of its own first")
    if group == cgroup.path_of(os.getpid()):
        raise AttachError(f"--attach-{role} {pid}: the process shares drb's own cgroup")
    if group in others:
        raise AttachError("the user and driver containers share one cgroup")
    return group


def _in_mount_ns(pid: int, action) -> str:
    """action() in a child that joined pid's mount namespace (at its root)."""
    def run():
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        linux.setns(fd, CLONE_NEWNS, f"setns(mnt) into {pid}")
        os.chdir("/")
        return action()
    return in_child(pid, run)


def bind_into(pid: int, src: str, dst: str, readonly: bool, under: str = "") -> list[str]:
    """Mount the host's directory `src` at `dst` in pid's mount namespace
    (open_tree clones it here, move_mount places it there). Returns the
    directories that had to be made for it, to be removed by unbind().

    `under`: the container's root directory as its mount namespace sees it
    now, for a container caught before pivot_root (an OCI createRuntime
    hook): the mount goes to under/dst, which is dst once the root moves
    there; what is returned is as the container will see it."""
    owner = root_host_id(pid)
    under = under.rstrip("/")

    def action():
        tree = linux.syscall(SYS_OPEN_TREE, AT_FDCWD, src.encode(),
                             OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC,
                             what=f"open_tree {src}")
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        linux.setns(fd, CLONE_NEWNS, f"setns(mnt) into {pid}")
        os.chdir("/")
        # What is made inside belongs to the container's root: a file
        # system of its user namespace takes no owner it cannot map.
        linux.libc.setfsgid(owner)
        linux.libc.setfsuid(owner)
        made, path = [], under or "/"
        for part in dst.strip("/").split("/"):
            path = os.path.join(path, part)
            # Under a root that has not moved yet, a link in the image
            # would lead out of it, onto the host's own directories.
            if under and os.path.islink(path):
                raise OSError(f"the container's {path[len(under):]} is a symbolic link; "
                              "drb follows none there")
            if not os.path.isdir(path):
                os.mkdir(path, 0o755)
                made.append(path[len(under):])
        linux.libc.setfsuid(0)
        linux.libc.setfsgid(0)
        linux.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, (under + dst).encode(),
                      MOVE_MOUNT_F_EMPTY_PATH, what=f"move_mount to {dst}")
        if readonly:
            linux.mount(None, under + dst, None, linux.MS_BIND | MS_REMOUNT | MS_RDONLY)
        return ":".join(made)
    out = in_child(pid, action)
    return [p for p in out.split(":") if p]


def unbind(pid: int, dst: str, made: list[str]) -> None:
    """Undo bind_into: unmount, and remove the directories it made."""
    def action():
        linux.libc.umount2(dst.encode(), MNT_DETACH)
        for path in reversed(made):
            try:
                os.rmdir(path)
            except OSError:
                pass
        return ""
    try:
        _in_mount_ns(pid, action)
    except OSError:
        pass        # the container is gone, and its mounts with it


MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


def hide_others_in_proc(pid: int) -> None:
    """Remount pid's /proc so that a process sees in it only the processes
    it may trace (hidepid=invisible; runc does not pass the option on)."""
    def action():
        linux.mount(None, "/proc", None, MS_REMOUNT | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "hidepid=invisible")
        return ""
    _in_mount_ns(pid, action)


def share_package(pid: int, under: str = "") -> list[str]:
    """drb's package, read-only, where a worker imports it from."""
    return bind_into(pid, package_dir(), f"{PACKAGE_AT}/drb_uring", readonly=True,
                     under=under)


def _drop_capabilities() -> None:
    for cap in range(64):
        linux.libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)     # past the last one: EINVAL
    hdr = ctypes.create_string_buffer(struct.pack("<Ii", 0x20080522, 0))   # v3, this process
    data = ctypes.create_string_buffer(24)                                 # all sets empty
    linux.check(linux.libc.syscall(SYS_CAPSET, hdr, data), "capset")
    linux.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _join(pid: int, profile: dict, uid: int = 0) -> None:
    """In the child, before exec: become a process of container `pid`,
    confined. A fork in the middle makes the pid namespace count; the first
    child stays behind, passing the program's exit status on."""
    ns = {t: os.open(f"/proc/{pid}/ns/{t}", os.O_RDONLY | os.O_CLOEXEC) for t in NAMESPACES}
    with open(f"/proc/{pid}/cgroup") as f:
        groups = [line.strip().split(":", 2) for line in f if line.strip()]
    me = str(os.getpid())
    for _, controllers, path in groups:
        root = cgroup.cgroup2_root() if not controllers else \
            os.path.join("/sys/fs/cgroup", controllers.replace("name=", ""))
        procs_file = os.path.join(root, path.lstrip("/"), "cgroup.procs")
        if os.path.exists(procs_file):
            with open(procs_file, "w") as f:
                f.write(me)
    for t in NAMESPACES:
        # A container may share some namespaces with us (the host's user
        # namespace, say): joining one we are in is an error.
        if os.fstat(ns[t]).st_ino != os.stat(f"/proc/self/ns/{t}").st_ino:
            linux.setns(ns[t], 0, f"setns({t}) into {pid}")
        os.close(ns[t])
    child = os.fork()
    if child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)     # the program's to handle
        os.closerange(0, 1024)
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
    parent = os.getppid()            # as this pid namespace sees it (0: outside it)
    os.chdir("/")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)      # of the container's user namespace only
    # After the change of credentials, which clears the parent-death signal.
    linux.die_with_parent()
    if os.getppid() != parent:
        os._exit(1)                  # the stand-in is gone already
    _drop_capabilities()
    seccomp.load(profile)            # and no_new_privs


def spawn_joined(pid: int, argv: list[str], fds=(), *, role: str,
                 deny: tuple[str, ...] = (), uid: int = 0, **stdio) -> procs.Child:
    """Start argv in container `pid`, confined as a domain of `role`, with
    fds[i] at 3 + i, as user `uid` of the container (its root by default).
    The returned process stands in for it on the host and exits with its
    status; the program itself is its only child."""
    profile = seccomp.domain_profile(role, deny)
    env = dict(e.split("=", 1) for e in ENV)
    return procs.spawn_at(argv, fds, env=env, before_exec=lambda: _join(pid, profile, uid),
                          **stdio)


def spawn_in(pid: int, argv: list[str], fds, out: int, **how):
    """spawn_joined (`how`: role, deny, uid) with output to `out`: (the
    stand-in, the program's own pid once it shows, else the stand-in's)."""
    child = spawn_joined(pid, argv, fds, stdout=out, stderr=out, **how)
    for _ in range(2000):
        kid = child_of(child.pid)
        if kid or child.poll() is not None:
            return child, kid or child.pid
        time.sleep(0.005)
    return child, child.pid


def host_uid(pid: int, uid: int) -> int:
    """The host uid that user `uid` of pid's user namespace is."""
    with open(f"/proc/{pid}/uid_map") as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if inside <= uid < inside + count:
                return outside + uid - inside
    raise AttachError(f"process {pid}: user {uid} of its user namespace is no host user")


def root_host_id(pid: int) -> int:
    """The host uid that root of pid's user namespace is (0 if the
    container shares the host's user namespace)."""
    with open(f"/proc/{pid}/uid_map") as f:
        for line in f:
            inside, outside, _count = (int(x) for x in line.split())
            if inside == 0:
                return outside
    raise AttachError(f"process {pid}: root of its user namespace is no host user")
