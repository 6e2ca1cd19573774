"""``drb bench --disk``: a user domain's disk (drb up --disk) against what
the same programs get without drb.

fio runs inside the user domain, as its root under its seccomp profile,
the same jobs on three files:

- ``drb-disk``: /dev/drb/disk, the pair's disk: the FUSE server in the user
  domain, its backend the double ring to the driver domain's worker;
- ``fuse-local``: the same FUSE server (drb_uring.disk.server) with a local
  file as its backend (``backing=``), mounted into the user domain the same
  way (the trusted side's connection, FOPEN_DIRECT_IO, the same slots), so
  FUSE costs the same: what the double ring adds. Its server runs on the
  host: its backend is io_uring, which a domain may not set up;
- ``bind``: a file bind-mounted into the domain, what ``docker -v`` gives:
  the ceiling.

Then the file system: a second pair with ``--fs ext4``, sqlite inserts per
second and fio on /data, against the same in a host directory bind-mounted
into the domain. Every file lives on tmpfs (/dev/shm), so the figures are
what the paths cost, not a disk's. The pairs are named bench-PID-disk and
bench-PID-fs, and this process works in a mount namespace of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from drb_uring import linux
from drb_uring.domains import attach, control
from drb_uring.domains.config import PairConfig
from drb_uring.errors import DrbError
from drb_uring.tools import ringbench

MiB = 1 << 20
SIZE, SMOKE_SIZE = 256 * MiB, 64 * MiB
ROWS, SMOKE_ROWS = 10_000, 1_000
TARGETS = ("drb-disk", "fuse-local", "bind")
FS_TARGETS = ("drb-fs", "bind-dir")
SHARE_AT = "/run/drb-bench"          # the bind-mounted host directory, inside
LOCAL_AT = "/dev/drb/local"          # fuse-local's file, inside
WORK_DIR = "/dev/shm"

# name: fio arguments (each also gets the file, size, runtime and JSON output)
JOBS = {
    "4k randread psync 1 job": "--rw=randread --bs=4k --ioengine=psync --numjobs=1",
    "4k randread psync 4 jobs": "--rw=randread --bs=4k --ioengine=psync --numjobs=4",
    "4k randread libaio direct qd32": "--rw=randread --bs=4k --ioengine=libaio --direct=1 "
                                      "--iodepth=32",
    "1M seq read": "--rw=read --bs=1m --ioengine=psync",
    "1M seq write": "--rw=write --bs=1m --ioengine=psync",
}
FS_JOBS = {
    "fs 4k randread psync": "--rw=randread --bs=4k --ioengine=psync",
    "fs 4k randwrite psync": "--rw=randwrite --bs=4k --ioengine=psync --fsync=32",
    "fs 1M seq write": "--rw=write --bs=1m --ioengine=psync --end_fsync=1",
}
GOALS = (
    # (what, the numerator, the denominator, which jobs, the worst must be at least)
    ("drb-disk / fuse-local, 4k (worst job)", "drb-disk", "fuse-local", "4k", 0.8),
    ("drb-disk / fuse-local, 1 MiB (worst job)", "drb-disk", "fuse-local", "1M", 0.9),
    ("drb-disk / bind, 1 MiB (worst job)", "drb-disk", "bind", "1M", 0.7),
)

SQLITE = r"""
import json, os, sqlite3, sys, time
path, n = sys.argv[1], int(sys.argv[2])
for p in (path, path + "-journal"):
    if os.path.exists(p):
        os.unlink(p)
