"""A user domain's raw disk (drb up --disk, drb user add --disk), from
inside, and what its own server can and cannot do: dd's bytes are on the
device at the domain's extent; the disk is exactly the extent; another
user domain's disk shows none of its bytes; the disk survives its server
(SIGKILLed under load: a delay, no error, every acknowledged write on the
device); a hostile server (replies to requests that do not exist, more
bytes than asked, stalls) hurts only its own domain, and a frozen one
cannot hold drb user rm.

One pair for the module, brought up without --disk: user0 has none;
user1 and user2 get theirs from drb user add --disk, 32 MiB each; the
last test removes user1."""
import hashlib
import json
import os
import select
import signal
import subprocess
import time

import pytest
from disk_env import (
    cgroup_pids,
    disk_of,
    domain_pid,
    fuse_conns_of,
    host_fuse_conns,
    in_user,
    pidfd_getfd,
    read_at,
    server_pid,
    sh,
    spawn_in_domain,
    status,
)
from pair_env import DRB, drb, leftovers, monitor_args, wait_gone

from drb_uring.domains.attach import child_of as attach_child

PREFIX = "dsk-tr"
NAME = f"{PREFIX}-b"
MiB = 1 << 20
EXTENT = 32 * MiB
A, B = "user1", "user2"            # the attacked domain and the other one


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    backing = tmp_path_factory.mktemp("dskraw") / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(3 * EXTENT)
    drb("up", NAME, "--backing", str(backing), "--extent", "32m", *monitor_args())
    try:
        drb("user", "add", NAME, "--disk")
        drb("user", "add", NAME, "--disk")
        yield str(backing)
    finally:
        drb("down", NAME, check=False)
        assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


def _base(role):
    return status(NAME)["domains"][role]["extent"][0]


def test_dd_through_the_disk_lands_at_the_extent(pair):
    st = status(NAME)
    assert [st["domains"][u]["extent"] for u in ("user0", A, B)] == \
        [[0, EXTENT], [EXTENT, EXTENT], [2 * EXTENT, EXTENT]]
    assert st["domains"]["user0"]["disk"] is None         # drb up without --disk
    assert disk_of(NAME, A)["size"] == disk_of(NAME, B)["size"] == EXTENT
    assert disk_of(NAME, A)["fs"] is None
    for role, seek, flag in ((A, 48, "conv=fsync"), (B, 7, "oflag=direct")):
        out = sh(NAME, role, "head -c 1048576 /dev/urandom > /tmp/blob && sha256sum < /tmp/blob "
                             f"&& dd if=/tmp/blob of=/dev/drb/disk bs=64k seek={seek} {flag} "
                             f"status=none && dd if=/dev/drb/disk bs=64k skip={seek} count=16 "
                             "status=none | sha256sum").stdout.split()
        want = out[0]
        assert out[2] == want, out                     # read back through the disk
        on_device = read_at(pair, _base(role) + seek * 65536, MiB)
        assert hashlib.sha256(on_device).hexdigest() == want, role


def _ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])          # utime + stime


