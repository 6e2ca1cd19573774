"""A user domain's worker: the driver side's process, started by the broker.

It inherits, for every channel of one user domain, the grant ring and the
channel's ring descriptors (never the data pool), maps the rings, and runs
the loop in C (channel._worker) until told to stop; then it finishes what is
in flight and exits, and the next worker (the broker starts one with the
new set of channels when a channel opens) takes the rings over where it
left them. Its spec (WorkerSpec, from the broker) is its only input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import struct
import sys

from drb_uring import linux, procs, ring
from drb_uring.ring import layout as L
from drb_uring.spec import Spec, SpecError


@dataclasses.dataclass(frozen=True)
class ChannelSpec(Spec):
    """One channel a worker serves."""

    id: int                    # the broker's channel id (drop requests and reports name it)
    ring_fd: int               # the grant ring, inherited
    params: str                # its io_uring_params, hex, for io_uring_queue_mmap
    pool_base: int             # where the broker registered slot 0
    ring_fds: list[int]        # ctl_user, ctl_driver, pool (-1: never), user_efd, driver_efd
    extent_base: int
    extent_size: int
    align: int
    held: bool = False         # not served until the broker says go

    def check(self) -> None:
        if self.id >= 1 << 31:
            raise SpecError("channel ids are below 2**31")
        if len(self.ring_fds) != 5 or self.ring_fds[2] != -1:
            raise SpecError("a worker gets 5 ring fds per channel and never the pool")
        if self.align & (self.align - 1) or self.extent_size <= 0:
            raise SpecError("bad alignment or extent")

    def fds(self) -> list[int]:
        return [self.ring_fd, *(fd for fd in self.ring_fds if fd >= 0)]

    def placed(self, at: int) -> "ChannelSpec":
        return self.replace(ring_fd=at, ring_fds=[at + 1, at + 2, -1, at + 3, at + 4])


@dataclasses.dataclass(frozen=True)
class WorkerSpec(Spec):
    """What a worker is told (drb_uring.channel.worker): every channel of
    one user domain, and its pipes to the broker."""

    channels: list[dict]       # ChannelSpec each
    ctl_fd: int                # broker -> worker: ids of channels to drop
    report_fd: int             # worker -> broker: channels dropped, and why
    gate_fd: int               # -1, or a pipe that ends when the previous worker is gone
    hold_fd: int               # held for life: the next worker's gate
    spin_ns: int
    restarted: bool = False    # the previous worker died: drop its completions
    uid: int = -1              # the user it runs as in the driver domain (the spawner's
                               # to apply; -1: the spawner's own)

    def check(self) -> None:
        for c in self.channels:
            ChannelSpec.from_dict(c)

    def channel_specs(self) -> list[ChannelSpec]:
        return [ChannelSpec.from_dict(c) for c in self.channels]

    def fds(self) -> list[int]:
        """Every fd the worker inherits, in the order placed() numbers them."""
        head = [self.ctl_fd, self.report_fd] + ([self.gate_fd] if self.gate_fd >= 0 else [])
        return head + [self.hold_fd] + [fd for c in self.channel_specs() for fd in c.fds()]

    def placed(self, first: int = 3) -> "WorkerSpec":
        """The spec as the worker reads it when its fds() are placed at
        first, first + 1, ... (procs.spawn_at)."""
        gate = first + 2 if self.gate_fd >= 0 else -1
        hold = first + (3 if gate >= 0 else 2)
        at = hold + 1
        chans = []
        for c in self.channel_specs():
            chans.append(c.placed(at).to_dict())
            at += 5
        return self.replace(ctl_fd=first, report_fd=first + 1, gate_fd=gate, hold_fd=hold,
                            channels=chans)


# What the loop needs once it is set up (measured with strace on a serving
# worker, its stop and its exit), and nothing else.
CALLS = ("io_uring_enter", "ppoll", "read", "write", "close", "munmap", "mmap", "brk", "madvise",
         "futex", "rt_sigreturn", "rt_sigaction", "rt_sigprocmask", "rt_sigpending", "sigaltstack",
         "getpid",
         "gettid", "clock_gettime", "clock_nanosleep", "newfstatat", "fstat", "lseek", "exit",
         "exit_group")


def confine() -> None:
    """Allow this process only its loop's calls (anything else fails with
    EPERM), once it holds what it needs: what sandboxed file servers do.
    On top of the domain's own filter."""
    import seccomp
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in CALLS:
        f.add_rule(seccomp.ALLOW, name)
    f.load()


# report_t {channel id, errno}; this one says "my signal handlers are in".
REPORT = struct.Struct("<Ii")
READY = REPORT.pack(0xFFFFFFFF, 0)


def _wait_for_gate(fd: int) -> None:
    """Block until the previous worker is gone (its end of the pipe closes):
    two workers must never drive the same rings."""
    if fd < 0:
        return
    while os.read(fd, 64):
        pass
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    # Whoever could write our memory would drive every grant ring we hold:
    # no other process of the driver domain may (the broker also gives each
    # worker a user id of its own, so none shares ours to begin with).
    linux.not_dumpable()
    spec = procs.spec_from_argv(WorkerSpec, argv)
    # No channel runs unmonitored: the kernel kills us when our parent (the
    # broker, or its stand-in that itself dies with the broker) goes.
    linux.die_with_parent()
    if os.getppid() == 1:      # reparented: the parent died before prctl
        sys.exit("drb-worker: the broker is already gone")
    # Told to stop before the loop runs (a handover right after a start):
    # it still takes the rings over cleanly, then stops at once. The
    # broker sends SIGTERM only once it has heard READY: before the
    # handlers, the default would end us mid-start.
    from drb_uring.channel import _worker
    _worker.install_stop_handlers()
    os.write(spec.report_fd, READY)
    _wait_for_gate(spec.gate_fd)
    from drb_uring.channel._worker import WorkerLoop
    os.set_blocking(spec.ctl_fd, False)
    loop = WorkerLoop(spec.ctl_fd, spec.report_fd)
    for c in spec.channel_specs():
        end = None
        try:
            # Not sealed: the next worker maps the same driver page again.
            end = ring.attach(ring.PeerFds.from_list(c.ring_fds), spin_ns=spec.spin_ns,
                              map_pool=False, seal=False)
            loop.add(end, c.id, c.ring_fd, bytes.fromhex(c.params), c.pool_base,
                     c.extent_base, c.extent_size, c.align, spec.restarted, c.held)
        except (L.LayoutError, OSError, ValueError) as e:
            if end is not None:
                end.close()
            with contextlib.suppress(OSError):     # add() may have closed it
                os.close(c.ring_fd)
            # One channel whose ring is no good (a user side that kept a
            # writable copy of its driver page and scribbled on it, say)
            # costs that channel alone: the broker hears why, the others
            # are served.
            print(f"drb-worker[{os.getpid()}]: channel {c.id} dropped: {e}", file=sys.stderr)
            os.write(spec.report_fd, REPORT.pack(c.id, -errno.EPROTO))
    confine()
    try:
        rc = loop.serve()
    finally:
        stats = loop.stats
        loop.close()
    print(f"drb-worker[{os.getpid()}]: stop rc={rc} {json.dumps(stats)}", file=sys.stderr)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
