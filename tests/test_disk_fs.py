"""A user domain's disk with a file system on it (drb up --disk --fs ext4),
from inside the domain, with unchanged programs: sqlite3, git, tar and fio
on /data; the file system is found again after drb down and drb up on the
same backing file; and a frozen disk server cannot hold drb down.

One pair for the whole module (real domains, via the CLI); each test
leaves it as the next one needs it, the last one takes it down."""
import json
import os
import signal
import subprocess
import time

import pytest
from disk_env import (
    domain_pid,
    fuse_conns_of,
    host_fuse_conns,
    in_user,
    read_at,
    server_pid,
    sh,
    status,
)
from pair_env import DRB, drb, leftovers, monitor_args, wait_gone

PREFIX = "dsk-tf"
NAME = f"{PREFIX}-a"
MiB = 1 << 20
SIZE = 128 * MiB
EXT4_MAGIC_AT, EXT4_MAGIC = 1024 + 0x38, b"\x53\xef"

SQLITE = """
import json, subprocess
sql = ["CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT);"]
for t in range(100):
    sql.append("BEGIN;")
    sql += [f"INSERT INTO t VALUES ({t * 100 + i}, '{'x' * 40}{t}-{i}');" for i in range(100)]
    sql.append("COMMIT;")
sql += ["SELECT count(*), sum(k) FROM t;", "PRAGMA integrity_check;"]
p = subprocess.run(["sqlite3", "/data/app.db"], input="\\n".join(sql), text=True,
                   capture_output=True)
print(json.dumps([p.returncode, p.stdout.split(), p.stderr.strip()]))
"""


def _doc_subset(limit=6 * MiB) -> list[str]:
    """Entries of /usr/share/doc, in order, up to about `limit` bytes: a
    few hundred files, which keeps the suite quick (the FUSE tests tar the
    whole of it)."""
    names, total = [], 0
    for name in sorted(os.listdir("/usr/share/doc")):
        for root, _dirs, files in os.walk(os.path.join("/usr/share/doc", name)):
            total += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
        names.append(name)
        if total >= limit:
            break
    return names


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    backing = tmp_path_factory.mktemp("dskfs") / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    drb("up", NAME, "--backing", str(backing), "--disk", "--fs", "ext4", *monitor_args())
    try:
        yield str(backing)
    finally:
        drb("down", NAME, check=False)
        assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)


def test_the_domain_has_a_file_system_of_its_own(pair):
    st = status(NAME)
    disk = st["domains"]["user0"]["disk"]
    assert disk["fs"] == "ext4" and disk["fs_mount"] == "/data" and disk["size"] == SIZE
    assert st["domains"]["user0"]["extent"] == [0, SIZE]
    server_pid(NAME)         # a live process of the user domain's cgroup
    # mkfs ran inside the domain; the superblock is on the device.
    assert read_at(pair, EXT4_MAGIC_AT, 2) == EXT4_MAGIC
    log = open(f"/run/drb/{NAME}/daemon.log").read()
    assert "formatting /dev/drb/disk with ext4" in log
    assert "not serving within" not in log     # the server said it serves, at once
    # Its owners are the domain's own (its root is 0, not an unmapped host id).
    out = sh(NAME, "user", "stat -c '%u %g %F' /data /data/lost+found; "
                           "grep -E ' /data | /dev/drb/disk ' /proc/self/mountinfo").stdout
    lines = out.splitlines()
    assert lines[:2] == ["0 0 directory", "0 0 directory"], out
    assert any("fuse.ext4" in x and "user_id=0," in x for x in lines), out


def test_sqlite_ten_thousand_inserts_in_transactions(pair):
    out = in_user(NAME, "user", SQLITE, timeout=120).stdout.strip()
    rc, rows, err = json.loads(out)
    assert rc == 0 and not err, out
    assert rows == [f"10000|{sum(range(10000))}", "ok"], rows


