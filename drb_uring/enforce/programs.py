"""The monitor's eBPF programs, loaded, and their maps (:class:`Enforcer`).

The programs (bpf/monitor.c) are loaded once per host by the enforcement
service (drb_uring.enforce.service), shared by every pair's broker and
removed when the last broker disconnects. For each channel the service
records the grant ring's io_ring_ctx (learned from the broker's own
io_uring_setup) with the channel's pool and extent, and creates the
channel's task table, a BPF_F_MMAPABLE array whose fd goes to the user side
only.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
import time

from drb_uring import bpf
from drb_uring.enforce import btf, tasks
from drb_uring.errors import DrbError

log = logging.getLogger("drb.enforce")

MAX_CHANNELS = 1024                   # channels enforced at once on this host
# The io map's counts per channel, in its order (monitor.c).
IO_COUNTS = ("reads", "read_bytes", "writes", "write_bytes", "flushes")
COUNTERS = ("syscalls", "ctx_switches", "mmap", "munmap", "mprotect", "pread64")
TRACEPOINTS = ("io_uring_submit_req", "io_uring_complete", "io_uring_register",
               "io_uring_create", "io_uring_req_failed", "io_uring_cqe_overflow",
               "sys_enter", "sched_switch")
BPF_MAP_TYPE_ARRAY, BPF_F_MMAPABLE = 2, 1 << 10


class EnforceError(DrbError):
    pass


def _create_task_table() -> int:
    """A new mmapable array map for one channel's task table (bcc's own
    map creation; the table is not part of a program's source)."""
    from bcc.libbcc import lib
    f = lib.bcc_create_map
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                  ctypes.c_int]
    fd = f(BPF_MAP_TYPE_ARRAY, b"drb_tasks", 4, tasks.ENTRY_SIZE, tasks.ENTRIES,
           BPF_F_MMAPABLE)
    if fd < 0:
        e = ctypes.get_errno() or -fd
        raise OSError(e, f"creating a task table: {os.strerror(e)}")
    return fd


def monitor_cflags() -> list[str]:
    """The -D flags that specialise bpf/monitor.c for this kernel (BTF)."""
    try:
        offsets = btf.monitor_offsets()
    except btf.BTFError as e:
        raise EnforceError(f"eBPF monitor cannot start: {e}") from None
    # The submit hook reads the head of struct io_kiocb in one go.
    head = max(v + 8 for k, v in offsets.items() if k.startswith("OFF_REQ_")
               and k != "OFF_REQ_CMD")
    head = max(head, offsets["OFF_REQ_CMD"] + max(offsets[k] + 8 for k in
                                                  ("OFF_RW_ADDR", "OFF_RW_LEN", "OFF_RW_POS",
                                                   "OFF_RW_FLAGS")))
    if head > 256:
        raise EnforceError(f"eBPF monitor cannot start: the io_kiocb fields it reads span "
                        f"{head} bytes, more than its 256-byte read")
    offsets["REQ_READ_LEN"] = (head + 7) & ~7
    # The completion hook reads opcode, buf_index and the result in one go
    # (each bpf_probe_read_kernel costs about 25 ns here).
    first = min(offsets["OFF_REQ_OPCODE"], offsets["OFF_REQ_BUF_INDEX"], offsets["OFF_REQ_RES"])
    offsets["OFF_REQ_OP_FIRST"] = first
    offsets["REQ_OP_SPAN"] = max(offsets["OFF_REQ_OPCODE"] + 1, offsets["OFF_REQ_BUF_INDEX"] + 2,
                                 offsets["OFF_REQ_RES"] + 4) - first
    if offsets["REQ_OP_SPAN"] > 128:
        raise EnforceError(f"eBPF monitor cannot start: the io_kiocb fields its completion "
                           f"hook reads span {offsets['REQ_OP_SPAN']} bytes, more than 128")
    return ([f"-D{k}={v}" for k, v in offsets.items()]
            + [f"-DMAX_CHANNELS={MAX_CHANNELS}", f"-I{bpf.DIR}"])


