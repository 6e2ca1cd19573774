"""A disk's server dies and another takes its connection over: the
trusted side keeps its own descriptor of the connection, so the mount
outlives the server; the next server asks the kernel to send again every
request the dead one held (FUSE_NOTIFY_RESEND). The application sees a
delay, never an error, and every write it saw acknowledged is in the
backing file."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

from fuse_env import Disk, Domain, in_private_ns, need, wait_until

from drb_uring.disk import fuse
from drb_uring.disk import mount as M

MiB = 1 << 20

APP = r"""
import os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
print("open", flush=True)
sys.stdin.readline()
os.pwrite(fd, b"R" * 65536, 3 * 65536)
print("written", flush=True)
"""

# Reads one request from the connection and dies without answering it.
THIEF = r"""
import os, select, struct, sys
fd = int(sys.argv[1])
select.select([fd], [], [])
data = os.read(fd, (1 << 20) + 4096)
length, opcode, unique = struct.unpack_from("<IIQ", data)
print(opcode, unique, flush=True)
os.kill(os.getpid(), 9)
"""


@in_private_ns
def test_a_request_the_dead_server_held_is_sent_again(tmp_path):
    dom = Domain(str(tmp_path / "dom"))
    disk = Disk(dom, str(tmp_path / "backing.img"), 4 * MiB)
    try:
        app = dom.popen(sys.executable, "-c", APP, disk.path, user=65534,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert app.stdout.readline().strip() == "open"      # INIT and OPEN answered
        disk.stop()
        thief = subprocess.Popen([sys.executable, "-c", THIEF, str(disk.fd)],
                                 pass_fds=[disk.fd], stdout=subprocess.PIPE, text=True)
        app.stdin.write("go\n")
        app.stdin.flush()
        opcode, unique = map(int, thief.stdout.readline().split())
        assert thief.wait(10) == -signal.SIGKILL
        assert opcode == fuse.FUSE_WRITE
        # The request is the dead thief's: read, never answered.
        assert M.waiting(disk.mount.conn) == 1
        time.sleep(0.2)
        assert app.poll() is None
        disk.start(restart=True)
        assert app.stdout.readline().strip() == "written"
        assert app.wait(10) == 0
        res = disk.stop()
        assert res["resent"] == 1 and res["writes"] == 1, res
        with open(disk.backing, "rb") as f:
            f.seek(3 * 65536)
            assert f.read(65536) == b"R" * 65536
    finally:
        disk.close()
        dom.close()


LOAD = r"""
import hashlib, json, os, random, sys, time
path, out, seconds, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rnd = random.Random(seed)
BLOCK, NBLOCKS = 65536, 128
fd = os.open(path, os.O_RDWR)
blocks = {}               # block -> its content as of the last acknowledged write
worst, ops, seq = 0.0, 0, 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    b = rnd.randrange(NBLOCKS)
    t = time.monotonic()
    if blocks and rnd.random() < 0.4:
        got = os.pread(fd, BLOCK, b * BLOCK)
        if got != bytes(blocks.get(b, bytes(BLOCK))):
            sys.exit(f"block {b} read back wrong")
    else:
        seq += 1
        n = rnd.choice([4096, 16384, BLOCK])
        data = (b"%08d" % seq) * (n // 8)
        if os.pwrite(fd, data, b * BLOCK) != n:
            sys.exit("short write")
        blocks.setdefault(b, bytearray(BLOCK))[:n] = data
    worst = max(worst, time.monotonic() - t)
    ops += 1
acked = {b: hashlib.sha256(bytes(v)).hexdigest() for b, v in blocks.items()}
json.dump({"acked": acked, "worst": worst, "ops": ops}, open(out, "w"))
"""


@in_private_ns
def test_killing_the_server_under_load_costs_a_delay_not_an_error(tmp_path):
    dom = Domain(str(tmp_path / "dom"))
    disk = Disk(dom, str(tmp_path / "backing.img"), 8 * MiB, slot_size=16 << 10,
                slot_count=128)
    try:
        out = os.path.join(dom.root, "load.json")
        app = dom.popen(sys.executable, "-c", LOAD, disk.path, out, "6", "11", user=65534,
                        stderr=subprocess.PIPE, text=True)
        rnd = random.Random(3)
        kills, held = 0, 0
        while app.poll() is None:
            time.sleep(rnd.uniform(0.05, 0.3))
            if app.poll() is not None:
                break
            disk.kill()
            kills += 1
            held += M.waiting(disk.mount.conn)
            time.sleep(rnd.uniform(0, 0.1))
            disk.start(restart=True)
        assert app.wait(30) == 0, app.stderr.read()
        disk.stop()
        assert kills >= 10
        # The kills landed mid-I/O: requests waited for the next server
        # (the resending itself is shown exactly by the test above).
        assert held > 0
        load = json.load(open(out))
        assert load["ops"] > 100
        # A delay: the longest call spanned a death and a restart.
        assert load["worst"] > 0.05, load["worst"]
        with open(disk.backing, "rb") as f:
            for b, sha in load["acked"].items():
                f.seek(int(b) * 65536)
                assert hashlib.sha256(f.read(65536)).hexdigest() == sha, b
    finally:
        disk.close()
        dom.close()


@in_private_ns
def test_dd_through_server_deaths(tmp_path):
    need("dd")
    dom = Domain(str(tmp_path / "dom"))
    disk = Disk(dom, str(tmp_path / "backing.img"), 32 * MiB)
    src = os.path.join(dom.root, "src")
    with open(src, "wb") as f:
        f.write(os.urandom(32 * MiB))
    try:
        for argv in (["dd", f"if={src}", f"of={disk.path}", "bs=16k", "oflag=direct",
                      "conv=notrunc,fsync"],
                     ["dd", f"if={disk.path}", f"of={src}.back", "bs=16k", "iflag=direct"]):
            app = dom.popen(*argv, user=65534, stderr=subprocess.PIPE, text=True)
            kills = 0
            while app.poll() is None and kills < 6:
                time.sleep(0.1)
                disk.kill()
                kills += 1
                disk.start(restart=True)
            assert app.wait(60) == 0, app.stderr.read()
        disk.stop()
        data = open(src, "rb").read()
        assert open(disk.backing, "rb").read() == data
        assert open(f"{src}.back", "rb").read() == data
    finally:
        disk.close()
        dom.close()


@in_private_ns
def test_the_connection_ends_when_the_last_descriptor_goes(tmp_path):
    # Without the trusted side's copy a dead server takes the connection
    # with it: applications get ENOTCONN at once instead of waiting.
    dom = Domain(str(tmp_path / "dom"))
    disk = Disk(dom, str(tmp_path / "backing.img"), MiB)
    try:
        os.close(disk.fd)
        disk.fd = os.open("/dev/null", os.O_RDONLY)
        disk.kill()
        p = dom.python("import os,sys; os.open(sys.argv[1], os.O_RDONLY)", disk.path,
                       user=65534, check=False)
        assert "Transport endpoint is not connected" in p.stderr, p.stderr
        assert wait_until(lambda: not os.path.exists(f"{M.FUSECTL}/{disk.mount.conn}")
                          or M.waiting(disk.mount.conn) == 0)
    finally:
        M.detach(dom.pid, disk.path)
        os.close(disk.fd)
        dom.close()
