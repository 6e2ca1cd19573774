"""drb: Double Ring Buffer I/O between a user domain and a driver domain.

The command-line face of drb-uring. Each subcommand prints a one-line
header saying what it does, then progress lines on long work.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

EXAMPLES = """examples:
  drb demo                            # a pair on a temporary file, a workload, teardown
  drb up db --size 1g                 # a pair named db on a new 1 GiB backing file
  drb up db --blockdev /dev/loop0 --o-direct
  drb exec db user -- python3 app.py  # run inside the user domain
  drb status db --json
  drb down db
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
    mons = bench.parse_list(a.monitor, ["on", "off"])
    rep = bench.run(transports, ops, sizes, depths, a.seconds, progress=_progress,
                    monitor=tuple(m == "on" for m in mons), repeat=a.repeat)
    print(bench.table(rep))
    if a.json:
        bench.write_json(rep, a.json)
        print(f"wrote {a.json}")
    return 0


def _require_root() -> None:
    if os.geteuid() != 0:
        raise CliError("must run as root (namespaces, cgroups and eBPF need it)")


class CliError(RuntimeError):
    pass


def _start_pair(args: dict) -> dict:
    """Start a pair's daemon and wait until it is up; returns its state."""
    from drb_uring import cgroup, pair, procs
    _require_root()
    pair.check_name(args["name"])
    cgroup.cgroup2_root()
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise CliError("bcc is missing: install python3-bpfcc (make setup does)") from None
    if args.get("backing") and not os.path.exists(args["backing"]):
        raise CliError(f"backing file {args['backing']} does not exist")
    if args.get("blockdev") and not os.path.exists(args["blockdev"]):
        raise CliError(f"block device {args['blockdev']} does not exist")
    d = pair.state_dir(args["name"])
    pid = pair.daemon_pid(args["name"])
    if pid:
        raise CliError(f"pair {args['name']!r} is already up (daemon pid {pid})")
    if os.path.exists(d):
        raise CliError(f"pair {args['name']!r} left state behind; run: drb down {args['name']}")
    os.makedirs(d, mode=0o700)
    r, w = os.pipe()
    log = open(os.path.join(d, "daemon.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "drb_uring.pair", json.dumps(args),
                             str(w)], pass_fds=[w], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            env=procs.module_env())
    log.close()
    os.close(w)
    with open(os.path.join(d, "daemon.pid"), "w") as f:
        f.write(str(proc.pid))
    with os.fdopen(r) as rf:
        line = rf.readline().strip()
    if line != "ok":
        proc.wait(30)
        pair.teardown_leftovers(args["name"])
        raise CliError(line.removeprefix("error: ") or "the pair's daemon died while starting")
    return pair.read_state(args["name"])


def _stop_pair(name: str) -> list[str]:
    from drb_uring import pair
    _require_root()
    pid = pair.daemon_pid(name)
    did = []
    if pid:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while time.monotonic() < end and pair.daemon_pid(name) == pid:
            time.sleep(0.02)
        if pair.daemon_pid(name) == pid:
            os.kill(pid, signal.SIGKILL)
            did.append(f"daemon {pid} did not stop; killed it")
        else:
            did.append(f"stopped daemon {pid}")
    did += pair.teardown_leftovers(name)
    return did


def cmd_up(a: argparse.Namespace) -> int:
    from drb_uring import pair
    from drb_uring.bench import parse_size
    size = parse_size(a.size)
    if size < 1 << 20:
        raise CliError(f"--size {a.size} is too small (at least 1m)")
    args = {**pair.DEFAULTS, "name": a.name, "backing": a.backing, "size": size,
            "blockdev": a.blockdev, "o_direct": a.o_direct, "attach_user": a.attach_user,
            "attach_driver": a.attach_driver, "no_monitor": a.no_monitor,
            "deny": [x for x in a.deny.split(",") if x] if a.deny is not None
            else list(pair.DEFAULTS["deny"])}
    if (a.attach_user is None) != (a.attach_driver is None):
        raise CliError("--attach-user and --attach-driver go together")
    if a.no_monitor:
        print("drb: WARNING: --no-monitor: the driver domain's access to user memory "
              "will not be checked against any I/O task table", file=sys.stderr)
    if a.foreground:
        return _up_foreground(args)
    print(f"drb: bringing up pair {a.name} ...", file=sys.stderr)
    st = _start_pair(args)
    _print_status(st, True)
    return 0


