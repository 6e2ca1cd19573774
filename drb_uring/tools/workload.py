"""The demo's workload, run inside the user domain by ``drb demo``.

First an ordinary Python program that uses a channel as a file: it reads
the first half of its extent (the device's own data) and writes and reads
back the second half. Then the channel load generator in C reads 4 KiB
blocks at random. Prints one JSON line with what it measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time

from drb_uring import procs
from drb_uring.channel.client import Channel
from drb_uring.enforce.tasks import OP_READ_FIXED
from drb_uring.ring import layout as L
from drb_uring.spec import Spec
from drb_uring.tools import _load, hist
from drb_uring.tools.ringbench import percentile


@dataclasses.dataclass(frozen=True)
class WorkloadSpec(Spec):
    socket: str
    size: int = 64 << 20
    seconds: float = 3.0


def main(argv: list[str] | None = None) -> int:
    a = procs.spec_from_argv(WorkloadSpec, argv)
    try:
        out = run(a)
    except KeyboardInterrupt:        # the demo was interrupted: it tears down
        return 130
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


def run(a: WorkloadSpec) -> dict:
    out: dict = {}
    half = a.size // 2
    geo = L.Geometry(sq_entries=64, cq_entries=128, slot_size=64 * 1024, slot_count=64)
    with Channel(a.socket, a.size, geometry=geo) as ch:
        f = io.BufferedRandom(ch.file(), buffer_size=1 << 20)
        # What the device holds: the caller compares this with the file.
        t0 = time.monotonic()
        got = hashlib.sha256(f.read(half)).hexdigest()
        out["read"] = {"bytes": half, "seconds": time.monotonic() - t0, "sha256": got}
        block = bytes(range(256)) * 4096                 # 1 MiB
        t0 = time.monotonic()
        want = hashlib.sha256()
        f.seek(half)
        for _ in range(half >> 20):
            f.write(block)
            want.update(block)
        f.flush()
        ch.flush()
        f.seek(half)
        got = hashlib.sha256(f.read(half)).hexdigest()
        out["write"] = {"bytes": half, "seconds": time.monotonic() - t0,
                        "sha256_ok": got == want.hexdigest(), "sha256": want.hexdigest()}
        for qd in (1, 32):
            r = _load.run(ch.end, OP_READ_FIXED, 4096, qd, a.seconds, a.size, True, 7)
            lat = sorted(r.pop("latencies_ns"))
            out[f"randread_4k_qd{qd}"] = {
                "ios": r["done"], "seconds": r["seconds"], "errors": r["errors"],
                "error": r["error"],
                "lat_us": {q: percentile(lat, v) / 1e3
                           for q, v in (("p50", 50), ("p99", 99), ("p999", 99.9))},
                "hist_us": dict(hist.counts(x // 1000 for x in lat))}
    return out


if __name__ == "__main__":
    sys.exit(main())
