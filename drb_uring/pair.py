"""A pair: a user domain and a driver domain with the monitor between them.

``drb up`` starts :func:`daemon` in the background; it builds the pair,
serves channels, and on SIGTERM (``drb down``) or a fatal error takes
everything down again: workers, domains, policies, cgroups, state.
Everything a pair has lives under /run/drb/NAME/ and
<cgroup2>/drb/NAME/; :func:`teardown_leftovers` removes what a dead daemon
left, using only those two places and the kernel's own lists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

from drb_uring import cgroup, monitor, nsutil, procs
from drb_uring.policy import DEFAULT_DENY, Policies, PolicyError

RUN = "/run/drb"
log = logging.getLogger("drb.pair")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,30}$")


DEFAULTS = {"backing": None, "size": 256 << 20, "blockdev": None, "o_direct": False,
            "attach_user": None, "attach_driver": None, "deny": list(DEFAULT_DENY),
            "no_monitor": False}


class PairError(RuntimeError):
    pass


def state_dir(name: str) -> str:
    return os.path.join(RUN, name)


def group_dir(name: str) -> str:
    return os.path.join(cgroup.cgroup2_root(), "drb", name)


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise PairError(f"bad pair name {name!r}: use 1-31 of a-z, 0-9, '-', '_'")


def read_state(name: str) -> dict | None:
    try:
        with open(os.path.join(state_dir(name), "state.json")) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def daemon_pid(name: str) -> int | None:
    try:
        with open(os.path.join(state_dir(name), "daemon.pid")) as f:
            pid = int(f.read())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None


class Pair:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.name = a.name
        self.dir = state_dir(a.name)
        self.sock = os.path.join(self.dir, "monitor.sock")
        self.group = group_dir(a.name) if not a.attach_user else None
        self.policies = Policies()
        self.inits: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}
        self.groups: dict[str, str] = {}
        self.mon: monitor.Monitor | None = None
        self.device = None

    # ---- set-up ------------------------------------------------------------

    def _device_path(self) -> tuple[str, tuple[int, int] | None]:
        a = self.a
        if a.blockdev:
            st = os.stat(a.blockdev)
            if not stat.S_ISBLK(st.st_mode):
                raise PairError(f"{a.blockdev} is not a block device")
            return a.blockdev, (os.major(st.st_rdev), os.minor(st.st_rdev))
        if a.backing:
            if not os.path.exists(a.backing):
                raise PairError(f"backing file {a.backing} does not exist")
            size = os.path.getsize(a.backing)
            if size < 1 << 20:
                raise PairError(f"backing file {a.backing} is too small "
                                f"({size} bytes; at least 1 MiB)")
            return os.path.abspath(a.backing), None
        path = os.path.join(self.dir, "driver", "backing.img")
        os.makedirs(os.path.dirname(path), mode=0o700)
        with open(path, "wb") as f:
            f.truncate(a.size)
        return path, None

    def _start_domain(self, role: str, hide: list[str]) -> None:
        group = os.path.join(self.group, role)
        cgroup.create(group)
        r, w = os.pipe()
        args = ["unshare", "--mount", "--pid", "--ipc", "--uts", "--net", "--fork",
                "--mount-proc", "--propagation", "private", sys.executable, "-m",
                "drb_uring.domain", "init", "--role", role,
                "--hostname", f"{self.name}-{role}", "--socket", self.sock,
                "--ready-fd", str(w)] + [x for h in hide for x in ("--hide", h)]

        def enter():
            cgroup.join(group)
            nsutil.die_with_parent()

        proc = subprocess.Popen(args, pass_fds=[w], preexec_fn=enter, env=procs.module_env(),
                                stdin=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as rf:
            ready = rf.readline().strip()
        if ready != "ready":
            raise PairError(f"the {role} domain did not start (see {self.dir}/daemon.log)")
        pid = None
        for _ in range(200):
            pid = nsutil.child_of(proc.pid)
            if pid:
                break
            time.sleep(0.005)
        self.inits[role] = proc
        self.pids[role] = pid
        self.groups[role] = group

    def _attach_domain(self, role: str, pid: int) -> None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise PairError(f"--attach-{role} {pid}: no such process") from None
        group = cgroup.path_of(pid)
        # A policy on a shared group would confine far more than the domain.
        if os.path.realpath(group) == os.path.realpath(cgroup.cgroup2_root()):
            raise PairError(f"--attach-{role} {pid}: the process is in the root cgroup; "
                            "put the container in a cgroup of its own first")
        if group == cgroup.path_of(os.getpid()):
            raise PairError(f"--attach-{role} {pid}: the process shares drb's own cgroup")
        if group in self.groups.values():
            raise PairError("the user and driver containers share one cgroup")
        self.pids[role] = pid
        self.groups[role] = group
        if role == "user":
            nsutil.bind_into(pid, self.sock, self.sock)

    def _spawn_worker(self, args: list[str], fds: list[int]):
        proc = nsutil.spawn_in(self.pids["driver"], [sys.executable, *args],
                               group=self.groups["driver"],
                               fds=fds, die_with_spawner=True, env=procs.module_env())
        for _ in range(400):
            pid = nsutil.child_of(proc.pid)
            if pid:
                return proc, pid
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        return proc, proc.pid

    def up(self) -> None:
        a = self.a
        dev_path, block = self._device_path()
        self.mon = monitor.Monitor(self.sock, spawn=self._spawn_worker,
                                   enforce=not a.no_monitor)
        if self.group:
            os.makedirs(os.path.dirname(self.group), exist_ok=True)
            try:
                cgroup.create(self.group)
            except FileExistsError:
                raise PairError(f"cgroup {self.group} exists: is pair {self.name!r} "
                                "up already, or left over? (drb down "
                                f"{self.name})") from None
            self._start_domain("driver", [])
            hide = [os.path.join(self.dir, "driver")]
            if not dev_path.startswith(self.dir) and not block:
                hide.append(os.path.dirname(dev_path))
            self._start_domain("user", hide)
        else:
            self._attach_domain("driver", a.attach_driver)
            self._attach_domain("user", a.attach_user)
        self.policies.device(self.groups["user"], None)
        self.policies.device(self.groups["driver"], block)
        self.policies.sockets(self.groups["user"], tuple(a.deny))
        if self.mon.ebpf:
            # Mode switches per domain, for drb trace and drb bench.
            for role in ("user", "driver"):
                self.mon.ebpf.watch(self.groups[role])
            self.mon.domains = dict(self.groups)
        # The driver domain opens the device itself and hands it over once.
        reg = nsutil.spawn_in(self.pids["driver"],
                              [sys.executable, "-m", "drb_uring.domain", "register",
                               "--socket", self.sock, "--device", dev_path]
                              + (["--o-direct"] if a.o_direct else []),
                              group=self.groups["driver"],
                              env=procs.module_env(), stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while reg.poll() is None and time.monotonic() < deadline:
            self.mon.step(0.05)
        if reg.poll() is None:
            reg.kill()
            raise PairError("the driver domain did not register its device in time")
        err = reg.stderr.read().decode().strip()
        reg.stderr.close()
        if reg.returncode != 0 or self.mon.device is None:
            raise PairError(err or "the driver domain could not register its device")
        self.state = {"name": self.name, "daemon_pid": os.getpid(), "socket": self.sock,
                      "device": dev_path, "device_size": self.mon.device.size,
                      "o_direct": a.o_direct, "attached": bool(a.attach_user),
                      "domains": {r: {"pid": self.pids[r], "cgroup": self.groups[r],
                                      "hostname": f"{self.name}-{r}"}
                                  for r in ("user", "driver")},
                      "deny": list(a.deny), "monitor": not a.no_monitor,
                      "started": time.time()}
        self._write_state()

    def _write_state(self) -> None:
        tmp = os.path.join(self.dir, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=2)
        os.replace(tmp, os.path.join(self.dir, "state.json"))

    # ---- tear-down ---------------------------------------------------------

    def down(self) -> None:
        if self.mon is not None:
            self.mon.close()
            self.mon = None
        for role, proc in self.inits.items():
            try:
                os.kill(self.pids[role], signal.SIGKILL)   # ends the whole pid namespace
            except (ProcessLookupError, TypeError):
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.policies.close()
        if self.group:
            cgroup.kill_and_remove(self.group)
            _remove_if_empty(os.path.dirname(self.group))
        if not self.group and self.pids.get("user"):
            nsutil.unbind_from(self.pids["user"], self.sock)


def _remove_if_empty(path: str) -> None:
    """The shared parents (<cgroup2>/drb, /run/drb) go with their last pair."""
    try:
        os.rmdir(path)
    except OSError:
        pass


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
        _remove_if_empty(os.path.dirname(g))
    d = state_dir(name)
    if os.path.isdir(d):
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d}")
    _remove_if_empty(RUN)
    return done


def _tell(fd: int, line: str) -> None:
    if fd >= 0:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass


def daemon(a: argparse.Namespace, ready_fd: int, log_to_stderr: bool = False) -> int:
    d = state_dir(a.name)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drb[%(process)d] %(message)s",
                        **({"stream": sys.stderr} if log_to_stderr
                           else {"filename": os.path.join(d, "daemon.log")}))
    pair = Pair(a)
    stop = []

    def on_signal(*_):
        stop.append(1)
        if pair.mon:
            pair.mon.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        pair.up()
        try:
            os.write(ready_fd, b"ok\n")
        except BrokenPipeError:
            pass
        os.close(ready_fd)
        ready_fd = -1
        log.info("pair %s up", a.name)
        if not stop:
            pair.mon.run()
    except (PairError, PolicyError, cgroup.CgroupError, OSError) as e:
        log.error("%s", e)
        _tell(ready_fd, f"error: {e}")
        status = 1
    except Exception as e:
        log.exception("pair %s failed", a.name)
        _tell(ready_fd, f"error: {type(e).__name__}: {e}")
        status = 1
    finally:
        try:
            pair.down()
        finally:
            log.info("pair %s down", a.name)
            logging.shutdown()
            shutil.rmtree(d, ignore_errors=True)
            _remove_if_empty(RUN)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry of the background daemon: python -m drb_uring.pair JSON READY_FD."""
    argv = sys.argv[1:] if argv is None else argv
    a = argparse.Namespace(**json.loads(argv[0]))
    return daemon(a, int(argv[1]))


if __name__ == "__main__":
    sys.exit(main())