def _up_foreground(args: dict) -> int:
    """The daemon in this process, logging to stderr; Ctrl-C takes it down."""
    from drb_uring import pair
    _require_root()
    pair.check_name(args["name"])
    if pair.daemon_pid(args["name"]) or os.path.exists(pair.state_dir(args["name"])):
        raise CliError(f"pair {args['name']!r} is up or left state behind; "
                       f"run: drb down {args['name']}")
    os.makedirs(pair.state_dir(args["name"]), mode=0o700)
    with open(os.path.join(pair.state_dir(args["name"]), "daemon.pid"), "w") as f:
        f.write(str(os.getpid()))
    r, w = os.pipe()
    os.close(r)          # nobody waits for the ready line: the log says it
    return pair.daemon(argparse.Namespace(**args), w, log_to_stderr=True)


def cmd_down(a: argparse.Namespace) -> int:
    did = _stop_pair(a.name)
    if not did:
        raise CliError(f"no pair named {a.name!r}")
    for line in did:
        print(f"drb: {line}")
    return 0


def _print_status(st: dict, alive: bool) -> None:
    print(f"pair {st['name']}: {'up' if alive else 'DOWN: its monitor is not running'}")
    print(f"  daemon/monitor pid {st['daemon_pid']}, socket {st['socket']}")
    print(f"  device {st['device']} ({st['device_size']} bytes"
          f"{', O_DIRECT' if st['o_direct'] else ''})")
    for role in ("user", "driver"):
        dm = st["domains"][role]
        print(f"  {role:<6} domain: pid {dm['pid']}, hostname {dm['hostname']}, "
              f"cgroup {dm['cgroup']}")
    if not alive:
        print("  its workers stopped with it and channel calls fail; "
              f"clean up with: drb down {st['name']}")


def cmd_status(a: argparse.Namespace) -> int:
    from drb_uring import pair
    names = [a.name] if a.name else sorted(os.listdir(pair.RUN)) if os.path.isdir(pair.RUN) \
        else []
    out = []
    for n in names:
        st = pair.read_state(n)
        if st is None:
            if a.name:
                raise CliError(f"no pair named {n!r}")
            continue
        alive = pair.daemon_pid(n) is not None
        out.append({**st, "alive": alive})
        if not a.json:
            _print_status(st, alive)
    if a.json:
        print(json.dumps(out if not a.name else out[0], indent=2))
    return 0


def cmd_ls(a: argparse.Namespace) -> int:
    from drb_uring import pair
    names = sorted(os.listdir(pair.RUN)) if os.path.isdir(pair.RUN) else []
    print(f"{'NAME':<20}{'STATE':<8}{'DAEMON':>8}  DEVICE")
    for n in names:
        st = pair.read_state(n) or {}
        alive = pair.daemon_pid(n)
        print(f"{n:<20}{'up' if alive else 'down':<8}{alive or '-':>8}  {st.get('device', '?')}")
    return 0


def exec_in(name: str, role: str, cmd: list[str], **kw) -> subprocess.Popen:
    from drb_uring import nsutil, pair, procs
    _require_root()
    st = pair.read_state(name)
    if st is None or not pair.daemon_pid(name):
        raise CliError(f"pair {name!r} is not up")
    dm = st["domains"][role]
    return nsutil.spawn_in(dm["pid"], cmd, group=dm["cgroup"],
                           packet_filter=role == "user" and "packet" in st["deny"],
                           env=procs.module_env(), **kw)


def cmd_exec(a: argparse.Namespace) -> int:
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        raise CliError("nothing to run: drb exec NAME {user|driver} -- CMD ...")
    proc = exec_in(a.name, a.role, cmd)
    return proc.wait()


