"""Domains made by runc, the OCI runtime Docker and containerd use.

drb writes an OCI bundle for each domain (a ``config.json`` and a nearly
empty root to pivot into) and lets runc make, enter and remove it. What
each domain is:

- its own user namespace: root inside is an unprivileged host id, a range
  of its own (allocated in domains.state), with no capability at all;
- its own mount, pid, ipc, uts, net and cgroup namespaces;
- a read-only root: read-only binds of the host's /usr (the merged-/usr
  links make /bin and /lib) and of the drb_uring package at
  /run/drb-lib/drb_uring; a fresh /proc with runc's masked and read-only
  paths; a read-only /sys; tmpfs /tmp and /run; runc's minimal /dev. The
  user domain also sees its broker's socket directory, and nothing else of
  /run/drb; nothing of other pairs, of the checkout or of cgroupfs;
- no_new_privs, the seccomp profile of domains.seccomp, and limits on
  processes and memory;
- its cgroup v2 group at <cgroup2>/drb/PAIR/ROLE, made by drb first, so
  that the cgroup-BPF policies are on it before anything runs inside.

runc's state for a pair lives in /run/drb/PAIR/runc, which no domain sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import drb_uring
from drb_uring import procs
from drb_uring.domains import cgroup, seccomp
from drb_uring.domains.state import private_file
from drb_uring.errors import DrbError

ID_SIZE = 65536
# PYTHONPATH inside a domain. Under /run, which is a tmpfs in a domain (and
# writable in most containers), so that a mount point can be made there
# even when the root is read-only.
PACKAGE_AT = "/run/drb-lib"
PYTHON = "/usr/bin/python3"
# runc 1.1's `runc spec` defaults.
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
          "/proc/scsi",
          # The host's block devices, and what backs them: a loop device's
          # backing_file names a host path (a pair's own backing file among
          # them), /proc/partitions and the block lists name the host's disks.
          "/sys/block", "/sys/class/block", "/sys/devices/virtual/block", "/sys/dev/block",
          "/proc/partitions", "/proc/diskstats", "/sys/kernel/debug", "/proc/swaps"]
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
ENV = ["PATH=/usr/bin:/usr/sbin:/bin:/sbin", "HOME=/tmp", "LANG=C.UTF-8",
       f"PYTHONPATH={PACKAGE_AT}", "PYTHONDONTWRITEBYTECODE=1"]


def python_argv(module: str, spec) -> list[str]:
    """`python -m module SPEC` as a domain runs it: its own python3, drb's
    package from PACKAGE_AT."""
    return [PYTHON, "-P", "-m", module, spec.to_json()]


class RuntimeError_(DrbError):
    pass


def runc() -> str:
    path = shutil.which("runc")
    if not path:
        raise RuntimeError_("runc is missing: install the Debian package runc (make setup does)")
    return path


def package_dir() -> str:
    """The directory holding the drb_uring package that runs here (installed
    or the source tree with its in-place build)."""
    return str(Path(drb_uring.__file__).resolve().parent)


@dataclasses.dataclass
class DomainSpec:
    pair: str
    role: str                         # "user0", "user1", ... or "driver"
    host_id: int                      # root inside is this host uid and gid
    deny: tuple[str, ...] = ()        # socket families refused (user domain)
    socket_dir: str | None = None     # host dir shown at /run/drb/PAIR (user domain)
    rootfs: str | None = None         # an unpacked image to use as root
    pids: int = 512
    memory: int = 4 << 30
    io_uring: bool = False            # may drive a handed io_uring (drb bench's direct)
    shares: tuple[tuple[str, str], ...] = ()   # (host dir, domain dir), shown read-only
    own_dirs: tuple[str, ...] = ()    # mount points the domain's root owns (a file system's)


class Domain:
    """One domain: its bundle, its container, its cgroup."""

    def __init__(self, state_dir: str, spec: DomainSpec):
        self.spec = spec
        self.root = os.path.join(state_dir, "runc")
        self.bundle = os.path.join(state_dir, "bundles", spec.role)
        self.id = f"drb-{spec.pair}-{spec.role}"
        self.group = os.path.join(cgroup.cgroup2_root(), "drb", spec.pair, spec.role)
        self.log = os.path.join(state_dir, f"{spec.role}.runc.log")

    # ---- the bundle ----------------------------------------------------------

    def _rootfs(self) -> str:
        if self.spec.rootfs:
            return os.path.abspath(self.spec.rootfs)
        rootfs = os.path.join(self.bundle, "rootfs")
        os.makedirs(rootfs, mode=0o755, exist_ok=True)
        for link in ("bin", "sbin", "lib", "lib64"):
            os.symlink(f"usr/{link}", os.path.join(rootfs, link))
        # Every mount point on the root exists beforehand: the root is host
        # root's, and runc init, the domain's root already, may not make
        # them (those under /run it makes in the tmpfs).
        for d in ("usr", "proc", "sys", "dev", "tmp", "run", "etc",
                  *(inside.lstrip("/") for _host, inside in self.spec.shares)):
            os.makedirs(os.path.join(rootfs, d), exist_ok=True)
        for d in self.spec.own_dirs:
            path = os.path.join(rootfs, d.lstrip("/"))
            os.makedirs(path, exist_ok=True)
            os.chown(path, self.spec.host_id, self.spec.host_id)
        etc = {"passwd": "root:x:0:0:root:/tmp:/bin/sh\n"
                         "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
               "group": "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n",
               "hostname": f"{self.hostname}\n",
               "hosts": f"127.0.0.1 localhost {self.hostname}\n",
               "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n"}
        for name, text in etc.items():
            with open(os.path.join(rootfs, "etc", name), "w") as f:
                f.write(text)
        return rootfs

    @property
    def hostname(self) -> str:
        return f"{self.spec.pair}-{self.spec.role}"

    def config(self, rootfs: str) -> dict:
        s = self.spec
        ro = ["bind", "ro", "nosuid", "nodev"]
        mounts = [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/run", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "nodev", "noexec", "mode=755", "size=16384k"]},
            {"destination": f"{PACKAGE_AT}/drb_uring", "type": "bind", "source": package_dir(),
             "options": ro},
        ]
        if not s.rootfs:
            mounts.insert(6, {"destination": "/usr", "type": "bind", "source": "/usr",
                              "options": ro})
        for host, inside in s.shares:
            # Read-only, as `docker -v HOST:DIR:ro`: a way in for programs.
            mounts.append({"destination": inside, "type": "bind", "source": host,
                           "options": ["rbind", "ro", "nosuid", "nodev"]})
        if s.socket_dir:
            # A directory, not the socket file: a bind of a file would keep
            # an old inode if the socket were made again.
            mounts.append({"destination": f"/run/drb/{s.pair}", "type": "bind",
                           "source": s.socket_dir,
                           "options": ["bind", "nosuid", "nodev", "noexec"]})
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False, "user": {"uid": 0, "gid": 0}, "cwd": "/",
                "args": [PYTHON, "-P", "-m", "drb_uring.domains.init"],
                "env": ENV,
                "capabilities": {k: [] for k in ("bounding", "effective", "inheritable",
                                                 "permitted", "ambient")},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}],
                "noNewPrivileges": True,
            },
            "root": {"path": rootfs, "readonly": True},
            "hostname": self.hostname,
            "mounts": mounts,
            "linux": {
                "uidMappings": [{"containerID": 0, "hostID": s.host_id, "size": ID_SIZE}],
                "gidMappings": [{"containerID": 0, "hostID": s.host_id, "size": ID_SIZE}],
                "namespaces": [{"type": t} for t in ("user", "pid", "ipc", "uts", "mount",
                                                     "network", "cgroup")],
                "cgroupsPath": f"/drb/{s.pair}/{s.role}",
                "resources": {"devices": [{"allow": False, "access": "rwm"}],
                              "pids": {"limit": s.pids}, "memory": {"limit": s.memory}},
                "maskedPaths": MASKED,
                "readonlyPaths": READ_ONLY,
                "seccomp": seccomp.domain_profile(s.role, s.deny, io_uring=s.io_uring),
            },
        }

    def write_bundle(self) -> None:
        # Traversable: runc init reaches the root as the domain's root.
        for d in (os.path.dirname(self.bundle), self.bundle):
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o711)
        rootfs = self._rootfs()
        with private_file(os.path.join(self.bundle, "config.json")) as f:
            json.dump(self.config(rootfs), f, indent=1)

    # ---- the container ---------------------------------------------------------

    def _runc(self, *args: str, capture: bool = False,
              timeout: float = 30) -> subprocess.CompletedProcess:
        # A detached container keeps runc's stdio: never a pipe then, or
        # reading it would wait for the container's end.
        with private_file(self.log, "ab") as log:
            proc = subprocess.run([runc(), "--root", self.root, *args], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE if capture else log, stderr=log,
                                  timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError_(f"runc {args[0]} {self.id} failed: {self.last_log_line()}")
        return proc

    def last_log_line(self) -> str:
        try:
            with open(self.log, "rb") as f:
                lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
        except OSError:
            return "no log"
        return lines[-1] if lines else "no message"

    def start(self) -> None:
        """Write the bundle, make the cgroup (the caller attaches its
        policies) and run the container detached. Its output goes to the
        log: a detached container holds on to runc's stdio."""
        self.write_bundle()
        # runc run -d returns once the init is exec'd.
        self._runc("run", "--detach", "--bundle", self.bundle, self.id)

    @property
    def pid(self) -> int:
        """The host pid of the domain's init."""
        state = json.loads(self._runc("state", self.id, capture=True).stdout)
        return int(state["pid"])

    def exec_argv(self, cmd: list[str], preserve_fds: int = 0,
                  pid_file: str | None = None, uid: int | None = None) -> list[str]:
        """The command line that runs `cmd` inside the domain, with the
        domain's limits and filters (fds 3..3+preserve_fds-1 kept), as the
        domain's root or as user and group `uid` of the domain."""
        argv = [runc(), "--root", self.root, "exec"]
        if preserve_fds:
            argv += ["--preserve-fds", str(preserve_fds)]
        if pid_file:
            argv += ["--pid-file", pid_file]
        if uid is not None:
            argv += ["--user", f"{uid}:{uid}"]
        return argv + ["--cwd", "/", self.id, *cmd]

    def spawn(self, cmd: list[str], fds: list[int], out: int, uid: int | None = None):
        """Start `cmd` inside the domain (fds[i] as its fd 3 + i, output to
        `out`): (the runc exec standing in for it, the program's own pid,
        or the stand-in's if runc never said)."""
        with tempfile.TemporaryDirectory(dir=os.path.dirname(self.root)) as tmp:
            pid_file = os.path.join(tmp, "pid")
            child = procs.spawn_at(self.exec_argv(cmd, preserve_fds=len(fds),
                                                  pid_file=pid_file, uid=uid),
                                   fds, stdout=out, stderr=out)
            for _ in range(2000):
                if os.path.exists(pid_file) or child.poll() is not None:
                    break
                time.sleep(0.005)
            try:
                with open(pid_file) as f:
                    return child, int(f.read())
            except (OSError, ValueError):
                return child, child.pid

    def stop(self) -> None:
        """Kill and remove the container (idempotent)."""
        if os.path.isdir(os.path.join(self.root, self.id)):
            subprocess.run([runc(), "--root", self.root, "delete", "--force", self.id],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)


