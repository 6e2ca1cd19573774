"""A user domain's disk, as its pair's daemon keeps it (drb up --disk).

The trusted side opens /dev/fuse and mounts the connection onto a regular
file inside the user domain (/dev/drb/disk by default: nosuid, nodev, a
file root, the domain's root as its owner), keeps its own descriptor of the
connection, and starts the server (drb_uring.disk.server) inside the user
domain, under its seccomp profile, on a channel of the user domain's whole
extent: the domain's own frontend, as blkfront is a Xen guest's. A server
that dies is started again on the same connection and asks the kernel to
resend what the dead one held (FUSE_NOTIFY_RESEND): an application sees a
delay, not an error. Taking the disk away aborts the connection through
fusectl first and detaches the mount lazily: a frozen server blocks nothing.

With a file system (--fs ext4) the disk is formatted once, inside the user
domain (mkfs.ext4 on /dev/drb/disk, never a host parser), and mounted at
/data (--fs-mount) by fuse2fs, run in the domain; its `fusermount` is
drb-fusermount, whose trusted side (drb_uring.disk.fusermount) mounts for it.

Whom it distrusts: the user domain. Nothing here reads, stats or walks a
path inside its FUSE mounts (a frozen server would block the caller); the
mount point is made as the domain's own user; the server and fuse2fs run as
the domain's processes, confined as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import signal
import subprocess
import sys
import time

from drb_uring import procs
from drb_uring.disk import mount
from drb_uring.disk.server import DiskServerSpec

log = logging.getLogger("drb.disk")

RESTART_LIMIT = 5          # server deaths in RESTART_WINDOW seconds before the disk gives up
RESTART_WINDOW = 10.0
STOP_GRACE = 2.0
SERVER_START = 30.0        # seconds a disk server may take to serve
EXT4_MAGIC_AT = 1024 + 0x38        # the superblock's s_magic
EXT4_MAGIC = b"\x53\xef"
SLOT_SIZE = 128 << 10
SLOT_COUNT = 64


@dataclasses.dataclass(frozen=True)
class DiskConfig:
    path: str = "/dev/drb/disk"
    fs: str | None = None              # "ext4", or None: the raw disk only
    fs_mount: str = "/data"
    page_cache: bool = False


def _makedirs_as(path: str, uid: int) -> str:
    """mkdir -p, as `uid` (the domain's own /dev and /tmp are its user
    namespace's: host root has no mapping there)."""
    mount._setfs(uid, uid)
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    finally:
        mount._setfs(0, 0)
    return path


class UserDisk:
    """One user domain's disk. `spawn_in(argv, fds, log_path, env=None)`
    starts a program inside the user domain as its root and returns (the
    process standing in for it, its pid); `watch(fd, cb)` / `unwatch(fd)`
    hook the daemon's loop."""

    def __init__(self, user: str, domain_pid: int, host_uid: int, size: int, socket: str,
                 cfg: DiskConfig, state_dir: str, spawn_in, watch, unwatch, run_until,
                 on_change=lambda: None):
        self.user = user
        self.pid = domain_pid
        self.uid = host_uid
        self.size = size
        self.socket = socket
        self.cfg = cfg
        self.dir = state_dir
        # The daemon's loop must go on while a server starts (it opens its
        # channel through the broker): run_until(done, timeout) turns it.
        self.spawn_in, self.watch, self.unwatch = spawn_in, watch, unwatch
        self.run_until = run_until
        self.on_change = on_change      # what info() says changed (a server started)
        self.fd = -1
        self.m: mount.Mount | None = None
        self.server = None              # (stand-in, pid, pidfd)
        self.deaths: list[float] = []
        self.stopping = False
        self.failed: str | None = None
        self.fs_proc = None             # fuse2fs's stand-in
        self.fusermount = None          # its trusted side (a host process)
        self.restarts = 0

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, f"{self.user}.disk.log")

    # ---- up ----------------------------------------------------------------------------

    def up(self) -> None:
        mount.ensure_fusectl()
        self.fd = mount.open_device()
        mount.in_namespace(self.pid, _makedirs_as, os.path.dirname(self.cfg.path), self.uid)
        self.m = mount.mount_file(self.fd, self.pid, self.cfg.path, self.uid, self.uid,
                                  mode=0o600)
        self._start_server(restart=False)

    def _start_server(self, restart: bool) -> None:
        spec = DiskServerSpec(channel=self.socket, size=self.size, slot_size=SLOT_SIZE,
                              slot_count=SLOT_COUNT, mode=0o600, uid=self.uid, gid=self.uid,
                              mtime=int(time.time()), page_cache=self.cfg.page_cache,
                              restart=restart)
        argv = ["/usr/bin/python3", "-P", "-m", "drb_uring.disk.server",
                spec.replace(ready_fd=True).to_json()]
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            child, pid = self.spawn_in(argv, [self.fd, ready_w], self.log_path)
        finally:
            os.close(ready_w)
        try:
            # Serving once it wrote its byte (its channel is open by then);
            # the runc exec standing in for it holds a copy of the pipe's
            # end, so its close alone would not show. Ended: not serving.
            served = self.run_until(lambda: bool(select.select([ready_r], [], [], 0)[0])
                                    or child.poll() is not None, SERVER_START)
            served = served and bool(select.select([ready_r], [], [], 0)[0]) \
                and os.read(ready_r, 1) == b"r"
        finally:
            os.close(ready_r)
        try:
            pidfd = os.pidfd_open(child.pid)
        except ProcessLookupError:
            pidfd = -1
        self.server = (child, pid, pidfd, _pidfd(pid))
        if pidfd >= 0:
            self.watch(pidfd, self._server_gone)
        if not served:
            log.error("%s: disk server %d not serving within %.0f s", self.user, pid,
                      SERVER_START)
        log.info("%s: disk server pid %d%s", self.user, pid, " (resending)" if restart else "")
        self.on_change()

    def _server_gone(self) -> None:
        """The server died (or ended): a new one on the same connection,
        which asks the kernel to resend what the dead one held. Only once
        the dead one is reaped: nothing it submitted is still running."""
        child, pid, pidfd, own = self.server
        self.unwatch(pidfd)
        os.close(pidfd)
        rc = child.wait()
        _close(own)
        self.server = None
        if self.stopping:
            return
        now = time.monotonic()
        self.deaths = [d for d in self.deaths if now - d < RESTART_WINDOW] + [now]
        if len(self.deaths) > RESTART_LIMIT:
            self.failed = (f"the disk server died {len(self.deaths)} times in "
                           f"{RESTART_WINDOW:.0f} s (last status {rc}): not started again")
            log.error("%s: %s", self.user, self.failed)
            if self.m is not None:
                mount.abort(self.m.conn)        # the disk answers ENOTCONN now
            self.on_change()
            return
        log.warning("%s: disk server %d ended (status %d); starting another", self.user,
                    pid, rc)
        self.restarts += 1
        self._start_server(restart=True)

    # ---- the file system on it ----------------------------------------------------------

    def formatted(self, backing_fd: int, base: int) -> bool:
        """Whether the disk holds an ext4 superblock, read on the host from
        the device (never through the FUSE mount)."""
        return os.pread(backing_fd, 2, base + EXT4_MAGIC_AT) == EXT4_MAGIC

    def mkfs(self, run_in) -> None:
        """mkfs.ext4 on the disk, inside the user domain (the file system's
        code runs in the sandbox, never in the host kernel)."""
        rc, out = run_in(["/usr/sbin/mkfs.ext4", "-q", "-F", "-L", "drb-data", self.cfg.path])
        if rc != 0:
            raise OSError(f"mkfs.ext4 in {self.user} failed ({rc}): {out.strip()[-300:]}")

    def mount_fs(self, run_in, sock_host: str, sock_inside: str) -> None:
        """fuse2fs in the user domain, mounting through drb-fusermount,
        whose trusted side runs here on the host."""
        r, w = os.pipe2(os.O_CLOEXEC)
        with open(self.log_path, "ab") as out:
            self.fusermount = subprocess.Popen(
                [sys.executable, "-P", "-m", "drb_uring.disk.fusermount", sock_host,
                 "--ready-fd", str(w)], pass_fds=[w], env=procs.module_env(),
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            f.read()                    # closed once it listens (or it died)
        if self.fusermount.poll() is not None:
            raise OSError(f"drb-fusermount's trusted side did not start; see {self.log_path}")
        bin_dir = "/run/drb-bin"
        rc, out = run_in(["/bin/sh", "-c", f"mkdir -p {bin_dir} && ln -sf "
                          f"/run/drb-lib/drb_uring/disk/drb-fusermount {bin_dir}/fusermount"])
        if rc != 0:
            raise OSError(f"placing drb-fusermount in {self.user} failed: {out}")
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin:/usr/sbin:/sbin",
               "DRB_FUSERMOUNT_SOCKET": sock_inside}
        child, pid = self.spawn_in(
            ["/usr/bin/fuse2fs", self.cfg.path, self.cfg.fs_mount, "-f",
             "-o", "fakeroot,allow_other,auto_unmount"], [], self.log_path, env=env)
        self.fs_proc = (child, _pidfd(pid))

    # ---- down --------------------------------------------------------------------------

    def down(self) -> None:
        """Take the disk away whatever its server does. fuse2fs first, given
        STOP_GRACE to write back and leave; then every connection is
        aborted (nothing waits on a server after that, frozen or not),
        detached, and the processes killed by their own pidfds (SIGKILL to
        a runc exec standing in for one is not passed on)."""
        self.stopping = True
        if self.fs_proc is not None:
            child, own = self.fs_proc
            _signal(own, signal.SIGTERM)
            try:
                child.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                pass
        fs = None
        if self.cfg.fs:
            try:
                fs = mount.find(self.pid, self.cfg.fs_mount)
            except (OSError, ProcessLookupError):
                pass
        for m in (fs, self.m):
            if m is not None:
                try:
                    mount.unmount(m)
                except (OSError, ProcessLookupError) as e:
                    log.warning("%s: detaching %s: %s", self.user, m.path, e)
        self.m = None
        if self.fs_proc is not None:
            child, own = self.fs_proc
            _signal(own, signal.SIGKILL)
            _wait_or_kill(child)
            _close(own)
            self.fs_proc = None
        if self.fusermount is not None:
            self.fusermount.terminate()
            _wait_or_kill(self.fusermount)
            self.fusermount = None
        if self.server is not None:
            child, _pid, pidfd, own = self.server
            self.unwatch(pidfd)
            _signal(own, signal.SIGKILL)
            _wait_or_kill(child)
            _close(pidfd)
            _close(own)
            self.server = None
        _close(self.fd)
        self.fd = -1

    def info(self) -> dict:
        return {"path": self.cfg.path, "size": self.size,
                "server_pid": self.server[1] if self.server else 0,
                "restarts": self.restarts, "failed": self.failed,
                "fs": self.cfg.fs, "fs_mount": self.cfg.fs_mount if self.cfg.fs else None}


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1


