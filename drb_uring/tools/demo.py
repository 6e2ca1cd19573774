"""``drb demo``: the main job on a built-in default.

Brings up a pair on a temporary backing file, runs a workload from inside
the user domain through a channel (a Python program using the file-like
API, then the Cython benchmark loop), prints throughput, latency
percentiles and a latency histogram in bpftrace's format; then a pair
whose user domain has a disk with ext4 on it (drb up --disk --fs ext4),
where dd and sqlite3 run unchanged. Everything is torn down, also when
interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from drb_uring.domains import control, runtime, state
from drb_uring.domains.config import PairConfig
from drb_uring.tools import hist
from drb_uring.tools.workload import WorkloadSpec


def _say(msg: str) -> None:
    sys.stdout.flush()
    print(f"  .. {msg}", file=sys.stderr, flush=True)


DEVICE_SIZE = 128 << 20
CHANNEL_SIZE = 64 << 20


def _fill(path: str, size: int) -> str:
    """A backing file of random bytes; returns the sha256 of its first
    CHANNEL_SIZE / 2 bytes, which the workload reads through the channel."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for off in range(0, size, 1 << 20):
            chunk = os.urandom(1 << 20)
            if off < CHANNEL_SIZE // 2:
                h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


DISK_SIZE = 64 << 20
SQLITE = """
import json, sqlite3, sys, time
db = sqlite3.connect("/data/demo.db", isolation_level=None)
db.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v TEXT)")
t = time.monotonic()
for b in range(10):
    db.execute("BEGIN")
    db.executemany("INSERT INTO t (v) VALUES (?)", [(sys.argv[1],)] * 100)
    db.execute("COMMIT")
took = time.monotonic() - t
print(json.dumps({"rows": db.execute("SELECT count(*) FROM t").fetchone()[0], "seconds": took,
                  "integrity": db.execute("PRAGMA integrity_check").fetchone()[0]}))
"""