def test_git_init_and_a_commit(pair):
    out = sh(NAME, "user", "cd /data && git init -q repo && cd repo && "
                           "echo 'on the drb disk' > README && git add README && "
                           "git -c user.name=drb -c user.email=drb@localhost commit -qm first && "
                           "git fsck --strict 2>&1 && git log --format=%s").stdout
    assert out.strip().splitlines()[-1] == "first", out


def test_tar_into_the_file_system_and_back(pair):
    names = _doc_subset()
    listed = " ".join(names)
    sh(NAME, "user", f"mkdir -p /data/doc && cd /usr/share/doc && tar -cf - {listed} | "
                     "tar -C /data/doc -xf -", timeout=180)
    # Back out of /data, compared with the original: contents, modes,
    # times, owners and links (tar --diff says nothing when all match).
    out = sh(NAME, "user", f"cd /data/doc && tar -cf - {listed} | tar -C /usr/share/doc -df - "
                           "&& echo same", timeout=180).stdout
    assert out.strip() == "same", out[-2000:]


def test_fio_on_the_file_system(pair):
    p = sh(NAME, "user", "fio --directory=/data --name=dsk --rw=randwrite --bs=4k --size=8m "
                         "--ioengine=psync --fsync=64 --verify=crc32c --do_verify=1 "
                         "--output-format=json", timeout=120)
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 8 * MiB, job
    assert job["read"]["io_bytes"] == 8 * MiB        # the verify pass read it all back


def test_the_file_system_is_found_again_after_down_and_up(pair):
    conns = fuse_conns_of(domain_pid(NAME))
    drb("down", NAME)
    assert not (conns & host_fuse_conns())      # both connections ended with the pair
    drb("up", NAME, "--backing", pair, "--disk", "--fs", "ext4", *monitor_args())
    log = open(f"/run/drb/{NAME}/daemon.log").read()
    assert "holds an ext4 file system: mounted as it is" in log and "formatting" not in log
    out = sh(NAME, "user", "sqlite3 /data/app.db 'SELECT count(*) FROM t; PRAGMA "
                           "integrity_check;' && cd /data/repo && git log --format=%s && "
                           "stat -c %u /data/repo/.git").stdout.split()
    assert out == ["10000", "ok", "first", "0"], out
    names = " ".join(_doc_subset())
    out = sh(NAME, "user", f"cd /data/doc && tar -cf - {names} | tar -C /usr/share/doc -df - "
                           "&& echo same", timeout=180).stdout
    assert out.strip() == "same", out[-2000:]


def test_a_frozen_server_cannot_hold_drb_down(pair):
    """SIGSTOP the disk's server while a program waits on /data: drb down
    still ends (the guard is the timeout), and leaves no mount, connection
    or process behind."""
    pid = server_pid(NAME)
    dom = domain_pid(NAME)
    conns = fuse_conns_of(dom)
    assert len(conns) == 2                  # the disk, and /data on it
    os.kill(pid, signal.SIGSTOP)
    reader = subprocess.Popen([DRB, "exec", NAME, "user", "--", "sh", "-c",
                               "cat /data/repo/README > /dev/null; sync /data/repo/README"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    t0 = time.monotonic()
    drb("down", NAME, timeout=60)
    took = time.monotonic() - t0
    reader.wait(30)
    gone = lambda p: not os.path.exists(f"/proc/{p}")       # noqa: E731 - reaped, not a zombie
    assert wait_gone(lambda: gone(dom) and gone(pid), 5), \
        [open(f"/proc/{p}/status").read()[:200] for p in (dom, pid) if not gone(p)]
    assert not (conns & host_fuse_conns())
    with open("/proc/self/mountinfo") as f:
        assert NAME not in f.read()
    assert wait_gone(lambda: not leftovers(PREFIX), 10), leftovers(PREFIX)
    print(f"drb down with a frozen disk server: {took:.1f} s")
