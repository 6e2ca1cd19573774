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

and, holding on to a ring the broker thinks it let go of:

  keep-closed:OFF says it let go of a channel the broker asks it to drop,
                  keeps its ring, and writes 4 KiB at device offset OFF
                  through it (ignores SIGTERM, serves nothing)
  fork-keep       forks a child that keeps every ring; 1.5 s after the
                  worker is gone the child writes 4 KiB at each channel's
                  extent, again and again, for 20 s

and, lying to the user side instead of the kernel:

  answer-unrun    a success for the request, which it never submitted
  answer-unknown  a response to a request nobody made
  answer-twice    the request, done right, then its response twice
  answer-too-much the request, done right, answered with one byte more
  answer-short    the request, done right, answered with fewer bytes
  flush-unrun     a success for the user's first request, a flush, never run
  shifted         the request into its own slot but 4 KiB past the slot's start
  append          the request with RWF_APPEND (a write lands at the file's end)
  nowait          the request with RWF_NOWAIT, then "success" whatever it got

A rogue the monitor failed to stop exits with status 3 after 5 s.
Self-contained (no import beyond drb_uring), so that it also runs inside a
driver domain as `python3 -c SOURCE MODE SPEC`.
"""

import ctypes
import json
import mmap
import os
import struct
import sys
import time

from drb_uring import ring
from drb_uring.ring import layout as L

# ---- a raw io_uring in pure Python: what a hostile process holding a grant
# ring's fd can do with it, written the way such a process would.

SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
IORING_OFF_SQ_RING = 0
IORING_OFF_SQES = 0x10000000
IORING_ENTER_GETEVENTS = 1
IORING_OP_NOP = 0
IORING_OP_FSYNC = 3
IORING_OP_READ_FIXED = 4
IORING_OP_WRITE_FIXED = 5
IOSQE_FIXED_FILE = 1
SQE = struct.Struct("<BBHiQQIIQHHIQQ")   # the kernel's struct io_uring_sqe (64 bytes)
CQE = struct.Struct("<QiI")

_libc = ctypes.CDLL(None, use_errno=True)


def _sys(nr: int, *args) -> int:
    r = _libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) if isinstance(a, int) else a
                                          for a in args])
    return r if r >= 0 else -ctypes.get_errno()


class RawRing:
    def __init__(self, fd: int, params: bytes):
        self.fd = fd
        p = struct.unpack_from("<10I", params, 0)
        self.sq_entries, self.cq_entries = p[0], p[1]
        (self.sq_head, self.sq_tail, self.sq_mask, _, _, _, self.sq_array, _) = \
            struct.unpack_from("<8I", params, 40)
        (self.cq_head, self.cq_tail, self.cq_mask, _, _, self.cq_cqes, _, _) = \
            struct.unpack_from("<8I", params, 80)
        size = max(self.sq_array + 4 * self.sq_entries, self.cq_cqes + 16 * self.cq_entries)
        # IORING_FEAT_SINGLE_MMAP: one mapping holds both rings.
        self.rings = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=IORING_OFF_SQ_RING)
        self.sqes = mmap.mmap(fd, 64 * self.sq_entries, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)
        # The params give where the masks are; the masks are in the ring.
        self.sq_mask = self._u32(self.sq_mask)
        self.cq_mask = self._u32(self.cq_mask)

    def _u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.rings, off)[0]

    def submit(self, **fields) -> int:
        """Queue one SQE and enter the kernel; returns what io_uring_enter said."""
        tail = self._u32(self.sq_tail)
        idx = tail & self.sq_mask
        names = ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags",
                 "user_data", "buf_index", "personality", "file_index", "addr3", "pad2")
        SQE.pack_into(self.sqes, idx * 64, *(fields.get(n, 0) for n in names))
        if self.sq_array:                   # none with IORING_SETUP_NO_SQARRAY
            struct.pack_into("<I", self.rings, self.sq_array + 4 * idx, idx)
        struct.pack_into("<I", self.rings, self.sq_tail, (tail + 1) & 0xFFFFFFFF)
        return _sys(SYS_IO_URING_ENTER, self.fd, 1, 0, 0, None, 0)

    def reap(self, wait: bool = True):
        """(user_data, res) of the next completion, or None."""
        head = self._u32(self.cq_head)
        if head == self._u32(self.cq_tail):
            if not wait:
                return None
            _sys(SYS_IO_URING_ENTER, self.fd, 0, 1, IORING_ENTER_GETEVENTS, None, 0)
            if head == self._u32(self.cq_tail):
                return None
        user_data, res, _ = CQE.unpack_from(self.rings,
                                            self.cq_cqes + 16 * (head & self.cq_mask))
        struct.pack_into("<I", self.rings, self.cq_head, (head + 1) & 0xFFFFFFFF)
        return user_data, res

    def register(self, opcode: int, arg=None, nr: int = 0) -> int:
        return _sys(SYS_IO_URING_REGISTER, self.fd, opcode, arg, nr)

    def close(self) -> None:
        self.rings.close()
        self.sqes.close()


# ---- the rogue


IORING_REGISTER_BUFFERS = 0


def first_request(spec: dict):
    """The user's first request, and the ring's (checked) geometry."""
    end = ring.attach(ring.PeerFds.from_list(spec["ring_fds"]), spin_ns=0, map_pool=False)
    end.wait_readable(10)
    req = dict(zip(L.SQE_FIELDS, L.SQE.unpack(end.pop(1)), strict=True))
    return req, end.geometry, end


READY = struct.pack("<Ii", 0xFFFFFFFF, 0)


def write_through(ch: dict, off: int) -> int:
    """WRITE_FIXED of 4 KiB from the channel's slot 0 at device offset off."""
    g = RawRing(ch["ring_fd"], bytes.fromhex(ch["params"]))
    return g.submit(opcode=IORING_OP_WRITE_FIXED, flags=IOSQE_FIXED_FILE, fd=0, len=4096,
                    user_data=0xbad, buf_index=0, addr=ch["pool_base"], off=off)


def keep_closed(spec: dict, target: int) -> int:
    import signal
    # Handed over before it kept anything: it leaves as a worker would.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    os.write(spec["report_fd"], READY)
    chans = {c["id"]: c for c in spec["channels"]}
    while True:
        word, = struct.unpack("<I", os.read(spec["ctl_fd"], 4))
        if word >> 31 or word not in chans:
            continue                        # "go" for a held channel, or not ours
        signal.signal(signal.SIGTERM, signal.SIG_IGN)               # now it holds on
        os.write(spec["report_fd"], struct.pack("<Ii", word, 0))   # "let go"
        time.sleep(0.5)                     # the broker has heard by now
        print(f"rogue: write through closed ring -> {write_through(chans[word], target)}",
              file=sys.stderr, flush=True)
        time.sleep(5)
        return 3


def fork_keep(spec: dict) -> int:
    os.write(spec["report_fd"], READY)
    if os.fork() == 0:
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(0.02)
        time.sleep(1.5)                     # until the broker has let go of the rings
        end = time.monotonic() + 20
        while time.monotonic() < end:
            for ch in spec["channels"]:
                write_through(ch, ch["extent_base"])
            time.sleep(0.3)
        os._exit(0)
    time.sleep(120)
    return 0


def main() -> int:
    mode, whole = sys.argv[1], json.loads(sys.argv[2])
    if mode.startswith("keep-closed:"):
        return keep_closed(whole, int(mode.split(":", 1)[1]))
    if mode == "fork-keep":
        return fork_keep(whole)
    # A worker is handed every channel of its user domain; the rogue goes
    # for the newest.
    spec = whole["channels"][-1]
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
    elif mode == "flush-unrun":
        _end.push(CQE.pack(req["user_data"], 0, 0))
        time.sleep(5)
        return 3
    elif mode in ("shifted", "append", "nowait"):
        if mode == "shifted":
            sqe["addr"] += 4096
        else:
            sqe["rw_flags"] = 0x10 if mode == "append" else 0x8    # RWF_APPEND, RWF_NOWAIT
        g.submit(**sqe)
        g.reap()
        _end.push(CQE.pack(req["user_data"], req["len"], 0))
        time.sleep(5)
        return 3
    elif mode.startswith("answer-"):
        if mode == "answer-unrun":
            answers = [(req["user_data"], req["len"])]
        elif mode == "answer-unknown":
            answers = [(req["user_data"] ^ (1 << 40), req["len"])]
        else:
            g.submit(**sqe)
            _tag, res = g.reap()
            answers = {"answer-twice": [(req["user_data"], res)] * 2,
                       "answer-short": [(req["user_data"], res - 1)]}.get(
                mode, [(req["user_data"], res + 1)])
        for tag, res in answers:
            _end.push(CQE.pack(tag, res, 0))
        time.sleep(5)
        return 3
    elif mode == "register":
        print(f"rogue: register -> {g.register(IORING_REGISTER_BUFFERS)}", file=sys.stderr,
              flush=True)
        time.sleep(5)
        return 3
    else:
        sys.exit(f"rogue worker: unknown mode {mode!r}")
    g.submit(**sqe)
    time.sleep(5)
    return 3


if __name__ == "__main__":
    sys.exit(main())
