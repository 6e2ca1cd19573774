"""drb: Double Ring Buffer I/O between a user domain and a driver domain.

The command-line face of drb-uring. Each subcommand prints a one-line
header saying what it does, then progress lines on long work.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """examples:
  drb bench --transport drb,drb-poll --op randread --bs 4k --qd 1,32 --seconds 3
  drb bench --op randread,randwrite,read,write --bs 4k,64k,1m --json io.json
  drb bench-ring                      # ring round trip vs raw cache line, stream rates
  drb bench-ring --json ring.json     # also write the figures as JSON
  drb bench-ring --iters 50000 --count 2000000   # a quicker run
"""


def _positive(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return n


def _progress(line: str) -> None:
    print(f"  .. {line}", file=sys.stderr, flush=True)


def cmd_bench_ring(a: argparse.Namespace) -> int:
    from drb_uring import ringbench
    print("Benchmarking the double ring between two processes (Ctrl-C to stop).")
    rep = ringbench.run(iters=a.iters, count=a.count, progress=_progress)
    print(ringbench.table(rep))
    if a.json:
        ringbench.write_json(rep, a.json)
        print(f"wrote {a.json}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from drb_uring import bench
    transports = bench.parse_list(a.transport, bench.TRANSPORTS)
    ops = bench.parse_list(a.op, list(bench.OPS))
    sizes = bench.parse_list(a.bs, conv=bench.parse_size)
    depths = bench.parse_list(a.qd, conv=int)
    if any(q < 1 or q > 1024 for q in depths):
        raise ValueError("queue depths must be in [1, 1024]")
    if any(b > 16 << 20 for b in sizes):
        raise ValueError("block sizes must be at most 16m")
    print("Benchmarking I/O through a channel (Ctrl-C to stop).")
    rep = bench.run(transports, ops, sizes, depths, a.seconds, progress=_progress)
    print(bench.table(rep))
    if a.json:
        bench.write_json(rep, a.json)
        print(f"wrote {a.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drb", description=__doc__.splitlines()[0],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    b = sub.add_parser("bench-ring", help="measure the double ring against the physical floor",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--iters", type=_positive, default=200_000,
                   help="round trips per latency measurement (default 200000)")
    b.add_argument("--count", type=_positive, default=20_000_000,
                   help="entries streamed at batch 32; batch 1 streams a tenth (default 20000000)")
    b.set_defaults(func=cmd_bench_ring)

    c = sub.add_parser("bench", help="I/O through a channel: IOPS, MB/s, latency, syscalls",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--transport", default="drb,drb-poll", help="drb, drb-poll (default both)")
    c.add_argument("--op", default="randread", help="randread, randwrite, read, write")
    c.add_argument("--bs", default="4k", help="block sizes, e.g. 4k,64k,1m")
    c.add_argument("--qd", default="1,32", help="queue depths, e.g. 1,32")
    c.add_argument("--seconds", type=float, default=3.0, help="per cell (default 3)")
    c.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    c.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("drb: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError) as e:
        print(f"drb: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