def _signal(pidfd: int, sig: int) -> None:
    if pidfd >= 0:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _wait_or_kill(proc, grace: float = STOP_GRACE) -> None:
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bring_up(pair, u) -> UserDisk:
    """User domain `u` of `pair` (a domains.daemon.Pair) gets its disk: its
    whole extent, as a file inside; with --fs, a file system on it,
    formatted once, inside the domain."""
    a, b = pair.cfg, pair.broker
    u.disk = disk = UserDisk(
        u.name, pair.pids[u.name], u.host_id, u.extent[1], pair.inside_sock,
        DiskConfig(path=a.disk_path, fs=a.fs, fs_mount=a.fs_mount,
                   page_cache=a.disk_page_cache), pair.dir,
        lambda argv, fds, log_path, env=None: pair.spawn_in(u.name, argv, fds, log_path,
                                                             env=env),
        b.watch, b.unwatch, b.run_until, on_change=lambda: _state_changed(pair))
    disk.up()
    if a.fs:
        def run(argv):
            return pair.run_in(u.name, argv)
        if disk.formatted(b.device.fd, u.extent[0]):
            log.info("%s: %s holds an ext4 file system: mounted as it is", u.name, a.disk_path)
        else:
            log.info("%s: formatting %s with ext4, inside the domain", u.name, a.disk_path)
            disk.mkfs(run)
        disk.mount_fs(run, os.path.join(u.sock_dir, "fusermount.sock"),
                      f"/run/drb/{pair.name}/fusermount.sock")
    return disk


def _state_changed(pair) -> None:
    # Before the pair is up there is no state to refresh; it is written then.
    if pair.state.get("domains"):
        try:
            pair.write_state()
        except OSError as e:
            log.warning("writing the pair's state: %s", e)


def state_of(u) -> dict:
    """The disk's part of user domain `u`'s state (nothing for a driver)."""
    if u is None:
        return {}
    return {"disk": u.disk.info() if u.disk is not None else None}
