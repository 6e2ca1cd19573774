"""drb: Double Ring Buffer I/O between a user domain and a driver domain.

The command-line face of drb-uring. Each subcommand prints a one-line
header saying what it does, then progress lines on long work. The work
itself lives in the parts (domains.control, tools.bench, tools.trace, ...);
this module parses, validates and prints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from drb_uring.errors import DrbError
from drb_uring.tools.benchcmd import TRANSPORTS_DEFAULT, cmd_bench, cmd_bench_ring, cmd_report
from drb_uring.tools.cliutil import CliError
from drb_uring.tools.cliutil import positive as _positive

EXAMPLES = """examples:
  drb demo                            # a pair on a temporary file, a workload, teardown
  drb up db --size 1g                 # a pair named db on a new 1 GiB backing file
  drb up db --blockdev /dev/loop0 --o-direct
  drb up app --size 1g --share $PWD:/app     # this directory, read-only, at /app inside
  drb up db --size 1g --disk --fs ext4       # /dev/drb/disk and ext4 at /data inside
  drb exec app user -- python3 /app/app.py   # run it inside the user domain (user0)
  drb up web --size 1g --users 4 --extent 128m   # user0..user3, 128 MiB each, 512 MiB free
  drb exec web user2 -- hostname
  drb user add web                    # user4, on a free extent of the same size
  drb user rm web user1
  drb status db --json
  drb status db --config > /etc/drb/db.toml  # drb up db --config /etc/drb/db.toml again
  drb events db --follow              # what happens to db, as it happens
  drb metrics --listen 127.0.0.1:9478 # every pair's counters for Prometheus
  drb down db
  drb bench --quick --json io.json   # drb against the baselines, ~3 minutes
  drb bench --quick --smoke           # the same cells, a fraction of a second each
  drb bench --disk --json disk.json   # the user domain's disk against FUSE alone and a bind
  drb report io.json --out report/   # the table and plots from it
  drb bench --transport drb,grant-map --op randread --bs 4k --qd 1,32 --seconds 3
  drb bench-ring                      # ring round trip vs raw cache line, stream rates
  drb bench-ring --json ring.json     # also write the figures as JSON
  drb bench-ring --iters 50000 --count 2000000   # a quicker run
