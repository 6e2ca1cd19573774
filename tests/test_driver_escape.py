"""A compromised driver domain tries to keep what it was given, or to take
what its worker holds: a worker that says it let go of a ring and keeps it,
a worker's child that outlives a removed user domain with its rings, a
neighbour process of the driver domain at the worker's /proc files, and a
user side that scribbles on its own channel's driver page beside sibling
channels. Each passes only if the bytes outside the attacker's own extent
and memory are unchanged.

Real brokers, real domains, real workers and the real monitor.
"""
import hashlib
import json
import os
import subprocess
import textwrap
import time

import pytest
from channel_env import brokers_made, dead, granted_rings, hang_guard, wait_until
from pair_env import DRB, drb, in_domain, leftovers, pairs_made, rogue_pair, wait_gone

from drb_uring.channel.client import Channel, ChannelFailed
from drb_uring.domains.cgroup import procs_below as cgroup_procs
from drb_uring.ring import layout as L

GEO = L.Geometry(sq_entries=16, cq_entries=16, slot_size=65536, slot_count=4)
SIZE = 64 << 20
PREFIX = "tesc"


def _device(m, base, size) -> bytes:
    with open(m.backing, "rb") as f:
        f.seek(base)
        return f.read(size)


def test_a_ring_kept_after_its_channel_closed_is_stopped(tmp_path, no_fd_leak):
    """User domain A's rogue worker says it let go of A's closed channel,
    keeps its grant ring, and writes through it at device offset 0, in user
    domain B's extent. The grant stays, closed, until the kernel says the
    ring is gone: the write is a violation, and B's bytes do not change."""
    with brokers_made(tmp_path, size=SIZE) as start:
        probe = start(tenants=2)
        base_a = probe.extents[1][0]
        probe.stop()
        m = start(tenants=2, rogue=f"keep-closed:0@{base_a}")
        b = Channel(m.sock_paths[0], 1 << 20, geometry=GEO)       # a real worker
        b.pwrite(0, os.urandom(65536))
        before = hashlib.sha256(_device(m, 0, SIZE // 2)).hexdigest()
        b_worker = b.worker_pid
        a1 = Channel(m.sock_paths[1], 1 << 20, geometry=GEO)
        a2 = Channel(m.sock_paths[1], 1 << 20, geometry=GEO)
        rogue = a2.worker_pid
        with hang_guard(what="closing a channel whose worker keeps its ring"):
            a2.close()
            with pytest.raises(ChannelFailed) as e:
                a1.pread(0, 4096)
        assert "a submission on the ring of a channel that ended" in str(e.value), e.value
        assert wait_until(lambda: dead(rogue))
        assert "a submission on the ring of a channel that ended" in m.log_text()
        assert hashlib.sha256(_device(m, 0, SIZE // 2)).hexdigest() == before
        # B never noticed.
        assert b.worker_pid == b_worker and not dead(b_worker)
        b.pwrite(0, b"after")
        assert b.pread(0, 5) == b"after"
        a1.close()
        b.close()


def test_a_scribbled_driver_page_costs_only_its_channel(tmp_path, no_fd_leak):
    """A user side keeps a writable descriptor of its channel's driver page
    and scribbles on its header. The next worker finds that page corrupt
    and drops that channel alone, with the reason; its siblings are served."""
    with brokers_made(tmp_path, size=SIZE) as start:
        m = start(tenants=1)
        x = Channel(m.sock_paths[0], 1 << 20, geometry=GEO)
        ro = [fd for fd in map(int, os.listdir("/proc/self/fd"))
              if os.path.realpath(f"/proc/self/fd/{fd}") == "/memfd:drb-ctl-driver (deleted)"]
        assert len(ro) == 1, ro
        y = Channel(m.sock_paths[0], 1 << 20, geometry=GEO)
        y.pwrite(0, b"sibling")
        # Hostile: a writable descriptor of x's driver page, from its own
        # read-only one (the user side made the memfd), and the header gone.
        rw = os.open(f"/proc/self/fd/{ro[0]}", os.O_RDWR)
        os.pwrite(rw, bytes(64), 0)
        os.close(rw)
        old = y.worker_pid
        z = Channel(m.sock_paths[0], 1 << 20, geometry=GEO)    # a new worker takes over
        # Once the one that mapped x's page before the scribble is gone.
        assert wait_until(lambda: dead(old), 10)
        with hang_guard(what="a channel whose driver page is corrupt"):
            with pytest.raises(ChannelFailed, match="ring is corrupt"):
                x.pread(0, 4)
        assert y.pread(0, 7) == b"sibling"
        z.pwrite(0, b"new")
        assert z.pread(0, 3) == b"new" and y.pread(0, 7) == b"sibling"
        for ch in (x, y, z):
            ch.close()


def test_a_polling_worker_lets_go_of_each_closed_channel(tmp_path, no_fd_leak):
    """A worker that polls instead of sleeping (drb-poll) still hears that
    a channel closed: channels of the whole extent, one after the other."""
    with brokers_made(tmp_path, size=16 << 20) as start:
        m = start(worker_spin_ns=3600 * 10**9)
        for i in range(3):
            with hang_guard(what=f"open and close number {i} on a polling worker"):
                with Channel(m.sock_path, 16 << 20, geometry=GEO) as ch:
                    if i:
                        assert ch.pread(0, 5) == b"cell%d" % (i - 1)
                    ch.pwrite(0, b"cell%d" % i)


@pytest.fixture(scope="module")
def pair():
    with pairs_made() as up:
        yield up
    assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


HOLDER = """
import sys, time
from drb_uring.channel.client import Channel
from drb_uring.ring import layout as L
with Channel({sock!r}, 1 << 20, geometry=L.Geometry(slot_size=65536, slot_count=4)) as ch:
    ch.pwrite(0, b"mine" * 1024)
    print(ch.worker_pid, flush=True)
    sys.stdin.readline()
    print(ch.pread(0, 4096) == b"mine" * 1024, flush=True)
    ch.pwrite(4096, b"more")
    print(ch.pread(4096, 4) == b"more", flush=True)
"""

NEIGHBOUR = r"""
import ctypes, errno, os, signal
libc = ctypes.CDLL(None, use_errno=True)
pid = {pid}
def attempt(name, fn):
    try:
        fn(); print(name, "ok")
    except OSError as e:
        print(name, errno.errorcode.get(e.errno, e.errno))
def sys_(nr, *args):
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if r < 0:
        raise OSError(ctypes.get_errno(), "")
    return r
for f in ("mem", "environ", "auxv", "maps", "smaps", "pagemap", "stack", "syscall", "io",
          "personality", "timerslack_ns", "mountinfo", "cmdline", "status"):
    attempt("read_" + f, lambda f=f: open(f"/proc/{{pid}}/{{f}}", "rb").read(64))
attempt("write_mem", lambda: open(f"/proc/{{pid}}/mem", "r+b").write(b"x" * 64))
for d in ("fd", "fdinfo", "map_files", "task"):
    attempt("list_" + d, lambda d=d: os.listdir(f"/proc/{{pid}}/{{d}}"))
for link in ("cwd", "root", "exe", "fd/3", "fd/4"):
    attempt("link_" + link, lambda link=link: os.readlink(f"/proc/{{pid}}/{{link}}"))
attempt("ptrace_attach", lambda: sys_(101, 16, pid, 0, 0))
attempt("process_vm_readv", lambda: sys_(310, pid, 0, 0, 0, 0, 0))
attempt("pidfd_getfd", lambda: sys_(438, sys_(434, pid, 0), 3, 0))
attempt("kill_stop", lambda: os.kill(pid, signal.SIGSTOP))
attempt("open_fd", lambda: os.close(os.open(f"/proc/{{pid}}/fd/3", os.O_RDWR)))
"""


def test_the_workers_memory_and_descriptors_are_its_own(pair):
    """Another process of the driver domain (its root, as a compromised
    driver domain would run) at every /proc file of the worker: the worker
    runs as a user of its own and is not dumpable, so none gives anything
    that would reach its memory or its rings, and the channel goes on with
    its bytes."""
    st = pair(f"{PREFIX}-mem", "--size", "16m")
    proc = subprocess.Popen([DRB, "exec", st["name"], "user", "--", "python3", "-c",
                             HOLDER.format(sock=st["socket"])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(proc.stdout.readline())
        with open(f"/proc/{worker}/status") as f:
            nspid = [line.split()[-1] for line in f if line.startswith("NSpid:")][0]
        out = in_domain(st["name"], "driver", NEIGHBOUR.format(pid=nspid)).stdout
        got = dict(line.split(maxsplit=1) for line in out.splitlines() if " " in line)
        # Nothing at all: the driver domain's /proc does not even list the
        # worker (hidepid=invisible), and the calls that need no /proc are
        # refused (another user, not dumpable, no capability).
        assert len(got) == 29 and "ok" not in got.values(), got
        assert all(v == "ENOENT" for k, v in got.items() if k.startswith(
            ("read_", "write_", "list_", "link_", "open_"))), got
        assert got["ptrace_attach"] == "EPERM" and got["process_vm_readv"] == "EPERM", got
        assert got["kill_stop"] == "EPERM" and got["pidfd_getfd"] in ("EPERM", "ENOSYS"), got
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "True"      # its bytes
        assert proc.stdout.readline().strip() == "True"      # and it goes on
    finally:
        proc.stdin.close()
        proc.wait(30)


def _driver_uids(st) -> set[int]:
    uids = set()
    pids = []
    for d, _, files in os.walk(st["domains"]["driver"]["cgroup"]):
        if "cgroup.procs" in files:
            with open(os.path.join(d, "cgroup.procs")) as f:
                pids += [int(x) for x in f.read().split()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                uids |= {int(line.split()[1]) for line in f if line.startswith("Uid:")}
        except OSError:
            pass
    return uids


def _hold_a_channel(st: dict, name: str, user: str) -> subprocess.Popen:
    """A program in user domain `user` that opens a channel (so that the
    rogue worker is handed a grant ring) and holds it for a minute."""
    p = subprocess.Popen([DRB, "exec", name, user, "--", "python3", "-c", textwrap.dedent(f"""
        import time
        from drb_uring.channel.client import Channel
        from drb_uring.ring import layout as L
        ch = Channel({st['socket']!r}, 1 << 20, geometry=L.Geometry(slot_size=65536, slot_count=4))
        print("open", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if line != "open":
        p.kill()
        p.wait(10)
        raise AssertionError(f"the channel did not open in {user}: {line!r}")
    return p


def test_a_removed_user_domains_ring_kept_by_a_child_goes_with_it():
    """The rogue worker of user domain user1 forks a child that keeps its
    grant rings and, once the worker is gone, writes through them at the
    user domain's extent again and again. user1 is removed and a new user1
    added on the same extent: the child is gone with its worker, and the
    new user domain's bytes stay as written."""
    name = f"{PREFIX}-fk"
    proc = rogue_pair(name, "fork-keep", users=2)
    opener = None
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        base, size = st["domains"]["user1"]["extent"]
        opener = _hold_a_channel(st, name, "user1")
        drb("user", "rm", name, "user1")
        drb("user", "add", name)
        st = json.loads(drb("status", name, "--json").stdout)
        assert st["domains"]["user1"]["extent"] == [base, size]
        mine = os.urandom(4096)
        with open(st["device"], "r+b") as f:
            f.seek(base)
            f.write(mine)
        time.sleep(3)           # the child writes every 0.3 s while it lives
        with open(st["device"], "rb") as f:
            f.seek(base)
            assert f.read(4096) == mine
        # Nothing of the worker's user is left in the driver domain: only
        # the domain's own root.
        assert _driver_uids(st) == {st["domains"]["driver"]["host_id"]}
    finally:
        if opener is not None:
            opener.kill()
            opener.wait(10)
        drb("down", name)
        proc.wait(10)


def test_a_ring_kept_by_a_child_is_stopped_when_the_daemon_dies():
    """The rogue worker forks a child that keeps its grant ring; then the
    pair's daemon (the broker) is killed. The service kills the worker, and
    the child writes through the ring 1.5 s later, again and again. The
    monitor's grant must outlive the broker: the child is killed by the
    service (or by the monitor at its first write), the extent's bytes stay
    as they were, and once nothing of the driver domain is left the grant is
    gone too (no row is kept for a ring nobody holds)."""
    name = f"{PREFIX}-dk"
    proc = rogue_pair(name, "fork-keep")
    opener = None
    try:
        st = json.loads(drb("status", name, "--json").stdout)
        before = granted_rings()
        base, _size = st["domains"]["user0"]["extent"]
        opener = _hold_a_channel(st, name, "user0")
        ours = granted_rings() - before
        assert len(ours) == 1
        mine = os.urandom(4096)
        with open(st["device"], "r+b") as f:
            f.seek(base)
            f.write(mine)
        driver = st["domains"]["driver"]["cgroup"]
        # The domain's init, the worker and the child it forks once ready.
        assert wait_until(lambda: len(cgroup_procs(driver)) >= 3, timeout=10)
        os.kill(proc.pid, 9)                       # the daemon, and with it the broker
        proc.wait(10)
        time.sleep(3)          # the child's writes start 1.5 s after the worker is gone
        with open(st["device"], "rb") as f:
            f.seek(base)
            assert f.read(4096) == mine
        assert wait_until(lambda: not cgroup_procs(driver), timeout=10), cgroup_procs(driver)
        # Ungranted, or the service left with nothing granted.
        assert wait_until(lambda: not ours & granted_rings(missing_ok=True), timeout=10)
    finally:
        if opener is not None:
            opener.kill()
            opener.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        drb("down", name)
    assert leftovers(name) == []
