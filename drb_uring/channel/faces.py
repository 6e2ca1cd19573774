"""A channel's other faces: an ordinary binary file, and asyncio.

Both are thin: every request still goes through the channel
(drb_uring.channel.client) and its checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import os
import select

from drb_uring.channel.request import ChannelClosed, ChannelFailed


class ChannelFile(io.RawIOBase):
    """A channel as an ordinary binary file: seek, read, readinto, write."""

    def __init__(self, channel):
        super().__init__()
        self.channel = channel
        self.pos = 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.channel.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        if self.pos >= self.channel.size:
            return 0
        n = self.channel.preadinto(self.pos, b)
        self.pos += n
        return n

    def write(self, b) -> int:
        n = self.channel.pwrite(self.pos, b)
        self.pos += n
        return n

    def flush(self) -> None:
        if not self.closed and not self.channel.closed:
            self.channel.flush()


class AsyncChannel:
    """asyncio face of a channel: the ring's eventfd is a reader on the loop
    (the worker is asked to signal after every publish) and so is the
    control connection, so a failure wakes every waiter."""

    def __init__(self, channel):
        self.ch = channel
        self.loop = asyncio.get_running_loop()
        self.slot_freed = asyncio.Event()
        channel.end.hold_wakeup(True)
        self.loop.add_reader(channel.end.eventfd, self._ready)
        self.loop.add_reader(channel.sock.fileno(), self._ready)

    def _ready(self) -> None:
        with contextlib.suppress(ChannelFailed, ChannelClosed, BlockingIOError):
            os.eventfd_read(self.ch.end.eventfd)
        try:
            self.ch.end.hold_wakeup(True)
            if self.ch.end.readable:
                self.ch._reap(0)
            elif self.ch.sock in _readable([self.ch.sock]):
                self.ch._hear_monitor()
        except (ChannelFailed, ChannelClosed):
            pass
        self.slot_freed.set()

    async def _await(self, make) -> object:
        while True:
            try:
                req = make()
                break
            except BlockingIOError:
                self.slot_freed.clear()
                await self.slot_freed.wait()
        fut = self.loop.create_future()
        if req.done:
            fut.set_result(None)
        else:
            req.callbacks.append(lambda r: fut.done() or fut.set_result(None))
        await fut
        return req.result(0)

    async def pread(self, offset: int, n: int) -> bytes:
        holder = []

        def make():
            req = self.ch.submit_read(offset, n, wait=False)
            holder.append(req)
            return req
        await self._await(make)
        return bytes(holder[-1].buf[:holder[-1].short])

    async def pwrite(self, offset: int, data) -> int:
        mv = memoryview(data).cast("B")
        if self.ch.aligned(offset, len(mv)):
            return await self._await(lambda: self.ch.submit_write(offset, mv, wait=False))
        # O_DIRECT and unaligned: the read-modify-write, awaiting each step.
        lo, bounce, ends = self.ch._rmw_plan(offset, len(mv))
        a = self.ch.align
        for blk in ends:
            await self._await(lambda blk=blk: self.ch.submit_readinto(
                blk, memoryview(bounce)[blk - lo:blk - lo + a], wait=False))
        bounce[offset - lo:offset - lo + len(mv)] = mv
        await self._await(lambda: self.ch.submit_write(lo, bounce, wait=False))
        return len(mv)

    async def flush(self) -> None:
        await self._await(lambda: self.ch.submit_flush(wait=False))

    def close(self) -> None:
        self.loop.remove_reader(self.ch.end.eventfd)
        self.loop.remove_reader(self.ch.sock.fileno())
        if not self.ch.closed:
            self.ch.end.hold_wakeup(False)


def _readable(socks) -> list:
    r, _, _ = select.select(socks, [], [], 0)
    return r
