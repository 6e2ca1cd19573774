"""``drb bench-ring``: the double ring against the physical floor.

Measures, in one run and the same way for both:

* round-trip latency of one request and its response between two processes
  on two cores, over the ring with both sides busy-polling;
* the raw floor: one cache line bounced between the same two processes;
* one-way streaming rate at batch 1 and batch 32.
"""

from __future__ import annotations

import mmap
import os
import platform
import time
from typing import Callable

from drb_uring import ring
from drb_uring.ring import _bench
from drb_uring.ring import layout as L
from drb_uring.tools import ringpeer

POLL_FOREVER_NS = 3_600 * 10**9  # a spin budget no run reaches: pure polling


def percentile(sorted_samples, q: float) -> int:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_samples:
        raise ValueError("no samples")
    k = max(0, min(len(sorted_samples) - 1, int(round(q / 100.0 * len(sorted_samples) + 0.5)) - 1))
    return int(sorted_samples[k])


def _summary(samples) -> dict:
    s = sorted(samples)
    return {"p50": percentile(s, 50), "p99": percentile(s, 99)}


def cpus() -> tuple[int | None, int | None]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)


class Pinned:
    """Pin this process to one CPU for the duration of a measurement."""

    def __init__(self, cpu: int | None):
        self.cpu = cpu
        self.saved = os.sched_getaffinity(0)

    def __enter__(self):
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.saved)


def _with_peer(mode: str, count: int, batch: int, spin_ns: int,
               body: Callable[[ring.UserEnd], object], geometry: L.Geometry | None = None):
    me, other = cpus()
    end, peer = ring.create(geometry or L.Geometry(sq_entries=256, cq_entries=256,
                                                   slot_size=4096, slot_count=1),
                            spin_ns=spin_ns)
    with end:
        proc = ringpeer.spawn(mode, peer.as_list(), count=count, batch=batch,
                              spin_ns=spin_ns, cpu=other)
        peer.close()
        try:
            with Pinned(me):
                out = body(end)
        finally:
            res = ringpeer.result(proc, timeout=60)
        if res.get("returncode") != 0:
            raise ringpeer.PeerError(f"ring peer failed: {res}")
    return out


def ring_rtt(iters: int, warmup: int = 10_000) -> dict:
    def body(end):
        _bench.pingpong_user(end, warmup)
        return _bench.pingpong_user(end, iters, first=warmup)
    return _summary(_with_peer("echo", warmup + iters, 1, POLL_FOREVER_NS, body))


def raw_rtt(iters: int, warmup: int = 10_000) -> dict:
    me, other = cpus()
    fd = os.memfd_create("drb-raw-line", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        mem = mmap.mmap(fd, mmap.PAGESIZE)
        proc = ringpeer.spawn("raw", [fd], count=warmup + iters, cpu=other)
    finally:
        os.close(fd)
    try:
        with Pinned(me):
            samples = _bench.raw_pingpong(mem, warmup + iters, True)
    finally:
        res = ringpeer.result(proc, timeout=60)
    if res.get("returncode") != 0:
        raise ringpeer.PeerError(f"raw peer failed: {res}")
    del samples[:warmup]
    out = _summary(samples)
    mem.close()
    return out


def stream_eps(count: int, batch: int) -> float:
    res = _with_peer("drain", count, batch, POLL_FOREVER_NS,
                     lambda end: _bench.push_stream(end, count, batch))
    if res["error"]:
        raise ringpeer.PeerError(res["error"])
    return count / res["seconds"]


def machine() -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "host": platform.node(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run(iters: int = 200_000, count: int = 20_000_000, progress=print) -> dict:
    progress(f"ring round trip, {iters} samples ...")
    r = ring_rtt(iters)
    progress(f"raw cache-line round trip, {iters} samples ...")
    raw = raw_rtt(iters)
    progress(f"one-way stream, {count // 10} entries at batch 1 ...")
    b1 = stream_eps(count // 10, 1)
    progress(f"one-way stream, {count} entries at batch 32 ...")
    b32 = stream_eps(count, 32)
    return {"schema": 1, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "ring_rtt_ns": r, "raw_rtt_ns": raw,
            "stream_eps": {"batch1": round(b1), "batch32": round(b32)}}


def table(rep: dict) -> str:
    r, raw, s = rep["ring_rtt_ns"], rep["raw_rtt_ns"], rep["stream_eps"]
    ratio = r["p50"] / raw["p50"] if raw["p50"] else float("inf")
    lines = [
        f"{'measure':<34}{'p50':>10}{'p99':>10}",
        f"{'ring round trip (ns)':<34}{r['p50']:>10}{r['p99']:>10}",
        f"{'raw cache-line round trip (ns)':<34}{raw['p50']:>10}{raw['p99']:>10}",
        f"{'ring / raw at p50':<34}{ratio:>10.2f}   (target <= 2.0)",
        "",
        f"{'one-way stream, batch 1':<34}{s['batch1'] / 1e6:>10.1f} M entries/s",
        f"{'one-way stream, batch 32':<34}{s['batch32'] / 1e6:>10.1f} M entries/s   (target >= 20)",
    ]
    return "\n".join(lines)