class Enforcer:
    """The loaded programs and their maps (lives in the host service)."""

    def __init__(self):
        try:
            from bcc import BPF
        except ImportError as e:
            raise EnforceError(f"bcc is missing ({e}); install python3-bpfcc") from None
        cflags = monitor_cflags()
        for tp in TRACEPOINTS:
            if not btf.has_tracepoint(tp):
                raise EnforceError(f"eBPF monitor cannot start: tracepoint {tp} is missing "
                                   f"from this kernel (no btf_trace_{tp} in its BTF)")
        try:
            self.b = BPF(src_file=str(bpf.DIR / "monitor.c"), cflags=cflags)
        except Exception as e:
            raise EnforceError(f"eBPF monitor cannot start: bcc could not compile "
                            f"bpf/monitor.c: {e}") from None
        self.cflags = cflags
        self.next_gid = 1
        self.tables: dict[int, tuple[int, int, mmap.mmap, int]] = {}  # gid -> ctx, fd, map, row
        self.free_rows = list(range(MAX_CHANNELS - 1, -1, -1))
        self.count_refs = 0
        self.trace_until = 0.0
        self.count_until = 0.0
        self.grants_gen = 0
        self.b["events"].open_ring_buffer(self._on_event)

    def _on_event(self, ctx, data, size) -> None:
        ev = self.b["events"].event(data)     # struct event, typed by bcc from the source
        log.error("VIOLATION channel %d: %s (pid %d, slot %d, user_data 0x%x, addr 0x%x, "
                  "len %d, pos %d, opcode %d, task state %d)", ev.channel,
                  tasks.REASONS.get(ev.reason, ev.reason), ev.pid, ev.slot, ev.user_data, ev.addr,
                  ev.len, ev.pos, ev.opcode, ev.task_state)

    def link_fds(self) -> list[int]:
        """The attachments of the enforcing programs (every one but the
        counters'). Each broker holds a copy: should this service die, the
        programs stay attached, checking and counting every submission,
        until the broker has killed its workers and let go of its copy."""
        counters = {b"sys_enter", b"sched_switch"}
        return [fd for tp, fd in sorted(self.b.raw_tracepoint_fds.items())
                if tp not in counters]

    def poll(self) -> None:
        self.b.ring_buffer_consume()

    def add_broker(self, tgid: int) -> None:
        m = self.b["brokers"]
        m[m.Key(tgid)] = m.Leaf(1)

    def remove_broker(self, tgid: int) -> None:
        m = self.b["brokers"]
        try:
            del m[m.Key(tgid)]
        except KeyError:
            pass

    def grant(self, tgid: int, ring_fd: int, pool_base: int, slot_size: int,
              slot_count: int, extent: tuple[int, int]) -> tuple[int, int]:
        """Enforce on the grant ring that `tgid` created as `ring_fd`. Returns
        (channel id, task table fd to hand to the user side)."""
        if slot_count > tasks.MAX_SLOTS:
            raise EnforceError(f"slot_count {slot_count} exceeds the task table's "
                               f"{tasks.MAX_SLOTS}")
        if not self.free_rows:
            raise EnforceError(f"{MAX_CHANNELS} channels are already enforced on this host")
        created = self.b["created"]
        key = created.Key(tgid, ring_fd)
        try:
            ctx = created[key].value
        except KeyError:
            raise EnforceError("the grant ring's creation was not seen by the monitor "
                            "program (is the monitor registered?)") from None
        del created[key]
        gid = self.next_gid
        row = self.free_rows[-1]
        fd = _create_task_table()
        try:
            mm = mmap.mmap(fd, tasks.TABLE_BYTES, prot=mmap.PROT_READ)
            tt = self.b["task_tables"]
            tt[tt.Key(row)] = ctypes.c_int(fd)
            self._zero_row(row)
            # The grant in its row first, then the ring's way to it.
            rows = self.b["grant_rows"]
            rows[rows.Key(row)] = rows.Leaf(gid, slot_size, slot_count, 0, row, 0, pool_base,
                                            *extent, ctx)
            g = self.b["grants"]
            g[g.Key(ctx)] = g.Leaf(row)
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
            base = (row * 2 + stage) * tasks.HIST_BUCKETS
            for i in range(tasks.HIST_BUCKETS):
                lat[lat.Key(base + i)] = lat.Leaf()     # every CPU's copy
        io = self.b["io"]
        for i in range(len(IO_COUNTS)):
            io[io.Key(row * len(IO_COUNTS) + i)] = io.Leaf()

    def failed(self, gid: int) -> str | None:
        """The channel's violation, from its task table's status word (the
        program writes it there and in the grant; the grant may be gone)."""
        self.poll()
        mm = self.tables.get(gid, (0, -1, None, -1))[2]
        code = 0
        if mm is not None:
            code = int.from_bytes(mm[tasks.STATUS_OFFSET:tasks.STATUS_OFFSET + 4], "little")
        if not code:
            leaf = self._grant_of(gid)
            code = leaf.failed if leaf is not None else 0
        return tasks.REASONS.get(code, str(code)) if code else None

    def _grant_of(self, gid: int):
        """The channel's grant, if its ring still has it: the kernel may
        have reused its ring's address for a new ring (io_uring_create then
        removed the grant)."""
        ctx, _fd, _mm, row = self.tables.get(gid, (0, -1, None, -1))
        g = self.b["grants"]
        try:
            if g[g.Key(ctx)].value != row:
                return None
        except KeyError:
            return None
        rows = self.b["grant_rows"]
        leaf = rows[rows.Key(row)]
        return leaf if leaf.channel == gid and leaf.ring == ctx else None

    def close_grant(self, gid: int) -> None:
        """The channel ended: from now on any submission on its ring is a
        violation. The grant itself stays until ungrant(), which the broker
        calls only once the kernel says the ring is gone."""
        leaf = self._grant_of(gid)
        if leaf is not None:
            leaf.closed = 1
            rows = self.b["grant_rows"]
            rows[rows.Key(self.tables[gid][3])] = leaf

    def ungrant(self, gid: int) -> None:
        if self._grant_of(gid) is not None:
            g = self.b["grants"]
            try:
                del g[g.Key(self.tables[gid][0])]
            except KeyError:
                pass
        ctx, fd, mm, row = self.tables.pop(gid, (0, -1, None, -1))
        if row >= 0:
            # The row forgets its ring before it can be reused (a CPU's
            # cached entry must name the row's ring), and only then do the
            # cached entries all go stale: the programs read the counter
            # before they look a ring up. Entry 0 is the service's alone.
            rows = self.b["grant_rows"]
            rows[rows.Key(row)] = rows.Leaf()
            self.grants_gen += 1
            gen = self.b["grants_gen"]
            gen[gen.Key(0)] = gen.Leaf(self.grants_gen)
        t = self.b["task_tables"]
        try:
            del t[t.Key(row)]
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
                base = (row * 2 + stage) * tasks.HIST_BUCKETS
                # Per-CPU maps: each entry is the sum of the CPUs' copies.
                b = {i: lat.sum(lat.Key(base + i)).value for i in range(tasks.HIST_BUCKETS)}
                b = {i: c for i, c in b.items() if c}
                if b:
                    out[g][tasks.STAGES[stage]] = b
            buckets = struct.unpack_from(f"<{tasks.HIST_BUCKETS}Q", self.tables[g][2],
                                         tasks.REAP_HIST_OFFSET)
            reap = {i: c for i, c in enumerate(buckets) if c}
            if reap:
                out[g][tasks.STAGES[2]] = reap
            # The kernel's completions by operation ride along as one more
            # "stage": {index in IO_COUNTS: count}.
            io = self.b["io"]
            done = {i: io.sum(io.Key(row * len(IO_COUNTS) + i)).value
                    for i in range(len(IO_COUNTS))}
            done = {i: c for i, c in done.items() if c}
            if done:
                out[g]["io"] = done
        return out

    def trace_lease(self, seconds: float, counters: bool = True) -> None:
        """Collect stage histograms and per-op counts for the next `seconds`
        (renewable), and with `counters` count the watched domains' mode
        switches too. The first cost on every request, the counters on every
        system call and context switch of the host: each runs only while
        someone asks for it."""
        now = time.monotonic()
        if not self.trace_until:
            cfg = self.b["config"]
            cfg[cfg.Key(0)] = cfg.Leaf(1)
        self.trace_until = max(self.trace_until, now + seconds)
        if counters:
            if not self.count_until:
                self.count_on()
            self.count_until = max(self.count_until, now + seconds)

    def expire(self) -> None:
        now = time.monotonic()
        if self.trace_until and now > self.trace_until:
            cfg = self.b["config"]
            cfg[cfg.Key(0)] = cfg.Leaf(0)
            self.trace_until = 0.0
        if self.count_until and now > self.count_until:
            self.count_until = 0.0
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
            raise EnforceError(f"cgroup {path} is not watched") from None
        return {name: getattr(v, name) for name in COUNTERS}

    def close(self) -> None:
        for gid in list(self.tables):
            self.ungrant(gid)
        if getattr(self, "b", None) is not None:
            self.b.cleanup()
            self.b = None


