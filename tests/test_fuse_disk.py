"""The single-file FUSE export, mounted into a domain's mount namespace
and served from a local file: what an application there sees, and what the
trusted side can do to the mount whatever state its server is in.

Each test runs in a private mount namespace of its own (fuse_env)."""
import json
import os
import signal
import stat
import time

import pytest
from fuse_env import Disk, Domain, in_private_ns, need, wait_until

from drb_uring.disk import mount as M

MiB = 1 << 20


def _setup(tmp_path, size=16 * MiB, **kw):
    dom = Domain(str(tmp_path / "dom"))
    fill = os.urandom(size) if kw.pop("random", False) else None
    disk = Disk(dom, str(tmp_path / "backing.img"), size, fill=fill, **kw)
    return dom, disk


def _teardown(dom, disk):
    disk.close()
    dom.close()


@in_private_ns
def test_the_file_is_the_domain_users_and_only_the_domain_sees_it(tmp_path):
    dom, disk = _setup(tmp_path, size=8 * MiB)
    try:
        out = dom.python("import os,sys,json; s=os.stat(sys.argv[1]); "
                         "print(json.dumps([s.st_mode, s.st_uid, s.st_gid, s.st_size, "
                         "s.st_blksize, s.st_ino]))", disk.path, user=65534).stdout
        mode, uid, gid, size, blksize, ino = json.loads(out)
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600
        assert (uid, gid, size, blksize, ino) == (65534, 65534, 8 * MiB, 4096, 1)
        mine = [m for m in M.mountinfo() if m["mountpoint"] == disk.path]
        assert mine == []                  # the test's own namespace has no such mount
        line = next(ln for ln in open(f"/proc/{dom.pid}/mountinfo")
                    if f" {disk.path} " in ln and " - fuse " in ln)
        opts = line.split()[5].split(",")
        assert "nosuid" in opts and "nodev" in opts
        assert "user_id=65534" in line and "allow_other" in line
        assert "default_permissions" in line
        # fusectl names the connection by the superblock's dev_t.
        M.ensure_fusectl()
        assert os.path.isdir(f"{M.FUSECTL}/{disk.mount.conn}")
        assert M.waiting(disk.mount.conn) == 0
    finally:
        _teardown(dom, disk)


READ_WRITE = r"""
import os, sys, random
path, out = sys.argv[1], sys.argv[2]
rnd = random.Random(7)
fd = os.open(path, os.O_RDWR)
want = bytearray(os.pread(fd, 16 << 20, 0))
for i in range(200):
    n = rnd.choice([1, 512, 4096, 65536, 65537, 200000, 1 << 20])
    off = rnd.randrange(0, (16 << 20) - n)
    data = os.urandom(n)
    assert os.pwrite(fd, data, off) == n
    want[off:off + n] = data
    m = rnd.choice([1, 4096, 300000, 1 << 20])
    o = rnd.randrange(0, (16 << 20) - m)
    assert os.pread(fd, m, o) == want[o:o + m], (o, m)
os.fsync(fd)
assert os.pread(fd, 16 << 20, 0) == want
os.close(fd)
open(out, "wb").write(want)
"""


@in_private_ns
def test_reads_and_writes_of_every_size_split_over_slots(tmp_path):
    # 64 KiB slots: a 1 MiB request is 16 backend requests.
    dom, disk = _setup(tmp_path, random=True, slot_size=64 << 10, slot_count=64)
    try:
        want = os.path.join(dom.root, "want")
        dom.python(READ_WRITE, disk.path, want, user=65534)
        with open(disk.backing, "rb") as f, open(want, "rb") as g:
            assert f.read() == g.read()
        res = disk.stop()
        assert res["end"] == "stopped" and res["writes"] >= 200 and res["reads"] >= 200
    finally:
        _teardown(dom, disk)


@in_private_ns
def test_other_users_are_refused_by_the_mode(tmp_path):
    dom, disk = _setup(tmp_path, size=MiB)
    try:
        p = dom.python("import os,sys; os.open(sys.argv[1], os.O_RDONLY)", disk.path,
                       user=1000, check=False)
        assert p.returncode != 0 and "PermissionError" in p.stderr
    finally:
        _teardown(dom, disk)


