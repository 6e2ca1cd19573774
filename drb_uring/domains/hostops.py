"""The host's requests to a pair's daemon, on its host-only control socket.

- user_add: a user domain more (`drb user add`, and the OCI hook for a
  container started with the io.drb.pair annotation);
- user_rm: one user domain less, by name or by the container it is;
- users: the user domains, their extents and pids;
- metrics: the pair's counters for `drb metrics` (domains.stats).

Each answers a dict or raises a DrbError, which the asker hears as its
refusal, one line.
"""

from __future__ import annotations

import time

from drb_uring.domains.config import free_extent, user_index, user_name
from drb_uring.domains.state import PairError
from drb_uring.spec import SpecError

WIPE_WAIT = 10.0     # seconds a user add waits for a removed user domain's extent


def _pid_or_size(field: str, v) -> None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 1):
        raise PairError(f"user_add: bad {field} {v!r}")


class HostOps:
    """`pair` is the daemon's Pair."""

    def __init__(self, pair):
        self.pair = pair

    def table(self) -> dict:
        return {"user_add": self.user_add, "user_rm": self.user_rm, "users": self.users,
                "metrics": self.metrics}

    def _next_user(self) -> str:
        p = self.pair
        limit = p.cfg.max_users
        if len(p.users) >= limit:
            raise PairError(f"pair {p.name} has {len(p.users)} user domains, the most it may "
                            f"have (drb up --max-users {limit})")
        for k in range(limit):
            if f"user{k}" not in p.users:
                return f"user{k}"
        raise PairError(f"pair {p.name}: no free user domain name below user{limit}")

    def user_add(self, msg: dict) -> dict:
        p = self.pair
        size, pid = msg.get("extent"), msg.get("attach")
        _pid_or_size("extent", size)
        _pid_or_size("attach", pid)
        container, rootfs = msg.get("container"), msg.get("rootfs")
        hostname = msg.get("hostname")
        for field, v in (("container", container), ("rootfs", rootfs), ("hostname", hostname)):
            if v is not None and (not isinstance(v, str) or not v or "\0" in v):
                raise PairError(f"user_add: bad {field} {v!r}")
        if rootfs is not None and (pid is None or not rootfs.startswith("/")):
            raise PairError("user_add: rootfs is for --attach, an absolute path")
        # A disk: True or False, or None for the pair's own choice (--disk).
        disk = msg.get("disk")
        if disk is not None and not isinstance(disk, bool):
            raise PairError(f"user_add: bad disk {disk!r}")
        if container is not None and any(u.container == container for u in p.users.values()):
            raise PairError(f"container {container[:12]} is already a user domain of pair "
                            f"{p.name}")
        name = self._next_user()
        dev = p.broker.device
        # A removed user domain's share is free only once the kernel is done
        # with its rings (the broker's limbo) and it is wiped: an add that
        # needs it waits for both, a while.
        end = time.monotonic() + WIPE_WAIT
        while True:
            taken = ([u.extent for u in p.users.values()] + p.broker.limbo.held_extents()
                     + sorted(p.wiping | p.unwipeable))
            try:
                extent = free_extent(dev.size, taken, size or p.extent_size, dev.align)
                break
            except SpecError as e:
                if not p.wiping or time.monotonic() > end:
                    raise PairError(str(e)) from None
            p.broker.limbo.poke()
            time.sleep(0.02)
        p.add_user(name, extent, pid, container=container, rootfs=rootfs, disk=disk,
                   hostname=hostname)
        p.write_state()
        return {"user": name, "domain": p.state["domains"][name]}

    def user_rm(self, msg: dict) -> dict:
        p = self.pair
        name, container = msg.get("user"), msg.get("container")
        if container is not None:
            found = [n for n, u in p.users.items() if u.container == container]
            if not isinstance(container, str) or not found:
                raise PairError(f"pair {p.name} has no user domain that is container "
                                f"{str(container)[:12]}")
            name = found[0]
        if not isinstance(name, str) or user_index(name) < 0:
            raise PairError(f"user_rm: not a user domain: {name!r} (user0, user1, ...)")
        name = user_name(name)
        if name not in p.users:
            raise PairError(f"pair {p.name} has no user domain {name}")
        # Its extent is zeroed once its rings are gone, before anyone else
        # may have it (see Pair._tenant_gone).
        p.wiping.add(p.users[name].extent)
        try:
            p.remove_user(name)
        finally:
            p.write_state()
        return {"user": name}

    def users(self, msg: dict) -> dict:
        p = self.pair
        return {"users": {n: {"extent": list(u.extent), "pid": p.pids.get(n, 0),
                              "container": u.container}
                          for n, u in p.users.items()}}

    def metrics(self, msg: dict) -> dict:
        """The pair's figures (domains.stats): with "users": [] the pair's
        own, with "users": [names] those user domains', as a reply must fit
        in one message."""
        lease, users = msg.get("lease", 0), msg.get("users", [])
        mode_switches = msg.get("mode_switches", False)
        if not isinstance(mode_switches, bool):
            raise PairError(f"metrics: bad mode_switches {mode_switches!r}")
        if not isinstance(lease, (int, float)) or isinstance(lease, bool):
            raise PairError(f"metrics: bad lease {lease!r}")
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise PairError(f"metrics: bad users {users!r}")
        return {"metrics": self.pair.stats.snapshot(lease, users, mode_switches)}
