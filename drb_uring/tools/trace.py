"""``drb trace``: a pair's per-stage latency histograms and mode switches.

The pair's broker answers a ``trace`` request with cumulative histograms
per channel and cumulative counters per domain; each request renews its
lease on the stage histograms. What this module prints is the difference
between two such snapshots.
"""

from __future__ import annotations

import socket

from drb_uring import protocol
from drb_uring.tools import hist


def snapshot(socket_path: str, lease: float) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with s:
        s.connect(socket_path)
        return protocol.request(s, {"op": "trace", "lease": lease})


def render(prev: dict, cur: dict, seconds: float) -> str:
    """Histograms of what happened between two snapshots, then each
    domain's counters per second and per I/O."""
    out = []
    # Every completion the monitor counted (the histograms time a sample).
    ios = sum(n - prev.get("ios", {}).get(ch, 0) for ch, n in cur.get("ios", {}).items())
    for ch in sorted(cur["channels"], key=int):
        for stage, buckets in sorted(cur["channels"][ch].items()):
            old = prev["channels"].get(ch, {}).get(stage, {})
            delta = {int(k): v - old.get(k, 0) for k, v in buckets.items()}
            if any(delta.values()):
                out.append(hist.format_hist(f"usecs_{stage}_ch{ch}", delta))
    out.append(f"{'domain':<8}{'counter':<14}{'per second':>14}{'per I/O':>12}   ({ios} I/Os)\n")
    for role in sorted(cur.get("counters", {})):
        for name, v in cur["counters"][role].items():
            d = v - prev["counters"].get(role, {}).get(name, 0)
            per_io = f"{d / ios:12.3f}" if ios else f"{'-':>12}"
            out.append(f"{role:<8}{name:<14}{d / seconds:>14.1f}{per_io}\n")
    return "".join(out)
