"""The versioned shared-memory layout of the double ring.

Three memfds make one ring, so that every page has exactly one writer:

``ctl_user``   written by the user side, read-only to the driver side:
               page 0 is the header and the user's indexes (request tail,
               response head, the user's wake-up flags); then the request
               ring of ``struct io_uring_sqe``.
``ctl_driver`` written by the driver side, read-only to the user side:
               page 0 repeats the geometry (under its own magic, so swapped
               fds are caught) and holds the driver's indexes (request head,
               response tail, the driver's wake-up flags); then the response
               ring of ``struct io_uring_cqe``.
``pool``       the data slots, written by whoever does the I/O.

Each index sits on its own cache line so the two sides never write the same
line. Everything here is pure logic so it can be tested without memory.
"""

from __future__ import annotations

import dataclasses
import struct

from drb_uring.enforce import _task
from drb_uring.errors import DrbError

PAGE = 4096
CACHELINE = 64

MAGIC_USER = b"DRBRINGU"
MAGIC_DRIVER = b"DRBRINGD"
VERSION = 1

SQE_SIZE = 64   # sizeof(struct io_uring_sqe), checked against the uapi header in tests
CQE_SIZE = 16   # sizeof(struct io_uring_cqe)

# Feature bits. NEED_WAKEUP: the sleep/wake protocol with per-party flags
# words; every ring of this version has it.
FEAT_NEED_WAKEUP = 1 << 0
FEATURES_KNOWN = FEAT_NEED_WAKEUP

# Header: magic, version, header_size, sqe_size, cqe_size, sq_entries,
# cq_entries, slot_size, slot_count, features, reserved, ctl_user_size,
# ctl_driver_size, pool_size.
HEADER = struct.Struct("<8sIIIIIIIIIIQQQ")
assert HEADER.size == 72

# Index words, each on its own cache line of page 0.
OFF_SQ_TAIL = 2 * CACHELINE      # ctl_user: request tail (user produces)
OFF_CQ_HEAD = 3 * CACHELINE      # ctl_user: response head (user consumes)
OFF_USER_FLAGS = 4 * CACHELINE   # ctl_user: the user's NEED_WAKEUP word
OFF_SQ_HEAD = 2 * CACHELINE      # ctl_driver: request head (driver consumes)
OFF_CQ_TAIL = 3 * CACHELINE      # ctl_driver: response tail (driver produces)
OFF_DRIVER_FLAGS = 4 * CACHELINE  # ctl_driver: the driver's NEED_WAKEUP word
OFF_ENTRIES = PAGE               # both: the ring entries start on page 1

LIMITS = {
    "sq_entries": (2, 1 << 15),
    "cq_entries": (2, 1 << 16),
    "slot_size": (PAGE, 1 << 24),
    # One slot limit: the task table's and the grant ring's (bpf/drb_task.h).
    "slot_count": (1, _task.MAX_SLOTS),
}
MAX_POOL = 1 << 32


class LayoutError(DrbError, ValueError):
    """The shared memory does not hold a ring this version understands."""


