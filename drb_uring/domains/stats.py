"""What a pair's daemon counts for `drb metrics`, kept monotonic.

The sources restart from zero under the daemon: a request ring's index is
32-bit and wraps, a new grant ring (after the monitor came back) has fresh
histograms, the monitor's per-domain counters start again with it, and a
channel that ends takes its counts with it. So the daemon keeps totals per
user domain and per domain, and adds only the growth of each source since
it last looked: at every `metrics` request, and once more when a channel
ends. Deaths, restarts and violations are counted from the broker's events
as they happen.

The snapshot (PairStats.snapshot, the control socket's `metrics` answer)::

    {"pair": NAME, "time": seconds since the epoch, "monitor": bool,
     "monitor_deaths": n, "monitor_restarts": n,
     "counted": ["ring", "monitor", "io", "mode_switches"],   # the sources that fed it
     "user_names": ["user0", ...],
     "users": {"user0": {
         "ring_requests": n,          # taken from its request rings, every op
         "requests": {"read": n, "write": n, "flush": n},   # only with "io"
         "bytes": {"read": n, "write": n},                  # only with "io"
         "channels": n, "channels_opened": n, "pinned_bytes": n,
         "max_channels": n, "max_pinned": n,
         "violations": {reason: n}, "worker_deaths": n, "worker_restarts": n,
         "latency_us_log2": {stage: {bucket: n}}}},   # bpftrace's numbering
     "domains": {"driver": {"syscalls": n, "ctx_switches": n,   # only with "mode_switches"
                            "ios": n},
                 "user0": {...}}}

Latency, the requests and bytes by operation ("io": the kernel's
completions of each grant ring) and the domains' counters come from the
eBPF monitor, and only while someone looks: each request's `lease` keeps them collected for that
many seconds (they cost on every request and system call). Without the
monitor they are absent and zero.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from drb_uring.errors import DrbError

# programs.IO_COUNTS by index: what each count adds to.
IO_KEYS = {0: ("requests", "read"), 1: ("bytes", "read"), 2: ("requests", "write"),
           3: ("bytes", "write"), 4: ("requests", "flush")}

log = logging.getLogger("drb.stats")

MAX_LEASE = 3600.0
RING_WRAP = 1 << 32
OPS = ("read", "write", "flush")


class UserTotals:
    def __init__(self):
        self.ring_requests = 0
        self.requests: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.channels_opened = 0
        self.violations: dict[str, int] = defaultdict(int)
        self.worker_deaths = 0
        self.worker_restarts = 0
        self.latency: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))


class PairStats:
    """`broker()` gives the pair's broker (None before it exists)."""

    def __init__(self, name: str, broker):
        self.name = name
        self.broker = broker
        self.users: dict[str, UserTotals] = {}
        self.domains: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.last: dict[tuple, int] = {}      # a source's value when last looked at
        self.epoch = 0                        # the monitor's lives: its counters restart
        self.monitor_deaths = 0
        self.monitor_restarts = 0
        self.io_counted = False
        self.looked = False                   # nobody asked yet: no sampling at channel ends

    def user(self, name: str) -> UserTotals:
        if name not in self.users:
            self.users[name] = UserTotals()
        return self.users[name]

    # ---- events ------------------------------------------------------------------

    def on_event(self, event: str, fields: dict) -> None:
        name = fields.get("user")
        u = self.user(name) if name else None
        if event == "channel-opened":
            u.channels_opened += 1
            ch = self._channel(fields["channel"])
            if ch is not None:
                # A ring's index need not start at 0: its growth counts from here.
                self.last[(ch.id, "ring")] = self._ring_head(ch)
        elif event == "channel-closed":
            ch = self._channel(fields["channel"])
            if ch is not None:
                # The histograms cost a word with the monitor: only once someone looks.
                self._sample([ch], 0.0, domains=False, monitor=self.looked)
            self.last = {k: v for k, v in self.last.items() if k[0] != fields["channel"]}
        elif event == "violation":
            u.violations[fields.get("reason") or "unknown"] += 1
        elif event == "worker-died":
            u.worker_deaths += 1
        elif event == "worker-restarted":
            u.worker_restarts += 1
        elif event == "monitor-down":
            self.monitor_deaths += 1
            self.epoch += 1
        elif event == "monitor-back":
            self.monitor_restarts += 1
        elif event == "user-removed":
            self.users.pop(name, None)
            self.domains.pop(name, None)
            # A user domain of the same name later is another cgroup: counted afresh.
            self.last = {k: v for k, v in self.last.items()
                         if not (k[0] == "domain" and k[2] == name)}

    # ---- sampling ----------------------------------------------------------------

    def _channel(self, cid: int):
        b = self.broker()
        return b.channels.get(cid) if b is not None else None

    @staticmethod
    def _ring_head(ch) -> int | None:
        try:
            return ch.request_head()
        except (OSError, ValueError):
            return None                    # its ring is already let go of

    def _grow(self, key: tuple, value: int, wrap: int = 0) -> int:
        """How much a source grew since it was last looked at: a value below
        the last one is a source that started again (or, with `wrap`, an
        index that wrapped)."""
        last = self.last.get(key)
        self.last[key] = value
        if last is None:
            return value
        if wrap:
            return (value - last) % wrap
        return value - last if value >= last else value

    def _io(self, u, ch, counts: dict[int, int]) -> None:
        """The monitor's counts of one channel's completions by operation
        (programs.IO_COUNTS, kept while someone looks)."""
        self.io_counted = True
        for i, n in counts.items():
            what = IO_KEYS.get(i)
            if what is not None:
                grown = self._grow((ch.id, *what), n)
                if what[0] == "requests":
                    u.requests[what[1]] += grown
                    # Every completion counted while counting is on: the
                    # divisor of the per-I/O rates (the stage histograms
                    # time only a sample of the requests).
                    self.domains[ch.tenant.name]["ios"] += grown
                    self.domains["driver"]["ios"] += grown
                else:
                    u.bytes[what[1]] += grown

    def _sample(self, channels, lease: float, domains: bool = True,
                monitor: bool = True, mode_switches: bool = False) -> None:
        b = self.broker()
        if b is None:
            return
        for ch in channels:
            u = self.user(ch.tenant.name)
            head = self._ring_head(ch)
            if head is not None:
                u.ring_requests += self._grow((ch.id, "ring"), head, RING_WRAP)
        enforcer = b.link.enforcer
        if enforcer is None or not monitor:
            return
        try:
            by_gid = {ch.gid: ch for ch in channels if ch.gid}
            hist = (enforcer.histograms(list(by_gid), lease, counters=mode_switches)
                    if by_gid or lease else {})
            for gid, stages in hist.items():
                ch = by_gid[gid]
                u = self.user(ch.tenant.name)
                for stage, buckets in stages.items():
                    if stage == "io":
                        self._io(u, ch, buckets)
                        continue
                    for bucket, n in buckets.items():
                        grown = self._grow((ch.id, gid, stage, bucket), n)
                        u.latency[stage][bucket] += grown
            if domains:
                for role, path in list(b.link.domains.items()):
                    for counter, n in enforcer.counters(path).items():
                        if counter in ("syscalls", "ctx_switches"):
                            self.domains[role][counter] += self._grow(
                                ("domain", self.epoch, role, counter), n)
        except (DrbError, OSError) as e:
            # The monitor went away meanwhile: the broker hears it and says so.
            log.warning("metrics: the monitor did not answer: %s", e)

    def snapshot(self, lease: float = 0.0, users: list[str] | None = None,
                 mode_switches: bool = False) -> dict:
        """The pair's figures. A control socket message is small (8 KiB):
        `users` = [] gives the pair's own and the names of its user
        domains ("user_names"), a list of names those user domains' alone;
        None, everything. The domains' system calls and context switches are
        counted (for the lease) and reported only with `mode_switches`: their
        hooks run on every system call of the host."""
        b = self.broker()
        self.looked = True
        lease = min(max(float(lease or 0), 0.0), MAX_LEASE)
        info = b.tenant_info() if b is not None else {}
        which = [n for n in info if users is None or n in users]
        if b is not None:
            live = [ch for ch in b.channels.values()
                    if not ch.ended and ch.tenant.name in which]
            self._sample(live, lease, domains=users is None or not users,
                         mode_switches=mode_switches)
        out = {"pair": self.name, "time": time.time(), "users": {}}
        for name in which:
            u = self.user(name)
            i = info[name]
            out["users"][name] = {
                "ring_requests": u.ring_requests,
                "channels": i["channels"], "channels_opened": u.channels_opened,
                "pinned_bytes": i["pinned"],
                "max_channels": i["limits"]["channels"], "max_pinned": i["limits"]["pinned"],
                "violations": dict(u.violations),
                "worker_deaths": u.worker_deaths, "worker_restarts": u.worker_restarts,
                "latency_us_log2": {st: {str(k): n for k, n in bk.items() if n}
                                    for st, bk in u.latency.items()}}
            if self.io_counted:
                out["users"][name]["requests"] = {op: u.requests.get(op, 0) for op in OPS}
                out["users"][name]["bytes"] = {op: u.bytes.get(op, 0) for op in OPS[:2]}
        if users is not None and users:
            return out
        monitored = b is not None and b.link.enforce
        out.update({
            "monitor": monitored,
            "monitor_deaths": self.monitor_deaths, "monitor_restarts": self.monitor_restarts,
            "counted": ["ring", *(["monitor"] if monitored else []),
                        *(["io"] if self.io_counted else []),
                        *(["mode_switches"] if monitored and mode_switches else [])],
            "user_names": sorted(info),
            "domains": {r: {k: self.domains.get(r, {}).get(k, 0)
                            for k in (("syscalls", "ctx_switches", "ios") if mode_switches
                                      else ("ios",))}
                        for r in ["driver", *sorted(info)]}})
        return out
