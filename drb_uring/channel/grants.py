"""Grant rings: the broker's record of each channel, and the ring it grants.

A grant ring is a real io_uring the broker creates disabled, gives the
user's data pool as fixed buffers (then unmaps the pool), the device as
fixed file 0, restricts to the data opcodes with IOSQE_FIXED_FILE required
and no register operation, has the monitor check from before anyone else
holds it, and enables. The broker keeps the ring and the ring descriptors
(never the pool) for as long as the channel is open: each new worker of its
user domain inherits them.

Whom it distrusts: the user side, whose ring memory is checked by
ring.validate_peer_fds before anything is built on it, and the driver
page, which a worker writes: what is read back from it (the request ring's
head) only tells the user side where to settle from the kernel's counts.
"""

from __future__ import annotations

import mmap
import os
import struct

from drb_uring import protocol, ring
from drb_uring.channel import _grant, _worker
from drb_uring.channel.release import ring_inode
from drb_uring.channel.worker import ChannelSpec
from drb_uring.enforce import tasks
from drb_uring.ring import layout as L


class BrokerChannel:
    """One open channel: its user domain, its connection, its extent of the
    device, its grant ring and the ring descriptors its workers inherit."""

    def __init__(self, cid: int, tenant, peer: protocol.Peer,
                 extent: tuple[int, int], pinned: int):
        self.id = cid
        self.tenant = tenant
        self.peer: protocol.Peer | None = peer
        self.extent = extent
        self.pinned = pinned
        self.ring_fd = -1
        self.params = b""
        self.pool_base = 0
        self.geo: ring.Geometry | None = None
        self.ring_fds: list[int] = []     # ctl_user, ctl_driver, -1, user_efd, driver_efd
        self.gid = 0            # the channel's id in the host's eBPF maps
        self.ino = 0            # its grant ring's inode (unique per ring)
        self.closing = False
        self.ended = False      # over; its ring waits for the kernel's word (release)
        self.reply_close = False   # answer "close" once the worker has let go
        self.fail_reason: str | None = None

    @property
    def worker_pid(self) -> int:
        w = self.tenant.worker
        return w.pid if w else 0

    def spec(self, align: int) -> ChannelSpec:
        return ChannelSpec(id=self.id, ring_fd=self.ring_fd, params=self.params.hex(),
                           pool_base=self.pool_base, ring_fds=list(self.ring_fds),
                           extent_base=self.extent[0], extent_size=self.extent[1],
                           align=align)

    def request_head(self) -> int:
        """The request ring's head as the driver left it (its own page)."""
        with mmap.mmap(self.ring_fds[1], mmap.PAGESIZE, prot=mmap.PROT_READ) as m:
            return struct.unpack_from("<I", m, L.OFF_SQ_HEAD)[0]

    def close_fds(self) -> None:
        protocol.close_fds([fd for fd in [self.ring_fd, *self.ring_fds] if fd >= 0])
        self.ring_fd = -1
        self.ring_fds = []


def seal(ring_fd: int, device_fd: int) -> None:
    """The device as fixed file 0, only the data opcodes, then enabled:
    what makes a ring a grant ring."""
    _grant.register_device(ring_fd, device_fd)
    _grant.restrict(ring_fd, [tasks.OP_READ_FIXED, tasks.OP_WRITE_FIXED, tasks.OP_FSYNC],
                    _worker.FLAG_FIXED_FILE, _worker.FLAG_FIXED_FILE)
    _grant.enable(ring_fd)


def build(ch: BrokerChannel, ring_fds: ring.PeerFds, device_fd: int, enforcer) -> int:
    """Build the channel's grant ring on the user's pool and take the ring
    descriptors (the pool's is closed: the registration holds its pages).
    Returns the task table's fd for the user side (-1 unmonitored). On
    failure nothing is left granted; the caller closes what it gave."""
    geo = ch.geo
    tt_fd = -1
    ch.ring_fd, ch.params = _grant.setup_disabled(geo.sq_entries)
    ch.ino = ring_inode(ch.ring_fd)
    ch.pool_base = _grant.register_pool(ch.ring_fd, ring_fds.pool, geo.slot_size,
                                        geo.slot_count)
    seal(ch.ring_fd, device_fd)
    if enforcer:
        # Enforced from before any worker has it.
        ch.gid, tt_fd = enforcer.grant(ch.ring_fd, ch.pool_base, geo.slot_size,
                                       geo.slot_count, ch.extent)
    os.close(ring_fds.pool)          # never kept: the registration holds the pages
    ring_fds.pool = -1
    ch.ring_fds = ring_fds.as_list()
    return tt_fd


def regrant(ch: BrokerChannel, device_fd: int, enforcer) -> int:
    """A new grant ring for the channel, under a new monitor: the old
    ring's buffers (the same pages; the broker never keeps the pool),
    checked from before any worker has it. Returns the new task table's
    fd, for the user side."""
    fd, params = _grant.setup_disabled(ch.geo.sq_entries)
    try:
        _grant.clone_buffers(fd, ch.ring_fd)
        seal(fd, device_fd)
        gid, tt_fd = enforcer.grant(fd, ch.pool_base, ch.geo.slot_size,
                                    ch.geo.slot_count, ch.extent)
    except BaseException:
        os.close(fd)
        raise
    # The old ring's holders are dead (the monitor's death killed every
    # worker, and the supervisor waited for each): this was the last copy.
    os.close(ch.ring_fd)
    ch.ring_fd, ch.params, ch.gid, ch.ino = fd, params, gid, ring_inode(fd)
    return tt_fd
