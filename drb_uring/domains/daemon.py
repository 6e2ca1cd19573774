"""A pair's daemon: user domains and a driver domain with the broker between.

``drb up`` starts it in the background (domains.control.start_pair); it
builds the pair (one driver domain, user domains user0 .. user{N-1}, each
with its own extent of the device and its own monitor socket), serves
channels, adds and removes user domains when the host asks on the pair's
control socket (``drb user add|rm``), and on SIGTERM (``drb down``) or a fatal
error takes everything down again: workers, domains, policies, cgroups,
state. Everything a pair has lives under /run/drb/NAME/ (no domain sees
it) and <cgroup2>/drb/NAME/.

The domains are containers made by runc (domains.runtime), or, in attach
mode, containers another runtime made (domains.attach). The device is
opened here, by the trusted side: the driver domain reaches it only through
the grant rings its workers inherit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import stat
import sys
import threading
import time

from drb_uring import linux, procs
from drb_uring.channel.broker import Broker, Limits
from drb_uring.channel.worker import WorkerSpec
from drb_uring.disk import frontend
from drb_uring.disk.frontend import UserDisk
from drb_uring.domains import attach, backing, cgroup, runtime
from drb_uring.domains.config import PairConfig, check_share, split_device, user_index
from drb_uring.domains.hostops import HostOps
from drb_uring.domains.journal import Journal
from drb_uring.domains.policy import Policies
from drb_uring.domains.state import (
    PairError,
    private_file,
    release_id,
    release_ids,
    remove_run_if_empty,
    reserve_ids,
    start_time,
    state_dir,
    write_state,
)
from drb_uring.domains.stats import PairStats
from drb_uring.errors import DrbError
from drb_uring.spec import Spec, SpecError

log = logging.getLogger("drb.pair")


@dataclasses.dataclass(frozen=True)
class DaemonSpec(Spec):
    config: dict            # a PairConfig, checked again here
    ready_fd: int           # "ok" or "error: ..." goes there once

    def check(self) -> None:
        PairConfig.from_dict(self.config)


@dataclasses.dataclass
class UserDomain:
    """One user domain of a pair: its extent of the device and its socket,
    alone in a directory that is shown to it (and no other) at
    /run/drb/PAIR."""

    name: str                        # userK
    extent: tuple[int, int]          # (base, size) of the device
    sock_dir: str                    # /run/drb/PAIR/users/userK
    host_id: int = 0                 # root inside is this host id
    reserved: bool = False           # host_id is the pair's (reserve_ids), to give back
    tenant: bool = False             # the broker serves its socket
    loop: str | None = None          # the loop device that is its extent, if it has one
    disk: UserDisk | None = None     # its disk (drb up --disk)
    container: str | None = None     # the OCI container it is (an attached one), if known
    hostname: str | None = None      # its host name, when it is not set yet (an OCI hook)
    up: bool = False                 # came up (its end is an event then)

    @property
    def sock(self) -> str:
        return os.path.join(self.sock_dir, "monitor.sock")

    @property
    def index(self) -> int:
        return user_index(self.name)


class Pair:
    def __init__(self, cfg: PairConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.dir = state_dir(cfg.name)
        # Each user domain's socket, alone in a directory that is shown to
        # that domain only, at /run/drb/NAME; the control socket is the host's.
        self.users_dir = os.path.join(self.dir, "users")
        self.inside_sock = f"/run/drb/{cfg.name}/monitor.sock"
        self.control = os.path.join(self.dir, "control.sock")
        self.policies = Policies()
        self.users: dict[str, UserDomain] = {}
        # Per domain ("driver", "user0", ...): its runc container (if drb
        # made it), pid, cgroup, and in attach mode [(mount point, dirs made)].
        self.domains: dict[str, runtime.Domain] = {}
        self.mounts: dict[str, list[tuple[str, list[str]]]] = {}
        self.pids: dict[str, int] = {}
        self.groups: dict[str, str] = {}
        self.ids: dict[str, int] = {}
        self.extent_size = 0             # a user domain's extent, unless --extent says
        self.broker: Broker | None = None
        # Extents of removed user domains: zeroed once their rings are gone
        # (wiping), or, if that failed, never given out again (unwipeable).
        self.wiping: set[tuple[int, int]] = set()
        self.unwipeable: set[tuple[int, int]] = set()
        self.state: dict = {}
        self.worker_log = os.path.join(self.dir, "workers.log")
        self.journal = Journal(cfg.name)
        self.stats = PairStats(cfg.name, lambda: self.broker)

    def observe(self, event: str, fields: dict) -> None:
        """What happened in the pair: counted, and kept in its event log."""
        self.stats.on_event(event, fields)
        self.journal(event, **fields)

    @property
    def sock(self) -> str | None:
        """user0's socket on the host (what a single-user pair had)."""
        u = self.users.get("user0")
        return u.sock if u else None

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

    def _share_socket(self, u: UserDomain, host_id: int) -> None:
        """Let root of the user domain (host id `host_id`) connect."""
        os.chown(u.sock_dir, 0, host_id)
        os.chmod(u.sock_dir, 0o750)
        os.chown(u.sock, 0, host_id)
        os.chmod(u.sock, 0o660)

    def _domain_spec(self, role: str, host_id: int, socket_dir: str | None) -> runtime.DomainSpec:
        a = self.cfg
        user = role != "driver"
        return runtime.DomainSpec(
            pair=self.name, role=role, host_id=host_id,
            deny=tuple(a.deny) if user else (),
            socket_dir=socket_dir,
            rootfs=a.user_rootfs if user else a.driver_rootfs,
            pids=a.domain_pids, memory=a.domain_memory,
            io_uring=a.user_io_uring and user,
            shares=tuple(check_share(x) for x in a.share) if user else (),
            own_dirs=(a.fs_mount,) if user and a.fs else ())

    def _start_domain(self, role: str, spec: runtime.DomainSpec) -> None:
        dom = runtime.Domain(self.dir, spec)
        # The group first, with its policies, then what runs in it.
        os.makedirs(dom.group, exist_ok=False)
        self.groups[role] = dom.group
        self._policies(role)
        self.domains[role] = dom
        dom.start()
        self.pids[role] = dom.pid

    def _make_driver(self) -> None:
        self.ids["driver"] = reserve_ids(self.name, 1)[0]
        self._start_domain("driver", self._domain_spec("driver", self.ids["driver"], None))
        # The domain's processes do not even see its workers (each a user of
        # its own, none dumpable) in /proc.
        attach.hide_others_in_proc(self.pids["driver"])

    def _attach_driver(self) -> None:
        pid = self.cfg.attach_driver
        self.groups["driver"] = attach.check_container("driver", pid, list(self.groups.values()),
                                                       self.cfg.allow_host_userns)
        self.pids["driver"] = pid
        # drb's package, read-only: the worker runs from it.
        self.mounts["driver"] = [(f"{runtime.PACKAGE_AT}/drb_uring", attach.share_package(pid))]
        self._policies("driver")
        # The driver container must be able to run a worker: say why not now.
        probe = attach.spawn_joined(
            pid, [runtime.PYTHON, "-P", "-c", "import drb_uring.channel._worker"],
            role="driver", stderr=procs.NULL)
        if probe.wait(30) != 0:
            raise PairError(f"the driver container (pid {pid}) cannot run "
                            f"drb's worker: {runtime.PYTHON} with liburing.so.2 must be there, "
                            f"and drb's package is at {runtime.PACKAGE_AT}")

    def _limits(self) -> Limits:
        return Limits(channels=self.cfg.max_channels, pinned=self.cfg.max_pinned)

    def add_user(self, name: str, extent: tuple[int, int], attach_pid: int | None = None,
                 container: str | None = None, rootfs: str | None = None,
                 disk: bool | None = None, hostname: str | None = None) -> None:
        """Bring up user domain `name` on `extent` of the device: its socket
        (the broker's tenant), then its container (made here, or an existing
        one in attach mode, whose root is at `rootfs` if it has not moved
        there yet), then its disk (`disk`, or the pair's --disk). On failure
        whatever was made is removed."""
        if disk is None:
            disk = self.cfg.disk
        if name in self.users:
            raise PairError(f"pair {self.name} already has a user domain {name}")
        u = UserDomain(name, extent, os.path.join(self.users_dir, name),
                       container=container, hostname=hostname)
        self.users[name] = u
        try:
            os.makedirs(u.sock_dir, mode=0o700)
            device_fd = -1
            if self.cfg.uses_loop_extents:
                # Its grant rings reach this device only: the kernel refuses
                # a request past the extent, whatever the monitor saw in time.
                dev = self.broker.device
                u.loop, device_fd = backing.loop_device(dev.fd, extent[0], extent[1],
                                                        max(dev.align, 512), self.cfg.o_direct)
            self.broker.add_tenant(name, u.sock, extent, limits=self._limits(),
                                   device_fd=device_fd)
            u.tenant = True
            if attach_pid is not None:
                self.groups[name] = attach.check_container(
                    "user", attach_pid, list(self.groups.values()), self.cfg.allow_host_userns)
                self.pids[name] = attach_pid
                u.host_id = attach.root_host_id(attach_pid)
                self._share_socket(u, u.host_id)
                self.mounts[name] = [(f"/run/drb/{self.name}", attach.bind_into(
                    attach_pid, u.sock_dir, f"/run/drb/{self.name}", readonly=False,
                    under=rootfs or ""))]
                # drb's package, read-only: the user side imports the client from it.
                self.mounts[name].append((f"{runtime.PACKAGE_AT}/drb_uring",
                                          attach.share_package(attach_pid, rootfs or "")))
                self._policies(name)
            else:
                u.host_id = reserve_ids(self.name, 1)[0]
                u.reserved = True
                self._share_socket(u, u.host_id)
                self._start_domain(name, self._domain_spec(name, u.host_id, u.sock_dir))
            self.broker.watch_domains({name: self.groups[name]})
            if disk:
                frontend.bring_up(self, u)
        except BaseException:
            # What went wrong is what the caller hears; a clean-up step that
            # fails too (its group never made, say) is only logged.
            try:
                self.remove_user(name)
            except Exception:   # noqa: BLE001
                log.exception("cleaning up after user domain %s failed to come up", name)
            raise
        log.info("user domain %s up: pid %d, extent %d+%d", name, self.pids[name], *extent)
        u.up = True
        self.journal("user-added", user=name, pid=self.pids[name], extent=list(extent),
                     **({"container": container} if container else {}),
                     **({"disk": True} if disk else {}))

    def remove_user(self, name: str) -> None:
        """Take user domain `name` down: its channels (the broker stops their
        workers and tells their user sides), its container or mounts, its
        policies, cgroup, host ids and socket directory. The other user
        domains are not touched."""
        u = self.users.get(name)
        if u is None:
            raise PairError(f"pair {self.name} has no user domain {name}")
        group = self.groups.get(name)
        errors = []

        def step(fn, *args):
            try:
                fn(*args)
            except Exception as e:       # the rest must still go
                log.exception("removing user domain %s", name)
                errors.append(e)
        if u.disk is not None:
            step(u.disk.down)            # its server's channel goes with it
            u.disk = None
        if u.tenant and self.broker is not None:
            step(self.broker.remove_tenant, name)
            u.tenant = False
        if self.broker is not None and group:
            step(self._unwatch, name, group)
        dom = self.domains.pop(name, None)
        if dom is not None:
            step(dom.stop)
        for dst, made in reversed(self.mounts.pop(name, [])):
            step(attach.unbind, self.pids[name], dst, made)
        if group:
            step(self.policies.detach, group)
            if dom is not None:
                step(runtime.remove_domain_groups, self.name, name)
        if u.reserved:
            step(release_id, self.name, u.host_id)
        shutil.rmtree(u.sock_dir, ignore_errors=True)
        if dom is not None:
            shutil.rmtree(dom.bundle, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(dom.log)
        self.groups.pop(name, None)
        self.pids.pop(name, None)
        del self.users[name]
        log.info("user domain %s removed", name)
        if u.up:
            self.observe("user-removed", {"user": name})
        else:
            self.stats.on_event("user-removed", {"user": name})
        if errors:
            raise PairError(f"removing user domain {name}: {errors[0]}")

    def _unwatch(self, name: str, group: str) -> None:
        self.broker.unwatch_domain(name)

    def _policies(self, role: str) -> None:
        a = self.cfg
        self.policies.device(self.groups[role], None)
        if role != "driver":
            self.policies.sockets(self.groups[role], tuple(a.deny))

    def worker_argv(self, spec: WorkerSpec) -> list[str]:
        """The worker's command line inside the driver domain."""
        return runtime.python_argv("drb_uring.channel.worker", spec)

    def _spawn_worker(self, spec: WorkerSpec, fds: list[int]):
        """Start a worker inside the driver domain, through its runtime, as
        the user of its own the broker chose (spec.uid)."""
        return self.spawn_in("driver", self.worker_argv(spec.placed()), fds, self.worker_log,
                             uid=spec.uid if spec.uid >= 0 else 0)

    def spawn_in(self, role: str, argv: list[str], fds: list[int], log_path: str,
                 uid: int = 0, env: dict | None = None):
        """Start argv inside domain `role` (fds[i] as its fd 3 + i, output to
        `log_path`), as user `uid` of the domain. Returns (the process
        standing in for it on the host, the pid of the program itself)."""
        if env:
            argv = ["/usr/bin/env", *(f"{k}={v}" for k, v in env.items()), *argv]
        with private_file(log_path, "ab") as out:
            if role in self.domains:
                return self.domains[role].spawn(argv, fds, out.fileno(), uid=uid)
            return attach.spawn_in(self.pids[role], argv, fds, out.fileno(),
                                   role="driver" if role == "driver" else "user",
                                   deny=tuple(self.cfg.deny) if role != "driver" else (),
                                   uid=uid)

    def run_in(self, role: str, argv: list[str], timeout: float = 120) -> tuple[int, str]:
        """Run argv inside domain `role` as its root and wait, the broker's
        loop turning meanwhile (a disk's server needs it): (status, output)."""
        log_path = os.path.join(self.dir, f"{role}.run.log")
        child, _pid = self.spawn_in(role, argv, [], log_path)
        if not self.broker.run_until(lambda: child.poll() is not None, timeout):
            child.kill()
        rc = child.wait()
        try:
            with open(log_path, errors="replace") as f:
                out = f.read()
            os.unlink(log_path)
        except OSError:
            out = ""
        return rc, out

    def _tenant_gone(self, name: str, extent: tuple[int, int] | None) -> None:
        """The broker: a removed user domain's last ring is gone. An extent
        its removal was asked for (drb user rm) is zeroed now, before
        anyone else may have it; one that only failed to come up, or the
        pair going down, keeps its bytes."""
        if extent is None or extent not in self.wiping:
            return
        try:
            how, took = backing.wipe_timed(self.broker.device.fd, *extent)
            log.info("user domain %s's extent %d+%d wiped (%s) in %.3f s", name, *extent,
                     how, took)
        except OSError as e:
            log.error("user domain %s's extent %d+%d could not be wiped: %s; it stays "
                      "taken", name, *extent, e)
            self.unwipeable.add(extent)
        self.wiping.discard(extent)

    def _ring_holders(self, inode: int) -> list[int]:
        """The driver domain's processes that hold the ring `inode` open."""
        group = self.groups.get("driver")
        return cgroup.holders(group, inode) if group else []

    def _sweep(self, uid: int) -> None:
        """End whatever a worker that ran as `uid` left in the driver domain
        (a worker cannot fork once confined; whatever holds its user's id
        there came from it)."""
        group, pid = self.groups.get("driver"), self.pids.get("driver")
        if group and pid:
            cgroup.kill_user(group, attach.host_uid(pid, uid))

    def _driver_cpus(self) -> list[int] | None:
        n = self.cfg.driver_cpus
        if not n:
            return None
        mine = sorted(os.sched_getaffinity(0))
        if n > len(mine):
            raise PairError(f"--driver-cpus {n}: this host gives the pair only "
                            f"{len(mine)} CPUs")
        return mine[:n]

    def up(self) -> None:
        a = self.cfg
        dev_path, block = self._device_path()
        os.makedirs(self.users_dir, mode=0o711)
        os.chmod(self.users_dir, 0o711)          # traversable, like /run/drb/NAME
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
            self.broker = Broker(None, control=self.control, spawn=self._spawn_worker,
                                 enforce=not a.no_monitor,
                                 **({"worker_spin_ns": a.worker_spin_ns}
                                    if a.worker_spin_ns is not None else {}),
                                 limits=self._limits(),
                                 worker_cpus=self._driver_cpus(),
                                 monitor_restart=a.restart,
                                 holders=self._ring_holders, sweep=self._sweep,
                                 gone=self._tenant_gone, observe=self.observe,
                                 host_ops=HostOps(self).table())
        finally:
            compiling.join()
        if errors:
            raise errors[0]
        # The device, opened here on the host (exclusively: a mounted block
        # device or a file another pair holds is refused): the driver domain
        # reaches it only through the grant rings.
        self.broker.adopt_device(backing.take(dev_path, a.o_direct, a.exclusive))
        dev = self.broker.device
        try:
            extents = split_device(dev.size, a.users, a.extent, dev.align)
        except SpecError as e:
            raise PairError(str(e)) from None
        self.extent_size = extents[0][1]
        if a.attached:
            self._attach_driver()
        else:
            self._make_driver()
        # A driver domain drb made dies with its broker (attached: its owner's).
        self.broker.watch_domains({"driver": self.groups["driver"]},
                                  None if a.attached else "driver")
        for k, extent in enumerate(extents):
            self.add_user(f"user{k}", extent, a.attach_user)
        self.state = {
            "name": self.name, "daemon_pid": os.getpid(), "control": self.control,
            "device": dev_path, "device_size": dev.size, "align": dev.align,
            "o_direct": a.o_direct, "attached": a.attached,
            "runc_root": os.path.join(self.dir, "runc"),
            "deny": list(a.deny), "monitor": not a.no_monitor, "started": time.time(),
            "max_users": a.max_users, "disk": a.disk, "config": a.to_dict()}
        self.write_state()
        self.journal("pair-up", device=dev_path, users=sorted(self.users, key=user_index),
                     monitor=not a.no_monitor, daemon_pid=os.getpid())

    def _domain_state(self, role: str) -> dict:
        pid = self.pids[role]
        u = self.users.get(role)
        out = {"pid": pid, "cgroup": self.groups[role], "started": start_time(pid),
               "hostname": u.hostname if u and u.hostname else attach.hostname_of(pid),
               "runc_id": self.domains[role].id if role in self.domains else None,
               "host_id": self.ids.get(role) or (self.users[role].host_id if role in self.users
                                                 else attach.root_host_id(pid)),
               "mounts": self.mounts.get(role, [])}
        if u is not None:
            out.update(index=u.index, extent=list(u.extent), socket=self.inside_sock,
                       socket_host=u.sock, device=u.loop, container=u.container,
                       **frontend.state_of(u))
        return out

    def write_state(self) -> None:
        """state.json: the pair, and each domain by name; "user" stays the
        name of user0 for those that knew one user domain only."""
        old = {r: d for r, d in self.state.get("domains", {}).items() if r != "user"}
        domains = {}
        for role in ["driver", *sorted(self.users, key=user_index)]:
            # What does not change (pid, hostname) is read once.
            if role in old and old[role]["pid"] == self.pids[role]:
                domains[role] = {**old[role], "mounts": self.mounts.get(role, []),
                                 **frontend.state_of(self.users.get(role))}
            else:
                domains[role] = self._domain_state(role)
        if "user0" in domains:
            domains = {"user": domains["user0"], **domains}
        self.state.update(
            domains=domains, users=sorted(self.users, key=user_index),
            extent_size=self.extent_size, socket=self.inside_sock, socket_host=self.sock)
        write_state(self.name, self.state)

    # ---- tear-down ---------------------------------------------------------

    def down(self) -> None:
        for u in self.users.values():
            if u.disk is not None:
                try:
                    u.disk.down()
                except Exception:     # noqa: BLE001 - the rest must still go
                    log.exception("taking user domain %s's disk down", u.name)
                u.disk = None
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
    status, why, was_up = 0, "stopped", False
    try:
        pair.up()
        was_up = True
        _tell(ready_fd, "ok")
        if ready_fd >= 0:           # -1 in the foreground (drb up --foreground)
            os.close(ready_fd)
        ready_fd = -1
        log.info("pair %s up", cfg.name)
        if not stop:
            pair.broker.run()
    except (DrbError, OSError) as e:
        log.error("%s", e)
        _tell(ready_fd, f"error: {e}")
        status, why = 1, str(e)
    except Exception as e:
        log.exception("pair %s failed", cfg.name)
        _tell(ready_fd, f"error: {type(e).__name__}: {e}")
        status, why = 1, f"{type(e).__name__}: {e}"
    finally:
        try:
            pair.down()
        finally:
            pair.journal("pair-down" if was_up else "pair-failed", reason=why)
            log.info("pair %s down", cfg.name)
            logging.shutdown()
            shutil.rmtree(d, ignore_errors=True)
            remove_run_if_empty()
    return status


def main(argv: list[str] | None = None) -> int:
    spec = procs.spec_from_argv(DaemonSpec, argv)
    return run(PairConfig.from_dict(spec.config), spec.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
