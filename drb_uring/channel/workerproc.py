"""One worker process, as the broker sees it: how it is started, and the
broker's pipes to it (drop and go words one way, reports the other).

Whom it distrusts: the worker. Its reports (report_t) only ever let go of
channels, and it is watched through pidfds, its stand-in's and its own,
never waited on in the loop.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
from typing import Callable

from drb_uring import linux, procs, protocol
from drb_uring.channel.worker import WorkerSpec

READY_ID = 0xFFFFFFFF              # its first report: it hears SIGTERM now
GO_BIT = 1 << 31                   # in a control word: serve this held channel (else drop it)

# spawn(spec, fds) -> (a process to watch, the pid of the worker itself): the
# worker inherits `fds`, which the spec names.
SpawnFn = Callable[["WorkerSpec", list[int]], tuple[subprocess.Popen, int]]


def spawn_plain(spec: WorkerSpec, fds: list[int]) -> tuple[subprocess.Popen, int]:
    """Start a worker as a child of the broker (no domain)."""
    proc = procs.spawn("drb_uring.channel.worker", spec, fds)
    return proc, proc.pid


class WorkerProc:
    """One worker process of a user domain, and the broker's pipes to it."""

    def __init__(self, proc: subprocess.Popen, pid: int, ctl_w: int, report_r: int,
                 gate_r: int, cids: set[int]):
        self.proc = proc
        self.pid = pid
        self.ctl_w = ctl_w          # ids of channels to drop
        self.report_r = report_r    # report_t records: channels dropped
        self.gate_r = gate_r        # ends when this worker is gone: the next one's gate
        self.cids = cids            # the channels it was started with
        self.pidfd = -1             # the process to watch (the stand-in, if any)
        self.wpidfd = -1            # the worker itself, when a stand-in started it
        self.uid = -1
        self.kill_at = 0.0          # when a worker told to stop gets SIGKILL
        self.retired = False        # told to stop: the next worker takes over
        self.ready = False          # its SIGTERM handler is in (it said so)
        self.termed = False

    def ask_drop(self, cid: int) -> None:
        self._tell(cid)

    def ask_go(self, cid: int) -> None:
        """A held channel may be served now."""
        self._tell(cid | GO_BIT)

    def _tell(self, word: int) -> None:
        try:
            os.write(self.ctl_w, struct.pack("<I", word))
        except OSError:             # it is gone; its exit finishes the channel
            pass

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None and self.proc.pid != self.pid:
            self.proc.kill()        # the stand-in that started it in the domain

    def wait_gone(self, timeout: float) -> bool:
        """Wait for the worker process itself to be gone (its descriptors
        closed with it); True once it is."""
        fd = self.wpidfd if self.wpidfd >= 0 else self.pidfd
        if fd < 0:
            return True
        return linux.readable(fd, timeout)

    def close_fds(self) -> None:
        protocol.close_fds([fd for fd in (self.ctl_w, self.report_r, self.gate_r, self.pidfd,
                                          self.wpidfd) if fd >= 0])
        self.ctl_w = self.report_r = self.gate_r = self.pidfd = self.wpidfd = -1