END = r"""
import errno, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = 4 << 20
assert os.pread(fd, 4096, size) == b""
assert len(os.pread(fd, 8192, size - 100)) == 100
assert os.pwrite(fd, b"y" * 8192, size - 4096) == 4096
try:
    os.pwrite(fd, b"z", size)
    raise SystemExit("a write at the end of the disk succeeded")
except OSError as e:
    assert e.errno == errno.ENOSPC, e
print("ok")
"""


@in_private_ns
def test_the_disk_has_an_end(tmp_path):
    dom, disk = _setup(tmp_path, size=4 * MiB)
    try:
        assert dom.python(END, disk.path, user=65534).stdout.strip() == "ok"
    finally:
        _teardown(dom, disk)


TRUNC = r"""
import errno, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
os.pwrite(fd, b"k" * 4096, 1 << 20)
os.close(fd)
# O_TRUNC is ignored, as a block device ignores it: size and data stay.
fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
os.pwrite(fd, b"a" * 4096, 0)
os.close(fd)
assert os.stat(path).st_size == 4 << 20
fd = os.open(path, os.O_RDWR)
assert os.pread(fd, 4096, 1 << 20) == b"k" * 4096
for what, call in (("ftruncate", lambda: os.ftruncate(fd, 4096)),
                   ("chmod", lambda: os.chmod(path, 0o644)),
                   ("chown", lambda: os.chown(path, 0, 0))):
    try:
        call()
        raise SystemExit(what + " succeeded")
    except OSError as e:
        assert e.errno == errno.EPERM, (what, e)
os.utime(path, (1, 1))     # times are taken, and not kept
assert os.stat(path).st_size == 4 << 20
print("ok")
"""


@in_private_ns
def test_a_disk_keeps_its_size_and_its_owner(tmp_path):
    dom, disk = _setup(tmp_path, size=4 * MiB)
    try:
        assert dom.python(TRUNC, disk.path, user=65534).stdout.strip() == "ok"
        # dd without conv=notrunc works as on a block device.
        dom.run("dd", "if=/dev/zero", f"of={disk.path}", "bs=4k", "count=1", user=65534)
        assert os.path.getsize(disk.backing) == 4 * MiB
    finally:
        _teardown(dom, disk)


SYNC = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def fallocate(fd, mode, off, n):
    if libc.fallocate(fd, mode, ctypes.c_long(off), ctypes.c_long(n)) < 0:
        raise OSError(ctypes.get_errno(), "fallocate")
fd = os.open(sys.argv[1], os.O_RDWR)
os.pwrite(fd, b"q" * 65536, 0)
os.fsync(fd)
os.fdatasync(fd)
fallocate(fd, 0x01 | 0x02, 4096, 8192)           # KEEP_SIZE | PUNCH_HOLE
try:
    fallocate(fd, 0, 0, 8 << 20)                 # growing: not a disk's
    raise SystemExit("growing fallocate succeeded")
except OSError as e:
    assert e.errno == 95, e                       # EOPNOTSUPP
