"""cgroup v2 groups for the domains.

The cgroup2 hierarchy is found from /proc/self/mountinfo: on a hybrid
layout (v1 controllers plus a v2 mount, as on this kind of machine) it is
/sys/fs/cgroup/unified, on a unified one /sys/fs/cgroup. Device and socket
policies are cgroup-BPF programs on these groups; the kernel runs them for
every task in the group whatever v1 controllers also exist.
"""

from __future__ import annotations

import os
import time

from drb_uring.errors import DrbError


class CgroupError(DrbError):
    pass


def cgroup2_root() -> str:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return left.split()[4]
    raise CgroupError("no cgroup2 file system is mounted "
                      "(mount -t cgroup2 none /sys/fs/cgroup/unified)")


def path_of(pid: int) -> str:
    """The cgroup v2 directory a process is in."""
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return os.path.join(cgroup2_root(), line[3:].strip().lstrip("/"))
    raise CgroupError(f"process {pid} is in no cgroup v2 group")


def create(path: str) -> None:
    os.makedirs(path, exist_ok=False)


def join(path: str, pid: int = 0) -> None:
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def kill_and_remove(path: str, timeout: float = 5.0) -> None:
    """Kill every process in the group (and below), then remove it."""
    if not os.path.isdir(path):
        return
    for sub in sorted((os.path.join(d, n) for d, ns, _ in os.walk(path) for n in ns),
                      key=len, reverse=True):
        kill_and_remove(sub, timeout)
    kill = os.path.join(path, "cgroup.kill")
    end = time.monotonic() + timeout
    while True:
        if os.path.exists(kill):
            with open(kill, "w") as f:
                f.write("1")
        else:
            for pid in procs(path):
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > end:
                raise CgroupError(f"cannot remove {path}: processes remain {procs(path)}") from None
            time.sleep(0.01)


def procs_below(path: str) -> list[int]:
    """Every process in the group and in the groups below it."""
    out: list[int] = []
    for d, _dirs, _files in os.walk(path):
        out += procs(d)
    return out


def _host_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def holders(path: str, inode: int) -> list[int]:
    """The processes of the group (and below) that hold an io_uring with
    this inode open (io_uring gives each ring an inode of its own)."""
    out = []
    for pid in procs_below(path):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.stat(f"/proc/{pid}/fd/{fd}").st_ino == inode and os.readlink(
                        f"/proc/{pid}/fd/{fd}") == "anon_inode:[io_uring]":
                    out.append(pid)
                    break
            except OSError:
                continue
    return out


def kill_user(path: str, host_uid: int, timeout: float = 5.0) -> int:
    """SIGKILL every process of the group (and below) whose real user is
    `host_uid`, until none is left (what they fork meanwhile too).
    Returns how many were killed."""
    killed = 0
    end = time.monotonic() + timeout
    while True:
        mine = [pid for pid in procs_below(path) if _host_uid(pid) == host_uid]
        if not mine:
            return killed
        for pid in mine:
            try:
                os.kill(pid, 9)
                killed += 1
            except ProcessLookupError:
                pass
        if time.monotonic() > end:
            raise CgroupError(f"processes of user {host_uid} in {path} survive SIGKILL: {mine}")
        time.sleep(0.005)
