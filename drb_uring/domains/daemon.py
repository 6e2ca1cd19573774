"""A pair's daemon: a user domain and a driver domain with the broker between.

``drb up`` starts it in the background (domains.control.start_pair); it
builds the pair, serves channels, and on SIGTERM (``drb down``) or a fatal
error takes everything down again: workers, domains, policies, cgroups,
state. Everything a pair has lives under /run/drb/NAME/ and
<cgroup2>/drb/NAME/.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

from drb_uring import linux, procs
from drb_uring.channel.broker import Broker, Limits
from drb_uring.domains import cgroup, nsutil
from drb_uring.domains.config import PairConfig
from drb_uring.domains.init import InitSpec, RegisterSpec
from drb_uring.domains.policy import Policies
from drb_uring.domains.state import (
    RUN,
    PairError,
    group_dir,
    remove_if_empty,
    start_time,
    state_dir,
    write_state,
)
from drb_uring.errors import DrbError
from drb_uring.spec import Spec

log = logging.getLogger("drb.pair")


@dataclasses.dataclass(frozen=True)
class DaemonSpec(Spec):
    config: dict            # a PairConfig, checked again here
    ready_fd: int           # "ok" or "error: ..." goes there once

    def check(self) -> None:
        PairConfig.from_dict(self.config)


class Pair:
    def __init__(self, cfg: PairConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.dir = state_dir(cfg.name)
        self.sock = os.path.join(self.dir, "monitor.sock")     # the user domain's
        self.control = os.path.join(self.dir, "control.sock")  # the host's: drb trace
        self.group = group_dir(cfg.name) if not cfg.attached else None
        self.policies = Policies()
        self.inits: dict[str, subprocess.Popen] = {}
        self.pids: dict[str, int] = {}
        self.groups: dict[str, str] = {}
        self.broker: Broker | None = None

    # ---- set-up ------------------------------------------------------------

    def _device_path(self) -> tuple[str, tuple[int, int] | None]:
        """The device's path and, for a block device, its numbers (checked
        already by domains.control)."""
        a = self.cfg
        if a.blockdev:
            st = os.stat(a.blockdev)
            if not stat.S_ISBLK(st.st_mode):
                raise PairError(f"{a.blockdev} is not a block device")
            return a.blockdev, (os.major(st.st_rdev), os.minor(st.st_rdev))
        if a.backing:
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
        spec = InitSpec(command="init", role=role, hostname=f"{self.name}-{role}",
                        socket=self.sock, ready_fd=w, hide=hide)
        args = ["unshare", "--mount", "--pid", "--ipc", "--uts", "--net", "--fork",
                "--mount-proc", "--propagation", "unchanged",
                *procs.argv("drb_uring.domains.init", spec)]

        def enter():
            cgroup.join(group)
            linux.die_with_parent()

        # Every process the daemon starts has its own session: a Ctrl-C in
        # the terminal of `drb up --foreground` reaches the daemon alone,
        # which then takes the pair down in order.
        proc = subprocess.Popen(args, pass_fds=[w], preexec_fn=enter, env=procs.module_env(),
                                start_new_session=True,
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

    def _spawn_worker(self, argv: list[str], fds: list[int]):
        proc = nsutil.spawn_in(self.pids["driver"], argv, start_new_session=True,
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
        a = self.cfg
        dev_path, block = self._device_path()
        # The broker's socket exists before the user domain, which binds it in.
        self.broker = Broker(self.sock, control=self.control, spawn=self._spawn_worker,
                             enforce=not a.no_monitor,
                             limits=Limits(channels=a.max_channels, pinned=a.max_pinned))
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
        self.broker.watch_domains(self.groups)
        # The driver domain opens the device itself and hands it over once,
        # on a socket pair: it never needs a path to the broker.
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.broker.add_peer(mine, "driver")
        spec = RegisterSpec(command="register", sock_fd=theirs.fileno(), device=dev_path,
                            o_direct=a.o_direct)
        try:
            reg = nsutil.spawn_in(self.pids["driver"],
                                  procs.argv("drb_uring.domains.init", spec),
                                  fds=[theirs.fileno()], start_new_session=True,
                                  group=self.groups["driver"], env=procs.module_env(),
                                  stderr=subprocess.PIPE)
        finally:
            theirs.close()
        if not self.broker.run_until(lambda: reg.poll() is not None, 20):
            reg.kill()
            reg.wait()
            raise PairError("the driver domain did not register its device in time")
        err = reg.stderr.read().decode().strip()
        reg.stderr.close()
        if reg.returncode != 0 or self.broker.device is None:
            raise PairError(err or "the driver domain could not register its device")
        self.state = {"name": self.name, "daemon_pid": os.getpid(), "socket": self.sock,
                      "control": self.control,
                      "device": dev_path, "device_size": self.broker.device.size,
                      "o_direct": a.o_direct, "attached": a.attached,
                      "domains": {r: {"pid": self.pids[r], "cgroup": self.groups[r],
                                      "started": start_time(self.pids[r]),
                                      "hostname": nsutil.hostname_of(self.pids[r])}
                                  for r in ("user", "driver")},
                      "deny": list(a.deny), "monitor": not a.no_monitor,
                      "started": time.time()}
        write_state(self.name, self.state)

    # ---- tear-down ---------------------------------------------------------

    def down(self) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None
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
            remove_if_empty(os.path.dirname(self.group))
        if not self.group and self.pids.get("user"):
            nsutil.unbind_from(self.pids["user"], self.sock)


def _tell(fd: int, line: str) -> None:
    if fd >= 0:
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass


def run(cfg: PairConfig, ready_fd: int, log_to_stderr: bool = False) -> int:
    """Bring the pair up, serve until SIGTERM or SIGINT, take it down."""
    d = state_dir(cfg.name)
    # Whatever the pair mounts stays in the pair: the daemon, and every
    # domain it starts, live in a mount namespace of their own.
    linux.private_mount_namespace()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drb[%(process)d] %(message)s",
                        **({"stream": sys.stderr} if log_to_stderr
                           else {"filename": os.path.join(d, "daemon.log")}))
    pair = Pair(cfg)
    stop = []

    def on_signal(*_):
        stop.append(1)
        if pair.broker:
            pair.broker.stop()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status = 0
    try:
        pair.up()
        _tell(ready_fd, "ok")
        ready_fd = _close(ready_fd)
        log.info("pair %s up", cfg.name)
        if not stop:
            pair.broker.run()
    except (DrbError, OSError) as e:
        log.error("%s", e)
        _tell(ready_fd, f"error: {e}")
        status = 1
    except Exception as e:
        log.exception("pair %s failed", cfg.name)
        _tell(ready_fd, f"error: {type(e).__name__}: {e}")
        status = 1
    finally:
        try:
            pair.down()
        finally:
            log.info("pair %s down", cfg.name)
            logging.shutdown()
            shutil.rmtree(d, ignore_errors=True)
            remove_if_empty(RUN)
    return status


def _close(fd: int) -> int:
    if fd >= 0:
        os.close(fd)
    return -1


def main(argv: list[str] | None = None) -> int:
    spec = procs.spec_from_argv(DaemonSpec, argv)
    return run(PairConfig.from_dict(spec.config), spec.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
