"""A file system on the disk, from inside a domain: mkfs.ext4 on the
single-file export, then fuse2fs (libfuse2, which mounts through
fusermount) on it, mounted by drb-fusermount and its trusted side, and
real programs on top: sqlite3, git, tar. fuse2fs and every program run as
the domain's uid, which cannot mount anything itself."""
import os
import subprocess
import sys
import time

import pytest
from fuse_env import Disk, Domain, in_private_ns, need, wait_until

from drb_uring.disk import fusermount as FM
from drb_uring.disk import mount as M

MiB = 1 << 20
UID = 65534


class Service:
    """The trusted side of drb-fusermount, and a PATH on which libfuse
    finds the stand-in under fusermount's name."""

    def __init__(self, root: str):
        self.sock = os.path.join(root, "fusermount.sock")
        r, w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-m", "drb_uring.disk.fusermount",
                                      self.sock, "--ready-fd", str(w)], pass_fds=[w])
        os.close(w)
        os.read(r, 1)
        os.close(r)
        self.bin = os.path.join(root, "bin")
        os.makedirs(self.bin)
        os.symlink(FM.helper_path(), os.path.join(self.bin, "fusermount"))
        self.env = dict(os.environ, PATH=f"{self.bin}:{os.environ['PATH']}",
                        DRB_FUSERMOUNT_SOCKET=self.sock)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def _need_helper():
    if not os.path.exists(FM.helper_path()):
        pytest.skip("drb-fusermount is not built (make build)")


SQL = "".join(
    "BEGIN;\n" + "".join(f"INSERT INTO t VALUES ({t * 100 + i}, '{'x' * 40}{t}-{i}');\n"
                         for i in range(100)) + "COMMIT;\n"
    for t in range(100))


