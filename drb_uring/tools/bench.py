"""``drb bench``: the paper's comparison on one host, in real domains.

Every transport runs between a user domain and a driver domain made the
way ``drb up`` makes them (runc containers, the sandboxes, the monitor),
on the same device and with the same workload loop in C:

- ``drb``, ``drb-poll``: the double ring through the monitor (the worker
  sleeping when idle, or polling);
- ``grant-map``: the original split-driver mechanism, with a grant mapped
  and unmapped per request and an event per publish;
- ``socket``: request and data over a Unix socket;
- ``direct``: the user domain driving an io_uring on the device itself,
  the ceiling without isolation;

and fio's io_uring engine on the same file, as a reference others can
reproduce. Each cell runs in a fresh process on a fresh channel; the
counted pass that follows the timed one gives the per-I/O costs from the
monitor's counters of each domain.

A cell with ``users`` above 1 (the double ring only) runs in a pair of that
many user domains on one driver domain: the same cell in every user domain,
each on its own extent, all verified first and then told ``go`` at once.
Its row gives the aggregate IOPS and each domain's share.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time

from drb_uring.tools import report, ringbench
from drb_uring.tools.benchpair import (  # noqa: F401 - the bench's names, in one place
    EXTENT,
    MANY_USERS,
    OPS,
    POLL_NS,
    TRANSPORTS,
    USERS_RING_ONLY,
    BenchError,
    BenchPair,
    Cell,
    pair_key,
    run_cell,
)

DATA_DIR = "/var/tmp/drb-bench"
CELL_SECONDS = 3.0      # each cell's timed pass, by default
SMOKE_SECONDS = 0.2     # with --smoke: every step runs, nothing is measured
PAGE_CACHE = ("warm by design: the device file is read through once before the first "
              "cell (the warm-up step), and fio runs with invalidate=0")


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


def matrix(transports, ops, sizes, depths, users=(1,), monitor=(True,)) -> list[Cell]:
    """Every combination; the monitor setting innermost, so that the two
    sides of an on/off comparison run back to back. The monitor setting
    applies to the double ring only (the baselines do not go through it)."""
    cells = []
    for t, op, bs, qd, u in itertools.product(transports, ops, sizes, depths, users):
        for m in (monitor if t.startswith("drb") else (True,)):
            cells.append(Cell(t, op, bs, qd, u, m))
    return cells


def quick_cells() -> list[Cell]:
    """What the README shows, in under three minutes on a 2-core machine."""
    cells = [Cell(t, "randread", 4096, qd) for t in TRANSPORTS for qd in (1, 32)]
    cells += [Cell("drb", "randread", 4096, qd, monitor=False) for qd in (1, 32)]
    cells += [Cell(t, "randread", 65536, 1) for t in ("drb", "grant-map", "direct")]
    cells += [Cell(t, "read", 1 << 20, 8) for t in ("drb", "direct")]
    cells += [Cell("drb", "randread", 4096, 32, users=16)]
    return cells


def full_cells() -> list[Cell]:
    return matrix(TRANSPORTS, list(OPS), [512, 4096, 65536, 1 << 20], [1, 8, 32, 128],
                  [1, 4, 16], (True, False))


# ---- the device -------------------------------------------------------------------

def data_file(size: int, progress) -> str:
    """Random bytes, written once and kept between runs of the same size."""
    os.makedirs(DATA_DIR, mode=0o700, exist_ok=True)
    path = os.path.join(DATA_DIR, f"random-{size >> 20}m.img")
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    progress(f"writing {size >> 20} MiB of random data to {path} (kept for later runs)")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def warm(path: str) -> None:
    """The warm-up step: every page of the device in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(4 << 20):
            pass


# ---- fio, the reference -----------------------------------------------------------------

