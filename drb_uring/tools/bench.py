"""``drb bench``: I/O through a channel, per transport, op, block size and
queue depth, all in one run on one machine.

Each transport gets its own monitor process and backing file; every cell
opens a fresh channel, runs the Cython workload loop for the given time and
records IOPS, MB/s, latency percentiles and system calls per I/O.
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import subprocess
import tempfile

from drb_uring import procs
from drb_uring.channel.broker import BrokerSpec
from drb_uring.channel.client import Channel
from drb_uring.domains import cgroup
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.errors import DrbError
from drb_uring.ring import layout as L
from drb_uring.tools import _load, ringbench

TRANSPORTS = ("drb", "drb-poll")
OPS = {"randread": (OP_READ_FIXED, True), "randwrite": (OP_WRITE_FIXED, True),
       "read": (OP_READ_FIXED, False), "write": (OP_WRITE_FIXED, False)}
POLL_NS = 3_600 * 10**9
MAX_SAMPLES = 2_000_000
EXTENT = 256 << 20


def parse_list(text: str, allowed=None, conv=str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise BenchError("empty list")
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise BenchError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    try:
        return [conv(x) for x in items]
    except ValueError as e:
        raise BenchError(str(e)) from None


class BenchError(DrbError):
    pass


class Domains:
    """Two cgroups standing in for the user and driver domains, so the
    eBPF counters can split mode switches by side: the benchmark loop runs
    in `user`, each monitor (and so its workers) in `driver`."""

    def __init__(self):
        from drb_uring.enforce.client import EnforceClient
        self.root = os.path.join(cgroup.cgroup2_root(), "drb", f"bench-{os.getpid()}")
        self.home = cgroup.path_of(os.getpid())
        self.enforcer = None
        os.makedirs(self.root)
        try:
            self.user = os.path.join(self.root, "user")
            self.driver = os.path.join(self.root, "driver")
            os.mkdir(self.user)
            os.mkdir(self.driver)
            self.enforcer = EnforceClient()
            self.enforcer.watch(self.user)
            self.enforcer.watch(self.driver)
        except BaseException:
            self.close()         # a failed start leaves no group behind
            raise

    def counters(self) -> dict:
        return {"user": self.enforcer.counters(self.user),
                "driver": self.enforcer.counters(self.driver)}

    def close(self) -> None:
        cgroup.join(self.home)
        if self.enforcer is not None:
            self.enforcer.close()
        cgroup.kill_and_remove(self.root)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self.root))


@contextlib.contextmanager
def _broker(transport: str, workdir: str, enforce: bool = True,
            domains: Domains | None = None):
    tag = f"{transport}-{'mon' if enforce else 'nomon'}"
    backing = os.path.join(workdir, f"{tag}.img")
    with open(backing, "wb") as f:
        # Real data, not a hole: reads must come from the page cache.
        chunk = os.urandom(1 << 20)
        for _ in range(EXTENT >> 20):
            f.write(chunk)
    spec = BrokerSpec(socket=os.path.join(workdir, f"{tag}.sock"), enforce=enforce,
                      device=backing)
    if transport == "drb-poll":
        spec = spec.replace(worker_spin_ns=POLL_NS)
    log = open(os.path.join(workdir, f"{tag}.log"), "w")
    _, driver_cpu = ringbench.cpus()

    def enter():
        # The broker and its workers on one CPU, the benchmark loop on the
        # other, as in drb bench-ring: the same placement for every cell.
        if domains:
            cgroup.join(domains.driver)
        if driver_cpu is not None:
            os.sched_setaffinity(0, {driver_cpu})

    proc = procs.spawn("drb_uring.channel.broker", spec, stdout=subprocess.PIPE, stderr=log,
                       preexec_fn=enter)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise BenchError(f"broker for {transport} did not start; see {log.name}")
        yield spec.socket
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        log.close()


def _counted_pass(ch, domains: Domains, opcode, bs, qd, seconds, rand, samples):
    """The same loop with the counters attached; returns (deltas, I/Os).
    Only the C loop runs in the user domain's group, and it allocates
    nothing, so what the counters see there is the I/O path's own."""
    domains.enforcer.count(True)
    try:
        c0 = domains.counters()
        cgroup.join(domains.user)
        try:
            res = _load.run(ch.end, opcode, bs, qd, seconds, EXTENT, rand, 7,
                                              len(samples), samples)
        finally:
            cgroup.join(domains.home)
        c1 = domains.counters()
    finally:
        domains.enforcer.count(False)
    if res["error"] or not res["done"]:
        raise BenchError(f"counted pass failed: {res['error']}")
    return ({side: {k: c1[side][k] - c0[side][k] for k in c0[side]} for side in c0},
            res["done"])


