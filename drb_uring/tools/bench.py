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

import contextlib
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

from drb_uring import procs
from drb_uring.domains import control, runtime
from drb_uring.domains.config import PairConfig
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.errors import DrbError
from drb_uring.ring import layout as L
from drb_uring.tools import baselines, ringbench
from drb_uring.tools.benchcell import CellSpec

TRANSPORTS = ("drb", "drb-poll", "grant-map", "socket", "direct")
OPS = {"randread": (OP_READ_FIXED, True), "randwrite": (OP_WRITE_FIXED, True),
       "read": (OP_READ_FIXED, False), "write": (OP_WRITE_FIXED, False)}
POLL_NS = 3_600 * 10**9
EXTENT = 256 << 20
DATA_DIR = "/var/tmp/drb-bench"
COUNTED_MIN_S = 0.2
CELL_TIMEOUT_S = 120
MANY_USERS = ("drb", "drb-poll")
USERS_RING_ONLY = ("more than one user domain runs for the double ring only (drb, drb-poll): "
                   "the baselines have no driver domain shared by many user domains")
PAGE_CACHE = ("warm by design: the device file is read through once before the first "
              "cell (the warm-up step), and fio runs with invalidate=0")


class BenchError(DrbError):
    pass


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


@dataclasses.dataclass(frozen=True)
class Cell:
    transport: str
    op: str
    bs: int
    qd: int
    users: int = 1
    monitor: bool = True

    def label(self) -> str:
        mon = "" if self.monitor else " monitor=off"
        users = f" users={self.users}" if self.users > 1 else ""
        return f"{self.transport}{mon} {self.op} bs={self.bs} qd={self.qd}{users}"


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


# ---- the domains -------------------------------------------------------------------

def _pair_key(cell: Cell) -> tuple:
    """(kind, monitor), and the number of user domains when above 1."""
    if cell.transport in ("grant-map", "socket"):
        return ("drb", True)          # the same domains as drb: made by drb up, monitored
    if cell.users > 1:
        return (cell.transport, cell.monitor, cell.users)
    return (cell.transport, cell.monitor)


class BenchPair:
    """A pair made as ``drb up`` makes it, for the cells of one kind:
    the daemon and its workers on the driver's CPU."""

    def __init__(self, key: tuple, device: str, enforcer, driver_cpu):
        kind, monitor, users = (*key, 1)[:3]
        self.name = (f"bench-{os.getpid()}-{kind}{'' if monitor else '-nm'}"
                     f"{f'-u{users}' if users > 1 else ''}")[:31]
        cfg = PairConfig(name=self.name, backing=device, no_monitor=not monitor,
                         worker_spin_ns=POLL_NS if kind == "drb-poll" else None,
                         user_io_uring=kind == "direct", users=users)
        saved = os.sched_getaffinity(0)
        try:
            if driver_cpu is not None:
                os.sched_setaffinity(0, {driver_cpu})      # the daemon inherits it
            self.state = control.start_pair(cfg)
        finally:
            os.sched_setaffinity(0, saved)
        # Each user domain by its own name (user0, ...), and the driver.
        self.users = self.state.get("users", ["user"])
        self.groups = {r: self.state["domains"][r]["cgroup"] for r in (*self.users, "driver")}
        self.enforcer = enforcer
        try:
            for g in self.groups.values():
                enforcer.watch(g)
        except BaseException:
            self.close()
            raise

    def exec_argv(self, role: str, module: str, spec, nfds: int) -> list[str]:
        dm = self.state["domains"][role]
        argv = [runtime.runc(), "--root", self.state["runc_root"], "exec"]
        if nfds:
            argv += ["--preserve-fds", str(nfds)]
        return argv + ["--cwd", "/", dm["runc_id"], *runtime.python_argv(module, spec)]

    def counters(self) -> dict:
        """Each domain's counters; "user" sums the user domains'."""
        per = {r: self.enforcer.counters(g) for r, g in self.groups.items()}
        out = {"driver": per["driver"]}
        out["user"] = {k: sum(per[u][k] for u in self.users) for k in per[self.users[0]]}
        return out

    def close(self) -> None:
        for g in self.groups.values():
            with contextlib.suppress(Exception):
                self.enforcer.unwatch(g)
        control.stop_pair(self.name)


# ---- one cell -----------------------------------------------------------------------

def _geometry(bs: int, qd: int) -> tuple[int, int, int]:
    """(ring entries, slots, slot size) for `qd` requests of `bs` bytes."""
    return L.next_pow2(qd, 2), L.next_pow2(qd), L.next_pow2(max(bs, L.PAGE))


def _read_line(f, proc, what: str) -> dict:
    line = f.readline()
    if not line:
        raise BenchError(f"{what} ended without a result (exit {proc.wait()})")
    out = json.loads(line)
    if out.get("error") and "done" not in out:
        raise BenchError(f"{what}: {out['error']}")
    return out


