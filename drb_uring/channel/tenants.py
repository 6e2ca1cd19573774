"""The user domains a broker serves (tenants): their sockets, shares and limits.

Each user domain connects on a socket of its own, gets channels only out of
its own extent of the device, and may hold only so much: a limit reached
gets an error that names it and hurts no other user domain.

Whom it distrusts: every user domain. Its connections are capped while they
have no channel (MAX_PENDING), its channels and pinned memory by Limits.
"""

from __future__ import annotations

import dataclasses
import os

from drb_uring.channel.extents import Extents
from drb_uring.errors import DrbError
from drb_uring.spec import Spec, SpecError

MAX_CHANNELS = 64          # per user domain, by default
MAX_PENDING = 16           # connections of one user domain that have no channel yet
MAX_PINNED = 512 << 20     # bytes of user memory pinned as fixed buffers, per user domain
DEFAULT_TENANT = "user"


class BrokerError(DrbError):
    pass


@dataclasses.dataclass(frozen=True)
class Limits(Spec):
    """What one user domain may hold; going past a limit gets an error
    naming it and hurts no one else."""

    channels: int = MAX_CHANNELS
    pinned: int = MAX_PINNED

    def check(self) -> None:
        if self.channels < 1 or self.pinned < 4096:
            raise SpecError("limits must allow at least one channel and one page")


class Tenant:
    """One user domain: its socket, its share of the device, its limits,
    its channels and the one worker that serves them all (the worker
    supervisor keeps the fields below `channels`)."""

    def __init__(self, name: str, path: str, sock, extent: tuple[int, int] | None,
                 limits: Limits):
        self.name = name
        self.path = path
        self.sock = sock
        self.extent = extent
        self.extents: Extents | None = None
        self.device = None                      # a Device of its own, if it has one
        self.limits = limits
        self.channels: dict = {}                # id -> BrokerChannel
        self.worker = None                      # the WorkerProc serving now
        self.workers: list = []                 # the current one and any retiring
        self.deaths: list[float] = []           # when its workers died, recently
        self.restart_at = 0.0                   # when the next worker starts after one died
        self.consumed: dict[int, int] = {}      # channel -> request ring head the dead one left
        self.death = ""                         # how the last one died
        # After the monitor came back: the new worker holds each channel
        # until its user side has taken up its new task table.
        self.awaiting: set[int] = set()
        self.resume_deadline = 0.0
        # Opens that wait for an extent a channel that ended still holds:
        # [peer, msg, fds, deadline].
        self.parked: list[list] = []

    def device_of(self, shared):
        """The device this user domain's grant rings reach, and where its
        extent starts on it: its own (a loop device that is its extent) at
        0, or the pair's shared device at its extent's base."""
        if self.device is not None:
            return self.device, 0
        return shared, (self.extent or (0, 0))[0]

    def extents_of(self, shared) -> Extents:
        if self.extents is None:
            if self.extent is None:
                self.extent = (0, shared.size)
            dev, _ = self.device_of(shared)
            self.extents = Extents(self.extent[1], dev.align or 1)
        return self.extents

    def check_limits(self, pool_size: int) -> None:
        """Refuse one more channel with a pool of `pool_size` bytes if it
        would take the user domain past its limits."""
        if len(self.channels) >= self.limits.channels:
            raise BrokerError(f"limit reached: {self.limits.channels} channels per user domain "
                              "(drb up --max-channels)")
        pinned = sum(ch.pinned for ch in self.channels.values())
        if pinned + pool_size > self.limits.pinned:
            raise BrokerError(f"limit reached: a pool of {pool_size >> 10} KiB on top of "
                              f"{pinned >> 10} KiB would pin more than "
                              f"{self.limits.pinned >> 10} KiB per user domain "
                              "(drb up --max-pinned)")


def check_extent(tenants: dict[str, Tenant], extent: tuple[int, int] | None,
                 device_size: int | None) -> None:
    """A new user domain's extent: on the device, and no one else's."""
    if extent is None:
        if tenants:
            raise BrokerError("a user domain beside others needs an extent of its own")
        return
    base, size = extent
    if base < 0 or size <= 0 or (device_size is not None and base + size > device_size):
        raise BrokerError(f"extent {base}+{size} is not on the device")
    for t in tenants.values():
        if t.extent is None or (t.extent[0] < base + size and base < sum(t.extent)):
            raise BrokerError(f"extent {base}+{size} overlaps user domain {t.name}'s")


def close_and_unlink(sock, path: str) -> None:
    """A listening socket, and its name in the file system."""
    sock.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
