"""``drb demo``: the main job on a built-in default.

Brings up a pair on a temporary backing file, runs a workload from inside
the user domain through a channel (a Python program using the file-like
API, then the Cython benchmark loop), prints throughput, latency
percentiles and a latency histogram in bpftrace's format, and tears
everything down, also when interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from drb_uring import procs
from drb_uring.domains import control
from drb_uring.domains.config import PairConfig
from drb_uring.tools import hist
from drb_uring.tools.workload import WorkloadSpec


def _say(msg: str) -> None:
    sys.stdout.flush()
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def run(seconds: float) -> int:
    name = f"demo-{os.getpid()}"
    t0 = time.monotonic()
    print("drb demo: a user domain and a driver domain, I/O through the double ring "
          "(Ctrl-C tears down)")
    # Ctrl-C must reach our finally block, not kill us mid-teardown.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _say(f"bringing up pair {name} on a 256 MiB temporary backing file")
        st = control.start_pair(PairConfig(name=name))
        u, d = st["domains"]["user"], st["domains"]["driver"]
        _say(f"user domain {u['hostname']} (pid {u['pid']}), driver domain "
             f"{d['hostname']} (pid {d['pid']}), monitor pid {st['daemon_pid']}")
        _say(f"running the workload inside the user domain ({2 * seconds:g} s of "
             "benchmark after a file-like pass)")
        spec = WorkloadSpec(socket=st["socket"], seconds=seconds)
        proc = control.exec_in(name, "user", procs.argv("drb_uring.tools.workload", spec),
                               stdout=subprocess.PIPE)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            print(f"drb demo: the workload failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        rep = json.loads(out.decode().strip().splitlines()[-1])
        f = rep["file"]
        print(f"\nfile-like API: wrote and read back {f['bytes'] >> 20} MiB in "
              f"{f['seconds']:.2f} s, sha256 {'matches' if f['sha256_ok'] else 'DIFFERS'}")
        print(f"\n{'workload':<22}{'IOPS':>11}{'MB/s':>9}{'p50 us':>9}{'p99 us':>9}"
              f"{'p99.9 us':>10}")
        for key in ("randread_4k_qd1", "randread_4k_qd32"):
            r = rep[key]
            iops = r["ios"] / r["seconds"]
            lat = r["lat_us"]
            print(f"{key:<22}{iops:>11.0f}{iops * 4096 / 1e6:>9.1f}{lat['p50']:>9.2f}"
                  f"{lat['p99']:>9.2f}{lat['p999']:>10.2f}")
        print()
        b = {int(k): v for k, v in rep["randread_4k_qd32"]["hist_us"].items()}
        sys.stdout.write(hist.format_hist("usecs_randread_4k_qd32", b))
        print("baselines (grant-map, socket, direct): not built yet; "
              "see drb bench once they are")
        return 0 if f["sha256_ok"] else 1
    except KeyboardInterrupt:
        print("\ndrb demo: interrupted; tearing down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # finish the teardown whatever comes
        for line in control.stop_pair(name):
            _say(line)
        signal.signal(signal.SIGINT, old)
        _say(f"done in {time.monotonic() - t0:.1f} s; nothing left behind")
