"""A raw io_uring in pure Python (ctypes + mmap), for tests only.

What a hostile process holding a grant ring's fd can do with it, written
the way such a process would: map the rings from the fd and the params,
write SQEs, call io_uring_enter and io_uring_register directly. Nothing
here is used by drb-uring itself.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
IORING_OFF_SQ_RING = 0
IORING_OFF_SQES = 0x10000000
IORING_ENTER_GETEVENTS = 1
IORING_OP_NOP = 0
IORING_OP_FSYNC = 3
IORING_OP_READ_FIXED = 4
IORING_OP_WRITE_FIXED = 5
IOSQE_FIXED_FILE = 1
SQE = struct.Struct("<BBHiQQIIQHHIQQ")   # the kernel's struct io_uring_sqe (64 bytes)
CQE = struct.Struct("<QiI")

_libc = ctypes.CDLL(None, use_errno=True)


def _sys(nr: int, *args) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a
                                          for a in args])
    return r if r >= 0 else -ctypes.get_errno()


class RawRing:
    def __init__(self, fd: int, params: bytes):
        self.fd = fd
        p = struct.unpack_from("<10I", params, 0)
        self.sq_entries, self.cq_entries = p[0], p[1]
        (self.sq_head, self.sq_tail, self.sq_mask, _, _, _, self.sq_array, _) = \
            struct.unpack_from("<8I", params, 40)
        (self.cq_head, self.cq_tail, self.cq_mask, _, _, self.cq_cqes, _, _) = \
            struct.unpack_from("<8I", params, 80)
        size = max(self.sq_array + 4 * self.sq_entries, self.cq_cqes + 16 * self.cq_entries)
        # IORING_FEAT_SINGLE_MMAP: one mapping holds both rings.
        self.rings = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=IORING_OFF_SQ_RING)
        self.sqes = mmap.mmap(fd, 64 * self.sq_entries, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.rings, off)[0]

    def submit(self, **fields) -> int:
        """Queue one SQE and enter the kernel; returns what io_uring_enter said."""
        tail = self._u32(self.sq_tail)
        idx = tail & self.sq_mask
        names = ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags",
                 "user_data", "buf_index", "personality", "file_index", "addr3", "pad2")
        SQE.pack_into(self.sqes, idx * 64, *(fields.get(n, 0) for n in names))
        struct.pack_into("<I", self.rings, self.sq_array + 4 * idx, idx)
        struct.pack_into("<I", self.rings, self.sq_tail, (tail + 1) & 0xFFFFFFFF)
        return _sys(SYS_IO_URING_ENTER, self.fd, 1, 0, 0, None, 0)

    def reap(self, wait: bool = True):
        """(user_data, res) of the next completion, or None."""
        head = self._u32(self.cq_head)
        if head == self._u32(self.cq_tail):
            if not wait:
                return None
            _sys(SYS_IO_URING_ENTER, self.fd, 0, 1, IORING_ENTER_GETEVENTS, None, 0)
            if head == self._u32(self.cq_tail):
                return None
        user_data, res, _ = CQE.unpack_from(self.rings,
                                            self.cq_cqes + 16 * (head & self.cq_mask))
        struct.pack_into("<I", self.rings, self.cq_head, (head + 1) & 0xFFFFFFFF)
        return user_data, res

    def register(self, opcode: int, arg=None, nr: int = 0) -> int:
        return _sys(SYS_IO_URING_REGISTER, self.fd, opcode, arg, nr)

    def close(self) -> None:
        self.rings.close()
        self.sqes.close()
