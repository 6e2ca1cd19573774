"""``drb soak``: a pair under mixed I/O while its parts are killed.

Brings up a pair (several user domains on one driver domain, with the
monitor's restart policy), runs a user side (tools.soakcell) in every user
domain, and for the given time kills, at random: a worker every few seconds,
a user side now and then (another starts with what the last one saw), and
the eBPF monitor now and then. At the end it takes the pair down and checks
the backing file block by block against every acknowledged write, and
compares the daemon's and the monitor's descriptors, memory, BPF programs
and maps and the pair's processes with what they were after warm-up.
Prints a summary: requests, kills, recoveries, mismatches, leaked objects.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from drb_uring.domains import control, runtime
from drb_uring.domains.config import PairConfig
from drb_uring.tools.soakcell import BLOCK, SoakCellSpec, block_data

EXTENT = 8 << 20
INSIDE_SOCK = "/run/drb/{name}/monitor.sock"


def _say(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _pids_in(group: str, word: bytes) -> list[int]:
    """Processes of a cgroup (and its children) whose command line has `word`."""
    out = []
    for root, _dirs, files in os.walk(group):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(root, "cgroup.procs")) as f:
                pids = [int(x) for x in f.read().split()]
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if word in f.read() and pid not in out:
                        out.append(pid)
            except OSError:
                pass
    return out


def _service_pid() -> int:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"drb_uring.enforce.service" in f.read():
                        return int(d)
            except OSError:
                pass
    return 0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _bpf_count(kind: str) -> int:
    out = subprocess.run(["bpftool", kind, "show"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if line[:1].isdigit())


class Cell:
    """One user domain's user side, and what the soak knows of its writes."""

    def __init__(self, k: int):
        self.k = k
        self.role = f"user{k}"
        self.acked: dict[int, int] = {}
        self.pending: dict[int, set[int]] = {}
        self.intents: dict[int, tuple[int, int]] = {}     # ver -> (blk, n)
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.ops = 0            # over every incarnation
        self.ops_now = 0        # this incarnation's count
        self.restarts_now = 0
        self.recoveries = 0
        self.mismatches = 0
        self.flushes = 0
        self.incarnation = 0
        self.started = 0        # incarnations that got as far as saying something
        self.killed = False     # its current incarnation was killed by the soak
        self.failures = 0       # incarnations that ended without being killed
        self.why: list[str] = []    # their last words on stderr
        self.log = ""
        self.heard = False


