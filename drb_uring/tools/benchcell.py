"""One cell of ``drb bench``, run inside the user domain.

Builds the cell's transport (a channel through the monitor for drb, or a
baseline's user end from the descriptors it was handed at 3..), warms it
through the integrity check (printed for the host to compare with the
device file), then on ``go`` runs the timed pass of the workload loop and
prints one JSON line. Then, on the word ``count`` on stdin, it runs the
shorter counted pass (the host has the monitor's counters on meanwhile)
and prints its I/O count; ``end`` closes everything.
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import sys

from drb_uring import procs
from drb_uring.spec import Spec, SpecError
from drb_uring.tools import _load, hist
from drb_uring.tools.ringbench import percentile

MAX_SAMPLES = 2_000_000
TRANSPORTS = ("drb", "drb-poll", "grant-map", "socket", "direct")


@dataclasses.dataclass(frozen=True)
class CellSpec(Spec):
    transport: str
    opcode: int
    rand: bool
    bs: int
    qd: int
    seconds: float
    counted_seconds: float
    extent: int
    slot_count: int
    slot_size: int
    entries: int                      # the request ring's entries (drb)
    nfds: int = 0                     # descriptors handed over, at 3..
    socket: str | None = None         # drb: the monitor's socket in this domain
    spin_ns: int | None = None        # drb: the user end's spin budget
    args: dict = dataclasses.field(default_factory=dict)   # a baseline's user end
    cpu: int | None = None
    seed: int = 1

    def check(self) -> None:
        if self.transport not in TRANSPORTS:
            raise SpecError(f"CellSpec.transport: {self.transport!r}")
        if self.transport.startswith("drb") and not self.socket:
            raise SpecError("CellSpec: a drb cell needs the monitor's socket")
        if self.qd < 1 or self.bs < 1 or self.seconds <= 0:
            raise SpecError("CellSpec: qd, bs and seconds must be positive")


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def summarize(res: dict, lat) -> dict:
    s = sorted(lat)
    out = {k: res[k] for k in ("done", "errors", "error", "seconds")}
    if s:
        out["lat_us"] = {"mean": round(sum(s) / len(s) / 1e3, 2),
                         "p50": percentile(s, 50) / 1e3, "p99": percentile(s, 99) / 1e3,
                         "p999": percentile(s, 99.9) / 1e3}
        out["hist_us"] = dict(hist.counts(x // 1000 for x in s))
    return out


def _transport(a: CellSpec, stack):
    if a.transport in ("drb", "drb-poll"):
        from drb_uring.channel.client import Channel
        from drb_uring.ring import layout as L
        geo = L.Geometry(sq_entries=a.entries, cq_entries=a.entries, slot_size=a.slot_size,
                         slot_count=a.slot_count)
        kw = {"spin_ns": a.spin_ns} if a.spin_ns is not None else {}
        ch = stack.enter_context(Channel(a.socket, a.extent, geometry=geo, **kw))
        return ch, _load.RingTransport(ch.end)
    from drb_uring.tools import baselines
    end = baselines.user_end(a.transport, list(range(3, 3 + a.nfds)), a.args)
    stack.callback(end.close)
    return None, end


def verify(t, a: CellSpec) -> dict:
    """The integrity check, the same for every transport, before anything
    is timed: a batch of reads at random blocks (the host compares their
    digests with the device file), then a batch of writes of fresh random
    bytes in the last blocks of the extent, read back through the
    transport (the host finds them in the file too)."""
    import hashlib
    import random
    # Not timed, so it waits long: a polling worker among 16 on one busy
    # CPU (drb-poll --users 16 under load) may not answer within the
    # timed loop's 5 s, and a slow answer is not a wrong one.
    wait = 60.0
    n = min(a.qd, t.depth, 8)
    bs = min(a.bs, a.slot_size)
    blocks = a.extent // bs
    rng = random.Random(a.seed)
    offs = [rng.randrange(blocks - n) * bs for _ in range(n)]
    digest = lambda bufs: [hashlib.sha256(b).hexdigest() for b in bufs]   # noqa: E731
    reads = digest(t.batch(_load.OP_READ, offs, bs, timeout=wait))
    woffs = [(blocks - n + i) * bs for i in range(n)]
    data = [rng.randbytes(bs) for _ in range(n)]
    if t.batch(_load.OP_WRITE, woffs, bs, data, timeout=wait) != [bs] * n:
        raise OSError(5, "short write")
    back = t.batch(_load.OP_READ, woffs, bs, timeout=wait)
    return {"bs": bs, "read_offsets": offs, "read_sha256": reads, "write_offsets": woffs,
            "write_sha256": digest(data), "read_back_ok": back == data}


def main(argv: list[str] | None = None) -> int:
    import contextlib
    a = procs.spec_from_argv(CellSpec, argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    with contextlib.ExitStack() as stack:
        try:
            ch, t = _transport(a, stack)
            checked = verify(t, a)      # and the transport is serving before anything is timed
        except OSError as e:
            _say({"error": f"the {a.transport} transport failed its integrity check: {e}"})
            return 1
        # The host compares the bytes with the device file before the timed
        # pass can write over them.
        _say({"verify": checked})
        if sys.stdin.readline().strip() != "go":
            return 0
        samples = array.array("Q", bytes(8 * MAX_SAMPLES))
        before = dict(t.stats)
        res = _load.run(t, a.opcode, a.bs, a.qd, a.seconds, a.extent, a.rand, 42,
                        MAX_SAMPLES, samples)
        out = summarize(res, samples[:res["nsamples"]])
        after = t.stats
        if "notifies" in after:
            out["user_wakeups"] = ((after["notifies"] - before["notifies"])
                                   + (after["sleeps"] - before["sleeps"]))
        out["monitored"] = bool(ch.monitored) if ch is not None else None
        _say(out)
        for line in sys.stdin:
            if line.strip() == "count":
                # Allocates nothing: what the counters see is the I/O path's own.
                r = _load.run(t, a.opcode, a.bs, a.qd, a.counted_seconds, a.extent, a.rand, 7,
                              MAX_SAMPLES, samples)
                _say({"done": r["done"], "error": r["error"], "errors": r["errors"]})
            else:
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
