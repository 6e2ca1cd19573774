"""The host's side of one ``drb bench`` cell: the pair it runs in, and the
cell processes it starts in the user domains.

A BenchPair is a pair made as ``drb up`` makes it (for the cells of one
kind); run_cell starts the cell (tools.benchcell) in each user domain with
its transport's plumbing, checks the bytes it read and wrote against the
device file, tells every cell to go at once, and turns what they measured
and what the monitor counted into one row of the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

from drb_uring import procs
from drb_uring.domains import control, runtime
from drb_uring.domains.config import PairConfig
from drb_uring.enforce.tasks import OP_READ_FIXED, OP_WRITE_FIXED
from drb_uring.errors import DrbError
from drb_uring.ring import layout as L
from drb_uring.tools import baselines
from drb_uring.tools.benchcell import CellSpec

TRANSPORTS = ("drb", "drb-poll", "grant-map", "socket", "direct")
OPS = {"randread": (OP_READ_FIXED, True), "randwrite": (OP_WRITE_FIXED, True),
       "read": (OP_READ_FIXED, False), "write": (OP_WRITE_FIXED, False)}
POLL_NS = 3_600 * 10**9
EXTENT = 256 << 20
COUNTED_MIN_S = 0.2
MANY_USERS = ("drb", "drb-poll")
USERS_RING_ONLY = ("more than one user domain runs for the double ring only (drb, drb-poll): "
                   "the baselines have no driver domain shared by many user domains")


class BenchError(DrbError):
    pass


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


# ---- the domains -------------------------------------------------------------------

def pair_key(cell: Cell) -> tuple:
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
        # The pairs of a run share one data file, one cell at a time.
        cfg = PairConfig(name=self.name, backing=device, no_monitor=not monitor, exclusive=False,
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