def test_an_idle_disk_costs_no_cpu(pair):
    """Idle, the server and the worker behind it sleep: neither wakes the
    other, and the server's wake-up descriptor does not stay readable."""
    sh(NAME, A, "dd if=/dev/drb/disk of=/dev/null bs=4k count=8 status=none")
    time.sleep(0.2)
    st = status(NAME)
    procs = [server_pid(NAME, A)] + [
        p for p in cgroup_pids(st, "driver")
        if b"drb_uring.channel.worker" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(procs) >= 2
    before = [_ticks(p) for p in procs]
    time.sleep(1.0)
    used = [_ticks(p) - b for p, b in zip(procs, before, strict=True)]
    assert max(used) <= 5, used       # clock ticks in a second: at most 5% of a CPU


def test_a_program_started_in_the_domain_goes_with_its_stand_in(pair):
    """What spawn_joined starts dies with the process standing in for it
    on the host (its parent-death signal is set after its credentials
    change, which would clear it)."""
    r, w = os.pipe()
    standin = spawn_in_domain(NAME, B, ["sh", "-c", "echo $$; exec sleep 1000"], stdout=w)
    os.close(w)
    with os.fdopen(r) as f:
        inner = f.readline().strip()
    host = attach_child(standin.pid)
    assert host and inner
    standin.kill()
    standin.wait()
    assert wait_gone(lambda: not os.path.exists(f"/proc/{host}"), 5)


EDGES = r"""
import errno, json, os
fd = os.open("/dev/drb/disk", os.O_RDWR)
size = os.fstat(fd).st_size
def w(off, n):
    try:
        return os.pwrite(fd, b"E" * n, off)
    except OSError as e:
        return errno.errorcode[e.errno]
print(json.dumps({"size": size, "end": os.lseek(fd, 0, os.SEEK_END),
                  "read_at_end": len(os.pread(fd, 4096, size)),
                  "read_across": len(os.pread(fd, 8192, size - 4096)),
                  "write_at_end": w(size, 4096), "write_past": w(size + (1 << 20), 4096),
                  "write_far": w(1 << 62, 4096), "write_across": w(size - 4096, 8192)}))
"""

MARK = r"""
import os, sys
fd = os.open("/dev/drb/disk", os.O_RDWR)
mark = bytes.fromhex(sys.argv[1]) * 256
size = os.fstat(fd).st_size
for off in (0, size // 2, size - 2 * 4096):
    os.pwrite(fd, mark, off)
os.fsync(fd)
"""

FIND = r"""
import os, sys
fd = os.open("/dev/drb/disk", os.O_RDONLY)
mark = bytes.fromhex(sys.argv[1])
data = b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
print(len(data), data.count(mark))
"""


def test_the_disk_is_the_extent_and_no_more(pair):
    """Its size is the extent; an offset at or past its end reads nothing
    and writes nothing (ENOSPC, EINVAL), never the next domain's bytes."""
    theirs = os.urandom(4096)
    in_user(NAME, B, MARK, theirs[:16].hex())
    before = read_at(pair, 2 * EXTENT, 3 * 4096)
    got = json.loads(in_user(NAME, A, EDGES).stdout)
    assert got["size"] == got["end"] == EXTENT
    assert got["read_at_end"] == 0 and got["read_across"] == 4096
    assert got["write_at_end"] == "ENOSPC"
    assert got["write_past"] in ("ENOSPC", "EINVAL") and got["write_far"] in ("ENOSPC", "EINVAL")
    assert got["write_across"] == 4096                # cut at the end of the disk
    assert read_at(pair, 2 * EXTENT - 4096, 4096) == b"E" * 4096
    assert read_at(pair, 2 * EXTENT, 3 * 4096) == before  # user2's first bytes, untouched
    assert before.startswith(theirs[:16] * 256)


def test_another_domain_shows_none_of_its_bytes(pair):
    mark = os.urandom(16).hex()
    in_user(NAME, A, MARK, mark)
    n, hits = in_user(NAME, A, FIND, mark).stdout.split()
    assert (int(n), int(hits)) == (EXTENT, 3 * 256)
    n, hits = in_user(NAME, B, FIND, mark).stdout.split()
    assert (int(n), int(hits)) == (EXTENT, 0)
    assert read_at(pair, 2 * EXTENT, EXTENT).count(bytes.fromhex(mark)) == 0


LOAD = r"""
import hashlib, json, os, random, sys, time
fd = os.open("/dev/drb/disk", os.O_RDWR)
rnd = random.Random(int(sys.argv[1]))
end = time.monotonic() + float(sys.argv[2])
acked, errors, worst, ops = {}, [], 0.0, 0
print("go", flush=True)
while time.monotonic() < end:
    off = rnd.randrange(256) * 65536
    data = rnd.randbytes(65536)
    t = time.monotonic()
    try:
        if os.pwrite(fd, data, off) != len(data):
            errors.append(f"short write at {off}")
        acked[off] = hashlib.sha256(data).hexdigest()
        if os.pread(fd, 65536, off) != data:
            errors.append(f"read back at {off} differs")
    except OSError as e:
        errors.append(f"{off}: {e}")
    worst = max(worst, time.monotonic() - t)
    ops += 1
print(json.dumps({"acked": acked, "errors": errors, "worst_s": worst, "ops": ops}))
"""


def test_the_disk_survives_its_server(pair):
    """SIGKILL the server (found in the domain's cgroup) three times while
    a program writes and reads: the program sees a delay, not an error,
    and every write it saw acknowledged is on the device."""
    before = disk_of(NAME, B)["restarts"]
    prog = subprocess.Popen([DRB, "exec", NAME, B, "--", "python3", "-c", LOAD, "7", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert prog.stdout.readline().strip() == "go"
        killed = []
        for _ in range(3):
            time.sleep(0.5)
            pid = server_pid(NAME, B)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            # The next one, on the same connection, asking for a resend.
            assert wait_gone(lambda: disk_of(NAME, B)["server_pid"] not in killed, 10)
        out, err = prog.communicate(timeout=60)
    finally:
        if prog.poll() is None:
            prog.kill()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["errors"] == [] and res["ops"] > 30, (res["errors"], err)
    disk = disk_of(NAME, B)
    assert disk["restarts"] == before + 3 and disk["failed"] is None
    base = _base(B)
    wrong = [off for off, want in res["acked"].items()
             if hashlib.sha256(read_at(pair, base + int(off), 65536)).hexdigest() != want]
    assert not wrong, wrong
    print(f"{res['ops']} writes and reads through 3 server deaths; the longest took "
          f"{res['worst_s'] * 1000:.0f} ms")


GRAB = r"""
import sys, time
from drb_uring import protocol
from drb_uring.channel.client import Channel
print("ready", flush=True)
end = time.monotonic() + 10
while time.monotonic() < end:
    try:
        ch = Channel(sys.argv[1], int(sys.argv[2]), offset=0)
    except protocol.ProtocolError:
        time.sleep(0.001)
        continue
    print("got", flush=True)
    time.sleep(1.0)
    ch.close()
    print("closed", flush=True)
    break
"""


def test_a_restarted_server_waits_for_its_extent(pair):
    """The next server finds the disk's extent taken (here by a program of
    the domain that grabbed it when the dead server's channel let go; in
    general by that channel itself, until the kernel is done with its
    ring): it waits and then serves, one restart, no failure."""
    before = disk_of(NAME, B)["restarts"]
    grab = subprocess.Popen([DRB, "exec", NAME, B, "--", "python3", "-c", GRAB,
                             status(NAME)["socket"], str(EXTENT)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _line(grab.stdout, 10) == "ready"
        os.kill(server_pid(NAME, B), signal.SIGKILL)
        assert _line(grab.stdout, 5) == "got", grab.stderr.read()
        assert _line(grab.stdout, 5) == "closed"
    finally:
        grab.kill()
        grab.wait()
    _other_works(pair)                      # B's disk, served by the next server
    disk = disk_of(NAME, B)
    assert disk["restarts"] == before + 1 and disk["failed"] is None, disk


# A FUSE server of the domain's own, hostile. fd 3 is the disk's connection.
ROGUE = r"""
import errno, json, os, select, struct, sys
mode, fd = sys.argv[1], 3
OUT = struct.Struct("<IiQ")            # fuse_out_header
READ, WRITE, NOTIFY_STORE = 15, 16, 4
stats = {"requests": 0}
def answer(data):
    try:
        os.write(fd, data)
    except OSError:
        pass            # the kernel refuses what it does not take: ENOENT, EINVAL
print("ready", flush=True)
while True:
    select.select([fd], [], [])
    try:
        buf = os.read(fd, (1 << 20) + 8192)
    except BlockingIOError:
        continue
    length, op, unique = struct.unpack_from("<IIQ", buf)
    stats["requests"] += 1
    size = struct.unpack_from("<I", buf, 40 + 16)[0] if op in (READ, WRITE) else 0
    if mode == "phantom":
        # Answers to requests that do not exist, and notices nobody asked
        # for (into the page cache of the disk's inode); the real one never.
        for u in (unique + 2, unique ^ (1 << 62), 0xdeadbeef):
            answer(OUT.pack(16 + 4096, 0, u) + b"P" * 4096)
        answer(OUT.pack(16 + 24 + 4096, NOTIFY_STORE, 0) +
               struct.pack("<QQII", 1, 0, 4096, 0) + b"P" * 4096)
        answer(OUT.pack(16, 12345, 0))
    elif mode == "overlong" and op == READ:
        answer(OUT.pack(16 + size + 4096, 0, unique) + b"O" * (size + 4096))
    elif mode == "short-header" and op == READ:
        answer(OUT.pack(16 + size + 4096, 0, unique) + b"O" * size)
    elif mode == "overclaim" and op == WRITE:
        answer(OUT.pack(16 + 8, 0, unique) + struct.pack("<II", size + 4096, 0))
    elif mode != "stall":
        answer(OUT.pack(16, -errno.EIO, unique))
"""

APP = r"""
import errno, json, os, sys
fd = os.open("/dev/drb/disk", os.O_RDWR)
print("open", flush=True)
op = sys.stdin.readline().strip()
try:
    n = len(os.pread(fd, 65536, 0)) if op == "read" else os.pwrite(fd, b"A" * 65536, 1 << 20)
    print(json.dumps({"ok": n}), flush=True)
except OSError as e:
    print(json.dumps({"errno": errno.errorcode[e.errno]}), flush=True)
"""


def _line(f, timeout):
    if select.select([f], [], [], timeout)[0]:
        return f.readline().strip()
    return None


def _other_works(pair):
    data = os.urandom(16).hex()
    out = in_user(NAME, B, "import os, sys; fd = os.open('/dev/drb/disk', os.O_RDWR); "
                                 "d = bytes.fromhex(sys.argv[1]) * 4096; os.pwrite(fd, d, 5 << 20);"
                                 " print(os.pread(fd, 16, 5 << 20).hex())",
                  data, timeout=30).stdout.strip()
    assert out == data
    assert read_at(pair, 2 * EXTENT + (5 << 20), 16 * 4096) == bytes.fromhex(data) * 4096


@pytest.mark.parametrize("mode,op,want", [
    ("overlong", "read", "EIO"),          # more bytes than the READ asked: refused, EIO
    ("overclaim", "write", "EIO"),        # says it wrote more than it was given: EIO
    ("short-header", "read", None),       # a header longer than its reply: refused, no answer
    ("phantom", "read", None),            # answers for nothing, never the real request
    ("stall", "write", None),             # takes requests, never answers
])
def test_a_hostile_server_hurts_only_its_own_domain(pair, mode, op, want):
    """user1's real server is frozen and a server of the domain's own takes
    its connection (run inside user1, under its profile): the program in
    user1 gets an error or waits; user2's disk works on with its bytes, the
    host's commands answer, and user1's bytes on the device are its own."""
    spid = server_pid(NAME, A)
    mine = read_at(pair, EXTENT, EXTENT)
    app = subprocess.Popen([DRB, "exec", NAME, A, "--", "timeout", "-s", "KILL", "4",
                            "python3", "-c", APP], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    conn = -1
    rogue = out = None
    try:
        assert _line(app.stdout, 10) == "open", app.stderr.read()
        conn = pidfd_getfd(spid, 3)
        os.kill(spid, signal.SIGSTOP)
        r, w = os.pipe()
        rogue = spawn_in_domain(NAME, A, ["python3", "-c", ROGUE, mode], [conn], stdout=w)
        os.close(w)
        out = os.fdopen(r)
        assert _line(out, 10) == "ready"
        app.stdin.write(op + "\n")
        app.stdin.flush()
        got = _line(app.stdout, 1)
        if want is None:
            assert got is None, got           # it waits, killed by its own timeout later
        else:
            assert json.loads(got) == {"errno": want}
        _other_works(pair)
        assert drb("status", NAME, timeout=20).returncode == 0
        assert read_at(pair, EXTENT, EXTENT) == mine   # nothing the hostile server said landed
    finally:
        if rogue is not None:
            rogue.kill()             # the stand-in: the program goes with it
            rogue.wait()
            if out is not None:
                out.close()
        if conn >= 0:
            os.close(conn)
        app.kill()
        app.wait()
        os.kill(spid, signal.SIGCONT)


def test_a_frozen_server_cannot_hold_user_rm(pair):
    """With user1's server stopped and a program waiting on its disk, drb
    user rm user1 ends (the guard is the timeout) and leaves nothing of
    user1: no mount, no connection, no process; user2 works on."""
    spid = server_pid(NAME, A)
    dom = domain_pid(NAME, A)
    group = status(NAME)["domains"][A]["cgroup"]
    procs = cgroup_pids(status(NAME), A)
    conns = fuse_conns_of(dom)
    assert len(conns) == 1
    os.kill(spid, signal.SIGSTOP)
    waiter = subprocess.Popen([DRB, "exec", NAME, A, "--", "dd", "if=/dev/drb/disk",
                               "of=/dev/null", "bs=64k", "count=1", "iflag=direct"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    assert waiter.poll() is None           # it waits on the frozen server
    drb("user", "rm", NAME, A, timeout=60)
    assert waiter.wait(30) != 0
    assert A not in status(NAME)["domains"]
    assert wait_gone(lambda: not any(os.path.exists(f"/proc/{p}") for p in procs), 5)
    assert not os.path.exists(group)
    assert not (conns & host_fuse_conns())
    _other_works(pair)