class Soak:
    def __init__(self, seconds: float, users: int, kill_every: float, seed: int, work: str):
        self.work = work
        self.seconds = seconds
        self.users = users
        self.kill_every = kill_every
        self.rng = random.Random(seed)
        self.name = f"soak-{os.getpid()}"[:31]
        self.cells = [Cell(k) for k in range(users)]
        self.kills = {"worker": 0, "user side": 0, "monitor": 0}
        self.monitor_back = 0
        self.sel = selectors.DefaultSelector()
        self.st: dict = {}
        self.stopping = False

    # ---- the user sides ------------------------------------------------------

    def start_cell(self, c: Cell) -> None:
        c.incarnation += 1
        spec = SoakCellSpec(socket=INSIDE_SOCK.format(name=self.name), blocks=EXTENT // BLOCK,
                            seed=self.rng.randrange(1 << 30),
                            first_version=c.incarnation << 32)
        c.log = os.path.join(self.work, f"{c.role}.{c.incarnation}.log")
        with open(c.log, "wb") as err:
            c.proc = control.exec_in(self.name, c.role,
                                     runtime.python_argv("drb_uring.tools.soakcell", spec),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err)
        state = {"acked": {str(b): v for b, v in c.acked.items()},
                 "pending": {str(b): sorted(v) for b, v in c.pending.items()}}
        c.proc.stdin.write((json.dumps(state) + "\n").encode())
        c.proc.stdin.close()
        os.set_blocking(c.proc.stdout.fileno(), False)
        c.ops_now = c.restarts_now = 0
        c.heard = False
        self.sel.register(c.proc.stdout, selectors.EVENT_READ, c)

    def cell_gone(self, c: Cell) -> None:
        """Its last words are in; what it had announced and not seen
        acknowledged stays possible."""
        self.sel.unregister(c.proc.stdout)
        c.proc.stdout.close()
        c.proc.wait()
        if not c.killed and not self.stopping:
            c.failures += 1     # its channel failed, or it could not get one
            with open(c.log, "rb") as f:
                last = f.read().decode(errors="replace").strip().splitlines()
            c.why.append(last[-1] if last else f"exit status {c.proc.returncode}")
        c.killed = False
        c.ops += c.ops_now
        c.recoveries += c.restarts_now
        for ver, (blk, n) in c.intents.items():
            for b in range(blk, blk + n):
                c.pending.setdefault(b, set()).add(ver)
        c.intents.clear()
        c.proc = None

    def hear(self, c: Cell) -> None:
        try:
            chunk = os.read(c.proc.stdout.fileno(), 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            self.cell_gone(c)
            return
        c.buf += chunk
        if not c.heard:
            c.heard = True
            c.started += 1
        *lines, c.buf = c.buf.split(b"\n")
        for line in lines:
            w = line.decode().split()
            if not w:
                continue
            if w[0] == "I":
                c.intents[int(w[3])] = (int(w[1]), int(w[2]))
            elif w[0] == "A":
                blk, n, ver = int(w[1]), int(w[2]), int(w[3])
                c.intents.pop(ver, None)
                for b in range(blk, blk + n):
                    c.acked[b] = ver
                    c.pending.pop(b, None)
            elif w[0] == "F":
                c.flushes += 1
            elif w[0] == "M":
                c.mismatches += 1
            elif w[0] == "S":
                c.ops_now, c.restarts_now = int(w[1]), int(w[2])

    # ---- what is killed ------------------------------------------------------

    def group(self, role: str) -> str:
        return self.st["domains"][role]["cgroup"]

    def kill_worker(self) -> bool:
        pids = _pids_in(self.group("driver"), b"drb_uring.channel.worker")
        pids = [p for p in pids if b"runc" not in _cmd(p)]
        if not pids:
            return False
        os.kill(self.rng.choice(pids), signal.SIGKILL)
        self.kills["worker"] += 1
        return True

    def cell_pids(self, c: Cell) -> list[int]:
        return [p for p in _pids_in(self.group(c.role), b"drb_uring.tools.soakcell")
                if b"runc" not in _cmd(p)]

    def kill_user_side(self) -> bool:
        c = self.rng.choice(self.cells)
        pids = self.cell_pids(c)
        if not pids:
            return False
        c.killed = True
        for p in pids:
            os.kill(p, signal.SIGKILL)
        self.kills["user side"] += 1
        return True

    def kill_monitor(self) -> bool:
        pid = _service_pid()
        if not pid:
            return False
        os.kill(pid, signal.SIGKILL)
        self.kills["monitor"] += 1
        self.monitor_dead = pid
        return True

    # ---- leaks ---------------------------------------------------------------

    def snapshot(self) -> dict:
        daemon = self.st["daemon_pid"]
        svc = _service_pid()
        procs = sum(len(_pids_in(self.group(r), b"")) for r in
                    [*(c.role for c in self.cells), "driver"])
        return {"daemon fds": _fds(daemon), "daemon rss KiB": _rss_kib(daemon),
                "monitor fds": _fds(svc), "monitor rss KiB": _rss_kib(svc),
                "bpf programs": _bpf_count("prog"), "bpf maps": _bpf_count("map"),
                "pair processes": procs}

    # ---- the run -------------------------------------------------------------

    def run(self, backing: str) -> dict:
        cfg = PairConfig(name=self.name, backing=backing, users=self.users, restart=True)
        _say(f"bringing up pair {self.name}: {self.users} user domains, one driver domain")
        self.st = control.start_pair(cfg)
        try:
            return self._run()
        finally:
            for c in self.cells:
                for p in self.cell_pids(c):
                    os.kill(p, signal.SIGKILL)
            control.stop_pair(self.name)

    def _run(self) -> dict:
        for c in self.cells:
            self.start_cell(c)
        t0 = time.monotonic()
        end = t0 + self.seconds
        warm = t0 + min(10.0, self.seconds / 4)
        before = None
        next_worker = t0 + self.kill_every
        # At least one of each, however short the run.
        next_user = t0 + min(self.kill_every * 7, self.seconds * 0.3)
        next_monitor = t0 + min(self.kill_every * 20, self.seconds * 0.5)
        next_line = t0 + 10
        self.monitor_dead = 0
        while time.monotonic() < end:
            for key, _ in self.sel.select(0.2):
                self.hear(key.data)
            now = time.monotonic()
            for c in self.cells:
                if c.proc is None:
                    self.start_cell(c)
            if before is None and now >= warm:
                before = self.snapshot()
            if self.monitor_dead and _service_pid() not in (0, self.monitor_dead):
                self.monitor_back += 1
                self.monitor_dead = 0
            if now >= next_worker:
                self.kill_worker()
                next_worker = now + self.rng.uniform(0.5, 1.5) * self.kill_every
            if now >= next_user:
                self.kill_user_side()
                next_user = now + self.rng.uniform(0.5, 1.5) * self.kill_every * 7
            if now >= next_monitor and not self.monitor_dead:
                self.kill_monitor()
                next_monitor = now + self.rng.uniform(0.5, 1.5) * self.kill_every * 20
            if now >= next_line:
                ops = sum(c.ops + c.ops_now for c in self.cells)
                _say(f"{now - t0:5.0f} s of {self.seconds:.0f}: {ops} requests, kills "
                     f"{self.kills}, mismatches {sum(c.mismatches for c in self.cells)}")
                next_line = now + 30
        # Settle: the monitor back, a worker serving, before the last count.
        settle_end = time.monotonic() + 30
        while time.monotonic() < settle_end and (
                self.monitor_dead or not _service_pid()
                or any(c.proc is None or not c.ops_now for c in self.cells)):
            for key, _ in self.sel.select(0.2):
                self.hear(key.data)
            for c in self.cells:
                if c.proc is None:
                    self.start_cell(c)
            if self.monitor_dead and _service_pid() not in (0, self.monitor_dead):
                self.monitor_back += 1
                self.monitor_dead = 0
        # A few quiet moments for descriptors to settle; a leak is what stays
        # through all of them (a handover caught mid-way holds a few fds).
        after = None
        for _ in range(10):
            for key, _ in self.sel.select(0.3):
                self.hear(key.data)
            now_ = self.snapshot()
            after = now_ if after is None else {k: min(after[k], now_[k]) for k in after}
        # Stop the user sides themselves (runc exec's own process is only
        # their stand-in), and hear their last words.
        self.stopping = True
        for c in self.cells:
            for p in self.cell_pids(c):
                os.kill(p, signal.SIGKILL)
        while any(c.proc is not None for c in self.cells):
            for key, _ in self.sel.select(1.0):
                self.hear(key.data)
        return {"before": before or after, "after": after}


def _cmd(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def verify(backing: str, cells: list[Cell], extents: list[tuple[int, int]]) -> int:
    """Blocks whose bytes no acknowledged (or unresolved) write could have left."""
    bad = 0
    with open(backing, "rb") as f:
        for c, (base, _size) in zip(cells, extents, strict=True):
            for blk in range(EXTENT // BLOCK):
                f.seek(base + blk * BLOCK)
                seen = f.read(BLOCK)
                could = {c.acked.get(blk, 0)} | c.pending.get(blk, set())
                if not any(seen == block_data(blk, v) for v in could):
                    bad += 1
    return bad


def run(seconds: float, users: int = 2, kill_every: float = 3.0, seed: int = 1,
        json_out: str | None = None) -> int:
    work = tempfile.mkdtemp(prefix="drb-soak-", dir="/var/tmp")
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        backing = os.path.join(work, "device.img")
        with open(backing, "wb") as f:
            f.truncate(users * EXTENT)
        soak = Soak(seconds, users, kill_every, seed, work)
        t0 = time.monotonic()
        counts = soak.run(backing)
        extents = [(k * EXTENT, EXTENT) for k in range(users)]
        _say("checking the backing file against every acknowledged write")
        bad_blocks = verify(backing, soak.cells, extents)
        before, after = counts["before"], counts["after"]
        # Descriptors and BPF objects must not grow; memory and processes
        # are reported. (Fewer than at warm-up is no leak: the warm-up count
        # may have caught a handover or a restart mid-way.)
        leaks = {k: after[k] - before[k] for k in before
                 if k in ("daemon fds", "monitor fds", "bpf programs", "bpf maps")
                 and after[k] > before[k]}
        summary = {
            "seconds": round(time.monotonic() - t0, 1), "user domains": users,
            "requests": sum(c.ops + c.ops_now for c in soak.cells),
            "flushes": sum(c.flushes for c in soak.cells),
            "kills": soak.kills,
            "recoveries": {"worker (channels carried on)": sum(c.recoveries
                                                               for c in soak.cells),
                           "user side started again": sum(max(0, c.started - 1)
                                                          for c in soak.cells),
                           "monitor back": soak.monitor_back},
            "mismatches": {"reads": sum(c.mismatches for c in soak.cells),
                           "device blocks": bad_blocks},
            "channels failed": sum(c.failures for c in soak.cells),
            "why they failed": [w for c in soak.cells for w in c.why],
            "unresolved writes": sum(len(v) for c in soak.cells for v in c.pending.values()),
            "leaked objects": leaks,
            "before -> after": {k: [before[k], after[k]] for k in before},
        }
        print(json.dumps(summary, indent=2))
        if json_out:
            with open(json_out, "w") as f:
                json.dump(summary, f, indent=2)
        # A channel that failed broke the promise that it carries on.
        ok = (not summary["mismatches"]["reads"] and not bad_blocks and not leaks
              and not summary["channels failed"])
        print(f"drb soak: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        signal.signal(signal.SIGINT, old)
        shutil.rmtree(work, ignore_errors=True)