def cmd_trace(a: argparse.Namespace) -> int:
    import socket as so

    from drb_uring import hist, pair, protocol
    if a.ebpf:
        from drb_uring import ebpf
        print(f"// bcc flags: {' '.join(ebpf.monitor_cflags())}")
        print((ebpf.BPF_DIR / "monitor.c").read_text(), end="")
        return 0
    if not a.name:
        raise CliError("which pair? drb trace NAME")
    st = pair.read_state(a.name)
    if st is None or not pair.daemon_pid(a.name):
        raise CliError(f"pair {a.name!r} is not up")

    def snapshot() -> dict:
        s = so.socket(so.AF_UNIX, so.SOCK_SEQPACKET)
        with s:
            s.connect(st["socket"])
            # Each snapshot renews the monitor's lease on stage histograms.
            return protocol.request(s, {"op": "trace", "lease": a.interval * 2 + 1})

    print(f"Tracing pair {a.name} for {a.seconds:g} s, every {a.interval:g} s "
          "(latency per stage in microseconds; mode switches per domain). Ctrl-C to stop.")
    prev = snapshot()
    t_prev = time.monotonic()
    end = t_prev + a.seconds
    while time.monotonic() < end:
        time.sleep(min(a.interval, max(0.0, end - time.monotonic())))
        cur = snapshot()
        now = time.monotonic()
        dt, t_prev = now - t_prev, now
        print(time.strftime("%H:%M:%S"))
        ios = 0
        for ch in sorted(cur["channels"], key=int):
            for stage, buckets in sorted(cur["channels"][ch].items()):
                old = prev["channels"].get(ch, {}).get(stage, {})
                delta = {int(k): v - old.get(k, 0) for k, v in buckets.items()}
                if stage == "submit_to_complete":
                    ios += sum(delta.values())
                if any(delta.values()):
                    sys.stdout.write(hist.format_hist(f"usecs_{stage}_ch{ch}", delta))
        print(f"{'domain':<8}{'counter':<14}{'per second':>14}{'per I/O':>12}   ({ios} I/Os)")
        for role in sorted(cur.get("counters", {})):
            for name, v in cur["counters"][role].items():
                d = v - prev["counters"][role][name]
                per_io = f"{d / ios:12.3f}" if ios else f"{'-':>12}"
                print(f"{role:<8}{name:<14}{d / dt:>14.1f}{per_io}")
        print()
        prev = cur
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from drb_uring import demo
    return demo.run(a)


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
    c.add_argument("--repeat", type=_positive, default=1,
                   help="run every cell this many times, alternating monitor settings")
    c.add_argument("--monitor", default="on",
                   help="on, off or on,off: with and without the eBPF monitor (default on)")
    c.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    c.set_defaults(func=cmd_bench)

    u = sub.add_parser("up", help="create a user domain and a driver domain with a monitor",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("name")
    g = u.add_mutually_exclusive_group()
    g.add_argument("--backing", metavar="PATH", help="an existing file as the device")
    g.add_argument("--size", default="256m",
                   help="size of a new sparse backing file (default 256m)")
    g.add_argument("--blockdev", metavar="DEV", help="a block device as the device")
    u.add_argument("--o-direct", action="store_true", help="open the device with O_DIRECT")
    u.add_argument("--attach-user", type=int, metavar="PID",
                   help="pair an existing container as the user domain")
    u.add_argument("--attach-driver", type=int, metavar="PID",
                   help="pair an existing container as the driver domain")
    u.add_argument("--deny", default=None, metavar="FAMILIES",
                   help="socket families the user domain may not use "
                        "(default inet,inet6,packet; '' for none)")
    u.add_argument("--foreground", action="store_true",
                   help="run the pair's daemon in this terminal, logging to stderr "
                        "(Ctrl-C takes the pair down)")
    u.add_argument("--no-monitor", action="store_true",
                   help="run WITHOUT the eBPF monitor: no I/O task table is enforced "
                        "(an explicit, loudly logged opt-out)")
    u.set_defaults(func=cmd_up)

    d = sub.add_parser("down", help="remove a pair and everything it made")
    d.add_argument("name")
    d.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="show a pair (or all)")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    sub.add_parser("ls", help="list pairs").set_defaults(func=cmd_ls)

    e = sub.add_parser("exec", help="run a command inside a domain")
    e.add_argument("name")
    e.add_argument("role", choices=("user", "driver"))
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    e.set_defaults(func=cmd_exec)

    t = sub.add_parser("trace", help="per-stage latency histograms of a pair's channels")
    t.add_argument("name", nargs="?")
    t.add_argument("--ebpf", action="store_true",
                   help="print the monitor's eBPF program and its flags for this kernel, and exit")
    t.add_argument("--seconds", type=float, default=10.0)
    t.add_argument("--interval", type=float, default=1.0)
    t.set_defaults(func=cmd_trace)

    m = sub.add_parser("demo", help="the main job: a pair, a workload through it, teardown")
    m.add_argument("--seconds", type=float, default=3.0, help="per benchmark phase")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except KeyboardInterrupt:
        print("drb: interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError, ValueError, CliError) as e:
        print(f"drb: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