def run_cell(pair: BenchPair, cell: Cell, device: str, seconds: float, log: int,
             cpus=(None, None)) -> dict:
    opcode, rand = OPS[cell.op]
    entries, slot_count, slot_size = _geometry(cell.bs, cell.qd)
    user_cpu, driver_cpu = cpus
    kw = dict(transport=cell.transport, opcode=opcode, rand=rand, bs=cell.bs, qd=cell.qd,
              seconds=seconds, counted_seconds=max(COUNTED_MIN_S, seconds / 4), extent=EXTENT,
              slot_count=slot_count, slot_size=slot_size, entries=entries, cpu=user_cpu)
    users = pair.users if cell.users > 1 else pair.users[:1]
    if len(users) != cell.users:
        raise BenchError(f"{cell.label()}: the pair has {len(pair.users)} user domains")
    cells: list[_Running] = []
    with contextlib.ExitStack() as stack:
        fds: list[int] = []
        if cell.transport.startswith("drb"):
            kw.update(socket=pair.state["socket"],
                      spin_ns=POLL_NS if cell.transport == "drb-poll" else None)
        else:
            if cell.users > 1:
                raise BenchError(f"{cell.label()}: {USERS_RING_ONLY}")
            dev = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            stack.callback(os.close, dev)
            p = baselines.plumb(cell.transport, dev, slot_count, slot_size, cell.qd)
            stack.callback(p.close)
            if p.server is not None:
                argv = pair.exec_argv("driver", "drb_uring.tools.baselines", p.server,
                                      len(p.driver_fds))
                pin = (lambda: os.sched_setaffinity(0, {driver_cpu})) if driver_cpu is not None \
                    else None
                driver = baselines.DriverSide(p, argv, before_exec=pin, stderr=log)
                stack.callback(driver.stop)
            fds = p.user_fds
            kw.update(nfds=len(fds), args=p.user_args)
        for role in users:
            # Each user domain's cell on its own extent, all of it (a pair
            # with one user domain: the bench's whole device).
            dm = pair.state["domains"][role]
            base, size = dm.get("extent") or (0, EXTENT)
            spec = CellSpec(**{**kw, "extent": min(size, EXTENT)})
            label = cell.label() + (f" in {role}" if cell.users > 1 else "")
            cells.append(_Running(pair, role, spec, fds, log, label, base))
            stack.callback(cells[-1].close)
        for c in cells:
            c.integrity = c.read(c.label)["verify"]
            check_bytes(device, c.integrity, c.label, c.base)
        # Every cell verified: all start at once.
        _tell_all(cells, "go")
        timed = [c.read(c.label) for c in cells]
        pair.enforcer.count(True)
        try:
            c0 = pair.counters()
            _tell_all(cells, "count")
            counted = [c.read(f"{c.label} (counted pass)") for c in cells]
            c1 = pair.counters()
        finally:
            pair.enforcer.count(False)
        _tell_all(cells, "end")
        rcs = [c.finish() for c in cells]
    for c, rc in zip(cells, rcs, strict=True):
        if rc != 0:
            raise BenchError(f"{c.label}: the cell exited with {rc}")
    for c, res in [*zip(cells, timed, strict=True), *zip(cells, counted, strict=True)]:
        if res["error"]:
            raise BenchError(f"{c.label}: {res['error']}")
        if res["errors"]:
            raise BenchError(f"{c.label}: {res['errors']} failed I/Os")
        if cell.transport.startswith("drb") and "monitored" in res \
                and res["monitored"] != cell.monitor:
            raise BenchError(f"{c.label}: channel monitored={res['monitored']}")
    delta = {r: {k: c1[r][k] - c0[r][k] for k in c0[r]} for r in c0}
    row = _row(cell, _aggregate(timed), sum(r["done"] for r in counted), delta)
    if cell.users == 1:
        row["integrity"] = cells[0].integrity     # checked against the device file above
    else:
        # Each domain's IOPS, in user-domain order; they sum to the row's IOPS.
        shares = [round(t["done"] / t["seconds"]) for t in timed]
        mean = sum(shares) / len(shares)
        row.update(iops=sum(shares), mb_s=round(sum(shares) * cell.bs / 1e6, 1),
                   shares=shares, share_domains=list(users),
                   fairness=round(min(shares) / mean, 3) if mean else None,
                   integrity=[c.integrity for c in cells])
    return row


class _Running:
    """One cell process in one user domain; its stdin and stdout are pipes to us."""

    def __init__(self, pair: BenchPair, role: str, spec: CellSpec, fds: list[int], log: int,
                 label: str, base: int):
        self.label, self.base, self.integrity = label, base, None
        cin_r, cin_w = os.pipe()
        cout_r, cout_w = os.pipe()
        try:
            self.proc = procs.spawn_at(pair.exec_argv(role, "drb_uring.tools.benchcell", spec,
                                                      len(fds)),
                                       fds, stdin=cin_r, stdout=cout_w, stderr=log)
        except BaseException:
            for fd in (cin_w, cout_r):
                os.close(fd)
            raise
        finally:
            os.close(cin_r)
            os.close(cout_w)
        self.to = os.fdopen(cin_w, "w")
        self.out = os.fdopen(cout_r, "r")

    def read(self, what: str) -> dict:
        return _read_line(self.out, self.proc, what)

    def tell(self, word: str) -> None:
        self.to.write(word + "\n")
        self.to.flush()

    def finish(self) -> int:
        self.to.close()
        return self.proc.wait(30)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.to.close()
        self.out.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _tell_all(cells: list[_Running], word: str) -> None:
    for c in cells:
        c.tell(word)


