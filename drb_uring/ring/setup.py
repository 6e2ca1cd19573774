"""Creating and attaching double rings (the control plane of drb_uring.ring._spsc).

The user side calls :func:`create`; it returns its :class:`UserEnd` and the
:class:`PeerFds` to hand to the driver side, which calls :func:`attach`.

Protection, page by page (one writer per page):

* ``ctl_user`` is mapped writable by the creator, then sealed against new
  writable mappings; the driver gets a read-only file descriptor for it.
* ``ctl_driver`` is mapped read-only by the creator, from a read-only
  descriptor; the writable descriptor goes to the driver, which seals it
  after mapping it, so nobody can map it writable afterwards.
* every memfd is sealed against shrinking, so a peer cannot turn our
  accesses into SIGBUS by truncating it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat

from drb_uring.ring import layout as L
from drb_uring.ring._spsc import DriverEnd, UserEnd

# Spin budget before sleeping: about 30 eventfd round trips on this kind of
# machine, long enough to ride out a peer's short gaps between batches.
DEFAULT_SPIN_NS = 50_000

_SEAL_SIZE = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)


@dataclasses.dataclass
class PeerFds:
    """What the driver side needs; every fd is owned by this object until
    handed over (to attach(), or by inheritance / SCM_RIGHTS)."""

    ctl_user: int      # read-only
    ctl_driver: int    # read-write, sealed by the attacher after it maps it
    pool: int
    user_efd: int
    driver_efd: int

    def as_list(self) -> list[int]:
        return [self.ctl_user, self.ctl_driver, self.pool, self.user_efd, self.driver_efd]

    @classmethod
    def from_list(cls, fds: list[int]) -> "PeerFds":
        if len(fds) != 5:
            raise ValueError(f"a ring needs 5 file descriptors, got {len(fds)}")
        return cls(*fds)

    def close(self) -> None:
        for fd in self.as_list():
            _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _new_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopen(fd: int, flags: int) -> int:
    # A fresh open file description: O_RDONLY here means mmap(PROT_WRITE,
    # MAP_SHARED) and mprotect to writable both fail with EACCES for the
    # holder, whatever it tries.
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise L.LayoutError(f"fd {fd} is not open: {e.strerror}") from None


def _check_memfd(fd: int, what: str, need: int) -> None:
    kind = _fd_kind(fd)
    if not kind.startswith("/memfd:"):
        raise L.LayoutError(f"{what}: fd {fd} is {kind!r}, not a memfd")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise L.LayoutError(f"{what}: fd {fd} is not a regular memfd")
    if st.st_size < need:
        raise L.LayoutError(f"{what} memfd too small: {st.st_size} bytes, layout needs {need}")
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    if seals & fcntl.F_SEAL_SHRINK == 0:
        raise L.LayoutError(f"{what} memfd is not sealed against shrinking")


def _check_eventfd(fd: int, what: str) -> None:
    kind = _fd_kind(fd)
    if kind != "anon_inode:[eventfd]":
        raise L.LayoutError(f"{what}: fd {fd} is {kind!r}, not an eventfd")


def create(geometry: L.Geometry | None = None, *, spin_ns: int = DEFAULT_SPIN_NS,
           start_index: int = 0) -> tuple[UserEnd, PeerFds]:
    """Create a double ring on the user side.

    ``start_index`` sets where the free-running 32-bit counters begin (tests
    use values near 2**32 to exercise wrap-around).
    """
    geo = geometry or L.Geometry()
    if not 0 <= start_index < 1 << 32:
        raise ValueError(f"start_index must be a 32-bit value, got {start_index}")
    opened: list[int] = []
    try:
        ctl_user = _new_memfd("drb-ctl-user", geo.ctl_user_size)
        opened.append(ctl_user)
        ctl_driver = _new_memfd("drb-ctl-driver", geo.ctl_driver_size)
        opened.append(ctl_driver)
        pool = _new_memfd("drb-pool", geo.pool_size)
        opened.append(pool)

        idx = start_index.to_bytes(4, "little")
        os.pwrite(ctl_user, geo.header(L.MAGIC_USER), 0)
        os.pwrite(ctl_user, idx, L.OFF_SQ_TAIL)
        os.pwrite(ctl_user, idx, L.OFF_CQ_HEAD)
        os.pwrite(ctl_driver, geo.header(L.MAGIC_DRIVER), 0)
        os.pwrite(ctl_driver, idx, L.OFF_SQ_HEAD)
        os.pwrite(ctl_driver, idx, L.OFF_CQ_TAIL)

        user_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        opened.append(user_efd)
        driver_efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        opened.append(driver_efd)
        ctl_driver_ro = _reopen(ctl_driver, os.O_RDONLY)
        opened.append(ctl_driver_ro)

        for fd in (ctl_user, ctl_driver, pool):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEAL_SIZE)
        end = UserEnd(geo, ctl_user, ctl_driver_ro, pool, user_efd, driver_efd, spin_ns,
                      owned_fds=(ctl_user, ctl_driver_ro, pool, user_efd, driver_efd))
        opened = [ctl_driver]   # the end owns the rest now
        fcntl.fcntl(ctl_user, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        fcntl.fcntl(pool, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
        peer = PeerFds(ctl_user=_reopen(ctl_user, os.O_RDONLY), ctl_driver=ctl_driver,
                       pool=os.dup(pool), user_efd=os.dup(user_efd),
                       driver_efd=os.dup(driver_efd))
        return end, peer
    except BaseException:
        for fd in opened:
            _close_quietly(fd)
        raise


def validate_peer_fds(fds: PeerFds) -> L.Geometry:
    """Check the fds a driver side received; returns the geometry they hold.
    Raises LayoutError naming the first problem."""
    _check_memfd(fds.ctl_user, "ctl_user", L.PAGE)
    geo = L.decode_header(os.pread(fds.ctl_user, L.HEADER.size, 0), L.MAGIC_USER)
    _check_memfd(fds.ctl_user, "ctl_user", geo.ctl_user_size)
    _check_memfd(fds.ctl_driver, "ctl_driver", L.PAGE)
    dgeo = L.decode_header(os.pread(fds.ctl_driver, L.HEADER.size, 0), L.MAGIC_DRIVER)
    if dgeo != geo:
        raise L.LayoutError(f"ctl_driver geometry {dgeo} differs from ctl_user's {geo}")
    _check_memfd(fds.ctl_driver, "ctl_driver", geo.ctl_driver_size)
    if fds.pool >= 0:
        _check_memfd(fds.pool, "pool", geo.pool_size)
    _check_eventfd(fds.user_efd, "user_efd")
    _check_eventfd(fds.driver_efd, "driver_efd")
    return geo


def attach(fds: PeerFds, *, spin_ns: int = DEFAULT_SPIN_NS, map_pool: bool = True,
           seal: bool = True) -> DriverEnd:
    """Attach the driver side to a ring from the fds the user side sent.

    Takes ownership of ``fds`` (closed on failure too). The header is read
    once, checked, and only the checked copy is used afterwards.
    """
    try:
        geo = validate_peer_fds(fds)
        end = DriverEnd(geo, fds.ctl_user, fds.ctl_driver, fds.pool if map_pool else -1,
                        fds.user_efd, fds.driver_efd, spin_ns,
                        owned_fds=fds.as_list())
    except BaseException:
        fds.close()
        raise
    # Our writable mapping exists now; nobody may create another one. Not
    # when the broker's next worker will take the ring over (seal=False):
    # the driver never reads back its own indexes while it runs, so a user
    # that kept a writable copy of the driver page can only confuse a new
    # worker about its own channel.
    if seal:
        fcntl.fcntl(fds.ctl_driver, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_SEAL)
    return end
