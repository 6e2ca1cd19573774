"""`drb metrics`: every pair's counters in Prometheus's text format.

The figures are the pair daemons' own (the `metrics` request on each
control socket, see domains.stats); this module only names them, through
prometheus_client's custom-collector API. Served over HTTP (--listen),
written for node_exporter's textfile collector (--textfile, atomically), or
printed once.

Latency is the eBPF monitor's log2 histogram, bucket for bucket: bucket k
of bpftrace's numbering (k >= 1) holds [2^(k-2), 2^(k-1)) microseconds, 0
for k = 1, so its upper bound 2^(k-1) us is the Prometheus bucket's `le`.
No second measurement is taken; the histogram's _sum is estimated from the
buckets (each count at its bucket's middle).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from drb_uring.domains import control, state
from drb_uring.errors import DrbError

DEFAULT_LISTEN = "127.0.0.1:9478"
TOP_BUCKET = 31            # le = 2^30 us (~18 min); anything slower is only in +Inf
ASK_TIMEOUT = 5.0
# A scrape keeps the monitor's histograms and counters on for this long:
# they cost on every request and system call, so only while someone looks.
SCRAPE_LEASE = 300.0
TEXTFILE = "drb.prom"


class MetricsError(DrbError):
    pass


def le_of(bucket: int) -> float:
    """The upper bound, in seconds, of log2 bucket `bucket` (bpftrace's numbering)."""
    return (1 << (max(bucket, 1) - 1)) / 1e6


def mid_of(bucket: int) -> float:
    return 0.0 if bucket <= 1 else 1.5 * (1 << (bucket - 2)) / 1e6


def histogram(buckets: dict) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets and an estimated sum from log2 counts."""
    counts = {int(k): n for k, n in buckets.items()}
    out, running = [], 0
    for k in range(1, TOP_BUCKET + 1):
        running += counts.get(k, 0) + (counts.get(0, 0) if k == 1 else 0)
        out.append((_float(le_of(k)), running))
    out.append(("+Inf", sum(counts.values())))
    return out, sum(n * mid_of(k) for k, n in counts.items())


def _float(v: float) -> str:
    return repr(v)


USERS_PER_ASK = 4          # a reply is one message of at most 8 KiB


def snapshot(name: str, lease: float = 0.0, mode_switches: bool = False) -> dict:
    """A pair's figures (see domains.stats), asked in pieces small enough
    for one message each."""
    def ask(users: list[str], lease: float = 0.0) -> dict:
        return control.ask_daemon(name, {"op": "metrics", "lease": lease, "users": users,
                                         "mode_switches": mode_switches},
                                  timeout=ASK_TIMEOUT)["metrics"]
    snap = ask([], lease)
    names = snap.get("user_names", [])
    for k in range(0, len(names), USERS_PER_ASK):
        snap["users"].update(ask(names[k:k + USERS_PER_ASK])["users"])
    return snap


class PairsCollector:
    """Asks every running pair's daemon (or `names`) at each collection."""

    def __init__(self, names: list[str] | None = None, lease: float = 0.0,
                 mode_switches: bool = False):
        self.names = names
        self.lease = lease
        self.mode_switches = mode_switches

    def snapshots(self) -> dict[str, dict | None]:
        out = {}
        for name in self.names or state.pair_names():
            if not state.daemon_pid(name):
                out[name] = None
                continue
            try:
                out[name] = snapshot(name, self.lease, self.mode_switches)
            except (DrbError, OSError):
                out[name] = None
        return out

    def collect(self):
        return families(self.snapshots())


def families(snaps: dict[str, dict | None]) -> list:
    """The metric families of pairs' snapshots (None: the pair's daemon did
    not answer)."""
    up = GaugeMetricFamily("drb_pair_up", "1 if the pair's daemon answered, else 0",
                           labels=["pair"])
    mon = GaugeMetricFamily("drb_pair_monitored", "1 if the pair runs under the eBPF monitor",
                            labels=["pair"])
    users_n = GaugeMetricFamily("drb_user_domains", "user domains of the pair", labels=["pair"])
    pu = ["pair", "user"]
    ring = CounterMetricFamily("drb_ring_requests", "requests the driver domain took from the "
                               "user domain's request rings, every operation", labels=pu)
    reqs = CounterMetricFamily("drb_requests", "requests by operation", labels=[*pu, "op"])
    nbytes = CounterMetricFamily("drb_bytes", "bytes moved by operation", labels=[*pu, "op"])
    lat = HistogramMetricFamily("drb_stage_latency_seconds", "latency of each stage of a "
                                "request, from the monitor's log2 histograms",
                                labels=[*pu, "stage"])
    chans = GaugeMetricFamily("drb_channels_open", "channels open", labels=pu)
    opened = CounterMetricFamily("drb_channels_opened", "channels opened", labels=pu)
    max_ch = GaugeMetricFamily("drb_channels_limit", "channels a user domain may have open "
                               "(drb up --max-channels)", labels=pu)
    pinned = GaugeMetricFamily("drb_pinned_bytes", "user memory pinned in channel pools",
                               labels=pu)
    max_pin = GaugeMetricFamily("drb_pinned_bytes_limit", "user memory a user domain may "
                                "pin (drb up --max-pinned)", labels=pu)
    viol = CounterMetricFamily("drb_violations", "violations the monitor stopped, by reason",
                               labels=[*pu, "reason"])
    deaths = CounterMetricFamily("drb_worker_deaths", "deaths of the user domain's worker "
                                 "(crashes, kills, violations)", labels=pu)
    restarts = CounterMetricFamily("drb_worker_restarts", "workers started to take over from "
                                   "one that died", labels=pu)
    mon_deaths = CounterMetricFamily("drb_monitor_deaths", "times the eBPF monitor went away",
                                     labels=["pair"])
    mon_back = CounterMetricFamily("drb_monitor_restarts", "times the eBPF monitor was "
                                   "brought back (drb up --restart)", labels=["pair"])
    pd = ["pair", "domain"]
    sysc = CounterMetricFamily("drb_domain_syscalls", "system calls made in the domain while "
                               "counted (the monitor counts while scraped with "
                               "--mode-switches)", labels=pd)
    ctxs = CounterMetricFamily("drb_domain_context_switches", "context switches in the domain "
                               "while counted", labels=pd)
    ios = CounterMetricFamily("drb_domain_ios", "I/Os the device completed for the domain "
                              "while counted: the divisor of the per-I/O rates", labels=pd)
    for pair, snap in sorted(snaps.items()):
        up.add_metric([pair], 0 if snap is None else 1)
        if snap is None:
            continue
        mon.add_metric([pair], 1 if snap.get("monitor") else 0)
        users_n.add_metric([pair], len(snap.get("users", {})))
        mon_deaths.add_metric([pair], snap.get("monitor_deaths", 0))
        mon_back.add_metric([pair], snap.get("monitor_restarts", 0))
        for user, u in sorted(snap.get("users", {}).items()):
            lab = [pair, user]
            ring.add_metric(lab, u.get("ring_requests", 0))
            for op, n in sorted(u.get("requests", {}).items()):
                reqs.add_metric([*lab, op], n)
            for op, n in sorted(u.get("bytes", {}).items()):
                nbytes.add_metric([*lab, op], n)
            for stage, buckets in sorted(u.get("latency_us_log2", {}).items()):
                b, total = histogram(buckets)
                lat.add_metric([*lab, stage], b, total)
            chans.add_metric(lab, u.get("channels", 0))
            opened.add_metric(lab, u.get("channels_opened", 0))
            max_ch.add_metric(lab, u.get("max_channels", 0))
            pinned.add_metric(lab, u.get("pinned_bytes", 0))
            max_pin.add_metric(lab, u.get("max_pinned", 0))
            for reason, n in sorted(u.get("violations", {}).items()):
                viol.add_metric([*lab, reason], n)
            deaths.add_metric(lab, u.get("worker_deaths", 0))
            restarts.add_metric(lab, u.get("worker_restarts", 0))
        for role, d in sorted(snap.get("domains", {}).items()):
            # Present only when asked for (--mode-switches): a zero would
            # read as "no system calls".
            if "syscalls" in d:
                sysc.add_metric([pair, role], d["syscalls"])
                ctxs.add_metric([pair, role], d.get("ctx_switches", 0))
            ios.add_metric([pair, role], d.get("ios", 0))
    return [up, mon, users_n, ring, reqs, nbytes, lat, chans, opened, max_ch, pinned, max_pin,
            viol, deaths, restarts, mon_deaths, mon_back,
            *([sysc, ctxs] if sysc.samples else []), ios]


def registry(names: list[str] | None, lease: float,
             mode_switches: bool = False) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(PairsCollector(names, lease, mode_switches))
    return reg


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [ADDR]:PORT or PORT (on 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise MetricsError(f"--listen {text!r}: give ADDR:PORT, e.g. 127.0.0.1:9478")
    return host, int(port)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def run(names: list[str], listen: str | None, textfile: str | None,
        interval: float | None, mode_switches: bool = False) -> int:
    state.require_root()
    if listen and textfile:
        raise MetricsError("--listen and --textfile exclude each other")
    if interval is not None and not 1 <= interval <= 3600:
        raise MetricsError(f"--interval must be in [1, 3600] seconds, got {interval:g}")
    if listen:
        host, port = parse_listen(listen)
        try:
            server, _thread = start_http_server(port, host, registry(names or None,
                                                                     SCRAPE_LEASE,
                                                                     mode_switches))
        except OSError as e:
            raise MetricsError(f"--listen {listen}: {e.strerror or e}") from None
        where = f"[{host}]" if ":" in host else host
        print(f"drb metrics: serving http://{where}:{port}/metrics (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        try:
            _wait_for_signal()
        finally:
            server.shutdown()
        return 0
    if textfile:
        if not os.path.isdir(textfile):
            raise MetricsError(f"--textfile {textfile}: not a directory")
        path = os.path.join(textfile, TEXTFILE)
        reg = registry(names or None, 3 * interval if interval else 0.0, mode_switches)
        while True:
            write_to_textfile(path, reg)
            if interval is None:
                return 0
            time.sleep(interval)
    from prometheus_client import generate_latest
    sys.stdout.write(generate_latest(registry(names or None, 0.0, mode_switches)).decode())
    return 0
