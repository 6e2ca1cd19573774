"""FUSE over io_uring (the fuse module's enable_uring, 7.42's
FUSE_OVER_IO_URING): the same export with requests taken from
IORING_OP_URING_CMD entries on the /dev/fuse descriptor instead of read(),
and answered with COMMIT_AND_FETCH. It works; it is not the default,
because a server's death loses the requests its ring entries held, which
FUSE_NOTIFY_RESEND does not send again (the last test shows it)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from fuse_env import URING_PARAM, Disk, Domain, in_private_ns, need, wait_until

from drb_uring.disk import mount as M

MiB = 1 << 20


def _enable():
    if not os.path.exists(URING_PARAM):
        pytest.skip("this kernel's fuse has no enable_uring (CONFIG_FUSE_IO_URING)")
    old = open(URING_PARAM).read().strip()
    with open(URING_PARAM, "w") as f:
        f.write("Y")
    return old


def _restore(old):
    with open(URING_PARAM, "w") as f:
        f.write(old)


RW = r"""
import os, sys, random
path = sys.argv[1]
rnd = random.Random(5)
fd = os.open(path, os.O_RDWR)
want = bytearray(os.pread(fd, 8 << 20, 0))
for i in range(300):
    n = rnd.choice([1, 4096, 65536, 131072, 300000, 1 << 20])
    off = rnd.randrange(0, (8 << 20) - n)
    data = os.urandom(n)
    assert os.pwrite(fd, data, off) == n
    want[off:off + n] = data
    o = rnd.randrange(0, (8 << 20) - n)
    assert os.pread(fd, n, o) == want[o:o + n]
os.fsync(fd)
assert os.pread(fd, 8 << 20, 0) == want
"""


@in_private_ns
def test_requests_come_on_the_ring(tmp_path):
    need("fio")
    old = _enable()
    dom = Domain(str(tmp_path / "dom"))
    # The ring is the trusted side's, restricted to IORING_OP_URING_CMD.
    disk = Disk(dom, str(tmp_path / "backing.img"), 8 * MiB, fill=os.urandom(8 * MiB),
                uring=True, slot_size=128 << 10, slot_count=32, trusted_ring=True)
    try:
        dom.python(RW, disk.path, user=65534)
        dom.run("fio", "--name=v", f"--filename={disk.path}", "--size=8m", "--rw=randwrite",
                "--bs=4k", "--ioengine=libaio", "--iodepth=32", "--direct=1",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output=/dev/null",
                user=65534, timeout=120)
        res = disk.stop()
        # INIT (and the read that found nothing more) came through read();
        # every other request came on a ring entry.
        assert res["dev_reads"] <= 4, res
        assert res["requests"] > 4000 and res["uring_enters"] > 0, res
        assert res["max_inflight"] >= 8, res
    finally:
        disk.close()
        dom.close()
        _restore(old)


HOLD = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
try:
    os.pwrite(fd, b"w" * 4096, 0)
    print("written", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
"""


@in_private_ns
def test_a_server_death_loses_what_its_ring_held(tmp_path):
    old = _enable()
    dom = Domain(str(tmp_path / "dom"))
    disk = Disk(dom, str(tmp_path / "backing.img"), MiB, uring=True,
                slot_size=128 << 10, slot_count=8)
    try:
        app = dom.popen(sys.executable, "-c", HOLD, disk.path, user=65534,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "open"
        disk.server.send_signal(signal.SIGSTOP)
        app.stdin.write("go\n")
        app.stdin.flush()
        assert wait_until(lambda: M.waiting(disk.mount.conn) >= 1)
        disk.kill()
        disk.start(restart=True)
        time.sleep(1)
        # Either the write failed (ECANCELED: the kernel handed it to the
        # dying server's ring) or it waits for good: never "written".
        done = app.poll() is not None
        out = app.stdout.readline().split() if done else ["waiting"]
        print("after the death:", out)
        assert out[0] in ("error", "waiting"), out
        if out[0] == "error":
            assert int(out[1]) == 125, out           # ECANCELED
        M.abort(disk.mount.conn)
        if not done:
            out = app.stdout.readline().split()
            assert out[0] == "error", out
        app.wait(10)
    finally:
        disk.close()
        dom.close()
        _restore(old)
