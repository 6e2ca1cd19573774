"""What the disk's tests share: a private mount namespace per test, a
"domain" (a process in a mount namespace of its own), and a disk (a backing
file, a FUSE connection the test keeps, its mount in the domain, a server).

Every test runs in a forked child that first enters a private mount
namespace, so nothing it mounts (FUSE files, fusectl, fuse2fs) is ever
seen outside it, and everything goes with the child: the namespace's last
process gone, its mounts go too. The pytest process itself never changes
namespace.
"""
from __future__ import annotations

import functools
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import pytest

from drb_uring import linux
from drb_uring.disk import mount as M
from drb_uring.disk import server as S

URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def in_private_ns(fn):
    """Run the test in a forked child inside a private mount namespace;
    its failure (or skip) is reported here. Its `tmp_path` is a tmpfs
    mounted there, on a directory any uid may enter (pytest's own are
    0700, which a domain's uid could not walk through)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        work = tempfile.mkdtemp(prefix="drb-fuse-")
        os.chmod(work, 0o755)
        if "tmp_path" in kwargs:
            kwargs["tmp_path"] = pathlib.Path(work)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:     # the child: never returns into pytest
            os.close(r)
            code, msg = 0, b""
            try:
                os.setsid()
                linux.private_mount_namespace()
                linux.mount("tmpfs", work, "tmpfs", 0, "mode=755,size=2g")
                fn(*args, **kwargs)
            except pytest.skip.Exception as e:
                code, msg = 3, str(e).encode()
            except BaseException:
                code, msg = 1, traceback.format_exc().encode()
            try:
                os.write(w, msg[-60000:])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(w)
        out = b""
        while chunk := os.read(r, 65536):
            out += chunk
        os.close(r)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        # Whatever the test started in its own session is gone with it.
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(work, ignore_errors=True)
        if code == 3:
            pytest.skip(out.decode())
        if code != 0:
            pytest.fail(f"in the private namespace (exit {code}):\n{out.decode()}",
                        pytrace=False)
    return wrapper


def wait_until(cond, timeout=10.0, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


class Domain:
    """A process in a mount namespace of its own (a copy of the test's), as
    a user domain would be; commands run in it with nsenter, as any uid."""

    def __init__(self, root: str, uid: int = 65534, gid: int = 65534):
        self.root = root
        self.uid, self.gid = uid, gid
        os.makedirs(root, exist_ok=True)
        os.chown(root, uid, gid)
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private",
                                      "sleep", "100000"])
        mine = os.stat("/proc/self/ns/mnt").st_ino
        assert wait_until(lambda: os.stat(f"/proc/{self.proc.pid}/ns/mnt").st_ino != mine)
        self.pid = self.proc.pid

    def cmd(self, *argv, user: int | None = None) -> list[str]:
        pre = ["nsenter", "-t", str(self.pid), "-m", "--"]
        if user is not None:
            pre += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return pre + [str(a) for a in argv]

    def run(self, *argv, user: int | None = None, check=True, timeout=60, **kw):
        p = subprocess.run(self.cmd(*argv, user=user), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode:
            raise AssertionError(f"{argv} exited {p.returncode}: {p.stderr}{p.stdout}")
        return p

    def popen(self, *argv, user: int | None = None, **kw) -> subprocess.Popen:
        return subprocess.Popen(self.cmd(*argv, user=user), **kw)

    def python(self, code: str, *args, user: int | None = None, timeout=120, check=True):
        return self.run(sys.executable, "-c", code, *args, user=user, timeout=timeout,
                        check=check)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Disk:
    """A backing file served as a single-file FUSE export in `domain`. The
    test keeps its own descriptor of the connection (the trusted side's),
    so servers may come and go."""

    def __init__(self, domain: Domain, backing: str, size: int, *, name="disk",
                 mode=0o600, fill: bytes | None = None, start=True, trusted_ring=False,
                 **spec):
        self.trusted_ring = trusted_ring
        self.domain = domain
        self.backing = backing
        with open(backing, "wb") as f:
            if fill is None:
                f.truncate(size)
            else:
                f.write(fill)
        self.path = os.path.join(domain.root, name)
        self.fd = M.open_device()
        self.mount = M.mount_file(self.fd, domain.pid, self.path, domain.uid, domain.gid,
                                  mode=mode)
        self.spec = S.DiskServerSpec(backing=backing, uid=domain.uid, gid=domain.gid,
                                     mode=mode, **spec)
        self.server = None
        self.results: list[dict] = []
        if start:
            self.start()

    def start(self, restart: bool = False, **changes) -> None:
        assert self.server is None
        spec = self.spec.replace(restart=restart, **changes)
        ring = None
        if spec.uring and self.trusted_ring:
            # As for a server in a domain: the ring is made here and inherited.
            ring, params = S.trusted_ring(spec.slot_count)
            spec = spec.replace(uring_params=params)
        try:
            self.server = S.spawn(spec, self.fd, ring_fd=ring, stdout=self._out())
        finally:
            if ring is not None:
                os.close(ring)

    def _out(self):
        # The server's last line (why it ended, its counters) goes to a file.
        self.outfile = open(f"{self.backing}.server-{len(self.results)}", "w+")
        return self.outfile.fileno()

    def _collect(self) -> dict:
        self.outfile.seek(0)
        lines = self.outfile.read().strip().splitlines()
        self.outfile.close()
        import json
        res = json.loads(lines[-1]) if lines else {}
        self.results.append(res)
        return res

    def stop(self, timeout=10) -> dict:
        """SIGTERM: the server answers what is in flight and exits."""
        self.server.send_signal(signal.SIGTERM)
        assert self.server.wait(timeout) == 0
        self.server = None
        return self._collect()

    def kill(self) -> None:
        """SIGKILL, and wait until it is reaped (what a restart must do)."""
        self.server.kill()
        self.server.wait()
        self.server = None
        self._collect()

    def wait_end(self, timeout=10) -> dict:
        assert self.server.wait(timeout) == 0
        self.server = None
        return self._collect()

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            self.server = None
        M.unmount(self.mount)
        os.close(self.fd)


def need(*programs):
    for p in programs:
        if shutil.which(p) is None:
            pytest.skip(f"{p} is not installed (apt-get install {p})")
