"""The eBPF side of the monitor: the I/O task table and its enforcement.

Loads bpf/monitor.c with bcc, specialised with offsets from BTF. For each
channel it creates a task table (a BPF_F_MMAPABLE array that only the user
side maps writable), records the grant ring's io_ring_ctx with the channel's
pool and extent, and afterwards reads back failures, events and latency
histograms.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct

from drb_uring import btf
from drb_uring.policy import BPF_DIR

log = logging.getLogger("drb.ebpf")

MAX_SLOTS = 1024
TASK = struct.Struct("<IIIIQQ")       # seq, state, op, len, offset, post_ns
TASK_TABLE_BYTES = ((MAX_SLOTS * TASK.size) + 4095) & ~4095
REASONS = {1: "opcode", 2: "slot out of range", 3: "no active task for the slot",
           4: "task entry torn", 5: "opcode differs from the task",
           6: "buffer outside the task's slot", 7: "length differs from the task",
           8: "device range outside the channel's extent",
           9: "device offset differs from the task", 10: "io_uring_register on a grant ring"}

BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY, BPF_F_MMAPABLE = 0, 2, 1 << 10
SYS_BPF = 321   # x86_64
_libc = ctypes.CDLL(None, use_errno=True)


class EbpfError(RuntimeError):
    pass


class Event(ctypes.Structure):
    _fields_ = [("channel", ctypes.c_uint32), ("reason", ctypes.c_uint32),
                ("pid", ctypes.c_uint32), ("slot", ctypes.c_uint32),
                ("user_data", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint64), ("pos", ctypes.c_uint64),
                ("opcode", ctypes.c_uint32), ("task_state", ctypes.c_uint32)]


def _map_create_array(value_size: int, entries: int, flags: int, name: bytes) -> int:
    attr = struct.pack("<IIIIII16s", BPF_MAP_TYPE_ARRAY, 4, value_size, entries, flags, 0,
                       name[:15])
    buf = ctypes.create_string_buffer(attr, 128)
    L = ctypes.c_long
    fd = _libc.syscall(L(SYS_BPF), L(BPF_MAP_CREATE), buf, L(128))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"creating a task table: {os.strerror(e)}")
    return fd


class EbpfMonitor:
    def __init__(self):
        try:
            from bcc import BPF
        except ImportError as e:
            raise EbpfError(f"bcc is missing ({e}); install python3-bpfcc") from None
        try:
            offsets = btf.monitor_offsets()
        except btf.BTFError as e:
            raise EbpfError(f"eBPF monitor cannot start: {e}") from None
        cflags = [f"-D{k}={v}" for k, v in offsets.items()]
        cflags += [f"-DMONITOR_TGID={os.getpid()}", f"-DMAX_SLOTS={MAX_SLOTS}"]
        for tp in ("io_uring_submit_req", "io_uring_complete", "io_uring_register",
                   "io_uring_create"):
            if not BPF.tracepoint_exists("io_uring", tp):
                raise EbpfError(f"eBPF monitor cannot start: tracepoint io_uring:{tp} "
                                "is missing from this kernel")
        try:
            self.b = BPF(src_file=str(BPF_DIR / "monitor.c"), cflags=cflags)
        except Exception as e:
            raise EbpfError(f"eBPF monitor cannot start: bcc could not compile "
                            f"bpf/monitor.c: {e}") from None
        self.cflags = cflags
        self.events: list[Event] = []
        self.b["events"].open_ring_buffer(self._on_event)

    def _on_event(self, ctx, data, size) -> None:
        ev = Event.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(Event)))
        self.events.append(ev)
        log.error("VIOLATION channel %d: %s (pid %d, slot %d, user_data 0x%x, addr 0x%x, "
                  "len %d, pos %d, opcode %d, task state %d)", ev.channel,
                  REASONS.get(ev.reason, ev.reason), ev.pid, ev.slot, ev.user_data, ev.addr,
                  ev.len, ev.pos, ev.opcode, ev.task_state)

    def poll(self) -> None:
        self.b.ring_buffer_consume()

    def ctx_of(self, ring_fd: int) -> int:
        created = self.b["created"]
        key = created.Key(os.getpid(), ring_fd)
        try:
            ctx = created[key].value
        except KeyError:
            raise EbpfError("the grant ring's creation was not seen by the monitor program") \
                from None
        del created[key]
        return ctx

    def register(self, channel: int, ctx: int, pool_base: int, slot_size: int,
                 slot_count: int, extent: tuple[int, int]) -> int:
        """Enforce on this grant ring from now on; returns the task table fd
        (for the user side; the caller closes it after sending)."""
        if slot_count > MAX_SLOTS:
            raise EbpfError(f"slot_count {slot_count} exceeds the task table's {MAX_SLOTS}")
        fd = _map_create_array(TASK.size, MAX_SLOTS, BPF_F_MMAPABLE, b"drb_tasks")
        try:
            tt = self.b["task_tables"]
            tt[tt.Key(channel)] = ctypes.c_int(fd)
            g = self.b["grants"]
            v = g.Leaf(channel, slot_size, slot_count, 0, pool_base, extent[0], extent[1])
            g[g.Key(ctx)] = v
        except BaseException:
            os.close(fd)
            raise
        return fd

    def failed(self, ctx: int) -> str | None:
        self.poll()
        try:
            code = self.b["grants"][self.b["grants"].Key(ctx)].failed
        except KeyError:
            return None
        return REASONS.get(code, str(code)) if code else None

    def unregister(self, channel: int, ctx: int) -> None:
        for name, key in (("grants", ctx), ("task_tables", channel)):
            t = self.b[name]
            try:
                del t[t.Key(key)]
            except KeyError:
                pass
        lat = self.b["lat"]
        for k in [k for k in lat.keys() if k.channel == channel]:
            del lat[k]

    def histograms(self, channel: int | None = None) -> dict:
        """{(channel, stage): {bucket: count}}; stage 0 post->submit,
        1 submit->complete, in microseconds."""
        out: dict = {}
        for k, v in self.b["lat"].items():
            if channel is None or k.channel == channel:
                out.setdefault((k.channel, k.stage), {})[k.slot] = v.value
        return out

    def close(self) -> None:
        if getattr(self, "b", None) is not None:
            self.b.cleanup()
            self.b = None
