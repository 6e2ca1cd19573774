"""The driver-side half of the ring soak and benchmarks, as its own process.

The user side starts it with :func:`spawn` and passes the ring's file
descriptors by inheritance, so the peer maps the memory from the fds alone,
exactly as a real driver domain does. It prints one JSON line and exits 0
when everything it checked was right.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys

from drb_uring import procs

MODES = ("echo", "drain", "raw", "write-peer-page")


def spawn(mode: str, fds: list[int], *, count: int = 0, batch: int = 32,
          spin_ns: int = 0, timeout: float = 10.0, cpu: int | None = None,
          stdout=subprocess.PIPE) -> subprocess.Popen:
    """Start a peer process that inherits exactly ``fds``."""
    args = [mode, "--fds", ",".join(map(str, fds)), "--count", str(count),
            "--batch", str(batch), "--spin-ns", str(spin_ns), "--timeout", str(timeout)]
    if cpu is not None:
        args += ["--cpu", str(cpu)]
    return procs.spawn_module("drb_uring.ringpeer", args, fds, stdout=stdout)


def result(proc: subprocess.Popen, timeout: float) -> dict:
    """Wait for a peer and return its JSON result; kill it on timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"ring peer did not finish within {timeout}s") from None
    lines = (out or b"").decode().strip().splitlines()
    res = json.loads(lines[-1]) if lines else {}
    res["returncode"] = proc.returncode
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="drb-ringpeer", description=__doc__)
    p.add_argument("mode", choices=MODES)
    p.add_argument("--fds", required=True)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--spin-ns", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--cpu", type=int)
    a = p.parse_args(argv)
    fds = [int(x) for x in a.fds.split(",")]
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})

    if a.mode == "raw":
        mem = mmap.mmap(fds[0], mmap.PAGESIZE)
        from drb_uring._ringbench import raw_pingpong
        raw_pingpong(mem, a.count, False, a.timeout)
        print(json.dumps({"done": a.count, "errors": 0, "error": None}))
        return 0

    from drb_uring import _ringbench, ring
    end = ring.attach(ring.PeerFds.from_list(fds), spin_ns=a.spin_ns)
    with end:
        if a.mode == "write-peer-page":
            # Proves one-writer-per-page: this store must die with SIGSEGV.
            import ctypes

            from drb_uring._ring import _address_of
            print(json.dumps({"about_to_write": True}), flush=True)
            ctypes.memset(_address_of(end, "ctl_peer") + 2 * 64, 0xff, 4)
            print(json.dumps({"error": "write to the peer's page succeeded"}))
            return 3
        fn = _ringbench.echo_driver if a.mode == "echo" else _ringbench.drain_driver
        res = fn(end, a.count, a.batch, a.timeout)
    print(json.dumps(res))
    return 0 if res["error"] is None and res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
