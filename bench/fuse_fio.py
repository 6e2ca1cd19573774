"""fio through the disk's FUSE export against the same file without FUSE.

    python bench/fuse_fio.py [--backing DIR] [--size 1g] [--runtime 5] [--rounds 3]
                             [--json OUT]

Runs in a private mount namespace (nothing it mounts reaches the host). For
each transport it lays out one file of --size in --backing (default
/dev/shm, so the numbers are FUSE's cost and not a disk's), then runs the
same fio jobs on:

  local        the backing file itself
  fuse-dev     the FUSE file, requests through read()/writev() on /dev/fuse
  fuse-uring   the FUSE file, requests through FUSE over io_uring
               (enable_uring=Y; put back as it was afterwards)

Both FUSE transports serve the file with the LocalFile backend (io_uring on
the backing file). Rounds go through every transport in turn, so that a
machine busy with something else for a while weighs on all of them; each
cell is the median over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from drb_uring import linux  # noqa: E402
from drb_uring.disk import mount as M  # noqa: E402
from drb_uring.disk import server as S  # noqa: E402

JOBS = {
    "4k randread psync 1 job": ["--rw=randread", "--bs=4k", "--ioengine=psync", "--numjobs=1"],
    "4k randread psync 4 jobs": ["--rw=randread", "--bs=4k", "--ioengine=psync",
                                 "--numjobs=4"],
    "4k randread libaio direct qd32": ["--rw=randread", "--bs=4k", "--ioengine=libaio",
                                       "--direct=1", "--iodepth=32"],
    "4k randwrite libaio direct qd32": ["--rw=randwrite", "--bs=4k", "--ioengine=libaio",
                                        "--direct=1", "--iodepth=32"],
    "1M seq read psync": ["--rw=read", "--bs=1M", "--ioengine=psync"],
    "1M seq write psync": ["--rw=write", "--bs=1M", "--ioengine=psync"],
}

URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def fio(path: str, args: list[str], runtime: int, size: int) -> dict:
    cmd = ["fio", "--name=j", f"--filename={path}", f"--size={size}", "--time_based",
           f"--runtime={runtime}", "--group_reporting", "--output-format=json",
           "--randrepeat=0", "--norandommap", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    lat = side["clat_ns"]
    return {"iops": round(side["iops"]), "MBps": round(side["bw_bytes"] / 1e6),
            "p50_us": round(lat["percentile"]["50.000000"] / 1000, 1),
            "p99_us": round(lat["percentile"]["99.000000"] / 1000, 1),
            "usr_cpu": round(job["usr_cpu"], 1), "sys_cpu": round(job["sys_cpu"], 1)}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fuse(backing: str, mnt: str, size: int, runtime: int, uring: bool, jobs,
             spin_us: int) -> dict:
    """Each job on a connection of its own, with a server of its own, whose
    counters then belong to that job alone."""
    res = {}
    for name, args in jobs.items():
        fd = M.open_device()
        ring = None
        try:
            m = M.mount_file(fd, os.getpid(), mnt, 0, 0)
            spec = S.DiskServerSpec(backing=backing, size=size, uring=uring, spin_us=spin_us,
                                    slot_size=(1 << 20) if uring else 128 << 10,
                                    slot_count=64 if uring else 256)
            if uring:
                # As in a domain: the trusted side's ring, restricted.
                ring, params = S.trusted_ring(spec.slot_count)
                spec = spec.replace(uring_params=params)
            with open(f"{backing}.server", "w+") as out:
                srv = S.spawn(spec, fd, ring_fd=ring, stdout=out.fileno())
                try:
                    res[name] = fio(mnt, args, runtime, size)
                    cpu = cpu_seconds(srv.pid)
                finally:
                    srv.send_signal(signal.SIGTERM)
                    srv.wait(10)
                    M.unmount(m)
                out.seek(0)
                st = json.loads(out.read().strip().splitlines()[-1])
            n = max(st["requests"], 1)
            # read/readv, writev, io_uring_enter on the FUSE ring, ppoll,
            # and io_uring_enter on the backend's ring.
            res[name]["server_syscalls_per_req"] = round(
                (st["dev_reads"] + st["dev_writes"] + st["uring_enters"] + st["sleeps"]
                 + st["kicks"]) / n, 2)
            res[name]["server_sleeps_per_req"] = round(st["sleeps"] / n, 2)
            # The server's CPU time per request (user + system, the kernel's
            # copies into and out of it included): less noisy than IOPS on
            # a machine that runs other things.
            res[name]["server_cpu_us_per_req"] = round(cpu * 1e6 / n, 2)
            res[name]["max_inflight"] = st["max_inflight"]
        finally:
            os.close(fd)
            if ring is not None:
                os.close(ring)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backing", default="/dev/shm")
    ap.add_argument("--size", default="1g")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--spin-us", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="transports (local fuse-dev fuse-uring)")
    ap.add_argument("--jobs", nargs="*", help="job names")
    ap.add_argument("--json")
    a = ap.parse_args()
    size = int(a.size[:-1]) << {"k": 10, "m": 20, "g": 30}[a.size[-1].lower()] \
        if a.size[-1].isalpha() else int(a.size)
    jobs = {k: v for k, v in JOBS.items() if not a.jobs or k in a.jobs}
    linux.private_mount_namespace()
    work = os.path.join(a.backing, f"drb-fuse-bench-{os.getpid()}")
    os.makedirs(work)
    backing = os.path.join(work, "backing.img")
    mnt = os.path.join(work, "disk")
    subprocess.run(["dd", "if=/dev/urandom", f"of={backing}", "bs=1M",
                    f"count={size >> 20}", "status=none"], check=True)
    transports = a.only or ["local", "fuse-dev", "fuse-uring"]
    rounds: dict[str, list[dict]] = {t: [] for t in transports}
    old = open(URING_PARAM).read().strip()
    try:
        for _ in range(a.rounds):
            for t in transports:
                if t == "local":
                    r = {n: fio(backing, args, a.runtime, size) for n, args in jobs.items()}
                elif t == "fuse-dev":
                    r = run_fuse(backing, mnt, size, a.runtime, False, jobs, a.spin_us)
                elif t == "fuse-uring":
                    with open(URING_PARAM, "w") as f:
                        f.write("Y")
                    r = run_fuse(backing, mnt, size, a.runtime, True, jobs, a.spin_us)
                    with open(URING_PARAM, "w") as f:
                        f.write(old)
                rounds[t].append(r)
                print(t, json.dumps(r), flush=True)
    finally:
        with open(URING_PARAM, "w") as f:
            f.write(old)
        shutil.rmtree(work)
    results = {t: {n: {k: statistics.median(r[n][k] for r in rs) for k in rs[0][n]}
                   for n in jobs} for t, rs in rounds.items()}
    names = list(jobs)
    print("\n| job | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for n in names:
        print(f"| {n} | " + " | ".join(
            f"{r[n]['iops']} IOPS, {r[n]['MBps']} MB/s, p50 {r[n]['p50_us']} us"
            for r in results.values()) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": size, "runtime": a.runtime, "backing": a.backing,
                       "rounds": rounds, "time": time.time(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
