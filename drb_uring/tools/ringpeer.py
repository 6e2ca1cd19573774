"""The driver-side half of the ring soak and benchmarks, as its own process.

The user side starts it with :func:`spawn` and passes the ring's file
descriptors by inheritance, so the peer maps the memory from the fds alone,
exactly as a real driver domain does. It prints one JSON line and exits 0
when everything it checked was right.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import subprocess
import sys

from drb_uring import procs
from drb_uring.errors import DrbError
from drb_uring.spec import Spec, SpecError

MODES = ("echo", "drain", "raw")


class PeerError(DrbError):
    pass


@dataclasses.dataclass(frozen=True)
class PeerSpec(Spec):
    mode: str
    fds: list[int]
    count: int = 0
    batch: int = 32
    spin_ns: int = 0
    timeout: float = 10.0
    cpu: int | None = None

    def check(self) -> None:
        if self.mode not in MODES:
            raise SpecError(f"mode must be one of {', '.join(MODES)}")


def spawn(mode: str, fds: list[int], *, count: int = 0, batch: int = 32,
          spin_ns: int = 0, timeout: float = 10.0, cpu: int | None = None,
          stdout=subprocess.PIPE) -> subprocess.Popen:
    """Start a peer process that inherits exactly ``fds``."""
    spec = PeerSpec(mode=mode, fds=list(fds), count=count, batch=batch, spin_ns=spin_ns,
                    timeout=timeout, cpu=cpu)
    return procs.spawn("drb_uring.tools.ringpeer", spec, fds, stdout=stdout)


def result(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for a peer and return its JSON result; kill it on timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise PeerError(f"ring peer did not finish within {timeout}s") from None
    lines = (out or b"").decode().strip().splitlines()
    res = json.loads(lines[-1]) if lines else {}
    res["returncode"] = proc.returncode
    return res


def main(argv: list[str] | None = None) -> int:
    a = procs.spec_from_argv(PeerSpec, argv)
    fds = a.fds
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})

    if a.mode == "raw":
        mem = mmap.mmap(fds[0], mmap.PAGESIZE)
        from drb_uring.ring._bench import raw_pingpong
        raw_pingpong(mem, a.count, False, a.timeout)
        print(json.dumps({"done": a.count, "errors": 0, "error": None}))
        return 0

    from drb_uring import ring
    from drb_uring.ring import _bench
    end = ring.attach(ring.PeerFds.from_list(fds), spin_ns=a.spin_ns)
    with end:
        fn = _bench.echo_driver if a.mode == "echo" else _bench.drain_driver
        res = fn(end, a.count, a.batch, a.timeout)
    print(json.dumps(res))
    return 0 if res["error"] is None and res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
