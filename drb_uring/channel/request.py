"""One call on a channel, and how a channel ends: the user side's records.

A call may be split into slot-sized pieces; its :class:`Request` is a
future for the whole, finished when the last piece is answered (or the
channel fails). Pure bookkeeping, tested without root.
"""

from __future__ import annotations

import os

from drb_uring.enforce.tasks import OP_FSYNC
from drb_uring.errors import DrbError


class ChannelClosed(DrbError):
    """The channel was closed by this side."""


class ChannelFailed(DrbError):
    """The channel failed (its worker died, the monitor went away, or the
    peer broke the protocol); the reason says which."""


class Request:
    """One call, possibly split in pieces; a future for its result."""

    __slots__ = ("channel", "op", "buf", "lent_slot", "inner", "pending", "short", "error",
                 "done", "callbacks")

    def __init__(self, channel, op: int, buf, n: int):
        self.channel = channel
        self.op = op
        self.buf = buf           # read: destination (None: lend the slot); write: source
        self.lent_slot: int | None = None   # a zero-copy read's slot, lent to the caller
        # (start, length, destination) of what the caller asked for inside a
        # larger aligned request (O_DIRECT); the destination is None for writes.
        self.inner: tuple[int, int, object] | None = None
        self.pending = 0
        self.short = n           # bytes done before the first short piece
        self.error: BaseException | None = None
        self.done = False
        self.callbacks: list = []

    def _piece_done(self, pos: int, want: int, res: int) -> None:
        if res < 0:
            if self.error is None:
                self.error = OSError(-res, os.strerror(-res))
        elif res < want:
            self.short = min(self.short, pos + res)
        self.pending -= 1
        if self.pending == 0:
            self._finish()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.pending = 0
        self._finish()

    def _finish(self) -> None:
        if self.inner is not None and self.error is None:
            start, n, dest = self.inner
            got = max(0, min(self.short - start, n))
            if dest is not None:
                dest[:got] = self.buf[start:start + got]
                self.buf = dest
            self.short = got
        self.done = True
        for cb in self.callbacks:
            cb(self)

    def result(self, timeout: float | None = None) -> int | None:
        """Wait for the whole request (at most `timeout` seconds: TimeoutError
        after) and return how many bytes it read or wrote (fewer than asked
        only at the end of the extent), or None for a flush. A read's bytes
        are in `buf` (its first result() bytes); channel.pread() returns
        them. Raises the request's error: OSError with the device's or the
        worker's errno, ChannelFailed, or ChannelClosed."""
        self.channel._drive(lambda: self.done, timeout)
        if self.error is not None:
            raise self.error
        return None if self.op == OP_FSYNC else self.short
