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
import subprocess
import time

from drb_uring import procs
from drb_uring.domains import cgroup, daemon, nsutil
from drb_uring.domains.config import PairConfig, check_name
from drb_uring.domains.state import (
    RUN,
    PairError,
    daemon_pid,
    group_dir,
    read_state,
    remove_if_empty,
    require_root,
    state_dir,
)


def teardown_leftovers(name: str) -> list[str]:
    """Remove what a pair whose daemon is gone left behind. Returns what it did."""
    done = []
    try:
        g = group_dir(name)
    except cgroup.CgroupError:
        g = None
    if g and os.path.isdir(g):
        cgroup.kill_and_remove(g)
        done.append(f"removed cgroup {g}")
    if g:
        remove_if_empty(os.path.dirname(g))
    d = state_dir(name)
    if os.path.isdir(d):
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d}")
    remove_if_empty(RUN)
    return done


def _preflight(cfg: PairConfig) -> None:
    require_root()
    cgroup.cgroup2_root()
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise PairError("bcc is missing: install python3-bpfcc (make setup does)") from None
    if cfg.backing and not os.path.exists(cfg.backing):
        raise PairError(f"backing file {cfg.backing} does not exist")
    if cfg.blockdev and not os.path.exists(cfg.blockdev):
        raise PairError(f"block device {cfg.blockdev} does not exist")
    pid = daemon_pid(cfg.name)
    if pid:
        raise PairError(f"pair {cfg.name!r} is already up (daemon pid {pid})")
    if os.path.exists(state_dir(cfg.name)):
        raise PairError(f"pair {cfg.name!r} left state behind; run: drb down {cfg.name}")


def start_pair(cfg: PairConfig) -> dict:
    """Start a pair's daemon in the background and wait until it is up;
    returns its state."""
    _preflight(cfg)
    d = state_dir(cfg.name)
    os.makedirs(d, mode=0o700)
    r, w = os.pipe()
    with open(os.path.join(d, "daemon.log"), "ab") as log:
        proc = procs.spawn("drb_uring.domains.daemon", daemon.DaemonSpec(config=cfg.to_dict(),
                                                                          ready_fd=w),
                           [w], start_new_session=True, stdin=subprocess.DEVNULL,
                           stdout=log, stderr=log)
    os.close(w)
    with open(os.path.join(d, "daemon.pid"), "w") as f:
        f.write(str(proc.pid))
    with os.fdopen(r) as rf:
        line = rf.readline().strip()
    if line != "ok":
        proc.wait(30)
        teardown_leftovers(cfg.name)
        raise PairError(line.removeprefix("error: ") or "the pair's daemon died while starting")
    return read_state(cfg.name)


def run_pair_here(cfg: PairConfig) -> int:
    """The daemon in this process, logging to stderr (drb up --foreground)."""
    _preflight(cfg)
    os.makedirs(state_dir(cfg.name), mode=0o700)
    with open(os.path.join(state_dir(cfg.name), "daemon.pid"), "w") as f:
        f.write(str(os.getpid()))
    return daemon.run(cfg, ready_fd=-1, log_to_stderr=True)


def stop_pair(name: str) -> list[str]:
    """Stop a pair's daemon (it takes everything down) and remove whatever
    is left. Returns what it did, one line per thing."""
    require_root()
    check_name(name)
    pid = daemon_pid(name)
    did = []
    if pid:
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 15
        while time.monotonic() < end and daemon_pid(name) == pid:
            time.sleep(0.02)
        if daemon_pid(name) == pid:
            os.kill(pid, signal.SIGKILL)
            did.append(f"daemon {pid} did not stop; killed it")
        else:
            did.append(f"stopped daemon {pid}")
    did += teardown_leftovers(name)
    return did


def exec_in(name: str, role: str, cmd: list[str], **kw) -> subprocess.Popen:
    """Start `cmd` inside a domain of a running pair."""
    require_root()
    check_name(name)
    st = read_state(name)
    if st is None or not daemon_pid(name):
        raise PairError(f"pair {name!r} is not up")
    dm = st["domains"][role]
    return nsutil.spawn_in(dm["pid"], cmd, group=dm["cgroup"],
                           packet_filter=role == "user" and "packet" in st["deny"],
                           env=procs.module_env(), **kw)