def run_cell(sock: str, transport: str, op: str, bs: int, qd: int, seconds: float,
             monitor: bool = True, domains: Domains | None = None) -> dict:
    slot = max(bs, L.PAGE)
    geo = L.Geometry(sq_entries=max(2, 1 << (qd - 1).bit_length()),
                     cq_entries=max(2, 1 << (qd - 1).bit_length()),
                     slot_size=1 << (slot - 1).bit_length(),
                     slot_count=max(1, 1 << (qd - 1).bit_length()))
    spin = POLL_NS if transport == "drb-poll" else None
    kw = {"spin_ns": spin} if spin else {}
    opcode, rand = OPS[op]
    with Channel(sock, EXTENT, geometry=geo, **kw) as ch:
        if ch.monitored != monitor:
            raise BenchError(f"channel monitored={ch.monitored}, expected {monitor}")
        ch.pread(0, 1)     # the worker is up and serving before anything is timed
        samples = array.array("Q", bytes(8 * MAX_SAMPLES))
        before = dict(ch.end.stats)
        with ringbench.Pinned(ringbench.cpus()[0]):
            res = _load.run(ch.end, opcode, bs, qd, seconds, EXTENT, rand,
                                              42, MAX_SAMPLES, samples)
        after = ch.end.stats
        res["latencies_ns"] = samples[:res["nsamples"]]
        # Mode switches come from a second, shorter pass with the counters'
        # hooks attached: they run on every system call of the host and
        # would slow the timed pass above.
        counted = _counted_pass(ch, domains, opcode, bs, qd, max(0.2, seconds / 4), rand,
                                samples) if domains else None
    if res["error"]:
        raise BenchError(f"{transport} {op} bs={bs} qd={qd}: {res['error']}")
    if res["errors"]:
        raise BenchError(f"{transport} {op} bs={bs} qd={qd}: {res['errors']} failed I/Os")
    ios, secs = res["done"], res["seconds"]
    lat = sorted(res["latencies_ns"])
    if counted is not None:
        d, n = counted
        per_io = {"syscalls_user": round(d["user"]["syscalls"] / n, 4),
                  "syscalls_driver": round(d["driver"]["syscalls"] / n, 4),
                  "ctx_switches": round((d["user"]["ctx_switches"]
                                         + d["driver"]["ctx_switches"]) / n, 4),
                  "map_ops": round(sum(d[s][k] for s in d for k in ("mmap", "munmap",
                                                                     "mprotect")) / n, 4)}
    else:
        # Without the counters: the user side's own wake-up calls only.
        user_calls = ((after["notifies"] - before["notifies"])
                      + (after["sleeps"] - before["sleeps"]))
        per_io = {"syscalls_user": round(user_calls / ios, 4), "syscalls_driver": None,
                  "ctx_switches": None, "map_ops": None}
    return {
        "transport": transport, "op": op, "bs": bs, "qd": qd, "pairs": 1, "monitor": monitor,
        "seconds": round(secs, 3), "ios": ios, "iops": round(ios / secs),
        "mb_s": round(ios * bs / secs / 1e6, 1),
        "lat_us": {"mean": round(sum(lat) / len(lat) / 1e3, 2),
                   "p50": ringbench.percentile(lat, 50) / 1e3,
                   "p99": ringbench.percentile(lat, 99) / 1e3,
                   "p999": ringbench.percentile(lat, 99.9) / 1e3},
        # Counted by the eBPF monitor per domain (cgroup), during the loop only.
        "per_io": per_io,
        "violations": 0 if monitor else None,
    }


def run(transports, ops, sizes, depths, seconds, progress=print,
        monitor=(True,), repeat: int = 1) -> dict:
    """Every cell, for each transport and monitor setting, `repeat` times.
    The settings of one cell run back to back, alternating, so that drift
    on a shared machine falls on both sides of a comparison."""
    runs = []
    cells = list(itertools.product(ops, sizes, depths))
    domains = Domains()
    try:
        with tempfile.TemporaryDirectory(prefix="drb-bench-") as work, \
                contextlib.ExitStack() as stack:
            socks = {(t, m): stack.enter_context(_broker(t, work, m, domains))
                     for t in transports for m in monitor}
            total = len(cells) * len(socks) * repeat
            n = 0
            for t in transports:
                for op, bs, qd in cells:
                    for rep in range(repeat):
                        for mon in monitor:
                            n += 1
                            progress(f"[{n}/{total}] {t} monitor={'on' if mon else 'off'} "
                                     f"{op} bs={bs} qd={qd} for {seconds}s")
                            r = run_cell(socks[(t, mon)], t, op, bs, qd, seconds, mon, domains)
                            r["repeat"] = rep
                            runs.append(r)
    finally:
        domains.close()
    return {"schema": 1, "machine": ringbench.machine(), "runs": runs,
            "monitor_ratio": monitor_ratios(runs)}


def monitor_ratios(runs) -> list[dict]:
    """Median IOPS with the monitor over median IOPS without, per cell."""
    import statistics
    by: dict = {}
    for r in runs:
        cell = (r["transport"], r["op"], r["bs"], r["qd"])
        by.setdefault(cell, {}).setdefault(r["monitor"], []).append(r["iops"])
    out = []
    for (t, op, bs, qd), v in by.items():
        if v.get(True) and v.get(False):
            on, off = statistics.median(v[True]), statistics.median(v[False])
            out.append({"transport": t, "op": op, "bs": bs, "qd": qd, "runs": len(v[True]),
                        "iops_on_over_off": round(on / off, 3) if off else None})
    return out


def table(rep: dict) -> str:
    head = (f"{'transport':<10}{'mon':<5}{'op':<10}{'bs':>8}{'qd':>4}{'IOPS':>11}{'MB/s':>9}"
            f"{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'sys/io U':>10}")
    rows = [head]
    for r in rep["runs"]:
        lat = r["lat_us"]
        rows.append(f"{r['transport']:<10}{'on' if r['monitor'] else 'off':<5}"
                    f"{r['op']:<10}{r['bs']:>8}{r['qd']:>4}"
                    f"{r['iops']:>11}{r['mb_s']:>9}{lat['p50']:>9.2f}{lat['p99']:>9.2f}"
                    f"{lat['p999']:>10.2f}{r['per_io']['syscalls_user']:>10.3f}")
    for m in rep.get("monitor_ratio", []):
        rows.append(f"monitor on/off median IOPS ({m['runs']} runs each), {m['transport']} "
                    f"{m['op']} bs={m['bs']} qd={m['qd']}: {m['iops_on_over_off']:.3f}"
                    "   (target >= 0.9)")
    return "\n".join(rows)


def write_json(rep: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")