db = sqlite3.connect(path, isolation_level=None)
db.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
t = time.monotonic()
for b in range(n // 100):
    db.execute("BEGIN")
    db.executemany("INSERT INTO t VALUES (?, ?)", ((b * 100 + i, "x" * 40) for i in range(100)))
    db.execute("COMMIT")
s = time.monotonic() - t
ok = db.execute("PRAGMA integrity_check").fetchone()[0]
print(json.dumps({"rows": n, "transactions": n // 100, "seconds": round(s, 3),
                  "inserts_per_s": round(n / s), "integrity": ok}))
"""


class DiskBenchError(DrbError):
    pass


def _fill(path: str, size: int, chunk: bytes) -> None:
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)


def fio_argv(job: str, where: str, size: int, seconds: float, directory: bool = False) -> list:
    place = f"--directory={where}" if directory else f"--filename={where}"
    return ["fio", f"--name={job.replace(' ', '-')}", place, f"--size={size}",
            *(JOBS | FS_JOBS)[job].split(), "--group_reporting", "--time_based",
            f"--runtime={max(1, round(seconds * 1000))}ms", "--invalidate=0",
            "--fallocate=none", "--randrepeat=0", "--norandommap", "--lat_percentiles=1",
            "--output-format=json"]


def parse_fio(out: str, job: str) -> dict:
    """One fio JSON (group_reporting) as a row: IOPS, MB/s, latency."""
    data = json.loads(out[out.index("{"):])
    j = data["jobs"][0]
    side = j["write" if "write" in job else "read"]
    pct = side["lat_ns"].get("percentile", {})
    if j.get("error"):
        raise DiskBenchError(f"fio {job}: error {j['error']}")
    return {"iops": round(side["iops"]), "mb_s": round(side["bw_bytes"] / 1e6, 1),
            "lat_us": {"p50": round(pct.get("50.000000", 0) / 1e3, 2),
                       "p99": round(pct.get("99.000000", 0) / 1e3, 2)}}


class _Pair:
    """A pair as drb up makes it (one user domain with its disk), the
    share directory bound into it, and what runs in it."""

    def __init__(self, name: str, backing: str, share: str, monitor: bool, fs: str | None):
        self.name = name
        self.state = control.start_pair(PairConfig(name=name, backing=backing, disk=True, fs=fs,
                                                   no_monitor=not monitor, exclusive=False))
        try:
            dm = self.state["domains"]["user0"]
            self.pid, self.uid = dm["pid"], dm["host_id"]
            # The domain's root owns what it works on (a file whose owner
            # its user namespace cannot map gives it no override).
            for root, dirs, files in os.walk(share):
                for n in [root, *(os.path.join(root, x) for x in dirs + files)]:
                    os.chown(n, self.uid, self.uid)
            attach.bind_into(self.pid, share, SHARE_AT, readonly=False)
        except BaseException:
            self.close()
            raise

    def run(self, argv: list[str], timeout: float) -> str:
        p = control.exec_in(self.name, "user0", argv, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise DiskBenchError(f"{argv[0]} in {self.name} took over {timeout:.0f} s") from None
        if p.returncode != 0:
            tail = (err or out).decode(errors="replace").strip().splitlines()[-2:]
            raise DiskBenchError(f"{' '.join(argv[:3])} in {self.name} exited {p.returncode}: "
                                 f"{' | '.join(tail)}")
        return out.decode()

    def close(self) -> None:
        control.stop_pair(self.name)


class _FuseLocal:
    """The disk's FUSE server on a local file, mounted into the domain as
    the pair's disk is (the trusted side keeps the connection)."""

    def __init__(self, pair: _Pair, backing: str, size: int, log: int):
        from drb_uring.disk import frontend, mount, server
        self.mount_mod = mount
        mount.ensure_fusectl()
        self.fd = mount.open_device()
        self.m = None
        self.proc = None
        try:
            self.m = mount.mount_file(self.fd, pair.pid, LOCAL_AT, pair.uid, pair.uid, mode=0o600)
            spec = server.DiskServerSpec(backing=backing, size=size,
                                         slot_size=frontend.SLOT_SIZE,
                                         slot_count=frontend.SLOT_COUNT, uid=pair.uid,
                                         gid=pair.uid, mode=0o600)
            self.proc = server.spawn(spec, self.fd, stdout=log, stderr=log)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)     # it answers what is in flight
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self.m is not None:
            self.mount_mod.unmount(self.m)
            self.m = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _median_row(rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["iops"])
    out = dict(rows[len(rows) // 2])
    out["rounds"] = len(rows)
    return out


def run(seconds: float, *, smoke: bool = False, repeat: int = 1, monitor: bool = True,
        progress=print) -> dict:
    """Both parts, `repeat` rounds each (cells taken in turn, medians
    kept). Ctrl-C or SIGTERM stops it, and everything it made comes down."""
    old = {s: signal.signal(s, _interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(seconds, smoke, repeat, monitor, progress)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _interrupted(*_):
    raise KeyboardInterrupt


def _run(seconds, smoke, repeat, monitor, progress) -> dict:
    if shutil.which("fio") is None:
        raise DiskBenchError("fio is missing: install the Debian package fio (make setup does)")
    # fusectl, fuse-local's mount: nothing of this run is mounted on the host.
    linux.private_mount_namespace()
    size = SMOKE_SIZE if smoke else SIZE
    rows = SMOKE_ROWS if smoke else ROWS
    base = f"bench-{os.getpid()}"
    work = tempfile.mkdtemp(prefix="drb-diskbench-", dir=WORK_DIR)
    log = os.open(os.path.join(work, "servers.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    jobs, fs_jobs, sqlite = [], [], []
    timeout = seconds * 4 + 120
    t0 = time.monotonic()
    try:
        share = os.path.join(work, "share")
        os.makedirs(os.path.join(share, "fs"))
        progress(f"filling three {size >> 20} MiB files on {WORK_DIR}")
        chunk = os.urandom(MiB)
        for path in ("device.img", "local.img", "share/bind.img"):
            _fill(os.path.join(work, path), size, chunk)
        files = {"drb-disk": "/dev/drb/disk", "fuse-local": LOCAL_AT,
                 "bind": f"{SHARE_AT}/bind.img"}
        progress(f"bringing up {base}-disk (a user domain with its disk)")
        pair = _Pair(f"{base}-disk", os.path.join(work, "device.img"), share, monitor, None)
        try:
            local = _FuseLocal(pair, os.path.join(work, "local.img"), size, log)
            try:
                total = len(JOBS) * len(TARGETS) * repeat
                k = 0
                for rnd in range(repeat):
                    for job in JOBS:
                        # Targets in turn, starting one further each round.
                        order = TARGETS[rnd % 3:] + TARGETS[:rnd % 3]
                        for target in order:
                            k += 1
                            progress(f"fio {k} of {total}: {job} on {target}")
                            out = pair.run(fio_argv(job, files[target], size, seconds), timeout)
                            jobs.append({"job": job, "target": target, "round": rnd,
                                         **parse_fio(out, job)})
            finally:
                local.close()
        finally:
            pair.close()
        for n in os.listdir(os.path.join(share, "fs")):
            os.unlink(os.path.join(share, "fs", n))
        os.unlink(os.path.join(share, "bind.img"))
        with open(os.path.join(work, "device.img"), "wb") as f:
            f.truncate(size)            # a fresh disk: mkfs.ext4 inside the domain
        progress(f"bringing up {base}-fs (the same, with --fs ext4 on /data)")
        pair = _Pair(f"{base}-fs", os.path.join(work, "device.img"), share, monitor, "ext4")
        try:
            dirs = {"drb-fs": "/data", "bind-dir": f"{SHARE_AT}/fs"}
            fsize = size // 8          # fio lays its file out first, through fuse2fs
            for rnd in range(repeat):
                for target in FS_TARGETS:
                    progress(f"sqlite: {rows} inserts in transactions of 100 on {target}")
                    out = pair.run(["python3", "-c", SQLITE, f"{dirs[target]}/bench.db",
                                    str(rows)], timeout)
                    sqlite.append({"target": target, "round": rnd,
                                   **json.loads(out.strip().splitlines()[-1])})
                for job in FS_JOBS:
                    for target in FS_TARGETS:
                        progress(f"fio: {job} on {target}")
                        out = pair.run(fio_argv(job, dirs[target], fsize, seconds,
                                                directory=True), timeout)
                        fs_jobs.append({"job": job, "target": target, "round": rnd,
                                        **parse_fio(out, job)})
        finally:
            pair.close()
    finally:
        os.close(log)
        shutil.rmtree(work, ignore_errors=True)
    bad = [s for s in sqlite if s["integrity"] != "ok"]
    if bad:
        raise DiskBenchError(f"sqlite's integrity check on {bad[0]['target']}: "
                             f"{bad[0]['integrity']}")
    disk = summarize(jobs, fs_jobs, sqlite)
    disk.update(smoke=smoke, seconds=seconds, rounds=repeat, monitor=monitor, size=size,
                took_s=round(time.monotonic() - t0, 1), setup=SETUP)
    return {"schema": 1, "machine": ringbench.machine(), "runs": [], "skipped": [], "fio": [],
            "page_cache": "the files are on tmpfs: every path reads and writes memory",
            "domains": "one user domain of a pair made as drb up --disk makes it; fio runs "
                       "inside it", "disk": disk}


SETUP = ("fio inside the user domain (its root, its seccomp profile) on: drb-disk "
         "(/dev/drb/disk: the FUSE server in the domain, over the double ring), fuse-local (the "
         "same server with a local-file backend, mounted the same way; its server on the host, "
         "since a domain may not set up io_uring), bind (a file bind-mounted in, as docker -v). "
         "The file system: /data (fuse2fs in the domain on the drb disk) against a host "
         "directory bind-mounted in. Backing files on tmpfs; 128 KiB slots, 64 of them; no "
         "CPU pinning")


def summarize(jobs: list[dict], fs_jobs: list[dict], sqlite: list[dict]) -> dict:
    """Medians per (job, target) over rounds, their ratios and the goals."""
    def medians(rows, targets):
        by: dict = {}
        for r in rows:
            by.setdefault((r["job"], r["target"]), []).append(r)
        return [_median_row(v) for (_j, t), v in by.items() if t in targets]
    jobs_m = medians(jobs, TARGETS)
    fs_m = medians(fs_jobs, FS_TARGETS)
    sq: dict = {}
    for s in sqlite:
        sq.setdefault(s["target"], []).append(s)
    sqlite_m = [sorted(v, key=lambda s: s["inserts_per_s"])[len(v) // 2] for v in sq.values()]

    def get(rows, job, target, key="iops"):
        return next((r[key] for r in rows if (r["job"], r["target"]) == (job, target)), None)
    ratios = []
    for job in JOBS:
        key = "mb_s" if job.startswith("1M") else "iops"
        d = get(jobs_m, job, "drb-disk", key)
        ratios.append({"job": job, "metric": key,
                       "drb_over_fuse_local": _ratio(d, get(jobs_m, job, "fuse-local", key)),
                       "drb_over_bind": _ratio(d, get(jobs_m, job, "bind", key))})
    for job in FS_JOBS:
        key = "mb_s" if "1M" in job else "iops"
        ratios.append({"job": job, "metric": key,
                       "drb_over_bind": _ratio(get(fs_m, job, "drb-fs", key),
                                               get(fs_m, job, "bind-dir", key))})
    ins = {s["target"]: s["inserts_per_s"] for s in sqlite_m}
    ratios.append({"job": "sqlite inserts", "metric": "inserts_per_s",
                   "drb_over_bind": _ratio(ins.get("drb-fs"), ins.get("bind-dir"))})
    return {"jobs": jobs_m, "fs_jobs": fs_m, "sqlite": sqlite_m, "ratios": ratios,
            "goals": goals(ratios), "raw": {"jobs": jobs, "fs_jobs": fs_jobs, "sqlite": sqlite}}


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def goals(ratios: list[dict]) -> list[dict]:
    out = []
    for what, _num, den, size, bound in GOALS:
        key = "drb_over_fuse_local" if den == "fuse-local" else "drb_over_bind"
        vals = [r[key] for r in ratios if r["job"].startswith(size) and r.get(key) is not None]
        worst = min(vals) if vals else None
        out.append({"target": what, "goal": f">= {bound}", "measured": worst,
                    "met": None if worst is None else worst >= bound})
    return out


# ---- what drb bench prints, and what drb report writes ---------------------------------

def table(rep: dict) -> str:
    d = rep["disk"]
    rows = [f"{'job':<34}{'target':<12}{'IOPS':>10}{'MB/s':>10}{'p50 us':>10}{'p99 us':>10}"]
    for r in d["jobs"] + d["fs_jobs"]:
        rows.append(f"{r['job']:<34}{r['target']:<12}{r['iops']:>10}{r['mb_s']:>10}"
                    f"{r['lat_us']['p50']:>10.1f}{r['lat_us']['p99']:>10.1f}")
    for s in d["sqlite"]:
        rows.append(f"sqlite: {s['rows']} inserts in {s['transactions']} transactions on "
                    f"{s['target']}: {s['inserts_per_s']} inserts/s")
    for r in d["ratios"]:
        parts = [f"{k.removeprefix('drb_over_').replace('_', '-')} {r[k]}"
                 for k in ("drb_over_fuse_local", "drb_over_bind") if k in r]
        rows.append(f"drb / ({r['job']}, {r['metric']}): {', '.join(parts)}")
    for g in d["goals"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        rows.append(f"{g['target']}: {g['measured']} (goal {g['goal']}, {met})")
    return "\n".join(rows)


def report_md(rep: dict) -> list[str]:
    """The disk's section of report.md."""
    d = rep["disk"]
    jobs = list(dict.fromkeys(r["job"] for r in d["jobs"]))
    cell = {(r["job"], r["target"]): r for r in d["jobs"]}

    def fmt(r, key):
        return "-" if r is None else (f"{r['mb_s']:,} MB/s" if key == "mb_s"
                                      else f"{r['iops']:,} IOPS, p50 {r['lat_us']['p50']} us")
    out = ["## The disk (drb bench --disk)", "", d.get("setup", ""), "",
           "| fio job | drb-disk | fuse-local | bind | drb-disk / fuse-local | drb-disk / bind |",
           "|---|---|---|---|---|---|"]
    ratio = {r["job"]: r for r in d["ratios"]}
    for job in jobs:
        key = "mb_s" if job.startswith("1M") else "iops"
        out.append(f"| {job} | " + " | ".join(fmt(cell.get((job, t)), key) for t in TARGETS)
                   + f" | {ratio[job]['drb_over_fuse_local']} | {ratio[job]['drb_over_bind']} |")
    out += ["", "| the file system | /data (drb) | bind-mounted directory | drb / bind |",
            "|---|---|---|---|"]
    fcell = {(r["job"], r["target"]): r for r in d["fs_jobs"]}
    for job in dict.fromkeys(r["job"] for r in d["fs_jobs"]):
        key = "mb_s" if "1M" in job else "iops"
        out.append(f"| {job} | " + " | ".join(fmt(fcell.get((job, t)), key) for t in FS_TARGETS)
                   + f" | {ratio[job]['drb_over_bind']} |")
    ins = {s["target"]: s for s in d["sqlite"]}
    if ins:
        n = next(iter(ins.values()))
        out.append(f"| sqlite, {n['rows']} inserts in transactions of 100 | "
                   + " | ".join(f"{ins[t]['inserts_per_s']:,} inserts/s" if t in ins else "-"
                                for t in FS_TARGETS)
                   + f" | {ratio['sqlite inserts']['drb_over_bind']} |")
    out += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for g in d["goals"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        out.append(f"| {g['target']} | {g['goal']} | {g['measured']} | {met} |")
    if d.get("smoke"):
        out += ["", "A smoke run (--smoke): every step, too short to measure."]
    return out


__all__ = ["run", "table", "report_md", "summarize", "goals", "fio_argv", "parse_fio",
           "DiskBenchError", "JOBS", "FS_JOBS", "TARGETS", "FS_TARGETS"]