@in_private_ns
def test_fuse2fs_on_the_disk_runs_sqlite_git_and_tar(tmp_path):
    need("fuse2fs", "mkfs.ext4", "e2fsck", "sqlite3", "git", "tar", "diff")
    _need_helper()
    dom = Domain(str(tmp_path / "dom"), uid=UID, gid=UID)
    disk = Disk(dom, str(tmp_path / "backing.img"), 512 * MiB)
    svc = Service(str(tmp_path))
    mnt = os.path.join(dom.root, "mnt")
    os.makedirs(mnt)
    os.chown(mnt, UID, UID)
    f2 = None
    try:
        dom.run("mkfs.ext4", "-q", "-F", disk.path, user=UID)
        # auto_unmount sends libfuse2 straight to fusermount, without
        # opening /dev/fuse (which a domain cannot) or calling mount(2).
        f2 = dom.popen("fuse2fs", disk.path, mnt, "-f", "-o", "fakeroot,auto_unmount",
                       user=UID, env=svc.env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
        assert wait_until(lambda: any(m["mountpoint"] == mnt for m in M.mountinfo(dom.pid)),
                          timeout=20), f2.poll()
        fs = next(m for m in M.mountinfo(dom.pid) if m["mountpoint"] == mnt)
        assert fs["fstype"] == "fuse.ext4" and fs["source"] == disk.path
        line = next(ln for ln in open(f"/proc/{dom.pid}/mountinfo") if f" {mnt} " in ln)
        assert f"user_id={UID}" in line and "nosuid" in line and "nodev" in line

        def sh(script, timeout=300):
            return dom.run("sh", "-ec", script, user=UID, timeout=timeout,
                           env=dict(os.environ, HOME=dom.root)).stdout

        with open(os.path.join(dom.root, "t.sql"), "w") as f:
            f.write(SQL)
        out = sh(f"cd {mnt}; sqlite3 t.db 'CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT)'; "
                 f"sqlite3 t.db < {dom.root}/t.sql; "
                 "sqlite3 t.db 'SELECT count(*), sum(a) FROM t' 'PRAGMA integrity_check'")
        assert out.split() == ["10000|49995000", "ok"], out

        out = sh(f"cd {mnt}; git init -q repo; cd repo; echo hello > f; git add f; "
                 "git -c user.name=t -c user.email=t@example.com commit -qm first; "
                 "git fsck --strict 2>&1; git log --format=%s")
        assert out.strip().splitlines()[-1] == "first", out

        t = time.monotonic()
        sh(f"tar -C /usr/share -cf - doc | tar -C {mnt} -xpf -; "
           f"tar -C {mnt} -cf - doc | tar -C {dom.root} -xpf -")
        took = time.monotonic() - t
        diff = dom.run("diff", "-r", "--no-dereference", "/usr/share/doc", f"{dom.root}/doc",
                       user=UID, check=False)
        assert diff.returncode == 0, (diff.stdout + diff.stderr)[-2000:]
        diff = dom.run("diff", "-r", "--no-dereference", "/usr/share/doc", f"{mnt}/doc",
                       user=UID, check=False)
        assert diff.returncode == 0, (diff.stdout + diff.stderr)[-2000:]
        # Without allow_other the mount is its owner's alone, root included.
        assert dom.run("ls", mnt, check=False).returncode != 0
        print(f"tar of /usr/share/doc in and out: {took:.1f} s")

        # fuse2fs ends cleanly (SIGTERM), unmounting through the stand-in.
        f2.terminate()
        assert f2.wait(60) == 0, f2.stdout.read()
        assert wait_until(lambda: not any(m["mountpoint"] == mnt
                                          for m in M.mountinfo(dom.pid)), timeout=10)
        f2 = None
        fsck = dom.run("e2fsck", "-fn", disk.path, user=UID, check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    finally:
        if f2 is not None:
            f2.kill()
            f2.wait()
        for m in M.mountinfo(dom.pid):
            if m["mountpoint"] == mnt:
                M.unmount(M.Mount(dom.pid, mnt, m["major"], m["minor"]))
        svc.close()
        disk.close()
        dom.close()


STANDIN = r"""
import os, socket, subprocess, sys
helper, opts, path = sys.argv[1:4]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
env = dict(os.environ, _FUSE_COMMFD=str(b.fileno()))
p = subprocess.run([helper, "-o", opts, "--", path], pass_fds=[b.fileno()], env=env,
                   capture_output=True, text=True)
b.close()
if p.returncode:
    print("refused", p.stderr.strip())
    sys.exit(0)
msg, fds, _, _ = socket.recv_fds(a, 1, 1)
print("fd", msg, os.readlink(f"/proc/self/fd/{fds[0]}"))
"""


@in_private_ns
def test_the_stand_in_passes_the_descriptor_and_refuses_what_it_must(tmp_path):
    _need_helper()
    dom = Domain(str(tmp_path / "dom"), uid=UID, gid=UID)
    svc = Service(str(tmp_path))
    mine = os.path.join(dom.root, "mine")
    os.makedirs(mine)
    os.chown(mine, UID, UID)
    theirs = os.path.join(dom.root, "theirs")
    os.makedirs(theirs)
    try:
        def standin(opts, path):
            return dom.run(sys.executable, "-c", STANDIN, FM.helper_path(), opts, path,
                           user=UID, env=svc.env).stdout.strip()

        out = standin("rw,nosuid,nodev,subtype=test", mine)
        # libfuse receives the descriptor as from fusermount: one byte, SCM_RIGHTS.
        assert out == "fd b'\\x00' /dev/fuse", out
        m = next(m for m in M.mountinfo(dom.pid) if m["mountpoint"] == mine)
        assert m["fstype"] == "fuse.test"
        assert "refused" in standin("rw,suid,blkdev", mine)
        assert "not supported" in standin("rw,context=x", mine)
        assert "not owned" in standin("rw", theirs)
        p = dom.run(FM.helper_path(), "-u", "-z", theirs, user=UID, env=svc.env, check=False)
        assert p.returncode == 1 and "not mounted by drb-fusermount" in p.stderr
        dom.run(FM.helper_path(), "-u", "-z", mine, user=UID, env=svc.env)
        assert not any(m["mountpoint"] == mine for m in M.mountinfo(dom.pid))
    finally:
        svc.close()
        dom.close()


def test_option_parsing():
    p = FM.parse_options("rw,nosuid,nodev,allow_other,default_permissions,max_read=131072,"
                         "fsname=/dev/x,subtype=ext4,auto_unmount,ro", allow_other=True)
    assert p == {"allow_other": True, "default_permissions": True, "read_only": True,
                 "max_read": 131072, "subtype": "ext4", "source": "/dev/x"}
    for bad in ("suid=1", "blkdev", "max_read=-1", "fsname=a b", "rootmode=40000", "fd=3",
                "user_id=0"):
        with pytest.raises(FM.Refused):
            FM.parse_options(bad, allow_other=True)
    with pytest.raises(FM.Refused):
        FM.parse_options("allow_other", allow_other=False)
