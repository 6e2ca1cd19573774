"""One user side of ``drb soak``, run inside a user domain.

Mixed reads, writes and flushes through one channel, for ever (the soak
kills it now and then, and starts another with what it knew). Every block's
content is a function of (block, version), so the soak can check any of it.
It reports on stdout, one line each, flushed:

    I blk n ver    about to write blocks blk..blk+n-1 at version ver
    A blk n ver    that write was acknowledged
    F              a flush returned
    M blk          a read returned bytes that no write of the block could have left
    S ops restarts its counts, every second

Its first stdin line is the state it starts from: {"acked": {blk: ver},
"pending": {blk: [ver, ...]}} (writes whose outcome nobody saw).
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time

from drb_uring.spec import Spec

BLOCK = 4096


def block_data(blk: int, ver: int) -> bytes:
    """What version `ver` of block `blk` holds (version 0: zeros)."""
    if ver == 0:
        return bytes(BLOCK)
    return random.Random(blk * 1_000_003 + ver).randbytes(BLOCK)


@dataclasses.dataclass(frozen=True)
class SoakCellSpec(Spec):
    socket: str
    blocks: int
    seed: int
    first_version: int      # versions this cell writes start here (unique per cell)


def main(argv: list[str] | None = None) -> int:
    from drb_uring import procs
    from drb_uring.channel.client import Channel
    from drb_uring.ring import layout as L

    spec = procs.spec_from_argv(SoakCellSpec, argv)
    start = json.loads(sys.stdin.readline())
    acked = {int(b): v for b, v in start["acked"].items()}
    pending = {int(b): set(v) for b, v in start["pending"].items()}
    rng = random.Random(spec.seed)
    ver = spec.first_version
    out = sys.stdout
    geo = L.Geometry(sq_entries=64, cq_entries=64, slot_size=8 * BLOCK, slot_count=16)
    # The last user side's channel may not have been let go of yet: its
    # extent comes back once the worker has dropped it.
    end = time.monotonic() + 30
    while True:
        try:
            ch = Channel(spec.socket, spec.blocks * BLOCK, geometry=geo)
            break
        except Exception as e:   # noqa: BLE001 - only "no free extent" is retried
            if "no free extent" not in str(e) or time.monotonic() > end:
                raise
            time.sleep(0.05)
    ops, last = 0, time.monotonic()
    while True:
        r = rng.random()
        n = rng.randint(1, 8)
        blk = rng.randrange(0, spec.blocks - n)
        if r < 0.45:
            ver += 1
            print(f"I {blk} {n} {ver}", file=out, flush=True)
            ch.pwrite(blk * BLOCK, b"".join(block_data(b, ver) for b in range(blk, blk + n)))
            print(f"A {blk} {n} {ver}", file=out, flush=True)
            for b in range(blk, blk + n):
                acked[b] = ver
                pending.pop(b, None)
        elif r < 0.97:
            got = ch.pread(blk * BLOCK, n * BLOCK)
            for i, b in enumerate(range(blk, blk + n)):
                seen = got[i * BLOCK:(i + 1) * BLOCK]
                could = {acked.get(b, 0)} | pending.get(b, set())
                if not any(seen == block_data(b, v) for v in could):
                    print(f"M {b}", file=out, flush=True)
        else:
            ch.flush()
            print("F", file=out, flush=True)
        ops += 1
        now = time.monotonic()
        if now - last >= 1.0:
            print(f"S {ops} {ch.restarts}", file=out, flush=True)
            last = now


if __name__ == "__main__":
    sys.exit(main())
