"""Letting go of a grant ring on the kernel's word, never on a worker's.

A channel that ended (closed by its user side, failed, or its user domain
removed) keeps its grant in the monitor, closed: any submission on its ring
is a violation that kills the submitter. It also keeps its extent, and its
user side's "close" waits for its answer. Both end only when the kernel
says the ring is unusable:

- no process but the broker holds it: every worker it was handed to is
  dead (its pidfd says so) and, where the broker can look (a driver domain
  of its own), no process there has it open (the ring's inode, unique per
  ring, is in no descriptor table);
- the kernel has nothing of it in flight: its own counts of what it took
  and what it completed (the ring's fdinfo: CachedSqHead, CachedCqTail and
  the overflow list, none of which user space can write) agree. A grant
  ring has no SQ index array (IORING_SETUP_NO_SQARRAY), so the kernel
  drops no submission it took, and the two counts meet.

Then the broker closes its own descriptor (the last one: the ring ends),
ungrants it, and gives the extent back.

Whom it distrusts: every worker. A worker's "I let go" only starts this;
a worker that kept the ring is killed by the monitor as soon as it uses it,
and the extent waits until the kernel agrees.
"""

from __future__ import annotations

import os
import time


def ring_inode(fd: int) -> int:
    """The ring's inode: io_uring gives every ring one of its own."""
    return os.fstat(fd).st_ino


def in_flight(fd: int) -> int:
    """Requests the kernel took from the ring and has not completed, from
    its own counters (this process's fdinfo of the ring)."""
    took = done = overflow = 0
    in_overflow = False
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            if in_overflow:
                if line.startswith((" ", "\t")) or key.strip().startswith("user_data"):
                    overflow += 1
                    continue
                in_overflow = False
            if key == "CachedSqHead":
                took = int(value)
            elif key == "CachedCqTail":
                done = int(value)
            elif key == "CqOverflowList":
                in_overflow = True
    return (took - done - overflow) & 0xFFFFFFFF


class Limbo:
    """The channels that ended and whose rings the kernel may still have.
    `holders(inode)`, if given, lists the processes (other than workers
    already known dead) that still hold a ring open."""

    WAIT_LOG = 5.0      # a ring held longer than this is logged, once

    def __init__(self, hub, holders=None):
        self.hub = hub
        self.holders = holders
        self.rings: dict[int, object] = {}      # channel id -> BrokerChannel
        self.since: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self.rings)

    def add(self, ch) -> None:
        self.rings[ch.id] = ch
        self.since[ch.id] = time.monotonic()

    def of(self, tenant) -> list:
        return [ch for ch in self.rings.values() if ch.tenant is tenant]

    def held_extents(self) -> list[tuple[int, int]]:
        """Shares of the device of user domains no longer served whose
        rings the kernel may still have: nobody else may have them yet."""
        hub = self.hub
        return sorted({ch.tenant.extent for ch in self.rings.values()
                       if hub.tenants.get(ch.tenant.name) is not ch.tenant
                       and ch.tenant.extent is not None})

    def why_held(self, ch) -> str | None:
        """What still holds the ring, or None when the kernel is done with it."""
        workers = [w.pid for w in ch.tenant.workers if ch.id in w.cids]
        if workers:
            return f"worker {workers[0]} is alive"
        if self.holders is not None and ch.ino:
            pids = self.holders(ch.ino)
            if pids:
                return f"process {pids[0]} holds it open"
        n = in_flight(ch.ring_fd) if ch.ring_fd >= 0 else 0
        if n:
            return f"{n} request(s) of it are in flight"
        return None

    def poke(self) -> None:
        """Release every ring the kernel is done with."""
        now = time.monotonic()
        for cid, ch in list(self.rings.items()):
            why = self.why_held(ch)
            if why is None:
                del self.rings[cid]
                self.since.pop(cid, None)
                self.hub.chans.release(ch)
            elif now - self.since.get(cid, now) > self.WAIT_LOG:
                self.hub.log.warning("channel %d ended %.0f s ago, and its ring is still held "
                                     "(%s): its extent stays taken", cid,
                                     now - self.since[cid], why)
                self.since[cid] = float("inf")      # said once