def _inside(rootfs: str, path: str) -> str:
    """`path` of the root `rootfs`, with its symlinks resolved inside it
    (an absolute link means the domain's /, not the host's)."""
    cur = rootfs
    parts = [p for p in path.split("/") if p]
    for _ in range(64):
        if not parts:
            return cur
        nxt = os.path.join(cur, parts.pop(0))
        if os.path.islink(nxt):
            target = os.readlink(nxt)
            parts = [p for p in target.split("/") if p] + parts
            if target.startswith("/"):
                cur = rootfs
            continue
        cur = nxt
    raise RuntimeError_(f"too many symbolic links under {rootfs} for {path}")


def check_rootfs(rootfs: str, role: str, shares=()) -> None:
    """What a domain's own root must hold, named if missing: drb's python3,
    the worker's liburing (driver), and every mount point (runc cannot make
    one in a root it does not own)."""
    if not os.path.isdir(rootfs):
        raise RuntimeError_(f"--{role}-rootfs {rootfs}: not a directory")
    missing = []
    if not os.path.isfile(_inside(rootfs, PYTHON)):
        missing.append(f"{PYTHON} (drb's {'worker' if role == 'driver' else 'client'} "
                       "runs on it)")
    if role == "driver" and not any(os.path.exists(_inside(rootfs, f"{d}/liburing.so.2"))
                                    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib",
                                              "/lib/x86_64-linux-gnu", "/lib")):
        missing.append("liburing.so.2 (the worker's io_uring library)")
    for d in ("/proc", "/sys", "/dev", "/tmp", "/run",
              *(inside for _host, inside in shares)):
        if not os.path.isdir(_inside(rootfs, d)):
            missing.append(f"the mount point {d}")
    if missing:
        raise RuntimeError_(f"--{role}-rootfs {rootfs} lacks: {'; '.join(missing)}")


def _group_roots() -> set[str]:
    """Every cgroup hierarchy drb's groups may be in (a hybrid layout has
    one per v1 controller, and the unified one)."""
    base = "/sys/fs/cgroup"
    roots = {cgroup.cgroup2_root()}
    if os.path.isdir(base):
        roots |= {os.path.join(base, d) for d in os.listdir(base)
                  if os.path.isdir(os.path.join(base, d, "drb"))}
    return roots


def remove_domain_groups(pair: str, role: str) -> None:
    """One domain's groups, in every hierarchy (a user domain removed from
    a running pair)."""
    for root in _group_roots():
        g = os.path.join(root, "drb", pair, role)
        if os.path.isdir(g):
            cgroup.kill_and_remove(g)


def remove_pair_groups(pair: str) -> None:
    """runc leaves the pair's parent groups in every hierarchy (a hybrid
    layout has one per v1 controller, and the unified one): remove them."""
    for root in _group_roots():
        g = os.path.join(root, "drb", pair)
        if os.path.isdir(g):
            cgroup.kill_and_remove(g)
        try:
            os.rmdir(os.path.join(root, "drb"))
        except OSError:
            pass