def _aggregate(timed: list[dict]) -> dict:
    """The timed passes of a cell's domains as one: I/Os summed over the
    longest pass, the histograms summed, and each latency percentile the
    highest among the domains (the mean weighted by I/Os)."""
    if len(timed) == 1:
        return timed[0]
    ios = sum(t["done"] for t in timed)
    out = {"done": ios, "seconds": max(t["seconds"] for t in timed), "errors": 0, "error": None}
    lats = [t["lat_us"] for t in timed if "lat_us" in t]
    if lats:
        out["lat_us"] = {k: max(x[k] for x in lats) for k in ("p50", "p99", "p999")}
        out["lat_us"]["mean"] = round(sum(t["lat_us"]["mean"] * t["done"] for t in timed
                                          if "lat_us" in t) / max(ios, 1), 2)
    hist_us: dict = {}
    for t in timed:
        for b, n in t.get("hist_us", {}).items():
            hist_us[b] = hist_us.get(b, 0) + n
    out["hist_us"] = hist_us
    return out


def check_bytes(device: str, v: dict, label: str, base: int = 0) -> None:
    """What the cell read and wrote through its transport, against the
    device file as the host sees it (the cell's offsets are in its extent,
    which starts at `base` of the device)."""
    import hashlib
    bs = v["bs"]
    with open(device, "rb") as f:
        for what, offs, sums in (("read", v["read_offsets"], v["read_sha256"]),
                                 ("write", v["write_offsets"], v["write_sha256"])):
            for off, want in zip(offs, sums, strict=True):
                f.seek(base + off)
                if hashlib.sha256(f.read(bs)).hexdigest() != want:
                    raise BenchError(f"{label}: integrity check failed: the {what} at offset "
                                     f"{off} does not match the device file")
    if not v["read_back_ok"]:
        raise BenchError(f"{label}: integrity check failed: written blocks read back wrong")


def _row(cell: Cell, timed: dict, counted_ios: int, delta: dict) -> dict:
    ios, secs = timed["done"], timed["seconds"]
    n = counted_ios
    per = lambda v: round(v / n, 4)     # noqa: E731
    both = lambda k: delta["user"][k] + delta["driver"][k]   # noqa: E731
    per_io = {"syscalls_user": per(delta["user"]["syscalls"]),
              "syscalls_driver": per(delta["driver"]["syscalls"]),
              "ctx_switches": per(both("ctx_switches")),
              "mmap": per(both("mmap")), "munmap": per(both("munmap")),
              "map_ops": per(both("mmap") + both("munmap"))}
    return {
        "transport": cell.transport, "op": cell.op, "bs": cell.bs, "qd": cell.qd,
        "users": cell.users, "pairs": 1, "monitor": cell.monitor,
        # With users above 1: the sum over the user domains, each running
        # the same cell at once (per-domain IOPS in "shares").
        "seconds": round(secs, 3), "ios": ios, "iops": round(ios / secs),
        "mb_s": round(ios * cell.bs / secs / 1e6, 1),
        "lat_us": timed["lat_us"], "hist_us": timed["hist_us"],
        # Counted by the eBPF monitor per domain (cgroup), in the counted pass.
        "per_io": per_io,
        "counted": {"ios": n, **delta},
        "violations": 0 if cell.monitor and cell.transport.startswith("drb") else None,
    }


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
                key = _pair_key(cell)
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
            "monitor_ratio": monitor_ratios(runs)}


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
            f"{'map/io':>8}")
    rows = [head]
    for r in rep["runs"]:
        lat, c = r["lat_us"], r["per_io"]
        rows.append(f"{r['transport']:<10}{'on' if r['monitor'] else 'off':<5}"
                    f"{r['op']:<10}{r['bs']:>8}{r['qd']:>4}{r.get('users', 1):>3}"
                    f"{r['iops']:>11}{r['mb_s']:>9}{lat['p50']:>9.2f}{lat['p99']:>9.2f}"
                    f"{lat['p999']:>10.2f}{c['syscalls_user']:>10.3f}"
                    f"{c['syscalls_driver']:>10.3f}{c['map_ops']:>8.2f}")
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
                    "   (target >= 0.9)")
    for s in rep.get("skipped", []):
        rows.append(f"skipped {Cell(**s['cell']).label()}: {s['reason']}")
    return "\n".join(rows)


def write_json(rep: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")
