"""Bringing pairs up and down, and running commands inside them.

What ``drb up``, ``drb down``, ``drb exec``, ``drb status`` and the demo
call. A pair's daemon (domains.daemon) does the work; this module starts it,
waits for it, stops it, and removes what a dead one left behind, using only
the pair's state directory and the kernel's own lists.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time

from drb_uring import procs
from drb_uring.domains import attach, backing, cgroup, daemon, journal, runtime, seccomp
from drb_uring.domains.config import (
    MIN_SIZE,
    PairConfig,
    check_name,
    check_share,
    split_device,
    user_index,
)
from drb_uring.domains.state import (
    RUN,
    PairError,
    daemon_pid,
    domain_alive,
    domain_names,
    group_dir,
    make_state_dir,
    private_file,
    read_state,
    record_daemon,
    release_ids,
    remove_run_if_empty,
    require_root,
    state_dir,
)


def teardown_leftovers(name: str) -> list[str]:
    """Remove what a pair whose daemon is gone left behind: its containers,
    the mounts it made in attached containers, its groups in every cgroup
    hierarchy, its host ids and its state. Returns what it did."""
    done = []
    d = state_dir(name)
    st = read_state(name) or {}
    root = os.path.join(d, "runc")
    if os.path.isdir(root):
        for cid in os.listdir(root):
            subprocess.run([runtime.runc(), "--root", root, "delete", "--force", cid],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
            done.append(f"removed container {cid}")
    for role in domain_names(st):
        dm = st["domains"][role]
        if domain_alive(st, role):
            for dst, made in reversed(dm.get("mounts") or []):
                attach.unbind(dm["pid"], dst, made)
                done.append(f"unmounted {dst} in the {role} container")
    try:
        g = group_dir(name)
    except cgroup.CgroupError:
        g = None
    if g and os.path.isdir(g):
        runtime.remove_pair_groups(name)
        done.append(f"removed cgroup {g}")
    if os.path.isdir(d):
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d}")
    release_ids(name)
    remove_run_if_empty()
    return done


def _check_device(cfg: PairConfig) -> None:
    """What can be said about the device before anything starts."""
    if cfg.blockdev:
        if not os.path.exists(cfg.blockdev):
            raise PairError(f"block device {cfg.blockdev} does not exist")
        if not stat.S_ISBLK(os.stat(cfg.blockdev).st_mode):
            raise PairError(f"{cfg.blockdev} is not a block device")
        os.close(backing.take(cfg.blockdev, False, cfg.exclusive))   # not mounted, not held
        return
    if cfg.backing:
        path = cfg.backing
        if not os.path.exists(path):
            raise PairError(f"backing file {path} does not exist")
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise PairError(f"backing file {path} is a directory; give a file "
                            "(or --size to make one)")
        if not stat.S_ISREG(st.st_mode):
            raise PairError(f"backing file {path} is not a regular file "
                            "(use --blockdev for a block device)")
        if st.st_size < MIN_SIZE:
            raise PairError(f"backing file {path} is too small "
                            f"({st.st_size} bytes; at least 1 MiB)")
        if not cfg.attached:
            split_device(st.st_size, cfg.users, cfg.extent)   # the user domains fit
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise PairError(f"backing file {path} is on a read-only file system")
        if not os.access(path, os.W_OK):
            raise PairError(f"backing file {path} is not writable")
        backing.check_mode(path, cfg.force)
        os.close(backing.take(path, False, cfg.exclusive))      # no other pair holds it
        return
    # A new backing file, under the pair's state directory.
    free = os.statvfs(os.path.dirname(RUN) if not os.path.isdir(RUN) else RUN)
    room = free.f_bavail * free.f_frsize
    if cfg.size > room:
        raise PairError(f"--size {cfg.size >> 20} MiB is more than the {room >> 20} MiB "
                        f"free on {RUN}; use a smaller --size, or --backing on a larger "
                        "file system")


def _preflight(cfg: PairConfig) -> None:
    require_root()
    cgroup.cgroup2_root()
    if not cfg.attached:
        runtime.runc()
    seccomp.domain_profile("user")        # the base profile is there and readable
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise PairError("bcc is missing: install python3-bpfcc (make setup does)") from None
    _check_device(cfg)
    shares = [check_share(x) for x in cfg.share]
    for host, _inside in shares:
        if not os.path.isdir(host):
            raise PairError(f"--share: {host} is not a directory on the host")
    for role, rootfs in (("user", cfg.user_rootfs), ("driver", cfg.driver_rootfs)):
        if rootfs:
            runtime.check_rootfs(rootfs, role, shares if role == "user" else ())
    pid = daemon_pid(cfg.name)
    if pid:
        raise PairError(f"pair {cfg.name!r} is already up (daemon pid {pid})")
    if os.path.exists(state_dir(cfg.name)):
        raise PairError(f"pair {cfg.name!r} left state behind; run: drb down {cfg.name}")


def start_pair(cfg: PairConfig) -> dict:
    """Start a pair's daemon in the background and wait until it is up;
    returns its state. Interrupted (Ctrl-C) or failed, it leaves nothing:
    the daemon is stopped and everything it made removed."""
    _preflight(cfg)
    d = make_state_dir(cfg.name)
    try:
        r, w = os.pipe()
        with private_file(os.path.join(d, "daemon.log"), "ab") as log:
            # Its own session: the pair outlives this command, and a Ctrl-C
            # here reaches it only as the orderly stop below.
            proc = procs.spawn("drb_uring.domains.daemon",
                               daemon.DaemonSpec(config=cfg.to_dict(), ready_fd=w),
                               [w], start_new_session=True, stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log)
        os.close(w)
        record_daemon(cfg.name, proc.pid)
        with os.fdopen(r) as rf:
            line = rf.readline().strip()
        if line != "ok":
            proc.wait(30)
            raise PairError(line.removeprefix("error: ")
                            or "the pair's daemon died while starting")
        return read_state(cfg.name)
    except BaseException:
        with _no_interrupts():
            stop_pair(cfg.name)
        raise


class _no_interrupts:
    """Finish a tear-down whatever the terminal sends meanwhile."""

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)


def run_pair_here(cfg: PairConfig) -> int:
    """The daemon in this process, logging to stderr (drb up --foreground)."""
    _preflight(cfg)
    make_state_dir(cfg.name)
    record_daemon(cfg.name, os.getpid())
    return daemon.run(cfg, ready_fd=-1, log_to_stderr=True)


def stop_pair(name: str) -> list[str]:
    """Stop a pair's daemon (it takes everything down) and remove whatever
    is left. Returns what it did, one line per thing."""
    require_root()
    check_name(name)
    pid = daemon_pid(name)
    did = []
    ended = None      # why the pair ended, when its daemon could not say so itself
    if pid:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while time.monotonic() < end and daemon_pid(name) == pid:
            time.sleep(0.02)
        if daemon_pid(name) == pid:
            os.kill(pid, signal.SIGKILL)
            did.append(f"daemon {pid} did not stop; killed it")
            ended = f"its daemon {pid} did not stop and was killed"
        else:
            did.append(f"stopped daemon {pid}")
    elif read_state(name) is not None:
        ended = "its daemon was gone; drb down removed what it left"
    did += teardown_leftovers(name)
    if ended:
        journal.Journal(name)("pair-down", reason=ended)
    return did


def check_role(role: str) -> None:
    if role != "driver" and user_index(role) < 0:
        raise PairError(f"no domain {role!r}: say driver, user (user0), user1, ...")


def exec_in(name: str, role: str, cmd: list[str], **kw) -> subprocess.Popen:
    """Start `cmd` inside a domain of a running pair: "driver", or a user
    domain "user0", "user1", ... ("user" is user0)."""
    require_root()
    check_name(name)
    check_role(role)
    st = read_state(name)
    if st is None or not daemon_pid(name):
        raise PairError(f"pair {name!r} is not up")
    if role not in st["domains"]:
        have = ", ".join(r for r in domain_names(st) if r != "driver") or "none"
        raise PairError(f"pair {name!r} has no user domain "
                        f"{'user0' if role == 'user' else role} (it has: {have})")
    dm = st["domains"][role]
    if not domain_alive(st, role):
        raise PairError(f"the {role} domain of pair {name!r} (pid {dm['pid']}) is gone; "
                        f"take the pair down with: drb down {name}")
    if dm.get("runc_id"):
        return subprocess.Popen([runtime.runc(), "--root", st["runc_root"], "exec", "--cwd", "/",
                                 dm["runc_id"], *_found_or_say(cmd, role)], **kw)
    deny = tuple(st["deny"]) if role != "driver" else ()
    std = {}
    for k in ("stdin", "stdout", "stderr"):
        v = kw.get(k)
        if v == subprocess.PIPE:
            raise PairError("a pipe to a command in an attached container is not supported")
        std[k] = procs.NULL if v == subprocess.DEVNULL else v
    return attach.spawn_joined(dm["pid"], cmd, role=role, deny=deny, **std)


def _found_or_say(cmd: list[str], role: str) -> list[str]:
    """`cmd`, run through the domain's sh so that a command the domain does
    not have is one line of ours (exit 127, as a shell says it) rather than
    runc's log line."""
    say = (f'echo "drb exec: $0: no such command in the {role} domain (its /usr is the '
           'host'"'"'s; a host directory gets in with drb up --share)" >&2')
    return ["/bin/sh", "-c", f'command -v -- "$0" >/dev/null 2>&1 || {{ {say}; exit 127; }}; '
            'exec "$0" "$@"', *cmd]


def ask_daemon(name: str, msg: dict, timeout: float = 120) -> dict:
    """Send one request to a running pair's daemon on its host-only control
    socket and return the reply (a DrbError carries the daemon's refusal)."""
    import socket

    from drb_uring import protocol
    require_root()
    check_name(name)
    st = read_state(name)
    if st is None or not daemon_pid(name):
        raise PairError(f"pair {name!r} is not up")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with s:
        s.settimeout(timeout)
        s.connect(st["control"])
        reply = protocol.request(s, msg)
    return reply


def add_user(name: str, attach_pid: int | None = None, extent: int | None = None,
             **more) -> dict:
    """A user domain more for a running pair (drb user add); returns its
    name and state. `more`: the attached container's id, its root before
    pivot_root (rootfs) and whether it asks for the pair's disk (the OCI
    hook's)."""
    return ask_daemon(name, {"op": "user_add", "attach": attach_pid, "extent": extent, **more})


def remove_user(name: str, user: str) -> dict:
    """Take one user domain of a running pair down (drb user rm)."""
    if user_index(user) < 0:
        raise PairError(f"not a user domain: {user!r} (user0, user1, ...)")
    return ask_daemon(name, {"op": "user_rm", "user": user})
