"""A pair's daemon: a user domain and a driver domain with the broker between.

``drb up`` starts it in the background (domains.control.start_pair); it
builds the pair, serves channels, and on SIGTERM (``drb down``) or a fatal
error takes everything down again: workers, domains, policies, cgroups,
state. Everything a pair has lives under /run/drb/NAME/ (no domain sees
it) and <cgroup2>/drb/NAME/.

The domains are containers made by runc (domains.runtime), or, in attach
mode, containers another runtime made (domains.attach). The device is
opened here, by the trusted side: the driver domain reaches it only through
the grant rings its workers inherit.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time

from drb_uring import linux, procs
from drb_uring.channel.broker import Broker, Limits
from drb_uring.channel.worker import WorkerSpec
from drb_uring.domains import attach, runtime
from drb_uring.domains.config import PairConfig
from drb_uring.domains.policy import Policies
from drb_uring.domains.state import (
    PairError,
    private_file,
    release_ids,
    remove_run_if_empty,
    reserve_ids,
    start_time,
    state_dir,
    write_state,
)
from drb_uring.errors import DrbError
from drb_uring.spec import Spec

log = logging.getLogger("drb.pair")
ROLES = ("user", "driver")


@dataclasses.dataclass(frozen=True)
class DaemonSpec(Spec):
    config: dict            # a PairConfig, checked again here
    ready_fd: int           # "ok" or "error: ..." goes there once

    def check(self) -> None:
        PairConfig.from_dict(self.config)


def _at_three(spec: WorkerSpec) -> WorkerSpec:
    """The spec a worker reads when its fds are placed at 3, 4, ... in the
    order the broker lists them (ring, ctl_user, ctl_driver, efds)."""
    return spec.replace(ring_fd=3, ring_fds=[4, 5, -1, 6, 7])


class Pair:
    def __init__(self, cfg: PairConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.dir = state_dir(cfg.name)
        # The user domain's socket, alone in a directory that is shown to it
        # at /run/drb/NAME; the control socket is the host's.
        self.sock_dir = os.path.join(self.dir, "user")
        self.sock = os.path.join(self.sock_dir, "monitor.sock")
        self.inside_sock = f"/run/drb/{cfg.name}/monitor.sock"
        self.control = os.path.join(self.dir, "control.sock")
        self.policies = Policies()
        self.domains: dict[str, runtime.Domain] = {}
        # attach mode: role -> [(mount point, directories made for it)]
        self.mounts: dict[str, list[tuple[str, list[str]]]] = {}
        self.pids: dict[str, int] = {}
        self.groups: dict[str, str] = {}
        self.ids: list[int] = []
        self.broker: Broker | None = None
        self.worker_log = os.path.join(self.dir, "workers.log")

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

    def _share_socket(self, host_id: int) -> None:
        """Let root of the user domain (host id `host_id`) connect."""
        os.chown(self.sock_dir, 0, host_id)
        os.chmod(self.sock_dir, 0o750)
        os.chown(self.sock, 0, host_id)
        os.chmod(self.sock, 0o660)

    def _make_domains(self) -> None:
        a = self.cfg
        self.ids = reserve_ids(self.name, len(ROLES))
        self._share_socket(self.ids[0])
        for role, host_id in zip(ROLES, self.ids, strict=True):
            spec = runtime.DomainSpec(
                pair=self.name, role=role, host_id=host_id,
                deny=tuple(a.deny) if role == "user" else (),
                socket_dir=self.sock_dir if role == "user" else None,
                rootfs=a.user_rootfs if role == "user" else a.driver_rootfs,
                pids=a.domain_pids, memory=a.domain_memory,
                io_uring=a.user_io_uring and role == "user")
            dom = runtime.Domain(self.dir, spec)
            # The group first, with its policies, then what runs in it.
            os.makedirs(dom.group, exist_ok=False)
            self.groups[role] = dom.group
            self._policies(role)
            self.domains[role] = dom
            dom.start()
            self.pids[role] = dom.pid

    def _attach_domains(self) -> None:
        a = self.cfg
        for role, pid in (("driver", a.attach_driver), ("user", a.attach_user)):
            self.groups[role] = attach.check_container(role, pid, list(self.groups.values()))
            self.pids[role] = pid
        self._share_socket(attach.root_host_id(self.pids["user"]))
        made = attach.bind_into(self.pids["user"], self.sock_dir, f"/run/drb/{self.name}",
                                readonly=False)
        self.mounts["user"] = [(f"/run/drb/{self.name}", made)]
        # drb's package, read-only, in both: the worker runs from it, the
        # user side's programs import the client from it.
        for role in ROLES:
            self.mounts.setdefault(role, []).append(
                (f"{runtime.PACKAGE_AT}/drb_uring", attach.share_package(self.pids[role])))
        for role in ROLES:
            self._policies(role)
        # The driver container must be able to run a worker: say why not now.
        probe = attach.spawn_joined(
            self.pids["driver"], [runtime.PYTHON, "-P", "-c", "import drb_uring.channel._worker"],
            role="driver", stderr=procs.NULL)
        if probe.wait(30) != 0:
            raise PairError(f"the driver container (pid {self.pids['driver']}) cannot run "
                            f"drb's worker: {runtime.PYTHON} with liburing.so.2 must be there, "
                            f"and drb's package is at {runtime.PACKAGE_AT}")

    def _policies(self, role: str) -> None:
        a = self.cfg
        self.policies.device(self.groups[role], None)
        if role == "user":
            self.policies.sockets(self.groups[role], tuple(a.deny))

    def worker_argv(self, spec: WorkerSpec) -> list[str]:
        """The worker's command line inside the driver domain."""
        return runtime.python_argv("drb_uring.channel.worker", spec)

    def _spawn_worker(self, spec: WorkerSpec, fds: list[int]):
        """Start a worker inside the driver domain, through its runtime."""
        argv = self.worker_argv(_at_three(spec))
        with private_file(self.worker_log, "ab") as out:
            if "driver" in self.domains:
                with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
                    pid_file = os.path.join(tmp, "pid")
                    child = procs.spawn_at(self.domains["driver"].exec_argv(
                        argv, preserve_fds=len(fds), pid_file=pid_file), fds,
                        stdout=out.fileno(), stderr=out.fileno())
                    for _ in range(2000):
                        if os.path.exists(pid_file) or child.poll() is not None:
                            break
                        time.sleep(0.005)
                    try:
                        with open(pid_file) as f:
                            return child, int(f.read())
                    except (OSError, ValueError):
                        return child, child.pid
            child = attach.spawn_joined(self.pids["driver"], argv, fds, role="driver",
                                        stdout=out.fileno(), stderr=out.fileno())
        for _ in range(2000):
            pid = attach.child_of(child.pid)
            if pid or child.poll() is not None:
                return child, pid or child.pid
            time.sleep(0.005)
        return child, child.pid

    def up(self) -> None:
        a = self.cfg
        dev_path, block = self._device_path()
        os.makedirs(self.sock_dir, mode=0o700)
        # Two slow starts side by side: the policies compile (clang) in a
        # thread while the broker connects to (or starts) the host's
        # enforcement service, which compiles the monitor's programs.
        errors: list[BaseException] = []

        def prepare():
            try:
                self.policies.prepare(tuple(a.deny))
            except BaseException as e:       # reported below, in this thread
                errors.append(e)
        compiling = threading.Thread(target=prepare, name="policies")
        compiling.start()
        try:
            self.broker = Broker(self.sock, control=self.control, spawn=self._spawn_worker,
                                 enforce=not a.no_monitor,
                                 **({"worker_spin_ns": a.worker_spin_ns}
                                    if a.worker_spin_ns is not None else {}),
                                 limits=Limits(channels=a.max_channels, pinned=a.max_pinned))
        finally:
            compiling.join()
        if errors:
            raise errors[0]
        # The device, opened here on the host: the driver domain reaches it
        # only through the grant rings.
        self.broker.open_device(dev_path, a.o_direct)
        if a.attached:
            self._attach_domains()
        else:
            self._make_domains()
        self.broker.watch_domains(self.groups)
        self.state = {
            "name": self.name, "daemon_pid": os.getpid(), "socket": self.inside_sock,
            "socket_host": self.sock, "control": self.control,
            "device": dev_path, "device_size": self.broker.device.size,
            "o_direct": a.o_direct, "attached": a.attached,
            "domains": {r: {"pid": self.pids[r], "cgroup": self.groups[r],
                            "started": start_time(self.pids[r]),
                            "hostname": attach.hostname_of(self.pids[r]),
                            "runc_id": self.domains[r].id if r in self.domains else None,
                            "host_id": self.ids[i] if self.ids else attach.root_host_id(
                                self.pids[r]),
                            "mounts": self.mounts.get(r, [])}
                        for i, r in enumerate(ROLES)},
            "runc_root": os.path.join(self.dir, "runc"),
            "deny": list(a.deny), "monitor": not a.no_monitor, "started": time.time()}
        write_state(self.name, self.state)

    # ---- tear-down ---------------------------------------------------------

    def down(self) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None
        for dom in self.domains.values():
            dom.stop()
        for role, mounts in self.mounts.items():
            for dst, made in reversed(mounts):
                attach.unbind(self.pids[role], dst, made)
        self.policies.close()
        if self.domains:
            runtime.remove_pair_groups(self.name)
        release_ids(self.name)


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
            remove_run_if_empty()
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
