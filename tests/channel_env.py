"""A real broker process with a registered backing file, for channel tests."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from drb_uring import procs
from drb_uring.channel.broker import BrokerSpec

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
# Runs a command in a private mount namespace, chroot or not (helpers/private_ns.py).
PRIVATE_NS = os.path.join(HELPERS, "private_ns.py")


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


class BrokerProc:
    """`rogue`: a mode of tests/helpers/rogue_worker.py to run instead of
    the real worker (through the broker's spawn hook)."""

    def __init__(self, tmp_path, size=256 << 20, o_direct=False, device=None,
                 enforce=True, rogue=None, limits=None, tenants=0, monitor_restart=False,
                 worker_spin_ns=None):
        """tenants=N: N user domains, each on its own socket (sock_paths)
        with an equal share of the device (extents)."""
        self.sock_path = str(tmp_path / "monitor.sock")
        share = size // max(tenants, 1) // (1 << 20) << 20
        self.extents = [(k * share, share) for k in range(tenants)]
        self.sock_paths = [str(tmp_path / f"user{k}.sock") for k in range(tenants)]
        self.control_path = str(tmp_path / "control.sock")
        self.backing = str(tmp_path / "backing")
        self.log = open(tmp_path / "broker.log", "w+")
        if not device:
            with open(self.backing, "wb") as f:
                f.truncate(size)
        spec = BrokerSpec(socket=None if tenants else self.sock_path,
                          control=self.control_path,
                          device=device or self.backing, o_direct=o_direct, enforce=enforce,
                          limits=limits or {}, monitor_restart=monitor_restart,
                          **({"worker_spin_ns": worker_spin_ns} if worker_spin_ns else {}),
                          tenants=[{"name": f"user{k}", "socket": p, "extent": list(e)}
                                   for k, (p, e) in enumerate(zip(self.sock_paths,
                                                                  self.extents,
                                                                  strict=True))])
        if rogue:
            argv = [sys.executable, os.path.join(HELPERS, "broker_with_rogue.py"), rogue,
                    spec.to_json()]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log,
                                         env=procs.module_env())
        else:
            self.proc = procs.spawn("drb_uring.channel.broker", spec, stdout=subprocess.PIPE,
                                    stderr=self.log)
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", (line, self.log_text())

    def workers(self) -> list[int]:
        return children_of(self.proc.pid)

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
        self.proc.stdout.close()
        self.log.close()


def dead(pid) -> bool:
    """Gone, or a zombie (it ran its last; its parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):     # gone while being read
        return True


def wait_until(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


def settled(read, pause=0.05, tries=100):
    """read() once two reads `pause` apart agree (closing fds settle)."""
    prev = None
    for _ in range(tries):
        cur = read()
        if cur == prev:
            return cur
        prev = cur
        time.sleep(pause)
    return prev


@contextlib.contextmanager
def brokers_made(tmp_path, **defaults):
    """A function that starts a broker (BrokerProc with `defaults`, then its
    own arguments); each is stopped at the end, with every worker gone."""
    made = []

    def start(**kw) -> BrokerProc:
        m = BrokerProc(tmp_path, **{**defaults, **kw})
        made.append(m)
        return m
    try:
        yield start
    finally:
        for m in made:
            m.stop()
            assert wait_until(lambda m=m: not m.workers()), m.workers()


@contextlib.contextmanager
def hang_guard(seconds: float = 30.0, what: str = "the call"):
    """Fail the test, rather than hang it, if the body blocks: a bound on a
    wait that would otherwise never end, not a speed check."""
    def expired(*_):
        raise TimeoutError(f"{what} still blocked after {seconds:g} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def expect_killed(ch, call, reason: str):
    """`call` fails because the monitor killed the channel's worker for
    `reason`, and that worker is dead. Returns the ChannelFailed."""
    import pytest

    from drb_uring.channel.client import ChannelFailed
    pid = ch.worker_pid
    with pytest.raises(ChannelFailed) as e:
        call()
    assert f"monitor killed backend worker {pid}: {reason}" in str(e.value)
    assert wait_until(lambda: dead(pid))
    return e.value


def wake_every_eventfd() -> None:
    """Signal every eventfd this process holds, as a hostile user side
    would wake its worker without publishing anything (the client's next
    publish would write an honest index over a corrupted one)."""
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]":
                os.eventfd_write(fd, 1)
        except OSError:
            pass


def granted_rings(missing_ok: bool = False) -> set[int]:
    """The io_ring_ctx addresses in the monitor's `grants` map now (none,
    with missing_ok, when the service and its maps are gone)."""
    p = subprocess.run(["bpftool", "map", "dump", "name", "grants", "-j"],
                       capture_output=True, text=True)
    if p.returncode and missing_ok:
        maps = subprocess.run(["bpftool", "map", "show", "-j"], capture_output=True,
                              text=True, check=True).stdout
        if not any(m.get("name") == "grants" for m in json.loads(maps or "[]")):
            return set()
    p.check_returncode()
    out = p.stdout
    # bpftool -j gives each key as its bytes in hex (and a "formatted" copy
    # only where the map has BTF).
    return {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little")
            for e in json.loads(out or "[]")}
