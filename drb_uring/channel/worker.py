"""A channel's worker: the driver side's process, started by the broker.

It inherits the grant ring and the channel's ring descriptors (never the
data pool), maps the rings, and runs the loop in C (channel._worker) until
told to stop. Its spec (WorkerSpec, from the broker) is its only input.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sys

from drb_uring import linux, procs, ring
from drb_uring.spec import Spec, SpecError


@dataclasses.dataclass(frozen=True)
class WorkerSpec(Spec):
    """What a worker is told about its channel (drb_uring.channel.worker)."""

    ring_fd: int               # the grant ring, inherited
    params: str                # its io_uring_params, hex, for io_uring_queue_mmap
    pool_base: int             # where the broker registered slot 0
    ring_fds: list[int]        # ctl_user, ctl_driver, pool (-1: never), user_efd, driver_efd
    extent_base: int
    extent_size: int
    align: int
    spin_ns: int

    def check(self) -> None:
        if len(self.ring_fds) != 5 or self.ring_fds[2] != -1:
            raise SpecError("a worker gets 5 ring fds and never the pool")
        if self.align & (self.align - 1) or self.extent_size <= 0:
            raise SpecError("bad alignment or extent")


# What the loop needs once it is set up (measured with strace on a serving
# worker, its stop and its exit), and nothing else.
CALLS = ("io_uring_enter", "ppoll", "read", "write", "close", "munmap", "mmap", "brk", "madvise",
         "futex", "rt_sigreturn", "rt_sigaction", "rt_sigprocmask", "sigaltstack", "getpid",
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


def main(argv: list[str] | None = None) -> int:
    spec = procs.spec_from_argv(WorkerSpec, argv)
    # No channel runs unmonitored: the kernel kills us when our parent (the
    # broker, or its stand-in that itself dies with the broker) goes.
    linux.die_with_parent()
    if os.getppid() == 1:      # reparented: the parent died before prctl
        sys.exit("drb-worker: the broker is already gone")
    from drb_uring.channel._worker import WorkerLoop
    end = ring.attach(ring.PeerFds.from_list(spec.ring_fds), spin_ns=spec.spin_ns,
                      map_pool=False)
    loop = WorkerLoop(end, spec.ring_fd, bytes.fromhex(spec.params), spec.pool_base,
                      spec.extent_base, spec.extent_size, spec.align)
    confine()
    try:
        rc = loop.serve()
    finally:
        stats = loop.stats
        loop.close()
        end.close()
    print(f"drb-worker[{os.getpid()}]: stop rc={rc} {json.dumps(stats)}", file=sys.stderr)
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
