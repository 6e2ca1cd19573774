"""Where a pair's state lives, and reading it.

Everything a pair has is under /run/drb/NAME/ (its state, its log, its
broker's socket) and <cgroup2>/drb/NAME/ (its domains' groups).
"""

from __future__ import annotations

import contextlib
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


def make_state_dir(name: str) -> str:
    """/run/drb/NAME. Directories are traversable (0711), not listable: a
    domain's runc init, already its unprivileged root, must reach the
    domain's bundle; every file in them is root's alone (0600), and the
    user domain's socket directory is 0750 to it only."""
    for path in (RUN, state_dir(name)):
        if not os.path.isdir(path):
            os.mkdir(path)
        os.chmod(path, 0o711)
    return state_dir(name)


def private_file(path: str, mode: str = "w"):
    """A file only root may read (these directories can be traversed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if "a" in mode
                                                     else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


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
    with private_file(tmp) as f:
        json.dump(state, f, indent=2)
    os.replace(tmp, os.path.join(state_dir(name), "state.json"))


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, an identity
    a recycled pid cannot fake."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):            # ran its last: not alive, whatever the pid
        return None
    return int(fields[19])


def record_daemon(name: str, pid: int) -> None:
    """Note the pair's daemon as pid and start time, in the pair's host-only
    state directory."""
    with private_file(os.path.join(state_dir(name), "daemon.pid")) as f:
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
        return sorted(n for n in os.listdir(RUN) if os.path.isdir(os.path.join(RUN, n)))
    except FileNotFoundError:
        return []


def remove_run_if_empty() -> None:
    """/run/drb goes with its last pair (and the id registry with it)."""
    if not pair_names() and not os.path.exists(IDS):
        for leftover in (".ids.lock",):
            try:
                os.unlink(os.path.join(RUN, leftover))
            except FileNotFoundError:
                pass
        remove_if_empty(RUN)


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


def domain_names(st: dict) -> list[str]:
    """The pair's domains by their own names (user0, user1, ..., driver),
    without the alias 'user' (user0, kept for older readers)."""
    doms = st.get("domains", {})
    return [r for r in doms if not (r == "user" and "user0" in doms)]


def describe(name: str) -> tuple[dict, str] | None:
    """A pair's state and one word for it: up, degraded (a domain is gone)
    or down (its daemon is gone). None if there is no such pair."""
    st = read_state(name)
    if st is None:
        return None
    if not daemon_pid(name):
        return st, "down"
    if not all(domain_alive(st, r) for r in domain_names(st)):
        return st, "degraded"
    return st, "up"


ID_BASE = 1 << 20          # host ids below this are the host's own users
ID_SPAN = 1 << 16          # each domain maps 65536 ids
IDS = os.path.join(RUN, "ids.json")


@contextlib.contextmanager
def _id_registry():
    """The id registry, read under its lock; what the caller leaves in the
    dict is written back (the file and the lock go when it is empty)."""
    import fcntl
    if not os.path.isdir(RUN):
        os.mkdir(RUN, 0o711)
    with private_file(os.path.join(RUN, ".ids.lock")) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(IDS) as f:
                taken = json.load(f)
        except (OSError, ValueError):
            taken = {}
        yield taken
        if taken:
            tmp = IDS + ".tmp"
            with private_file(tmp) as f:
                json.dump(taken, f)
            os.replace(tmp, IDS)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(IDS)
            os.unlink(os.path.join(RUN, ".ids.lock"))


def reserve_ids(name: str, count: int) -> list[int]:
    """Host id ranges for a pair's domains, different from every other
    pair's: the first host id of each range. Kept in /run/drb/ids.json,
    under a lock, until release_ids."""
    with _id_registry() as taken:
        used = {i for ranges in taken.values() for i in ranges}
        mine = []
        k = 0
        while len(mine) < count:
            if k not in used:
                mine.append(k)
            k += 1
        taken[name] = taken.get(name, []) + mine
    return [ID_BASE + k * ID_SPAN for k in mine]


def release_id(name: str, host_id: int) -> None:
    """Give back one range of `name`'s (a user domain removed)."""
    if not os.path.exists(IDS):
        return
    with _id_registry() as taken:
        left = [k for k in taken.get(name, []) if ID_BASE + k * ID_SPAN != host_id]
        if left:
            taken[name] = left
        else:
            taken.pop(name, None)


def release_ids(name: str) -> None:
    if not os.path.exists(IDS):
        return
    with _id_registry() as taken:
        taken.pop(name, None)
