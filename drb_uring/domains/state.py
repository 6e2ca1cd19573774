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


def daemon_pid(name: str) -> int | None:
    try:
        with open(os.path.join(state_dir(name), "daemon.pid")) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


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
