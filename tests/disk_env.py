"""What the tests of a pair's disk (drb up --disk) share: the disk's server
as drb status shows it, the FUSE connections a domain has, the host's view
of every FUSE connection, and a way into a domain with a descriptor."""
import json
import os
import subprocess

from pair_env import drb

from drb_uring import linux
from drb_uring.disk import mount as M

SYS_PIDFD_GETFD = 438


def status(name: str) -> dict:
    return json.loads(drb("status", name, "--json").stdout)


def disk_of(name: str, role: str = "user0") -> dict:
    return status(name)["domains"][role]["disk"]


def cgroup_pids(st: dict, role: str) -> set[int]:
    path = os.path.join(st["domains"][role]["cgroup"], "cgroup.procs")
    with open(path) as f:
        return {int(x) for x in f.read().split()}


def server_pid(name: str, role: str = "user0") -> int:
    """The disk server's host pid, as drb status says, checked to be a
    process of the user domain's cgroup running drb_uring.disk.server."""
    st = status(name)
    pid = st["domains"][role]["disk"]["server_pid"]
    assert pid in cgroup_pids(st, role), (pid, cgroup_pids(st, role))
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"drb_uring.disk.server" in f.read()
    return pid


def domain_pid(name: str, role: str = "user0") -> int:
    return status(name)["domains"][role]["pid"]


def fuse_conns_of(pid: int) -> set[int]:
    """The FUSE connections mounted in pid's mount namespace (their names
    under /sys/fs/fuse/connections), from its mountinfo: nothing is opened
    inside a FUSE mount."""
    return {(m["major"] << 20) | m["minor"] for m in M.mountinfo(pid)
            if m["fstype"].split(".")[0] in ("fuse", "fuseblk")}


def host_fuse_conns() -> set[int]:
    """Every FUSE connection the kernel has, from fusectl, mounted in a
    forked child's private mount namespace (nothing is mounted here)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:      # pragma: no cover
        os.close(r)
        try:
            linux.private_mount_namespace()
            linux.mount("fusectl", M.FUSECTL, "fusectl", 0)
            os.write(w, " ".join(os.listdir(M.FUSECTL)).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    os.waitpid(pid, 0)
    return {int(x) for x in out.split()}


def pidfd_getfd(pid: int, fd: int) -> int:
    """A copy of process pid's descriptor fd (host root may take one)."""
    pidfd = os.pidfd_open(pid)
    try:
        return linux.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0, what="pidfd_getfd")
    finally:
        os.close(pidfd)


def spawn_in_domain(name: str, role: str, argv: list[str], fds=(), **stdio):
    """argv inside a running pair's domain, confined as the domain's own
    processes are (its namespaces, cgroup, seccomp profile, no capability),
    with fds[i] as its descriptor 3 + i."""
    from drb_uring.domains import attach
    st = status(name)
    return attach.spawn_joined(st["domains"][role]["pid"], argv, fds, role="user",
                               deny=tuple(st["deny"]), **stdio)


def in_user(name: str, role: str, code: str, *args, timeout=60, check=True, **kw):
    """python3 -c CODE inside a user domain."""
    p = subprocess.run([drb_path(), "exec", name, role, "--", "python3", "-c", code, *args],
                       capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode:
        raise AssertionError(f"in {role}: exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def sh(name: str, role: str, script: str, timeout=120, check=True):
    p = subprocess.run([drb_path(), "exec", name, role, "--", "sh", "-c", script],
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
        raise AssertionError(f"in {role}: {script!r} exited {p.returncode}\n{p.stdout}\n"
                             f"{p.stderr[-3000:]}")
    return p


def drb_path() -> str:
    from pair_env import DRB
    return DRB


def read_at(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        return os.pread(f.fileno(), n, off)