"""


_DEFAULT_LISTEN = "127.0.0.1:9478"


def _config(a: argparse.Namespace):
    from drb_uring.domains.config import DEFAULT_DENY, PairConfig, parse_size
    deny = [x for x in a.deny.split(",") if x] if a.deny is not None else list(DEFAULT_DENY)
    return PairConfig(name=a.name, backing=a.backing, size=parse_size(a.size),
                      blockdev=a.blockdev, o_direct=a.o_direct, attach_user=a.attach_user,
                      attach_driver=a.attach_driver, deny=deny, no_monitor=a.no_monitor,
                      max_channels=a.max_channels, max_pinned=parse_size(a.max_pinned),
                      user_rootfs=_abs(a.user_rootfs), driver_rootfs=_abs(a.driver_rootfs),
                      domain_pids=a.domain_pids, domain_memory=parse_size(a.domain_memory),
                      users=a.users, driver_cpus=a.driver_cpus, restart=a.restart,
                      extent=parse_size(a.extent) if a.extent is not None else None,
                      share=list(a.share), force=a.force,
                      allow_host_userns=a.allow_host_userns, disk=a.disk,
                      disk_path=a.disk_path, fs=a.fs, fs_mount=a.fs_mount,
                      max_users=a.max_users)


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def cmd_up(a: argparse.Namespace) -> int:
    from drb_uring.domains import control
    cfg = _config(a)
    if cfg.no_monitor:
        print("drb: WARNING: --no-monitor: the driver domain's access to user memory "
              "will not be checked against any I/O task table", file=sys.stderr)
    if a.foreground:
        return control.run_pair_here(cfg)
    print(f"drb: bringing up pair {cfg.name} ...", file=sys.stderr)
    try:
        st = control.start_pair(cfg)
    except KeyboardInterrupt:
        print(f"drb: interrupted: pair {cfg.name} was not brought up; everything it had "
              "started is removed", file=sys.stderr)
        return 130
    _print_status(st, "up")
    return 0


def cmd_down(a: argparse.Namespace) -> int:
    from drb_uring.domains import control
    did = control.stop_pair(a.name)
    if not did:
        raise CliError(f"no pair named {a.name!r}")
    for line in did:
        print(f"drb: {line}")
    return 0


def _print_status(st: dict, condition: str) -> None:
    from drb_uring.domains import state
    head = {"up": "up", "down": "DOWN: its monitor is not running",
            "degraded": "DEGRADED: a domain is gone"}[condition]
    print(f"pair {st['name']}: {head}")
    print(f"  daemon/monitor pid {st['daemon_pid']}, socket {st['socket']}")
    print(f"  device {st['device']} ({st['device_size']} bytes"
          f"{', O_DIRECT' if st['o_direct'] else ''})")
    for role in sorted(state.domain_names(st), key=lambda r: (r != "driver", len(r), r)):
        dm = st["domains"][role]
        gone = "" if state.domain_alive(st, role) else "  GONE"
        ext = (f", extent {dm['extent'][0]}+{dm['extent'][1]}" if dm.get("extent")
               else "")
        print(f"  {role} domain: pid {dm['pid']}, hostname {dm['hostname']}, "
              f"cgroup {dm['cgroup']}{ext}{gone}")
    if condition != "up":
        print("  its channels fail; clean up with: "
              f"drb down {st['name']}")


def cmd_status(a: argparse.Namespace) -> int:
    from drb_uring.domains import state
    state.require_root()       # pair state is readable by root only
    if a.config:
        from drb_uring.ops import tomlconfig
        sys.stdout.write(tomlconfig.of_pair(a.name))
        return 0
    names = [a.name] if a.name else state.pair_names()
    out = []
    for n in names:
        got = state.describe(n)
        if got is None:
            if a.name:
                raise CliError(f"no pair named {n!r}")
            continue
        st, condition = got
        out.append({**st, "state": condition, "alive": condition != "down"})
        if not a.json:
            _print_status(st, condition)
    if a.json:
        print(json.dumps(out if not a.name else out[0], indent=2))
    # As systemctl status: 3 when what was asked about is not running well.
    return 0 if all(o["state"] == "up" for o in out) else 3


def cmd_ls(a: argparse.Namespace) -> int:
    from drb_uring.domains import state
    state.require_root()       # pair state is readable by root only
    print(f"{'NAME':<20}{'STATE':<10}{'DAEMON':>8}  DEVICE")
    for n in state.pair_names():
        st, condition = state.describe(n) or ({}, "starting")
        pid = state.daemon_pid(n)
        print(f"{n:<20}{condition:<10}{pid or '-':>8}  {st.get('device', '?')}")
    return 0


def cmd_exec(a: argparse.Namespace) -> int:
    from drb_uring.domains import control
    control.check_role(a.role)
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        raise CliError("nothing to run: drb exec NAME {user|userK|driver} -- CMD ...")
    return control.exec_in(a.name, a.role, cmd).wait()


def cmd_user(a: argparse.Namespace) -> int:
    from drb_uring.domains import control
    from drb_uring.domains.config import parse_size
    if a.action == "add":
        if a.user is not None:
            raise CliError("drb user add NAME [--attach PID] [--extent SIZE]: the new user "
                           "domain's name is chosen for it")
        extent = parse_size(a.extent) if a.extent is not None else None
        got = control.add_user(a.name, a.attach, extent, **({"disk": True} if a.disk else {}))
        dm = got["domain"]
        print(f"drb: added {got['user']} to pair {a.name}: pid {dm['pid']}, hostname "
              f"{dm['hostname']}, extent {dm['extent'][0]}+{dm['extent'][1]}")
        return 0
    if a.user is None:
        raise CliError("which user domain? drb user rm NAME userK")
    if a.attach is not None or a.extent is not None or a.disk:
        raise CliError("--attach, --extent and --disk are for drb user add")
    got = control.remove_user(a.name, a.user)
    print(f"drb: removed {got['user']} from pair {a.name}")
    return 0


def cmd_trace(a: argparse.Namespace) -> int:
    from drb_uring.domains import state
    from drb_uring.tools import trace
    if a.ebpf:
        from drb_uring import bpf
        from drb_uring.enforce.programs import monitor_cflags
        print(f"// bcc flags: {' '.join(monitor_cflags())}")
        print((bpf.DIR / "monitor.c").read_text(), end="")
        return 0
    if not a.name:
        raise CliError("which pair? drb trace NAME")
    if not a.seconds > 0:
        raise CliError(f"--seconds must be more than 0, got {a.seconds:g}")
    if not 0.1 <= a.interval <= 3600:
        raise CliError(f"--interval must be between 0.1 and 3600 seconds, got {a.interval:g}")
    state.require_root()
    st = state.read_state(a.name)
    if st is None or not state.daemon_pid(a.name):
        raise CliError(f"pair {a.name!r} is not up")
    # Each snapshot renews the broker's lease on the stage histograms.
    lease = a.interval * 2 + 1
    print(f"Tracing pair {a.name} for {a.seconds:g} s, every {a.interval:g} s "
          "(latency per stage in microseconds; mode switches per domain). Ctrl-C to stop.")
    prev = trace.snapshot(st["control"], lease)
    t_prev = time.monotonic()
    end = t_prev + a.seconds
    while time.monotonic() < end:
        time.sleep(min(a.interval, max(0.0, end - time.monotonic())))
        cur = trace.snapshot(st["control"], lease)
        now = time.monotonic()
        print(time.strftime("%H:%M:%S"))
        sys.stdout.write(trace.render(prev, cur, now - t_prev))
        print()
        prev, t_prev = cur, now
    return 0


def cmd_soak(a: argparse.Namespace) -> int:
    from drb_uring.domains import state
    from drb_uring.tools import soak
    state.require_root()
    seconds = a.seconds if a.seconds is not None else a.minutes * 60
    if seconds <= 0 or a.kill_every <= 0:
        raise CliError("--minutes, --seconds and --kill-every must be positive")
    if not 1 <= a.users <= 16:
        raise CliError("--users must be in [1, 16]")
    return soak.run(seconds, users=a.users, kill_every=a.kill_every, seed=a.seed,
                    json_out=a.json)


def cmd_metrics(a: argparse.Namespace) -> int:
    from drb_uring.ops import metrics
    return metrics.run(a.names, a.listen, a.textfile, a.interval, a.mode_switches)


def cmd_events(a: argparse.Namespace) -> int:
    from drb_uring.ops import events
    return events.run(a.name, a.follow, a.json)


def cmd_install(a: argparse.Namespace) -> int:
    from drb_uring.ops import install
    for line in install.command(a.cmd, a.dir):
        print(f"drb: {line}")
    return 0


def cmd_hook(a: argparse.Namespace) -> int:
    from drb_uring.ops import hook
    return hook.run()


def cmd_ebpfd(a: argparse.Namespace) -> int:
    from drb_uring.ops import install
    return install.ebpfd()


def cmd_demo(a: argparse.Namespace) -> int:
    from drb_uring.tools import demo
    return demo.run(a.seconds)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="drb", description=__doc__.splitlines()[0],
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def command(name: str, help: str):
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    b = command("bench-ring", "measure the double ring against the physical floor")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    b.add_argument("--iters", type=_positive, default=200_000,
                   help="round trips per latency measurement (default 200000)")
    b.add_argument("--count", type=_positive, default=20_000_000,
                   help="entries streamed at batch 32; batch 1 streams a tenth (default 20000000)")
    b.set_defaults(func=cmd_bench_ring)

    c = command("bench", "drb against the original mechanism and today's ways, in real "
                         "domains: IOPS, MB/s, latency, system calls and mappings per I/O")
    c.add_argument("--transport", default=TRANSPORTS_DEFAULT,
                   help="drb, drb-poll, grant-map, socket, direct (default all)")
    c.add_argument("--op", default="randread", help="randread, randwrite, read, write")
    c.add_argument("--bs", default="4k", help="block sizes, e.g. 4k,64k,1m")
    c.add_argument("--qd", default="1,32", help="queue depths, e.g. 1,32")
    c.add_argument("--users", default="1",
                   help="user domains served by one driver domain, e.g. 1,4,16 (default 1)")
    c.add_argument("--quick", action="store_true",
                   help="the README's matrix: 4k random reads at depth 1 and 32 for every "
                        "transport, 1 MiB sequential reads for drb and direct (~3 min)")
    c.add_argument("--full", action="store_true",
                   help="every transport, op, block size (512..1m), depth (1..128), "
                        "user count and monitor setting (hours)")
    c.add_argument("--no-fio", action="store_true", help="skip fio's reference runs")
    c.add_argument("--seconds", type=float,
                   help="per cell (default 3; 0.2 with --smoke)")
    c.add_argument("--smoke", action="store_true",
                   help="every cell for a fraction of a second, through the same steps: "
                        "proves the matrix runs here, measures nothing")
    c.add_argument("--repeat", type=_positive, default=1,
                   help="run every cell this many times, alternating monitor settings")
    c.add_argument("--monitor", default="on",
                   help="on, off or on,off: with and without the eBPF monitor (default on)")
    c.add_argument("--disk", action="store_true",
                   help="the user domain's disk instead: fio inside the domain on drb-disk, on "
                        "fuse-local (the same FUSE server on a local file) and on a bind-mounted "
                        "file; sqlite and fio on its file system against a bind-mounted "
                        "directory (~2 min)")
    c.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    c.set_defaults(func=cmd_bench)

    r = command("report", "a drb bench --json file as a table, targets and plots")
    r.add_argument("file", help="the JSON that drb bench --json wrote")
    r.add_argument("--out", default="report", help="directory for report.md and the PNG plots "
                                                   "(default ./report)")
    r.set_defaults(func=cmd_report)

    u = command("up", "create a user domain and a driver domain with a monitor")
    u.add_argument("name", help="the pair's name: 1-31 of a-z, 0-9, '-', '_'")
    g = u.add_mutually_exclusive_group()
    g.add_argument("--backing", metavar="PATH", help="an existing file as the device")
    g.add_argument("--size", default="256m",
                   help="size of a new backing file: bytes or k, m, g, t (default 256m)")
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
    u.add_argument("--max-channels", type=_positive, default=64,
                   help="channels a user domain may open at once (default 64)")
    u.add_argument("--max-pinned", default="512m",
                   help="user memory a user domain may pin in channel pools (default 512m)")
    u.add_argument("--user-rootfs", metavar="DIR",
                   help="an unpacked image as the user domain's root (default: the host's "
                        "/usr, read-only, and nothing else)")
    u.add_argument("--driver-rootfs", metavar="DIR",
                   help="an unpacked image as the driver domain's root")
    u.add_argument("--domain-pids", type=_positive, default=512,
                   help="processes each domain may have (default 512)")
    u.add_argument("--domain-memory", default="4g",
                   help="memory each domain may use (default 4g)")
    u.add_argument("--users", type=_positive, default=1,
                   help="user domains served by the one driver domain, user0 .. user{N-1} "
                        "(default 1, at most 64; 'user' is user0)")
    u.add_argument("--extent", metavar="SIZE",
                   help="the part of the device each user domain gets, e.g. 64m (default: "
                        "the device split evenly, rounded down to 1 MiB)")
    u.add_argument("--restart", action="store_true",
                   help="should the eBPF monitor die, bring it back and carry every "
                        "channel on (default: the channels fail with the reason)")
    u.add_argument("--driver-cpus", type=int, default=1, metavar="N",
                   help="CPUs the driver domain's workers share (one worker per user "
                        "domain): the first N of this host's; 0 = any (default 1)")
    u.add_argument("--disk", action="store_true",
                   help="give every user domain its extent as a disk: a file (default "
                        "/dev/drb/disk) any program can read, write and fsync, served through "
                        "the double ring")
    u.add_argument("--disk-path", default="/dev/drb/disk", metavar="PATH",
                   help="where the disk shows inside (default /dev/drb/disk)")
    u.add_argument("--fs", choices=["ext4"],
                   help="with --disk: a file system on it, formatted once inside the user "
                        "domain and mounted by fuse2fs there")
    u.add_argument("--fs-mount", default="/data", metavar="DIR",
                   help="where --fs mounts it inside (default /data)")
    u.add_argument("--share", action="append", default=[], metavar="HOST_DIR:DOMAIN_DIR",
                   help="show a host directory read-only in every user domain, as docker "
                        "-v DIR:DIR:ro does: how programs get in (repeatable)")
    u.add_argument("--force", action="store_true",
                   help="use a backing file even though its mode says it is read-only")
    u.add_argument("--allow-host-userns", action="store_true",
                   help="with --attach-*: pair a container that shares the host's user, pid "
                        "or mount namespace (refused by default)")
    u.add_argument("--no-monitor", action="store_true",
                   help="run WITHOUT the eBPF monitor: no I/O task table is enforced "
                        "(an explicit, loudly logged opt-out)")
    u.add_argument("--max-users", type=_positive, default=64, metavar="N",
                   help="user domains the pair may have at once, however added (default 64)")
    u.add_argument("--config", metavar="FILE",
                   help="take the options from a TOML file (keys: these options without "
                        "the dashes); options given here as well win")
    u.set_defaults(func=cmd_up)

    d = command("down", "remove a pair and everything it made")
    d.add_argument("name", help="the pair to take down")
    d.set_defaults(func=cmd_down)

    s = command("status", "show a pair (or all)")
    s.add_argument("name", nargs="?", help="the pair (default: every pair)")
    s.add_argument("--json", action="store_true", help="print the state as JSON")
    s.add_argument("--config", action="store_true",
                   help="print the pair's configuration as the TOML file drb up --config reads")
    s.set_defaults(func=cmd_status)

    command("ls", "list pairs").set_defaults(func=cmd_ls)

    e = command("exec", "run a command inside a domain")
    e.add_argument("name", help="the pair")
    e.add_argument("role", metavar="DOMAIN",
                   help="which domain: driver, user0, user1, ... (user is user0)")
    e.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...",
                   help="the command and its arguments, after --")
    e.set_defaults(func=cmd_exec)

    w = command("user", "add a user domain to a running pair, or remove one")
    w.add_argument("action", choices=("add", "rm"), help="add or rm")
    w.add_argument("name", help="the pair")
    w.add_argument("user", nargs="?", help="rm: the user domain to remove (userK)")
    w.add_argument("--attach", type=int, metavar="PID",
                   help="add: pair an existing container as the new user domain")
    w.add_argument("--disk", action="store_true",
                   help="add: give the new user domain a disk (as drb up --disk does)")
    w.add_argument("--extent", metavar="SIZE",
                   help="add: the new user domain's extent (default: as the others')")
    w.set_defaults(func=cmd_user)

    t = command("trace", "per-stage latency histograms of a pair's channels")
    t.add_argument("name", nargs="?", help="the pair to trace")
    t.add_argument("--ebpf", action="store_true",
                   help="print the monitor's eBPF program and its flags for this kernel, and exit")
    t.add_argument("--seconds", type=float, default=10.0,
                   help="how long to trace (default 10)")
    t.add_argument("--interval", type=float, default=1.0,
                   help="seconds between printouts (default 1)")
    t.set_defaults(func=cmd_trace)

    m = command("demo", "the main job: a pair, a workload through it, teardown")
    m.add_argument("--seconds", type=float, default=3.0, help="per benchmark phase (default 3)")
    m.set_defaults(func=cmd_demo)

    k = command("soak", "a pair under mixed I/O while its worker, user sides and monitor "
                        "are killed; then every acknowledged write is checked")
    k.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    k.add_argument("--seconds", type=float, help="how long, in seconds instead")
    k.add_argument("--users", type=int, default=2, help="user domains (default 2)")
    k.add_argument("--kill-every", type=float, default=3.0, metavar="S",
                   help="seconds between worker kills, about (default 3); user sides "
                        "about 7 times and the monitor 20 times as far apart")
    k.add_argument("--seed", type=int, default=1, help="for the workload and the kills")
    k.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    k.set_defaults(func=cmd_soak)

    x = command("metrics", "every pair's counters in Prometheus's text format: printed, "
                           "served, or written for node_exporter")
    x.add_argument("names", nargs="*", metavar="NAME", help="only these pairs (default: all)")
    x.add_argument("--listen", metavar="ADDR:PORT", nargs="?", const=_DEFAULT_LISTEN,
                   help=f"serve /metrics over HTTP there (default {_DEFAULT_LISTEN}: this "
                        "host only)")
    x.add_argument("--textfile", metavar="DIR",
                   help="write DIR/drb.prom (atomically) for node_exporter's textfile "
                        "collector, once, or every --interval")
    x.add_argument("--interval", type=float, metavar="S",
                   help="with --textfile: write again every S seconds")
    x.add_argument("--mode-switches", action="store_true",
                   help="also count each domain's system calls and context switches "
                        "(drb_domain_syscalls_total, drb_domain_context_switches_total): "
                        "their hooks run on every system call of the host while scraped")
    x.set_defaults(func=cmd_metrics)

    v = command("events", "what happened to pairs, one line an event; kept after a pair "
                          "is down")
    v.add_argument("name", nargs="?", help="the pair (default: every pair's)")
    v.add_argument("--follow", action="store_true", help="print events as they happen, too")
    v.add_argument("--json", action="store_true", help="one JSON object a line")
    v.set_defaults(func=cmd_events)

    i = command("install-units", "put drb's systemd units in place: drb-ebpfd.service and "
                                 "drb@.service (drb up NAME --config /etc/drb/NAME.toml)")
    i.add_argument("--dir", metavar="DIR", help="where (default /etc/systemd/system)")
    i.set_defaults(func=cmd_install)

    h = command("install-hook", "configure podman (hooks.d) to run drb hook for containers "
                                "annotated io.drb.pair=NAME")
    h.add_argument("--dir", metavar="DIR",
                   help="the hooks directory (default /etc/containers/oci/hooks.d)")
    h.set_defaults(func=cmd_install)

    command("hook", "the OCI hook (createRuntime, poststop) that makes a container a user "
                    "domain of pair NAME while it runs; reads the container's state on "
                    "stdin").set_defaults(func=cmd_hook)
    command("ebpfd", "run the host's eBPF monitor service in the foreground, loaded while "
                     "no pair runs (what drb-ebpfd.service runs)").set_defaults(func=cmd_ebpfd)
    return p


def _up_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = next(x for x in parser._actions if isinstance(x, argparse._SubParsersAction))
    return sub.choices["up"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if a.cmd == "up" and a.config:
            from drb_uring.ops import tomlconfig
            a = tomlconfig.expand(argv, a.config, a.name, parser, _up_parser(parser))
        return a.func(a)
    except KeyboardInterrupt:
        print("drb: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (drb trace ... | head): as other tools, say
        # nothing, and keep the interpreter's last flush from saying it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (DrbError, OSError) as e:
        print(f"drb: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
