"""O_DIRECT alignment on the user side of a channel: what an unaligned
request becomes on a device that takes only aligned offsets and lengths.

A read is widened to the aligned range that covers it, and only the part
asked for is handed over; a write is a read-modify-write of the partial
blocks at either end, then one aligned write. A mixin of Channel: it uses
the channel's align, size and request path.
"""

from __future__ import annotations

import errno

from drb_uring.channel.request import Request  # noqa: F401 - what the calls return
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED


class DirectAlignment:
    def aligned(self, offset: int, n: int) -> bool:
        """Whether the device takes [offset, offset+n) as it is."""
        return (offset | n) % self.align == 0

    def _span(self, offset: int, n: int) -> tuple[int, int]:
        """The aligned range that covers [offset, offset+n), inside the extent."""
        lo = offset - offset % self.align
        return lo, min(-(-(offset + n) // self.align) * self.align, self.size)

    def _read_bounced(self, offset: int, n: int, dest, wait: bool) -> Request:
        """An unaligned read on an O_DIRECT device: read the aligned range
        that covers it, then hand over only the part asked for."""
        n = max(0, min(n, self.size - offset))
        lo, hi = self._span(offset, n)
        return self._submit(OP_READ_FIXED, lo, hi - lo, bytearray(hi - lo), wait,
                            inner=(offset - lo, n, bytearray(n) if dest is None else dest))

    def _rmw_plan(self, offset: int, n: int) -> tuple[int, bytearray, list[int]]:
        """For an unaligned write: the aligned start, a buffer for the aligned
        range, and the partial blocks at its ends that must be read first."""
        if offset < 0 or offset + n > self.size:
            raise OSError(errno.ERANGE, f"offset {offset}+{n} is beyond the extent "
                                        f"of {self.size} bytes")
        lo, hi = self._span(offset, n)
        ends = set()
        if offset % self.align:
            ends.add(lo)
        if (offset + n) % self.align:
            ends.add(hi - self.align)
        return lo, bytearray(hi - lo), sorted(ends)

    def _write_bounced(self, offset: int, data, wait: bool) -> Request:
        """An unaligned write on an O_DIRECT device: read-modify-write of the
        partial blocks at either end, then one aligned write."""
        if not wait:
            raise OSError(errno.EINVAL, f"this device is opened with O_DIRECT and takes "
                                        f"offsets and lengths in multiples of {self.align} "
                                        "bytes; an unaligned write is a read-modify-write, "
                                        "which cannot be posted without waiting")
        lo, bounce, ends = self._rmw_plan(offset, len(data))
        for blk in ends:
            self.submit_readinto(blk, memoryview(bounce)[blk - lo:blk - lo + self.align]
                                 ).result()
        bounce[offset - lo:offset - lo + len(data)] = data
        return self._submit(OP_WRITE_FIXED, lo, len(bounce), bounce, True,
                            inner=(offset - lo, len(data), None))