def _in_user(name: str, argv: list[str]) -> str:
    proc = control.exec_in(name, "user", argv, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        raise OSError(f"{argv[0]} in the user domain exited {proc.returncode}")
    return out.decode()


def _disk_step(name: str, work: str, monitor: bool) -> bool:
    """A pair whose user domain has a disk with ext4 on it (drb up --disk
    --fs ext4): dd reads the disk through, and its bytes are the device's;
    sqlite3 writes rows on /data, and they are on the device."""
    backing = os.path.join(work, "disk.img")
    with open(backing, "wb") as f:
        f.truncate(DISK_SIZE)
    _say(f"bringing up pair {name}: its user domain gets its {DISK_SIZE >> 20} MiB extent as "
         "/dev/drb/disk, formatted ext4 inside it and mounted at /data")
    control.start_pair(PairConfig(name=name, backing=backing, disk=True, fs="ext4",
                                  no_monitor=not monitor))
    out = _in_user(name, ["sh", "-c", "dd if=/dev/drb/disk bs=1M iflag=direct 2>/tmp/dd.log | "
                                      "sha256sum && tail -1 /tmp/dd.log"]).splitlines()
    got, dd = out[0].split()[0], out[-1].split(", ")
    with open(backing, "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    print(f"\ndisk: dd read all of /dev/drb/disk inside the user domain ({DISK_SIZE >> 20} MiB "
          f"in {float(dd[-2].split()[0]):.2f} s, {dd[-1]}): sha256 "
          f"{'matches the device' if got == want else 'DIFFERS from the device'}")
    marker = f"drb-demo-{os.urandom(6).hex()}"
    res = json.loads(_in_user(name, ["python3", "-c", SQLITE, marker]).strip().splitlines()[-1])
    with open(backing, "rb") as f:
        on_device = marker.encode() in f.read()
    print(f"disk: sqlite3 on /data (ext4 on the disk): {res['rows']} rows in 10 transactions "
          f"in {res['seconds']:.2f} s, integrity {res['integrity']}; the rows "
          f"{'are on the device' if on_device else 'are NOT on the device'}")
    return got == want and on_device and res["integrity"] == "ok"


def run(seconds: float, monitor: bool = True) -> int:
    name = f"demo-{os.getpid()}"
    disk_name = f"{name}-disk"
    t0 = time.monotonic()
    print("drb demo: a user domain and a driver domain, I/O through the double ring "
          "(Ctrl-C tears down)")
    # Ctrl-C must reach our finally block, not kill us mid-teardown.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    work = tempfile.mkdtemp(prefix="drb-demo-", dir="/var/tmp")
    try:
        backing = os.path.join(work, "device.img")
        _say(f"filling a {DEVICE_SIZE >> 20} MiB backing file with random data")
        want = _fill(backing, DEVICE_SIZE)
        _say(f"bringing up pair {name} on it")
        st = control.start_pair(PairConfig(name=name, backing=backing, no_monitor=not monitor))
        u, d = st["domains"]["user"], st["domains"]["driver"]
        _say(f"user domain {u['hostname']} (pid {u['pid']}), driver domain "
             f"{d['hostname']} (pid {d['pid']}), monitor pid {st['daemon_pid']}")
        _say(f"running the workload inside the user domain (a file-like pass, then "
             f"{2 * seconds:g} s of random reads)")
        spec = WorkloadSpec(socket=st["socket"], size=CHANNEL_SIZE, seconds=seconds)
        proc = control.exec_in(name, "user", runtime.python_argv("drb_uring.tools.workload", spec),
                               stdout=subprocess.PIPE)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"drb demo: the workload failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        rep = json.loads(out.decode().strip().splitlines()[-1])
        r, w = rep["read"], rep["write"]
        read_ok = r["sha256"] == want
        with open(backing, "rb") as f:     # the write, as the device has it
            f.seek(CHANNEL_SIZE // 2)
            on_disk = hashlib.sha256(f.read(w["bytes"])).hexdigest() == w["sha256"]
        print(f"\nfile-like API: read {r['bytes'] >> 20} MiB of the device's data in "
              f"{r['seconds']:.2f} s, sha256 {'matches the file' if read_ok else 'DIFFERS'}; "
              f"wrote and read back {w['bytes'] >> 20} MiB in {w['seconds']:.2f} s, "
              f"{'on the device' if on_disk and w['sha256_ok'] else 'DIFFERS'}")
        print(f"\n{'workload':<22}{'IOPS':>11}{'MB/s':>9}{'p50 us':>9}{'p99 us':>9}"
              f"{'p99.9 us':>10}")
        for key in ("randread_4k_qd1", "randread_4k_qd32"):
            res = rep[key]
            iops = res["ios"] / res["seconds"]
            lat = res["lat_us"]
            print(f"{key:<22}{iops:>11.0f}{iops * 4096 / 1e6:>9.1f}{lat['p50']:>9.2f}"
                  f"{lat['p99']:>9.2f}{lat['p999']:>10.2f}")
        print()
        b = {int(k): v for k, v in rep["randread_4k_qd32"]["hist_us"].items()}
        sys.stdout.write(hist.format_hist("usecs_randread_4k_qd32", b))
        for line in control.stop_pair(name):
            _say(line)
        disk_ok = _disk_step(disk_name, work, monitor)
        return 0 if read_ok and on_disk and w["sha256_ok"] and disk_ok else 1
    except KeyboardInterrupt:
        print("\ndrb demo: interrupted; tearing down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # finish the teardown whatever comes
        for n in (name, disk_name):
            for line in control.stop_pair(n):
                _say(line)
        shutil.rmtree(work, ignore_errors=True)
        left = [p for n in (name, disk_name) for p in (state.state_dir(n), state.group_dir(n))
                if os.path.exists(p)] + [p for p in (work,) if os.path.exists(p)]
        signal.signal(signal.SIGINT, old)
        _say(f"done in {time.monotonic() - t0:.1f} s; "
             + (f"LEFT BEHIND: {', '.join(left)}" if left else "nothing left behind"))
