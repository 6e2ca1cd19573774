"""The device a broker serves: opened here, on the host, by the trusted side.

The driver domain reaches it only through the grant rings, where it is
fixed file 0. Everything about it is read from the open descriptor itself,
never taken from anyone's word: its size, and whether it was opened with
O_DIRECT and so needs aligned offsets and lengths.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct

from drb_uring import linux, protocol
from drb_uring.channel.extents import Extents

BLKGETSIZE64 = 0x80081272


class Device:
    """The device's fd, its size, its O_DIRECT alignment (`align`, 0 when
    it does not need one) and the extents handed out of it."""

    def __init__(self, fd: int):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
        else:
            raise protocol.ProtocolError("the device must be a regular file or a block device")
        self.fd = fd
        direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        self.align = linux.dio_alignment(fd) if direct else 0
        self.extents = Extents(size, self.align or 1)

    @classmethod
    def open(cls, path: str, o_direct: bool) -> "Device":
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_DIRECT if o_direct else 0))
        try:
            return cls(fd)
        except BaseException:
            os.close(fd)
            raise

    @property
    def size(self) -> int:
        return self.extents.size

    def close(self) -> None:
        protocol.close_fds([self.fd])
        self.fd = -1