st = os.statvfs(sys.argv[1])
assert (st.f_bsize, st.f_blocks) == (4096, (4 << 20) // 4096), st
print("ok")
"""


@in_private_ns
def test_fsync_fallocate_and_statfs(tmp_path):
    dom, disk = _setup(tmp_path, size=4 * MiB)
    try:
        assert dom.python(SYNC, disk.path, user=65534).stdout.strip() == "ok"
        data = open(disk.backing, "rb").read(65536)
        assert data == b"q" * 4096 + bytes(8192) + b"q" * (65536 - 12288)
        res = disk.stop()
        assert res["flushes"] == 2
    finally:
        _teardown(dom, disk)


@in_private_ns
def test_many_requests_in_flight_with_async_direct_io(tmp_path):
    need("fio")
    dom, disk = _setup(tmp_path, size=32 * MiB)
    try:
        dom.run("fio", "--name=v", f"--filename={disk.path}", "--size=32m", "--rw=randwrite",
                "--bs=4k", "--ioengine=libaio", "--iodepth=32", "--direct=1",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output=/dev/null",
                user=65534, timeout=120)
        res = disk.stop()
        # FUSE_ASYNC_DIO: one caller's 32 requests reach the server at once.
        assert res["max_inflight"] >= 16, res
        assert res["writes"] >= 8192 and res["reads"] >= 8192, res
    finally:
        _teardown(dom, disk)


@in_private_ns
def test_page_cache_mode_writes_through(tmp_path):
    dom, disk = _setup(tmp_path, size=4 * MiB, page_cache=True)
    try:
        dom.python("import os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
                   "os.pwrite(fd, b'c'*10000, 5000); "
                   "assert os.pread(fd, 10000, 5000) == b'c'*10000", disk.path, user=65534)
        # No writeback cache: an answered write is in the backing file.
        assert open(disk.backing, "rb").read()[5000:15000] == b"c" * 10000
    finally:
        _teardown(dom, disk)


HANG = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
sys.stdin.readline()
try:
    os.pread(fd, 4096, 0)
    print("read")
except OSError as e:
    print("error", e.errno)
"""


@in_private_ns
def test_abort_frees_the_mount_of_a_frozen_server_without_blocking(tmp_path):
    dom, disk = _setup(tmp_path, size=MiB)
    try:
        import subprocess
        app = dom.popen(os.sys.executable, "-c", HANG, disk.path, user=65534,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "open"
        disk.server.send_signal(signal.SIGSTOP)
        app.stdin.write("go\n")
        app.stdin.flush()
        # The read waits on the frozen server; the trusted side does not.
        assert wait_until(lambda: M.waiting(disk.mount.conn) >= 1)
        t = time.monotonic()
        M.unmount(disk.mount)
        assert time.monotonic() - t < 2
        out = app.stdout.read().split()
        app.wait(10)
        assert out[0] == "error" and int(out[1]) in (103, 107), out   # ECONNABORTED, ENOTCONN
        assert not any(m["mountpoint"] == disk.path for m in M.mountinfo(dom.pid))
        disk.server.send_signal(signal.SIGCONT)
        assert disk.wait_end()["end"] == "aborted"
    finally:
        os.close(disk.fd)
        dom.close()


@in_private_ns
def test_detaching_the_mount_ends_the_server(tmp_path):
    dom, disk = _setup(tmp_path, size=MiB)
    try:
        M.detach(dom.pid, disk.path)
        assert disk.wait_end()["end"] == "unmounted"
    finally:
        os.close(disk.fd)
        dom.close()


@in_private_ns
def test_the_mount_point_must_be_the_users_own_regular_file(tmp_path):
    dom = Domain(str(tmp_path / "dom"))
    fd = M.open_device()
    try:
        planted = os.path.join(dom.root, "planted")
        open(planted, "w").close()            # root's, not the domain's
        with pytest.raises(PermissionError):
            M.mount_file(fd, dom.pid, planted, 65534, 65534)
        link = os.path.join(dom.root, "link")
        os.symlink("/etc/hostname", link)
        with pytest.raises(PermissionError):
            M.mount_file(fd, dom.pid, link, 65534, 65534)
        # Where the domain's uid cannot write, nothing is created.
        with pytest.raises(PermissionError):
            M.mount_file(fd, dom.pid, str(tmp_path / "x"), 65534, 65534)
        assert not os.path.exists(tmp_path / "x")
        assert not [m for m in M.mountinfo(dom.pid) if m["fstype"] == "fuse"]
    finally:
        os.close(fd)
        dom.close()


def test_a_pidfd_tells_a_live_process_from_a_reused_pid():
    import subprocess
    p = subprocess.Popen(["sleep", "100"])
    pidfd = os.pidfd_open(p.pid)
    try:
        assert M.pidfd_pid(pidfd) == p.pid
        p.kill()
        p.wait()
        assert M.pidfd_pid(pidfd) == -1
        # What took the pid since, if anything, is not who asked.
        with pytest.raises(ProcessLookupError):
            M.in_namespace(os.getpid(), os.getpid, pidfd=pidfd)
    finally:
        os.close(pidfd)
