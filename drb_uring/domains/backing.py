"""The pair's device on the host: taken only when free, held exclusively,
cut into user domains' extents the kernel enforces, and wiped between
tenants.

- A block device is opened O_EXCL: the kernel refuses it while it is
  mounted or held by anyone else. A backing file gets an OFD write lock,
  held by the pair's daemon for its life: a second pair on the same file
  is refused, naming the first. A file that is not writable by its mode is
  refused unless forced (root could write it anyway).
- An extent the kernel enforces: a loop device over the backing file (or
  block device) with its offset and size limit, in direct-I/O mode, which
  is the only device a user domain's grant rings reach. A request past it
  fails in the block layer, whatever the monitor saw in time.
- A removed user domain's extent is zeroed before anyone else may have it:
  a hole punched in a file, BLKZEROOUT on a block device, or zeros written
  where neither works.

Whom it distrusts: nobody here is a domain; it refuses what the host's
user would regret (a mounted file system, a file in use by another pair).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import stat
import struct
import time

from drb_uring import linux
from drb_uring.domains.state import RUN, PairError

BLKZEROOUT = 0x127F
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
F_OFD_SETLK = 37
ZERO_CHUNK = 1 << 20


class _LoopInfo64(ctypes.Structure):
    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
                ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
                ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_uint8 * 64),
                ("lo_crypt_name", ctypes.c_uint8 * 64), ("lo_encrypt_key", ctypes.c_uint8 * 32),
                ("lo_init", ctypes.c_uint64 * 2)]


class _LoopConfig(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", _LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


# ---- taking the device -------------------------------------------------------------

def pair_using(path: str) -> str | None:
    """The running pair whose device is `path` (the same file), if any."""
    try:
        want = os.stat(path)
    except OSError:
        return None
    if not os.path.isdir(RUN):
        return None
    for name in os.listdir(RUN):
        try:
            with open(os.path.join(RUN, name, "state.json")) as f:
                dev = json.load(f).get("device")
            st = os.stat(dev)
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return name
    return None


def check_mode(path: str, force: bool) -> None:
    """A file its mode says is not to be written is refused, unless forced."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if not mode & 0o222 and not force:
        raise PairError(f"backing file {path} is read-only by its mode ({mode:04o}); "
                        "drb would write it. Give it write permission, or --force")


def take(path: str, o_direct: bool, exclusive: bool = True) -> int:
    """Open the device for the pair, exclusively: O_EXCL for a block device
    (refused while mounted or held), an OFD write lock for a file (refused
    while another pair holds it). The lock lasts as long as the fd."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if o_direct else 0)
    if not exclusive:
        return os.open(path, flags)
    block = stat.S_ISBLK(os.stat(path).st_mode)
    try:
        fd = os.open(path, flags | (os.O_EXCL if block else 0))
    except OSError as e:
        if block and e.errno == errno.EBUSY:
            raise PairError(f"block device {path} is in use: mounted, or held open by "
                            "another program (the kernel refuses to give it out "
                            "exclusively)") from None
        raise
    if not block:
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, lock)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            other = pair_using(path)
            raise PairError(f"backing file {path} is in use by "
                            f"{f'pair {other}' if other else 'another program'} "
                            "(it holds a lock on it)") from None
    return fd


# ---- extents the kernel enforces ---------------------------------------------------------

def loop_device(backing_fd: int, offset: int, size: int, block_size: int,
                o_direct: bool) -> tuple[str, int]:
    """A loop device that is [offset, offset + size) of the backing file or
    device, in direct-I/O mode (no second page cache), cleared by the kernel
    once its last user closes it. Returns its path and an open descriptor
    (O_RDWR | O_EXCL: only the pair uses it; O_DIRECT for an O_DIRECT pair)."""
    cfg = _LoopConfig(fd=backing_fd, block_size=block_size)
    cfg.info.lo_offset = offset
    cfg.info.lo_sizelimit = size
    cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            path = f"/dev/loop{n}"
            setup = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                try:
                    fcntl.ioctl(setup, LOOP_CONFIGURE, bytes(cfg))
                except OSError as e:
                    if e.errno == errno.EBUSY:      # taken meanwhile by someone else
                        continue
                    raise PairError(f"a loop device for the extent {offset}+{size}: "
                                    f"{e.strerror}") from None
                # Ours now: held open (exclusively) before the configuring
                # descriptor goes, or autoclear would undo it at once.
                return path, os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_EXCL
                                     | (os.O_DIRECT if o_direct else 0))
            finally:
                os.close(setup)
        raise PairError("no free loop device (16 tries)")
    finally:
        os.close(ctl)


def loop_backing(path: str) -> tuple[int, int, int] | None:
    """(offset, size limit, flags) of a configured loop device, or None."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = _LoopInfo64()
        buf = bytearray(ctypes.sizeof(info))
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        except OSError:
            return None
        info = _LoopInfo64.from_buffer(buf)
        return info.lo_offset, info.lo_sizelimit, info.lo_flags
    finally:
        os.close(fd)


# ---- wiping ----------------------------------------------------------------------------

def wipe(fd: int, offset: int, size: int) -> str:
    """Zero [offset, offset + size) of the device; returns how. The file's
    or device's page cache is dropped for the range by each way below."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        try:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, size))
            return "BLKZEROOUT"
        except OSError:
            pass
    else:
        for mode, how in ((FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, "a punched hole"),
                          (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, "a zeroed range")):
            r = linux.libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(size))
            if r == 0:
                return how
    zeros = bytes(ZERO_CHUNK)
    done = 0
    buffered = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    try:
        while done < size:
            n = min(ZERO_CHUNK, size - done)
            done += os.pwrite(buffered, zeros[:n], offset + done)
        os.fsync(buffered)
    finally:
        os.close(buffered)
    return "zeros written"


def wipe_timed(fd: int, offset: int, size: int) -> tuple[str, float]:
    t0 = time.monotonic()
    how = wipe(fd, offset, size)
    return how, time.monotonic() - t0
