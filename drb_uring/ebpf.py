"""The eBPF side of the monitor: the I/O task table and its enforcement.

The programs (bpf/monitor.c) are loaded once per host by a small service,
``python -m drb_uring.ebpfd``, shared by every pair's monitor and removed
when the last monitor disconnects. A monitor talks to it with
:class:`EbpfClient`: for each channel the service records the grant ring's
io_ring_ctx (learned from the monitor's own io_uring_setup) with the
channel's pool and extent, and creates the channel's task table, a
BPF_F_MMAPABLE array whose fd goes to the user side only.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import mmap
import os
import socket
import struct
import subprocess
import sys
import time

from drb_uring import btf, procs, protocol
from drb_uring.policy import BPF_DIR

log = logging.getLogger("drb.ebpf")

MAX_SLOTS = 1024
# The I/O task table entry, version TASK_VERSION (bpf/monitor.c struct
# drb_task, cython_ext/tasks.pxd): seq (odd while the user side writes it),
# state (1 = active), op, len, offset (channel-relative), post_ns (user's
# CLOCK_MONOTONIC), submit_ns (written by the program).
TASK_VERSION = 1
TASK = struct.Struct("<IIIIQQQ")
MAX_CHANNELS = 1024                   # channels enforced at once on this host
HIST_SLOTS = 64
TT_ENTRIES = MAX_SLOTS + 16           # then the user side's post->reap histogram
REAP_HIST_OFFSET = MAX_SLOTS * TASK.size
TASK_TABLE_BYTES = ((TT_ENTRIES * TASK.size) + 4095) & ~4095
REASONS = {1: "opcode", 2: "slot out of range", 3: "no active task for the slot",
           4: "task entry torn", 5: "opcode differs from the task",
           6: "buffer outside the task's slot", 7: "length differs from the task",
           8: "device range outside the channel's extent",
           9: "device offset differs from the task", 10: "io_uring_register on a grant ring"}
STAGES = {0: "post_to_submit", 1: "submit_to_complete", 2: "post_to_reap"}
COUNTERS = ("syscalls", "ctx_switches", "mmap", "munmap", "mprotect", "pread64")

SERVICE_SOCK = "/run/drb-ebpfd.sock"
SERVICE_LOCK = "/run/lock/drb-ebpfd.lock"
SERVICE_LOG = "/var/log/drb-ebpfd.log"
OPS = {op: (0,) for op in ("hello", "grant", "failed", "ungrant", "hist", "watch",
                           "unwatch", "counters", "count", "error")}
OPS["ok"] = (0, 1)

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


def monitor_cflags() -> list[str]:
    """The -D flags that specialise bpf/monitor.c for this kernel (BTF)."""
    try:
        offsets = btf.monitor_offsets()
    except btf.BTFError as e:
        raise EbpfError(f"eBPF monitor cannot start: {e}") from None
    # The submit hook reads the head of struct io_kiocb in one go.
    head = max(v + 8 for k, v in offsets.items() if k.startswith("OFF_REQ_")
               and k != "OFF_REQ_CMD")
    head = max(head, offsets["OFF_REQ_CMD"] + max(offsets[k] + 8 for k in
                                                  ("OFF_RW_ADDR", "OFF_RW_LEN", "OFF_RW_POS")))
    if head > 256:
        raise EbpfError(f"eBPF monitor cannot start: the io_kiocb fields it reads span "
                        f"{head} bytes, more than its 256-byte read")
    offsets["REQ_READ_LEN"] = (head + 7) & ~7
    return ([f"-D{k}={v}" for k, v in offsets.items()]
            + [f"-DMAX_SLOTS={MAX_SLOTS}", f"-DMAX_CHANNELS={MAX_CHANNELS}"])


class EbpfMonitor:
    """The loaded programs and their maps (lives in the host service)."""

    def __init__(self):
        try:
            from bcc import BPF
        except ImportError as e:
            raise EbpfError(f"bcc is missing ({e}); install python3-bpfcc") from None
        cflags = monitor_cflags()
        for tp in ("io_uring_submit_req", "io_uring_complete", "io_uring_register",
                   "io_uring_create", "sys_enter", "sched_switch"):
            if not btf.has_tracepoint(tp):
                raise EbpfError(f"eBPF monitor cannot start: tracepoint {tp} is missing "
                                f"from this kernel (no btf_trace_{tp} in its BTF)")
        try:
            self.b = BPF(src_file=str(BPF_DIR / "monitor.c"), cflags=cflags)
        except Exception as e:
            raise EbpfError(f"eBPF monitor cannot start: bcc could not compile "
                            f"bpf/monitor.c: {e}") from None
        self.cflags = cflags
        self.next_gid = 1
        self.tables: dict[int, tuple[int, int, mmap.mmap, int]] = {}  # gid -> ctx, fd, map, row
        self.free_rows = list(range(MAX_CHANNELS - 1, -1, -1))
        self.count_refs = 0
        self.trace_until = 0.0
        self.b["events"].open_ring_buffer(self._on_event)

    def _on_event(self, ctx, data, size) -> None:
        ev = Event.from_buffer_copy(ctypes.string_at(data, ctypes.sizeof(Event)))
        log.error("VIOLATION channel %d: %s (pid %d, slot %d, user_data 0x%x, addr 0x%x, "
                  "len %d, pos %d, opcode %d, task state %d)", ev.channel,
                  REASONS.get(ev.reason, ev.reason), ev.pid, ev.slot, ev.user_data, ev.addr,
                  ev.len, ev.pos, ev.opcode, ev.task_state)

    def poll(self) -> None:
        self.b.ring_buffer_consume()

    def add_monitor(self, tgid: int) -> None:
        m = self.b["monitors"]
        m[m.Key(tgid)] = m.Leaf(1)

    def remove_monitor(self, tgid: int) -> None:
        m = self.b["monitors"]
        try:
            del m[m.Key(tgid)]
        except KeyError:
            pass

    def grant(self, tgid: int, ring_fd: int, pool_base: int, slot_size: int,
              slot_count: int, extent: tuple[int, int]) -> tuple[int, int]:
        """Enforce on the grant ring that `tgid` created as `ring_fd`. Returns
        (channel id, task table fd to hand to the user side)."""
        if slot_count > MAX_SLOTS:
            raise EbpfError(f"slot_count {slot_count} exceeds the task table's {MAX_SLOTS}")
        if not self.free_rows:
            raise EbpfError(f"{MAX_CHANNELS} channels are already enforced on this host")
        created = self.b["created"]
        key = created.Key(tgid, ring_fd)
        try:
            ctx = created[key].value
        except KeyError:
            raise EbpfError("the grant ring's creation was not seen by the monitor "
                            "program (is the monitor registered?)") from None
        del created[key]
        gid = self.next_gid
        fd = _map_create_array(TASK.size, TT_ENTRIES, BPF_F_MMAPABLE, b"drb_tasks")
        try:
            mm = mmap.mmap(fd, TASK_TABLE_BYTES, prot=mmap.PROT_READ)
            tt = self.b["task_tables"]
            tt[tt.Key(gid)] = ctypes.c_int(fd)
            row = self.free_rows[-1]
            self._zero_row(row)
            g = self.b["grants"]
            g[g.Key(ctx)] = g.Leaf(gid, slot_size, slot_count, 0, row, 0, pool_base, *extent)
        except BaseException:
            os.close(fd)
            raise
        self.free_rows.pop()
        self.next_gid += 1
        self.tables[gid] = (ctx, fd, mm, row)
        return gid, fd

    def _zero_row(self, row: int) -> None:
        lat = self.b["lat"]
        for stage in (0, 1):
            base = (row * 2 + stage) * HIST_SLOTS
            for i in range(HIST_SLOTS):
                lat[lat.Key(base + i)] = lat.Leaf(0)

    def failed(self, gid: int) -> str | None:
        self.poll()
        ctx = self.tables.get(gid, (0,))[0]
        try:
            code = self.b["grants"][self.b["grants"].Key(ctx)].failed
        except KeyError:
            return None
        return REASONS.get(code, str(code)) if code else None

    def ungrant(self, gid: int) -> None:
        ctx, fd, mm, row = self.tables.pop(gid, (0, -1, None, -1))
        for name, key in (("grants", ctx), ("task_tables", gid)):
            t = self.b[name]
            try:
                del t[t.Key(key)]
            except KeyError:
                pass
        if mm is not None:
            mm.close()
            os.close(fd)
            self.free_rows.append(row)

    def histograms(self, gids) -> dict[int, dict[str, dict[int, int]]]:
        out: dict = {g: {} for g in gids}
        lat = self.b["lat"]
        for g in gids:
            if g not in self.tables:
                continue
            row = self.tables[g][3]
            for stage in (0, 1):
                base = (row * 2 + stage) * HIST_SLOTS
                b = {i: lat[lat.Key(base + i)].value for i in range(HIST_SLOTS)}
                b = {i: c for i, c in b.items() if c}
                if b:
                    out[g][STAGES[stage]] = b
            buckets = struct.unpack_from("<64Q", self.tables[g][2], REAP_HIST_OFFSET)
            reap = {i: c for i, c in enumerate(buckets) if c}
            if reap:
                out[g][STAGES[2]] = reap
        return out

    def trace_lease(self, seconds: float) -> None:
        """Collect stage histograms and count mode switches for the next
        `seconds` (renewable): both cost on every request or system call,
        so they run only while someone looks."""
        if not self.trace_until:
            cfg = self.b["config"]
            cfg[cfg.Key(0)] = cfg.Leaf(1)
            self.b.attach_raw_tracepoint(tp="io_uring_complete", fn_name="on_complete")
            self.count_on()
        self.trace_until = max(self.trace_until, time.monotonic() + seconds)

    def expire(self) -> None:
        if self.trace_until and time.monotonic() > self.trace_until:
            cfg = self.b["config"]
            cfg[cfg.Key(0)] = cfg.Leaf(0)
            self.trace_until = 0.0
            self.b.detach_raw_tracepoint(tp="io_uring_complete")
            self.count_off()

    def count_on(self) -> None:
        """Attach the counters' hooks (they run on every system call and
        context switch of the host); reference-counted."""
        if self.count_refs == 0:
            self.b.attach_raw_tracepoint(tp="sys_enter", fn_name="count_sys_enter")
            self.b.attach_raw_tracepoint(tp="sched_switch", fn_name="count_sched_switch")
        self.count_refs += 1

    def count_off(self) -> None:
        self.count_refs -= 1
        if self.count_refs == 0:
            self.b.detach_raw_tracepoint(tp="sys_enter")
            self.b.detach_raw_tracepoint(tp="sched_switch")

    def watch(self, path: str) -> None:
        """Count this cgroup's mode switches whenever counting is on."""
        c = self.b["counters"]
        c[c.Key(os.stat(path).st_ino)] = c.Leaf()

    def unwatch(self, path: str) -> None:
        c = self.b["counters"]
        try:
            del c[c.Key(os.stat(path).st_ino)]
        except (KeyError, FileNotFoundError):
            pass

    def counters(self, path: str) -> dict[str, int]:
        c = self.b["counters"]
        try:
            v = c[c.Key(os.stat(path).st_ino)]
        except (KeyError, FileNotFoundError):
            raise EbpfError(f"cgroup {path} is not watched") from None
        return {name: getattr(v, name) for name in COUNTERS}

    def close(self) -> None:
        for gid in list(self.tables):
            self.ungrant(gid)
        if getattr(self, "b", None) is not None:
            self.b.cleanup()
            self.b = None


