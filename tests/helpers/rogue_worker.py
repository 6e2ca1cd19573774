"""A compromised worker, for tests: started in place of the real one through
the broker's spawn hook (never by drb-uring itself).

    python rogue_worker.py MODE WORKER_SPEC_JSON

It takes what the broker hands a worker (the grant ring, the ring fds),
waits for the user's first request, and then, depending on MODE, does what a
hostile driver domain would try:

  read-untasked   READ_FIXED into the next slot, for which no task is active
  cross-slot      the request's slot index, but an address in the next slot
  beyond-extent   the request, at the first byte past the channel's extent
  register        an io_uring_register call on the grant ring
  neg-offset      the request, at position -1 ("the file's current position")
  as-posted       the request as the user wrote it, unchecked: its offset is
                  added to the extent's base whatever it is (near 2**64 it wraps)
  early-answer    the request, then its response at once, before the kernel
                  has finished it (the clear-and-reuse race)
  probe:FILE      record what the ring refuses (nop, a non-fixed file, a
                  register call) to FILE, then wait to be stopped

A rogue the monitor failed to stop exits with status 3 after 5 s.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uring import CQE, IORING_OP_NOP, IORING_OP_READ_FIXED, IOSQE_FIXED_FILE, RawRing  # noqa: E402

from drb_uring import ring  # noqa: E402
from drb_uring.ring import layout as L  # noqa: E402

IORING_REGISTER_BUFFERS = 0


def first_request(spec: dict):
    """The user's first request, and the ring's (checked) geometry."""
    end = ring.attach(ring.PeerFds.from_list(spec["ring_fds"]), spin_ns=0, map_pool=False)
    end.wait_readable(10)
    req = dict(zip(L.SQE_FIELDS, L.SQE.unpack(end.pop(1)), strict=True))
    return req, end.geometry, end


def main() -> int:
    mode, spec = sys.argv[1], json.loads(sys.argv[2])
    g = RawRing(spec["ring_fd"], bytes.fromhex(spec["params"]))
    if mode.startswith("probe:"):
        res = {}
        for name, op, flags in (("nop", IORING_OP_NOP, IOSQE_FIXED_FILE),
                                ("read_not_fixed_file", IORING_OP_READ_FIXED, 0)):
            g.submit(opcode=op, flags=flags, user_data=0xfeed)
            res[name] = g.reap()[1]
        res["register"] = g.register(IORING_REGISTER_BUFFERS)
        path = mode[len("probe:"):]
        with open(path + ".tmp", "w") as f:
            json.dump(res, f)
        os.rename(path + ".tmp", path)
        time.sleep(60)
        return 0
    # The broker registered slot k at pool_base + k * slot_size.
    req, geo, _end = first_request(spec)
    other = (req["buf_index"] + 1) % geo.slot_count
    sqe = dict(opcode=req["opcode"], flags=IOSQE_FIXED_FILE, fd=0, len=req["len"],
               user_data=req["user_data"], buf_index=req["buf_index"],
               addr=spec["pool_base"] + req["buf_index"] * geo.slot_size,
               off=spec["extent_base"] + req["off"])
    if mode == "read-untasked":
        sqe.update(opcode=IORING_OP_READ_FIXED, buf_index=other,
                   addr=spec["pool_base"] + other * geo.slot_size)
    elif mode == "cross-slot":
        sqe.update(addr=spec["pool_base"] + other * geo.slot_size)
    elif mode == "beyond-extent":
        sqe.update(off=spec["extent_base"] + spec["extent_size"])
    elif mode == "neg-offset":
        sqe.update(off=(1 << 64) - 1)
    elif mode == "as-posted":
        sqe.update(off=(spec["extent_base"] + req["off"]) & ((1 << 64) - 1))
    elif mode == "early-answer":
        g.submit(**sqe)
        _end.push(CQE.pack(req["user_data"], req["len"], 0))
        time.sleep(5)
        return 3
    elif mode == "register":
        g.register(IORING_REGISTER_BUFFERS)
        time.sleep(5)
        return 3
    else:
        sys.exit(f"rogue worker: unknown mode {mode!r}")
    g.submit(**sqe)
    time.sleep(5)
    return 3


if __name__ == "__main__":
    sys.exit(main())