def fio_cell(device: str, op: str, bs: int, qd: int, seconds: float, cpu) -> dict | None:
    """fio's io_uring engine on the same file, on the user domain's CPU."""
    fio = shutil.which("fio")
    if fio is None:
        return None
    rw = {"randread": "randread", "randwrite": "randwrite", "read": "read",
          "write": "write"}[op]
    argv = [fio, "--name=ref", f"--filename={device}", "--ioengine=io_uring", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={qd}", f"--size={EXTENT}", "--time_based",
            f"--runtime={max(1, round(seconds))}", "--invalidate=0", "--direct=0",
            "--fixedbufs", "--registerfiles", "--norandommap", "--randrepeat=0",
            "--lat_percentiles=1", "--output-format=json"]
    if cpu is not None:
        argv.append(f"--cpus_allowed={cpu}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise BenchError(f"fio failed: {proc.stderr.strip().splitlines()[-1:]}")
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    # Submission to completion, as the loop measures (clat alone misses
    # the reads that complete inside the submitting call).
    pct = side["lat_ns"].get("percentile", {})
    return {"op": op, "bs": bs, "qd": qd, "iops": round(side["iops"]),
            "mb_s": round(side["bw_bytes"] / 1e6, 1),
            "lat_us": {"p50": pct.get("50.000000", 0) / 1e3, "p99": pct.get("99.000000", 0) / 1e3},
            "command": " ".join(argv[1:])}


# ---- the run ---------------------------------------------------------------------------

def _interrupted(*_):
    raise KeyboardInterrupt


def run(cells: list[Cell], seconds: float, progress=print, repeat: int = 1,
        fio: bool = True) -> dict:
    """Every cell `repeat` times, then fio on the 4k random-read cells.
    Ctrl-C or SIGTERM stops it, and every domain it made comes down."""
    old = {s: signal.signal(s, _interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(cells, seconds, progress, repeat, fio)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(cells, seconds, progress, repeat, fio) -> dict:
    from drb_uring.enforce.client import EnforceClient
    runnable = [c for c in cells if c.users == 1 or c.transport in MANY_USERS]
    skipped = [{"cell": dataclasses.asdict(c), "reason": USERS_RING_ONLY}
               for c in cells if c not in runnable]
    if not runnable:
        raise BenchError(f"nothing to run: {USERS_RING_ONLY}")
    if skipped:
        progress(f"skipping {len(skipped)} cell(s) with more than one user domain: "
                 f"{USERS_RING_ONLY}")
    cpus = ringbench.cpus()
    device = data_file(EXTENT, progress)
    progress("warming the page cache with the device's data")
    warm(device)
    # The depth-1 floor (report.floor_us): two hand-offs between these cores.
    progress("measuring the raw cache-line round trip between the two cores")
    raw = ringbench.raw_rtt(20_000)
    runs = []
    pairs: dict = {}
    enforcer = EnforceClient()
    work = tempfile.mkdtemp(prefix="drb-bench-")
    log = os.open(os.path.join(work, "cells.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    total = len(runnable) * repeat
    t0 = time.monotonic()
    try:
        k = 0
        for cell in runnable:
            for rep in range(repeat):
                k += 1
                key = pair_key(cell)
                if key not in pairs:
                    progress(f"bringing up the domains for {key[0]}"
                             f"{'' if key[1] else ' (monitor off)'}"
                             f"{f' with {cell.users} user domains' if cell.users > 1 else ''}")
                    pairs[key] = BenchPair(key, device, enforcer, cpus[1])
                left = ""
                if k > 1:
                    per = (time.monotonic() - t0) / (k - 1)
                    left = f", about {per * (total - k + 1):.0f} s left"
                progress(f"cell {k} of {total}: {cell.label()} for {seconds:g} s{left}")
                try:
                    r = run_cell(pairs[key], cell, device, seconds, log, cpus)
                except BenchError as e:
                    with open(os.path.join(work, "cells.log"), errors="replace") as f:
                        tail = f.read().strip().splitlines()[-3:]
                    raise BenchError(f"{e}" + (f"; log: {' | '.join(tail)}" if tail else "")) \
                        from None
                r["repeat"] = rep
                runs.append(r)
        references = []
        if fio:
            for cell in {(c.op, c.bs, c.qd) for c in runnable if c.transport == "direct"
                         or (c.op, c.bs) == ("randread", 4096)}:
                progress(f"fio reference: {cell[0]} bs={cell[1]} qd={cell[2]}")
                ref = fio_cell(device, *cell, seconds, cpus[0])
                if ref:
                    references.append(ref)
    finally:
        # A second Ctrl-C must not cut the tear-down short.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if pairs:
                progress("taking the benchmark's domains down")
            failures = []
            for p in pairs.values():
                try:
                    p.close()
                except Exception as e:          # the others must still come down
                    failures.append(f"{p.name}: {e}")
            if failures:
                progress(f"could not take down {'; '.join(failures)}; run drb down NAME")
        finally:
            signal.signal(signal.SIGINT, old)
        enforcer.close()
        os.close(log)
        shutil.rmtree(work, ignore_errors=True)
    return {"schema": 1, "machine": ringbench.machine(), "runs": runs,
            "skipped": skipped,
            "fio": sorted(references, key=lambda r: (r["op"], r["bs"], r["qd"])),
            "page_cache": PAGE_CACHE,
            "domains": "runc containers made as drb up makes them; a fresh cell process and "
                       "a fresh channel (or baseline plumbing) per cell; with users above 1, "
                       "one pair of that many user domains on one driver domain, the same cell "
                       "in each user domain at once on its own extent",
            "monitor_ratio": monitor_ratios(runs),
            "floor": {"raw_rtt_ns": raw}}


def monitor_ratios(runs) -> list[dict]:
    """Median IOPS with the monitor over median IOPS without, per cell (of
    one user domain)."""
    by: dict = {}
    for r in runs:
        if r.get("users", 1) != 1:
            continue                    # one user domain's cells only
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
    head = (f"{'transport':<10}{'mon':<5}{'op':<10}{'bs':>8}{'qd':>4}{'U':>3}{'IOPS':>11}"
            f"{'MB/s':>9}"
            f"{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'sys/io U':>10}{'sys/io D':>10}"
            f"{'map/io':>8}{'/direct':>8}")
    rows = [head]
    for r in rep["runs"]:
        lat, c = r["lat_us"], r["per_io"]
        vs = report.over_direct(rep["runs"], r)
        rows.append(f"{r['transport']:<10}{'on' if r['monitor'] else 'off':<5}"
                    f"{r['op']:<10}{r['bs']:>8}{r['qd']:>4}{r.get('users', 1):>3}"
                    f"{r['iops']:>11}{r['mb_s']:>9}{lat['p50']:>9.2f}{lat['p99']:>9.2f}"
                    f"{lat['p999']:>10.2f}{c['syscalls_user']:>10.3f}"
                    f"{c['syscalls_driver']:>10.3f}{c['map_ops']:>8.2f}"
                    f"{'-' if vs is None else f'{vs:.3f}':>8}")
    if line := report.floor_line(rep):
        rows.append(line)
    for r in rep["runs"]:
        if r.get("shares"):
            rows.append(f"{r['transport']} {r['op']} bs={r['bs']} qd={r['qd']} in "
                        f"{r['users']} user domains: {r['iops']} IOPS in all, per domain "
                        f"{', '.join(map(str, r['shares']))}; smallest share / mean "
                        f"{r['fairness']}   (target >= 0.5)")
    for f in rep.get("fio", []):
        rows.append(f"{'fio':<10}{'-':<5}{f['op']:<10}{f['bs']:>8}{f['qd']:>4}{'':>3}"
                    f"{f['iops']:>11}"
                    f"{f['mb_s']:>9}{f['lat_us']['p50']:>9.2f}{f['lat_us']['p99']:>9.2f}")
    for m in rep.get("monitor_ratio", []):
        rows.append(f"monitor on/off median IOPS ({m['runs']} runs each), {m['transport']} "
                    f"{m['op']} bs={m['bs']} qd={m['qd']}: {m['iops_on_over_off']:.3f}"
                    "   (target >= 0.97)")
    for s in rep.get("skipped", []):
        rows.append(f"skipped {Cell(**s['cell']).label()}: {s['reason']}")
    return "\n".join(rows)
