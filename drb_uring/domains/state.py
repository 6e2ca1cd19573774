"""Where a pair's state lives, and reading it.

Everything a pair has is under /run/drb/NAME/ (its state, its log, its
broker's socket) and <cgroup2>/drb/NAME/ (its domains' groups).
"""

from __future__ import annotations

import json
import os

from drb_uring.domains import cgroup
from drb_uring.errors import DrbError

RUN = "/run/drb"


class PairError(DrbError):
    pass


def require_root() -> None:
    if os.geteuid() != 0:
        raise PairError("must run as root (namespaces, cgroups and eBPF need it)")


def state_dir(name: str) -> str:
    return os.path.join(RUN, name)


def group_dir(name: str) -> str:
    return os.path.join(cgroup.cgroup2_root(), "drb", name)


def read_state(name: str) -> dict | None:
    try:
        with open(os.path.join(state_dir(name), "state.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def write_state(name: str, state: dict) -> None:
    tmp = os.path.join(state_dir(name), "state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(state_dir(name), "state.json"))


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, an identity
    a recycled pid cannot fake."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def record_daemon(name: str, pid: int) -> None:
    """Note the pair's daemon as pid and start time, in the pair's host-only
    state directory."""
    with open(os.path.join(state_dir(name), "daemon.pid"), "w") as f:
        f.write(f"{pid} {start_time(pid)}\n")


def daemon_pid(name: str) -> int | None:
    """The pid of the pair's daemon if that very process still runs."""
    try:
        with open(os.path.join(state_dir(name), "daemon.pid")) as f:
            pid, started = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    return pid if start_time(pid) == started else None


def pair_names() -> list[str]:
    try:
        return sorted(os.listdir(RUN))
    except FileNotFoundError:
        return []


def remove_if_empty(path: str) -> None:
    """The shared parents (<cgroup2>/drb, /run/drb) go with their last pair."""
    try:
        os.rmdir(path)
    except OSError:
        pass


def domain_alive(st: dict, role: str) -> bool:
    """Whether the domain recorded in state `st` still runs: the same
    process (pid and start time), not a recycled pid."""
    dm = st["domains"][role]
    return dm.get("started") is not None and start_time(dm["pid"]) == dm["started"]


def describe(name: str) -> tuple[dict, str] | None:
    """A pair's state and one word for it: up, degraded (a domain is gone)
    or down (its daemon is gone). None if there is no such pair."""
    st = read_state(name)
    if st is None:
        return None
    if not daemon_pid(name):
        return st, "down"
    if not all(domain_alive(st, r) for r in ("user", "driver")):
        return st, "degraded"
    return st, "up"