class EbpfClient:
    """A monitor's connection to the host service; starts it if needed."""

    def __init__(self, timeout: float = 60.0):
        os.makedirs(os.path.dirname(SERVICE_LOCK), exist_ok=True)
        lock = os.open(SERVICE_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.sock = self._connect()
            except (FileNotFoundError, ConnectionRefusedError):
                self._start_service(timeout)
                self.sock = self._connect()
        finally:
            os.close(lock)
        self._call("hello", tgid=os.getpid())

    @staticmethod
    def _connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(SERVICE_SOCK)
        except OSError:
            s.close()
            raise
        return s

    @staticmethod
    def _start_service(timeout: float) -> None:
        log_f = open(SERVICE_LOG, "ab")
        proc = subprocess.Popen([sys.executable, "-m", "drb_uring.ebpfd"],
                                stdout=subprocess.PIPE, stderr=log_f, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=procs.module_env())
        log_f.close()
        proc.wait(timeout)       # the service forks away at once; reap the first half
        line = proc.stdout.readline().decode().strip()
        proc.stdout.close()
        if line != "ready":
            raise EbpfError(line.removeprefix("error: ")
                            or f"the eBPF service failed to start; see {SERVICE_LOG}")

    def _call(self, op: str, **kw):
        reply, fds = protocol.request(self.sock, {"op": op, **kw}, keep_fds=True, table=OPS)
        return reply, fds

    def grant(self, ring_fd: int, pool_base: int, slot_size: int, slot_count: int,
              extent: tuple[int, int]) -> tuple[int, int]:
        reply, fds = self._call("grant", fd=ring_fd, pool_base=pool_base, slot_size=slot_size,
                                slot_count=slot_count, extent=list(extent))
        if len(fds) != 1:
            protocol.close_fds(fds)
            raise EbpfError("the eBPF service sent no task table")
        return reply["channel"], fds[0]

    def failed(self, gid: int) -> str | None:
        return self._call("failed", channel=gid)[0].get("reason")

    def ungrant(self, gid: int) -> None:
        self._call("ungrant", channel=gid)

    def histograms(self, gids, lease: float = 0.0) -> dict:
        """Stage histograms; with lease > 0 keep collecting for that long."""
        h = self._call("hist", channels=list(gids), lease=lease)[0]["hist"]
        return {int(g): {st: {int(b): c for b, c in bk.items()} for st, bk in v.items()}
                for g, v in h.items()}

    def watch(self, path: str) -> None:
        self._call("watch", path=path)

    def unwatch(self, path: str) -> None:
        self._call("unwatch", path=path)

    def count(self, on: bool) -> None:
        """Keep the counters' hooks attached while this client wants them."""
        self._call("count", on=on)

    def counters(self, path: str) -> dict[str, int]:
        return self._call("counters", path=path)[0]["counters"]

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
            self.sock = None