def _page_round(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int, least: int = 1) -> int:
    """The smallest power of two that is at least n and at least `least`."""
    return max(least, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Sizes of one double ring. All counts and the slot size are powers of two."""

    sq_entries: int = 256
    cq_entries: int = 512
    slot_size: int = 64 * 1024
    slot_count: int = 64
    features: int = FEATURES_KNOWN

    def __post_init__(self) -> None:
        for name, (lo, hi) in LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise LayoutError(f"{name} must be an integer, got {v!r}")
            if not _is_pow2(v):
                raise LayoutError(f"{name} must be a power of two, got {v}")
            if not lo <= v <= hi:
                raise LayoutError(f"{name} must be in [{lo}, {hi}], got {v}")
        if self.cq_entries < self.sq_entries:
            # Every request gets one response; a smaller response ring could
            # make the driver stall with requests it cannot answer.
            raise LayoutError(
                f"cq_entries ({self.cq_entries}) must be >= sq_entries ({self.sq_entries})")
        if self.pool_size > MAX_POOL:
            raise LayoutError(f"pool of {self.pool_size} bytes exceeds {MAX_POOL}")
        unknown = self.features & ~FEATURES_KNOWN
        if unknown:
            raise LayoutError(f"unsupported feature bits 0x{unknown:x}")
        if not self.features & FEAT_NEED_WAKEUP:
            raise LayoutError("feature NEED_WAKEUP is required by this version")

    @property
    def ctl_user_size(self) -> int:
        return OFF_ENTRIES + _page_round(self.sq_entries * SQE_SIZE)

    @property
    def ctl_driver_size(self) -> int:
        return OFF_ENTRIES + _page_round(self.cq_entries * CQE_SIZE)

    @property
    def pool_size(self) -> int:
        return self.slot_size * self.slot_count

    def header(self, magic: bytes) -> bytes:
        return HEADER.pack(magic, VERSION, PAGE, SQE_SIZE, CQE_SIZE,
                           self.sq_entries, self.cq_entries, self.slot_size,
                           self.slot_count, self.features, 0,
                           self.ctl_user_size, self.ctl_driver_size, self.pool_size)


def decode_header(raw: bytes, magic: bytes) -> Geometry:
    """Parse and check a header read (once) from shared memory.

    Raises LayoutError naming the first field that is wrong.
    """
    if len(raw) < HEADER.size:
        raise LayoutError(f"header truncated: {len(raw)} of {HEADER.size} bytes")
    (got_magic, version, header_size, sqe_size, cqe_size, sq_entries, cq_entries,
     slot_size, slot_count, features, _reserved, ctl_user_size, ctl_driver_size,
     pool_size) = HEADER.unpack_from(raw)
    if got_magic != magic:
        raise LayoutError(f"bad magic {got_magic!r}, expected {magic!r}")
    if version != VERSION:
        raise LayoutError(f"unsupported layout version {version}, this is version {VERSION}")
    if header_size != PAGE:
        raise LayoutError(f"header_size {header_size}, expected {PAGE}")
    if sqe_size != SQE_SIZE:
        raise LayoutError(f"sqe_size {sqe_size}, expected {SQE_SIZE}")
    if cqe_size != CQE_SIZE:
        raise LayoutError(f"cqe_size {cqe_size}, expected {CQE_SIZE}")
    geo = Geometry(sq_entries=sq_entries, cq_entries=cq_entries, slot_size=slot_size,
                   slot_count=slot_count, features=features)
    for name, got in (("ctl_user_size", ctl_user_size),
                      ("ctl_driver_size", ctl_driver_size),
                      ("pool_size", pool_size)):
        want = getattr(geo, name)
        if got != want:
            raise LayoutError(f"{name} {got} does not match the geometry ({want})")
    return geo


# Byte-level encodings of the kernel's entries, for Python-side tools and
# tests (the Cython paths use the kernel's own struct declarations).
SQE_FIELDS = ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags",
              "user_data", "buf_index", "personality", "file_index", "addr3", "pad2")
SQE = struct.Struct("<BBHiQQIIQHHIQQ")
CQE_FIELDS = ("user_data", "res", "flags")
CQE = struct.Struct("<QiI")
assert SQE.size == SQE_SIZE and CQE.size == CQE_SIZE


def field_offsets(st: struct.Struct, names: tuple[str, ...]) -> dict[str, int]:
    """Offset of each field of a little-endian, unpadded struct format."""
    out, fmt = {}, st.format[1:]
    for i, name in enumerate(names):
        out[name] = struct.calcsize("<" + fmt[:i])
    return out


def encode_sqe(**fields: int) -> bytes:
    unknown = set(fields) - set(SQE_FIELDS)
    if unknown:
        raise TypeError(f"unknown SQE field(s): {', '.join(sorted(unknown))}")
    return SQE.pack(*(fields.get(n, 0) for n in SQE_FIELDS))


def decode_cqes(raw: bytes) -> list[tuple[int, int, int]]:
    return [CQE.unpack_from(raw, i) for i in range(0, len(raw), CQE_SIZE)]
