"""drb bench, drb bench-ring and drb report: the command line's checks of
their options, then the measuring parts (tools.bench, tools.diskbench,
tools.ringbench, tools.report)."""

from __future__ import annotations

import argparse
import json

from drb_uring.tools.cliutil import CliError
from drb_uring.tools.cliutil import progress as _progress

TRANSPORTS_DEFAULT = "drb,drb-poll,grant-map,socket,direct"


def _show(table: str, rep: dict, json_path: str | None) -> int:
    """A run's table on stdout, and its JSON where asked."""
    print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rep, f, indent=2)
            f.write("\n")
        print(f"wrote {json_path}")
    return 0


def cmd_bench_ring(a: argparse.Namespace) -> int:
    from drb_uring.tools import ringbench
    print("Benchmarking the double ring between two processes (Ctrl-C to stop).")
    rep = ringbench.run(iters=a.iters, count=a.count, progress=_progress)
    return _show(ringbench.table(rep), rep, a.json)


def cmd_bench(a: argparse.Namespace) -> int:
    from drb_uring.domains.config import parse_size
    from drb_uring.domains.state import require_root
    from drb_uring.tools import bench
    if a.quick and a.full:
        raise CliError("--quick and --full exclude each other")
    if a.disk:
        return _bench_disk(a)
    transports = bench.parse_list(a.transport, bench.TRANSPORTS)
    ops = bench.parse_list(a.op, list(bench.OPS))
    sizes = bench.parse_list(a.bs, conv=parse_size)
    depths = bench.parse_list(a.qd, conv=int)
    users = bench.parse_list(a.users, conv=int)
    if any(q < 1 or q > 1024 for q in depths):
        raise CliError("queue depths must be in [1, 1024]")
    if any(b > 16 << 20 for b in sizes):
        raise CliError("block sizes must be at most 16m")
    if any(u < 1 or u > 64 for u in users):
        raise CliError("--users must be in [1, 64]")
    seconds = a.seconds if a.seconds is not None else \
        bench.SMOKE_SECONDS if a.smoke else bench.CELL_SECONDS
    if seconds <= 0 or seconds > 3600:
        raise CliError("--seconds must be in (0, 3600]")
    mons = bench.parse_list(a.monitor, ["on", "off"])
    if a.quick:
        cells = bench.quick_cells()
    elif a.full:
        cells = bench.full_cells()
    else:
        cells = bench.matrix(transports, ops, sizes, depths, users,
                             tuple(m == "on" for m in mons))
    require_root()
    what = " (a smoke run: every cell once, through the same steps, too short to measure)" \
        if a.smoke else ""
    print(f"Benchmarking {len(cells)} cells in real domains, {seconds:g} s each{what} "
          "(Ctrl-C to stop).")
    rep = bench.run(cells, seconds, progress=_progress, repeat=a.repeat, fio=not a.no_fio)
    return _show(bench.table(rep), rep, a.json)


def _bench_disk(a: argparse.Namespace) -> int:
    from drb_uring.domains.state import require_root
    from drb_uring.tools import bench, diskbench
    others = [o for o, v, d in (("--quick", a.quick, False), ("--full", a.full, False),
                                ("--no-fio", a.no_fio, False),
                                ("--transport", a.transport, TRANSPORTS_DEFAULT),
                                ("--op", a.op, "randread"), ("--bs", a.bs, "4k"),
                                ("--qd", a.qd, "1,32"), ("--users", a.users, "1")) if v != d]
    if others:
        raise CliError(f"--disk runs the disk's own fio jobs: not with {', '.join(others)}")
    mons = bench.parse_list(a.monitor, ["on", "off"])
    if len(mons) != 1:
        raise CliError("--disk takes one --monitor setting: on or off")
    seconds = a.seconds if a.seconds is not None else \
        bench.SMOKE_SECONDS if a.smoke else bench.CELL_SECONDS
    if seconds <= 0 or seconds > 3600:
        raise CliError("--seconds must be in (0, 3600]")
    require_root()
    what = " (a smoke run: every step, too short to measure)" if a.smoke else ""
    print(f"Benchmarking the user domain's disk: {len(diskbench.JOBS)} fio jobs on "
          f"{len(diskbench.TARGETS)} files, then its file system, {seconds:g} s each{what} "
          "(Ctrl-C to stop).")
    rep = diskbench.run(seconds, smoke=a.smoke, repeat=a.repeat, monitor=mons[0] == "on",
                        progress=_progress)
    return _show(diskbench.table(rep), rep, a.json)


def cmd_report(a: argparse.Namespace) -> int:
    from drb_uring.tools import report
    rep = report.load(a.file)
    paths = report.write(rep, a.out)
    for t in report.targets(rep):
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        print(f"  {t['target']}: {t['measured'] if t['measured'] is not None else '-'} "
              f"(goal {t['goal']}, {met})")
    print(f"wrote {', '.join(paths)}")
    return 0
